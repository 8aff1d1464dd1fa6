//! A keyspace at run time: the entry state of one named cache and the one door every change
//! goes through. It owns its configuration, its L1 tier, its in-flight loads (single flight and
//! their leases), the overlay of pending write-behind writes, and — for a sourced keyspace — its
//! binding to a Postgres table. It calls nothing above it: the patterns (`patterns::*`) decide
//! *when* to read, load, write or refresh; this module decides *whether* a result may be
//! installed (see `cache` for the ordering rules).
//!
//! The door: [`Keyspace::mutate`], [`Keyspace::invalidate`], [`Keyspace::clear`] and
//! [`Keyspace::write_pending`] first mark the key's in-flight load stale, then change the state,
//! so a load that read the row before the change never installs its older result after it.
//! Every producer of change events — writes, the CDC applier, the warm load, write-behind, the
//! flusher — enters through it; [`Keyspace::load`] is the only fill.
//!
//! A sourced keyspace is *not ready* until its table has been read from the catalog and the
//! configuration checked against it; until then its requests answer 503 and `/readyz` says why.
//! Binding is retried in the background, so a sidecar that starts before its database comes up
//! becomes ready by itself.

pub mod config;
pub mod freshness;
pub mod overlay;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus::{Histogram, IntCounter};

use crate::cache::{Entry, Flights, Install, Installed, L1, Lease, Merged};
use crate::hlc::Hlc;
use crate::key::{self, Key, KeyError};
use crate::keyspace::config::KeyspaceConfig;
use crate::l2::{Guarded, Tier};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::source::SourceError;
use crate::source::postgres::schema::{Binding, TableMeta};
use crate::source::postgres::{PgPool, TableSource};
use freshness::Freshness;
use overlay::{Overlay, Pending};

/// What a keyspace operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyspaceError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Why a keyspace could not be bound to its table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// Postgres could not be asked; try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The table is missing or does not fit the keyspace's configuration.
    #[error("{0}")]
    Unfit(String),
}

/// Where a read's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Served from L1.
    Hit,
    /// Served from this node's pending write-behind write (not yet in Postgres).
    Pending,
    /// Loaded from the source by this read (or by the flight it joined).
    Miss,
    /// Served from L1 late in the entry's life, with a background refresh underway.
    Refreshing,
    /// Loaded from the shared L2 tier (Redis) by this read (or by the flight it joined).
    L2,
}

/// Keys and their entries, as a snapshot hands them out.
pub type Entries = Vec<(Arc<str>, Arc<Entry>)>;

/// A read's answer: the entry (possibly negative) and where it came from.
#[derive(Debug, Clone)]
pub struct Read {
    pub entry: Arc<Entry>,
    pub origin: Origin,
    /// Set only when the answer is outside the freshness contract (it could not be reloaded):
    /// how far behind the database it may be. `None`: within the contract.
    pub lag: Option<Lag>,
}

/// How far behind the database an answer may be, when that is more than the contract allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// At most this far behind.
    Behind(Duration),
    /// Not known: the change stream has not caught up since this process started.
    Unknown,
}

/// The result every caller of one load flight receives.
pub type LoadResult = Result<Arc<Entry>, SourceError>;

/// What a read's load found: the entry, and whether L2 had it (else the source answered).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub entry: Arc<Entry>,
    pub from_l2: bool,
}

/// Counters of one keyspace, resolved once so the hot path does no label lookups.
pub struct KeyspaceMetrics {
    pub hits_l1: IntCounter,
    pub hits_l2: IntCounter,
    pub misses: IntCounter,
    pub loads_found: IntCounter,
    pub loads_absent: IntCounter,
    pub loads_error: IntCounter,
    pub load_seconds: Histogram,
    pub fills_skipped: IntCounter,
    /// Reads outside the freshness contract, reloaded from Postgres.
    pub stale_reloaded: IntCounter,
    /// Reads outside the freshness contract, served with their lag reported.
    pub stale_served: IntCounter,
}

impl KeyspaceMetrics {
    fn new(m: &Metrics, ks: &str) -> Self {
        KeyspaceMetrics {
            hits_l1: m.cache_hits.with_label_values(&[ks, "l1"]),
            hits_l2: m.cache_hits.with_label_values(&[ks, "l2"]),
            misses: m.cache_misses.with_label_values(&[ks]),
            loads_found: m.loads.with_label_values(&[ks, "found"]),
            loads_absent: m.loads.with_label_values(&[ks, "absent"]),
            loads_error: m.loads.with_label_values(&[ks, "error"]),
            load_seconds: m.load_duration.with_label_values(&[ks]),
            fills_skipped: m.fills_skipped.with_label_values(&[ks]),
            stale_reloaded: m.stale_reads.with_label_values(&[ks, "reloaded"]),
            stale_served: m.stale_reads.with_label_values(&[ks, "served"]),
        }
    }
}

/// What keeps a keyspace from serving, by the part that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Blocker {
    /// The table has not been read and checked.
    Bind,
    /// Change data capture: warming from a snapshot, or the stream is down.
    Cdc,
    /// The table changed in a way the keyspace's configuration no longer fits.
    Schema,
}

/// Who hears of every change the door lets through, after it is installed (the RESP front's
/// client tracking). Called inline on the changing task: it must be quick and never block.
pub trait Watch: Send + Sync {
    /// `key`'s state changed (written, deleted, invalidated, dropped for room or age).
    fn changed(&self, keyspace: &str, key: &str);
    /// Every key of the keyspace may have changed (a TRUNCATE, a reset).
    fn cleared(&self, keyspace: &str);
}

/// A test hook run after a load's query returned and before its result is installed.
pub type LoadHook = Arc<dyn Fn(Arc<str>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// One keyspace.
pub struct Keyspace {
    pub config: KeyspaceConfig,
    l1: L1,
    flights: Flights<LoadResult>,
    source: RwLock<Option<Arc<TableSource>>>,
    blockers: Mutex<std::collections::BTreeMap<Blocker, String>>,
    load_hook: RwLock<Option<LoadHook>>,
    /// Write-behind writes not yet flushed: reads see them first.
    pending: Overlay,
    pub(crate) hlc: Arc<Hlc>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) m: KeyspaceMetrics,
    max_key_bytes: usize,
    /// The freshness contract, for a keyspace fed by change data capture.
    freshness: OnceLock<Arc<Freshness>>,
    /// Source position below which no state is accepted any more (see [`Keyspace::reset_below`]).
    floor: AtomicU64,
    /// The change stream keeps the keyspace up to date (see [`Keyspace::set_followed`]).
    followed: AtomicBool,
    /// The shared L2 tier, for a keyspace with `l2 = true`.
    l2: OnceLock<Arc<Tier>>,
    /// In-flight L2 reads: their leases, like the source loads'.
    l2_flights: Flights<Option<Arc<Entry>>>,
    /// Told of every change after it is installed (see [`Watch`]).
    watch: Arc<OnceLock<Arc<dyn Watch>>>,
}

impl Keyspace {
    pub fn new(config: KeyspaceConfig, hlc: Arc<Hlc>, metrics: Arc<Metrics>, max_key_bytes: usize) -> Keyspace {
        let mut blockers = std::collections::BTreeMap::new();
        if let Some(t) = &config.table {
            blockers.insert(
                Blocker::Bind,
                format!("table {t} has not been bound yet (waiting for Postgres)"),
            );
        }
        Keyspace {
            l1: L1::with_store(config.store, config.capacity, config.ttl, config.negative_ttl),
            flights: Flights::default(),
            source: RwLock::new(None),
            blockers: Mutex::new(blockers),
            load_hook: RwLock::new(None),
            pending: Overlay::default(),
            m: KeyspaceMetrics::new(&metrics, &config.name),
            metrics,
            hlc,
            max_key_bytes,
            config,
            freshness: OnceLock::new(),
            floor: AtomicU64::new(0),
            followed: AtomicBool::new(true),
            l2: OnceLock::new(),
            l2_flights: Flights::default(),
            watch: Arc::default(),
        }
    }

    /// Has `watch` told of every change from now on. For an in-memory keyspace, a document
    /// dropped for room or age is a change too (it is gone, not reloadable). Set once.
    pub fn set_watch(&self, watch: Arc<dyn Watch>) {
        if self.watch.set(watch).is_err() || self.is_sourced() || self.config.federate {
            return;
        }
        let (hook, name) = (self.watch.clone(), self.config.name.clone());
        self.l1.on_dropped(Box::new(move |key| {
            if let Some(w) = hook.get() {
                w.changed(&name, key);
            }
        }));
    }

    /// Tells the watch that `key` changed.
    fn changed(&self, key: &str) {
        if let Some(w) = self.watch.get() {
            w.changed(&self.config.name, key);
        }
    }
    /// Puts the keyspace behind the shared L2 tier.
    pub fn set_l2(&self, tier: Arc<Tier>) {
        let _ = self.l2.set(tier);
    }

    /// The keyspace's L2 tier, if it has one.
    pub fn l2(&self) -> Option<&Arc<Tier>> {
        self.l2.get()
    }

    /// Marks the key's in-flight loads (from the source and from L2) stale.
    fn invalidate_flights(&self, key: &str) {
        self.flights.invalidate(key);
        if self.l2.get().is_some() {
            self.l2_flights.invalidate(key);
        }
    }

    /// Whether an L1 entry may be served without revalidation (see `l2`): always, without an
    /// L2 tier.
    pub fn trusts(&self, entry: &Entry) -> bool {
        self.l2.get().is_none_or(|t| t.trusts(entry))
    }

    /// Puts the keyspace under the freshness contract of its change stream.
    pub fn set_freshness(&self, f: Arc<Freshness>) {
        let _ = self.freshness.set(f);
    }

    /// Whether `entry` is within the freshness contract (always, without one).
    pub fn is_fresh(&self, entry: &Entry) -> bool {
        self.is_fresh_read(entry.read_at)
    }

    /// Whether state read from Postgres at `read_at` (`None`: only what the stream brought, or
    /// the absence of an entry) is within the freshness contract.
    pub fn is_fresh_read(&self, read_at: Option<tokio::time::Instant>) -> bool {
        self.freshness
            .get()
            .is_none_or(|f| f.is_fresh_as(read_at, self.followed.load(Ordering::Acquire)))
    }

    /// Whether the change stream keeps this keyspace up to date. Off while its table cannot be
    /// followed: then the stream's watermark says nothing about it, and only an entry's own
    /// read from Postgres makes it fresh.
    pub fn set_followed(&self, on: bool) {
        self.followed.store(on, Ordering::Release);
    }

    /// How far behind the database this keyspace's cached state may be.
    pub fn lag(&self) -> Lag {
        match self.freshness.get().map(|f| f.behind()) {
            Some(Some(d)) => Lag::Behind(d),
            Some(None) => Lag::Unknown,
            None => Lag::Behind(Duration::ZERO),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the keyspace has a table behind it.
    pub fn is_sourced(&self) -> bool {
        self.config.table.is_some()
    }

    /// The bound table, or `NotReady` with the reason.
    pub fn source(&self) -> Result<Arc<TableSource>, SourceError> {
        if let Some(s) = self.source.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(s.clone());
        }
        Err(SourceError::NotReady {
            keyspace: self.config.name.clone(),
            reason: self.readiness().err().unwrap_or_else(|| "not bound".into()),
        })
    }

    /// `Ok` when the keyspace can serve, or why it cannot.
    pub fn readiness(&self) -> Result<(), String> {
        match self.blockers.lock().unwrap_or_else(|p| p.into_inner()).values().next() {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }

    /// Makes room in L1 for about `entries` more entries ahead of a bulk load.
    pub fn reserve(&self, entries: usize) {
        self.l1.reserve(entries);
    }

    /// Sets (or, with `None`, lifts) one reason the keyspace cannot serve.
    pub fn set_blocker(&self, kind: Blocker, reason: Option<String>) {
        let ready = {
            let mut b = self.blockers.lock().unwrap_or_else(|p| p.into_inner());
            match reason {
                Some(r) => b.insert(kind, r),
                None => b.remove(&kind),
            };
            b.is_empty()
        };
        self.metrics
            .keyspace_ready
            .with_label_values(&[&self.config.name])
            .set(ready as i64);
    }

    /// Installs a hook run between a load's query and its install (tests use it to hold a load
    /// open while the row changes).
    pub fn set_load_hook(&self, hook: Option<LoadHook>) {
        *self.load_hook.write().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    fn load_hook(&self) -> Option<LoadHook> {
        self.load_hook.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the table's metadata and binds the keyspace to it; `true` when it was bound before
    /// and the documents it makes have changed shape (see [`Binding::same_shape`]) — what is
    /// cached was made under the old shape. When the table does not fit, the keyspace becomes
    /// not ready with the reason; when Postgres cannot be asked, a keyspace already bound keeps
    /// its binding and stays as it is.
    pub async fn bind(&self, pool: &Arc<PgPool>) -> Result<bool, BindError> {
        let table = self
            .config
            .table
            .as_ref()
            .expect("bind is only called for sourced keyspaces");
        let result = async {
            let client = pool.get().await.map_err(|e| BindError::Unavailable(e.to_string()))?;
            let meta =
                TableMeta::load(&**client, table)
                    .await
                    .map_err(|e| match crate::source::postgres::classify(&e) {
                        e @ SourceError::Unavailable(_) => BindError::Unavailable(e.to_string()),
                        e => BindError::Unfit(e.to_string()),
                    })?;
            Binding::resolve(&self.config, meta.as_ref()).map_err(|p| BindError::Unfit(p.join("; ")))
        }
        .await;
        match result {
            Ok(binding) => {
                let mut source = self.source.write().unwrap_or_else(|p| p.into_inner());
                let changed = source.as_ref().is_some_and(|s| !s.binding().same_shape(&binding));
                let same_table = source
                    .as_ref()
                    .is_some_and(|s| !changed && s.binding().columns == binding.columns);
                if !same_table {
                    *source = Some(Arc::new(TableSource::new(pool.clone(), binding)));
                }
                drop(source);
                self.set_blocker(Blocker::Bind, None);
                Ok(changed)
            }
            Err(e) => {
                let bound = self.source.read().unwrap_or_else(|p| p.into_inner()).is_some();
                if bound && matches!(e, BindError::Unfit(_)) {
                    // Its table no longer fits (dropped, renamed, a key column gone): nothing of
                    // it is served from the moment the keyspace says so, so it is emptied first.
                    // (Capture's reshape then also raises the floor.)
                    self.clear();
                }
                if !(bound && matches!(e, BindError::Unavailable(_))) {
                    self.set_blocker(Blocker::Bind, Some(e.to_string()));
                }
                Err(e)
            }
        }
    }

    /// Parses a key from its URL form for this keyspace.
    pub fn parse_key(&self, raw: &str) -> Result<Key, KeyspaceError> {
        if !self.is_sourced() {
            return Ok(key::parse_opaque(raw, self.max_key_bytes)?);
        }
        Ok(key::key_from_parts(self.parse_key_parts(raw)?, self.max_key_bytes)?)
    }

    /// A key's normalized components, refused as [`Keyspace::parse_key`] refuses it, without
    /// its cache key (a flush binds only the components).
    pub fn parse_key_parts(&self, raw: &str) -> Result<Vec<String>, KeyspaceError> {
        if !self.is_sourced() {
            return Ok(key::parse_opaque(raw, self.max_key_bytes)?.parts);
        }
        let source = self.source()?;
        Ok(key::parse_parts(
            raw,
            &self.config.name,
            &source.binding().key,
            self.max_key_bytes,
        )?)
    }

    /// The cache key of a stored row from the text of its key columns, as Postgres printed them.
    pub fn key_of_texts(&self, texts: &[String]) -> Option<Arc<str>> {
        let source = self.source().ok()?;
        let key = &source.binding().key;
        key::cache_key_of_row(key.iter().zip(texts.iter().map(String::as_str)), usize::MAX).ok()
    }

    /// What this node serves for `key` without loading: its pending write-behind write, else the
    /// live L1 entry.
    pub fn lookup(&self, key: &str) -> Option<Read> {
        if let Some(p) = self.pending.get(key) {
            // An acknowledged write not yet flushed: read-your-writes, whatever L1 holds.
            let mut entry = Entry::new(p.doc, Lsn::ZERO, p.version);
            entry.stored_at = p.at;
            return Some(Read {
                entry: Arc::new(entry),
                origin: Origin::Pending,
                lag: None,
            });
        }
        let entry = self.l1.get(key)?;
        Some(Read {
            entry,
            origin: Origin::Hit,
            lag: None,
        })
    }

    /// The live L1 entry for `key` (the database's state as this node holds it), ignoring the
    /// overlay.
    pub fn cached(&self, key: &str) -> Option<Arc<Entry>> {
        self.l1.get(key)
    }

    /// The key's pending write-behind write, if any.
    pub fn pending(&self, key: &str) -> Option<Pending> {
        self.pending.get(key)
    }

    /// An entry's lifetime: `ttl`, or `negative_ttl` for "not found".
    pub fn lifetime(&self, e: &Entry) -> Duration {
        self.l1.lifetime(e)
    }

    /// A read's miss: the key's state from L2 when the keyspace has a tier and L2 holds it,
    /// else from the table ([`Keyspace::reload`]), installed unless a change of the key came
    /// while it ran.
    ///
    /// A keyspace under the CDC freshness contract asks L2 only while its own change stream
    /// keeps the contract: then every change old enough to count has reached this node, and L2
    /// (written before any change is announced) holds it too; otherwise only Postgres can say.
    pub async fn load(&self, key: &Key) -> Result<Loaded, KeyspaceError> {
        if let Some(tier) = self.l2.get()
            && self.is_fresh_read(None)
            && let Some(entry) = self.load_l2(tier, key).await
        {
            return Ok(Loaded { entry, from_l2: true });
        }
        let (entry, _installed) = self.reload(key).await?;
        Ok(Loaded { entry, from_l2: false })
    }

    /// The key's state from L2, installed in L1 unless a change of the key came meanwhile
    /// (concurrent reads share one L2 request, whose flight is its lease). `None` when L2 has
    /// nothing usable (no record, an "unknown since" marker, unavailable, or this node's own
    /// change of the key still on its way there).
    async fn load_l2(&self, tier: &Arc<Tier>, key: &Key) -> Option<Arc<Entry>> {
        if tier.publishing(&key.cache_key) {
            return None;
        }
        let (flight, _) = self.l2_flights.join(&key.cache_key);
        let lease = flight.clone();
        let found = flight
            .run(|| async move {
                let asked = tokio::time::Instant::now();
                let mut rec = tier.get(&key.cache_key).await.ok()?;
                if !rec.as_ref().is_some_and(|r| r.is_state()) {
                    // A miss: load it here, unless another node holds the key's lease — then
                    // its fill is on the way (forty pods missing one key make one query).
                    if tier.take_lease(&key.cache_key).await.unwrap_or(true) {
                        return None;
                    }
                    rec = tier.await_fill(&key.cache_key).await;
                }
                let rec = rec?;
                if !rec.is_state() || (rec.lsn.0 < self.floor.load(Ordering::Acquire) && rec.lsn != Lsn::ZERO) {
                    return None;
                }
                let mut entry = rec.to_entry(self.hlc.now());
                entry.checked_at = Some(asked);
                self.fill_l1(&key.cache_key, &entry, lease).await;
                Some(Arc::new(entry))
            })
            .await;
        self.l2_flights.finish(&key.cache_key, &flight);
        if found.is_some() {
            self.m.hits_l2.inc();
        }
        found
    }

    /// Loads `key` from the table itself (never L2) through the keyspace's flights — concurrent
    /// loads of one key share one query — and installs the result if no change of the key
    /// happened while it ran (the flight is the load's lease). Returns the loaded entry and
    /// whether it was installed. With an L2 tier the loaded state is written there
    /// (compare-and-set, not announced).
    ///
    /// A load that finds the table changed under its binding (a column or the table renamed or
    /// dropped) re-reads the table's shape and tries once more with it.
    pub async fn reload(&self, key: &Key) -> Result<(Arc<Entry>, bool), KeyspaceError> {
        match self.load_once(key).await {
            Err(KeyspaceError::Source(SourceError::SchemaChanged(why))) => {
                let pool = self.source()?.pool().clone();
                tracing::info!(keyspace = self.name(), reason = %why, "a load found the table changed; re-reading its columns");
                self.metrics
                    .cdc_schema_changes
                    .with_label_values(&[self.name(), "rebound"])
                    .inc();
                // A failed bind leaves the keyspace not ready, with the reason.
                let reshaped = self.bind(&pool).await.map_err(|e| match e {
                    BindError::Unavailable(why) => SourceError::Unavailable(why),
                    BindError::Unfit(reason) => SourceError::NotReady {
                        keyspace: self.name().to_string(),
                        reason,
                    },
                })?;
                if reshaped {
                    // What is cached was made in the old shape. (A CDC keyspace's capture also
                    // sees the change and raises its floor; this read must not wait for that.)
                    self.clear();
                }
                self.load_once(key).await
            }
            other => other,
        }
    }

    async fn load_once(&self, key: &Key) -> Result<(Arc<Entry>, bool), KeyspaceError> {
        let source = self.source()?;
        let (flight, _leader) = self.flights.join(&key.cache_key);
        let lease = flight.clone();
        let result: LoadResult = flight
            .run(|| async move {
                let started = std::time::Instant::now();
                let read_at = tokio::time::Instant::now();
                let ticket = self.l2.get().map(|t| t.ticket());
                let loaded = source.load(&key.parts).await;
                self.m.load_seconds.observe(started.elapsed().as_secs_f64());
                let loaded = match loaded {
                    Ok(l) => l,
                    Err(e) => {
                        self.m.loads_error.inc();
                        return Err(e);
                    }
                };
                if loaded.value.is_some() {
                    self.m.loads_found.inc();
                } else {
                    self.m.loads_absent.inc();
                }
                if let Some(hook) = self.load_hook() {
                    hook(key.cache_key.clone()).await;
                }
                let mut entry = Entry::new(loaded.value, loaded.lsn, self.hlc.now())
                    .with_snapshot(loaded.snapshot)
                    .read_at(read_at);
                entry.checked_at = Some(read_at);
                let held = lease.is_valid();
                self.fill_l1(&key.cache_key, &entry, lease).await;
                if let (Some(tier), Some(ticket), true) = (self.l2.get(), ticket, held) {
                    // Off the read's path: the compare-and-set keeps a late fill harmless.
                    let (tier, key, e) = (tier.clone(), key.cache_key.clone(), entry.clone());
                    tokio::spawn(async move { tier.fill(&key, &e, ticket).await });
                }
                Ok(Arc::new(entry))
            })
            .await;
        self.flights.finish(&key.cache_key, &flight);
        let held = flight.is_valid();
        Ok((result?, held))
    }

    /// Installs a load's result under its lease (skipped, and counted, when a change of the
    /// key came while it ran).
    async fn fill_l1(&self, key: &Arc<str>, entry: &Entry, lease: Arc<dyn Lease>) {
        if self.l1.install(key.clone(), entry.clone(), Install::Fill(lease)).await == Installed::Skipped {
            self.m.fills_skipped.inc();
        }
    }

    /// The door for a change whose new state is known: marks the key's in-flight load stale
    /// first, then installs unless the cached state is newer (see `cache` for why this order is
    /// safe).
    ///
    /// With an L2 tier, a change installed here is also written to L2 and announced to the
    /// other nodes (queued; see `l2`).
    pub async fn mutate(&self, key: Arc<str>, entry: Entry) -> Installed {
        let Some(tier) = self.l2.get() else {
            return self.mutate_local(key, entry).await;
        };
        let record = entry.clone();
        let done = self.mutate_local(key.clone(), entry).await;
        if done == Installed::Stored {
            tier.changed(key, &record);
        }
        done
    }

    /// Waits until this node's change of `key` reached the L2 tier and was announced (see
    /// `Tier::published`); at once without a tier.
    pub async fn published(&self, key: &Arc<str>) {
        if let Some(t) = self.l2.get() {
            t.published(key).await;
        }
    }

    /// The door for state that is not a new change here: a warm load's rows, a replicated
    /// change (its origin announced it), L2's newer state. Installs like [`Keyspace::mutate`]
    /// without announcing.
    pub async fn mutate_local(&self, key: Arc<str>, entry: Entry) -> Installed {
        self.invalidate_flights(&key);
        if self.below_floor(&entry) {
            return Installed::Skipped;
        }
        // An in-memory keyspace's entries are all at position zero, so the comparison always
        // accepts (see `L1::put`); a document is put without it.
        let plain = !self.is_sourced() && !self.config.federate && entry.value.is_some() && entry.lsn == Lsn::ZERO;
        let done = if plain {
            self.l1.put(key.clone(), entry).await;
            Installed::Stored
        } else {
            self.l1.install(key.clone(), entry, Install::IfNotOlder).await
        };
        if done == Installed::Stored {
            self.changed(&key);
        }
        done
    }

    /// The door for a federated event: marks the key's in-flight load stale, then installs
    /// under the conflict rule (highest `(version, origin)` wins; see `federation`).
    pub async fn merge(&self, key: Arc<str>, entry: Entry) -> Merged {
        self.invalidate_flights(&key);
        let merged = self.l1.merge(key.clone(), entry).await;
        if merged == Merged::Stored {
            self.changed(&key);
        }
        merged
    }

    /// Removes every federated entry made by `origin` before `version` (a federated clear), each
    /// unless it changed meanwhile. Returns how many were removed.
    pub async fn sweep(&self, origin: &str, version: u64) -> u64 {
        let mut n = 0;
        for (key, e) in self.l1.entries() {
            let stale = e.version < version && e.fed.as_ref().is_some_and(|f| &*f.origin == origin);
            if stale && self.l1.remove_exact(key.clone(), &e).await {
                self.changed(&key);
                n += 1;
            }
        }
        n
    }

    /// Removes a tombstone every peer has passed, unless the key changed since.
    pub async fn drop_tombstone(&self, key: Arc<str>, tombstone: &Arc<Entry>) -> bool {
        self.l1.remove_exact(key, tombstone).await
    }

    /// Whether `entry` describes state from before the keyspace's floor.
    fn below_floor(&self, entry: &Entry) -> bool {
        entry.lsn.0 < self.floor.load(Ordering::Acquire) && entry.lsn != Lsn::ZERO
    }

    /// The door for a change whose new state is not known: forgets the key.
    pub async fn invalidate(&self, key: &str) {
        self.invalidate_flights(key);
        self.l1.remove(key).await;
        self.changed(key);
    }

    /// The door for a change at source position `lsn` (by transaction `xid`) whose new state is
    /// not known: forgets the key unless what is cached is newer than the change (a replayed
    /// change must not drop a newer entry).
    /// With an L2 tier the change is written there (as "changed, state unknown") and announced.
    pub async fn invalidate_at(&self, key: Arc<str>, lsn: Lsn, xid: Option<u32>) -> Installed {
        if let Some(tier) = self.l2.get() {
            tier.invalidated(key.clone(), lsn, xid);
        }
        self.invalidate_at_local(key, lsn, xid).await
    }

    /// [`Keyspace::invalidate_at`] without announcing (a change another node announced).
    pub async fn invalidate_at_local(&self, key: Arc<str>, lsn: Lsn, xid: Option<u32>) -> Installed {
        self.invalidate_flights(&key);
        let done = self
            .l1
            .remove_unless_newer(key.clone(), &Entry::new(None, lsn, 0).with_xid(xid))
            .await;
        if done == Installed::Stored {
            self.changed(&key);
        }
        done
    }

    /// Forgets every key (a TRUNCATE, or a resnapshot); loads in flight will not install.
    pub fn clear(&self) {
        self.flights.invalidate_all();
        self.l2_flights.invalidate_all();
        self.l1.clear();
        if let Some(w) = self.watch.get() {
            w.cleared(&self.config.name);
        }
    }

    /// The table was emptied at source position `lsn` (a TRUNCATE): forgets every key and,
    /// with an L2 tier, voids L2's older state and tells the other nodes.
    pub fn clear_at(&self, lsn: Lsn) {
        self.clear();
        if let Some(tier) = self.l2.get() {
            tier.cleared(lsn);
        }
    }

    /// Marks `entry` confirmed current as of `at` (L2 holds its version), unless the key
    /// changed meanwhile; returns the confirmed entry.
    async fn confirm_at(&self, key: Arc<str>, entry: &Arc<Entry>, at: tokio::time::Instant) -> Entry {
        let mut confirmed = (**entry).clone();
        confirmed.checked_at = Some(at);
        self.l1.replace_exact(key, entry, confirmed.clone()).await;
        confirmed
    }

    /// An L1 entry the L2 tier does not trust (suspect after a gap in the invalidation
    /// channel, unconfirmed past the bound while the channel is behind, or past `l1_max_age`):
    /// kept if L2 holds the same version, replaced by L2's newer state, else reloaded from the
    /// table (read-through) or served with its lag unknown.
    pub async fn revalidate(&self, key: &Key, cached: Read) -> Result<Read, KeyspaceError> {
        let Some(tier) = self.l2.get() else {
            return Ok(cached);
        };
        let asked = tokio::time::Instant::now();
        let entry = &cached.entry;
        if !tier.publishing(&key.cache_key)
            && tier.may_vouch(entry)
            && let Ok(Some(rec)) = tier.get(&key.cache_key).await
            && rec.is_state()
        {
            let l2 = rec.to_entry(self.hlc.now());
            let l2_newer = l2.supersedes(entry);
            let l1_newer = entry.supersedes(&l2);
            if l2_newer && l1_newer {
                let confirmed = self.confirm_at(key.cache_key.clone(), entry, asked).await;
                tier.revalidated("confirmed");
                return Ok(Read {
                    entry: Arc::new(confirmed),
                    ..cached
                });
            }
            if l2_newer {
                let mut newer = l2;
                newer.checked_at = Some(asked);
                self.mutate_local(key.cache_key.clone(), newer.clone()).await;
                tier.revalidated("replaced");
                return Ok(Read {
                    entry: Arc::new(newer),
                    origin: Origin::L2,
                    lag: None,
                });
            }
        }
        if self.config.read_through
            && let Ok((entry, _)) = self.reload(key).await
        {
            tier.revalidated("reloaded");
            return Ok(Read {
                entry,
                origin: Origin::Miss,
                lag: None,
            });
        }
        tier.revalidated("served");
        Ok(Read {
            lag: Some(Lag::Unknown),
            ..cached
        })
    }

    /// Every live entry of L1 (a follower's snapshot), and whether L1 holds the whole table:
    /// the keyspace is warmed and has dropped no document for room or age since.
    pub fn entries(&self) -> (Entries, bool) {
        let whole = self.config.warm && self.l1.dropped() == 0;
        (self.l1.entries(), whole)
    }

    /// Forgets every key and, from now on, refuses state from before source position `lsn`:
    /// a change captured earlier but applied later, or a load that started earlier, cannot put
    /// back what the reset removed. Used when the table's shape changed at `lsn`.
    pub fn reset_below(&self, lsn: Lsn) {
        if let Some(f) = self.freshness.get() {
            f.reloaded();
        }
        self.floor.fetch_max(lsn.0, Ordering::AcqRel);
        self.clear();
    }

    /// The door for an accepted write-behind write: overlays it for reads (unless a newer one
    /// is there) and marks the key's in-flight load stale — that load read the old row.
    pub fn write_pending(&self, key: &str, p: Pending) {
        self.invalidate_flights(key);
        self.pending.set(key, p);
        self.changed(key);
    }

    /// The write with `version` (and any older one) reached Postgres, or was set aside: stop
    /// overlaying it.
    pub fn settle(&self, key: &str, version: u64) {
        self.pending.settle(key, version);
        // What reads see may change back (a write set aside); a spare invalidation is harmless.
        self.changed(key);
    }

    /// Settles several writes (as [`Keyspace::settle`]) with one pass over the pending writes.
    pub fn settle_all(&self, writes: &[(&str, u64)]) {
        self.pending.settle_all(writes);
        for (key, _) in writes {
            self.changed(key);
        }
    }

    /// Runs L1's pending bookkeeping now: expired and evicted documents are removed (and their
    /// removal reported to the watch) without waiting for the next cache operation.
    pub async fn housekeep(&self) {
        self.l1.sync().await;
    }

    /// One step of the compact store's expiry sweep (see [`crate::server`]'s sweeper).
    pub fn sweep_some(&self) {
        self.l1.sweep_some();
    }

    /// Live numbers for `/v1/keyspaces` and the metrics, after moka's pending bookkeeping.
    pub async fn stats(&self) -> Stats {
        self.l1.sync().await;
        Stats {
            entries: self.l1.entry_count(),
            weighted_size_bytes: self.l1.weighted_size(),
            loads_in_flight: self.flights.len(),
            pending_writes: self.pending.len(),
        }
    }
}

/// A keyspace's live numbers.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub entries: u64,
    pub weighted_size_bytes: u64,
    pub loads_in_flight: usize,
    pub pending_writes: usize,
}

impl Guarded for Keyspace {
    async fn heard(&self, key: Arc<str>, lsn: Lsn, xid: Option<u32>) {
        self.invalidate_at_local(key, lsn, xid).await;
    }

    fn heard_clear(&self) {
        self.clear();
    }

    fn l1_entries(&self) -> Vec<(Arc<str>, Arc<Entry>)> {
        self.l1.entries()
    }

    async fn confirm(&self, key: Arc<str>, entry: &Arc<Entry>, at: tokio::time::Instant) {
        self.confirm_at(key, entry, at).await;
    }
}
