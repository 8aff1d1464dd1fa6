//! A keyspace at run time: its configuration, its L1 tier and in-flight loads, and — for a
//! sourced keyspace — its binding to a Postgres table. The patterns (`patterns::*`) operate on
//! it; the HTTP layer only calls `get`/`put`/`delete`.
//!
//! A sourced keyspace is *not ready* until its table has been read from the catalog and the
//! configuration checked against it; until then its requests answer 503 and `/readyz` says why.
//! Binding is retried in the background, so a sidecar that starts before its database comes up
//! becomes ready by itself.

use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use prometheus::{Histogram, IntCounter};

use crate::cache::{Entry, Flights, Install, Installed, L1};
use crate::config::{KeyspaceConfig, WriteMode};
use crate::hlc::Hlc;
use crate::key::{self, Key, KeyError};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::patterns::{read_through, write_through};
use crate::source::SourceError;
use crate::source::postgres::schema::{Binding, TableMeta};
use crate::source::postgres::{PgPool, TableSource};

/// What a keyspace operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyspaceError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("keyspace {0} is read-only (write = \"none\"); configure write = \"through\" to accept writes")]
    ReadOnly(String),
    #[error("the body is not valid JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Where a read's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Served from L1.
    Hit,
    /// Loaded from the source by this read (or by the flight it joined).
    Miss,
    /// Served from L1 late in the entry's life, with a background refresh underway.
    Refreshing,
}

/// A read's answer: the entry (possibly negative) and where it came from.
#[derive(Debug, Clone)]
pub struct Read {
    pub entry: Arc<Entry>,
    pub origin: Origin,
}

/// The result every caller of one load flight receives.
pub type LoadResult = Result<Arc<Entry>, SourceError>;

/// Counters of one keyspace, resolved once so the hot path does no label lookups.
pub struct KeyspaceMetrics {
    pub hits_l1: IntCounter,
    pub misses: IntCounter,
    pub loads_found: IntCounter,
    pub loads_absent: IntCounter,
    pub loads_error: IntCounter,
    pub load_seconds: Histogram,
    pub fills_skipped: IntCounter,
}

impl KeyspaceMetrics {
    fn new(m: &Metrics, ks: &str) -> Self {
        KeyspaceMetrics {
            hits_l1: m.cache_hits.with_label_values(&[ks, "l1"]),
            misses: m.cache_misses.with_label_values(&[ks]),
            loads_found: m.loads.with_label_values(&[ks, "found"]),
            loads_absent: m.loads.with_label_values(&[ks, "absent"]),
            loads_error: m.loads.with_label_values(&[ks, "error"]),
            load_seconds: m.load_duration.with_label_values(&[ks]),
            fills_skipped: m.fills_skipped.with_label_values(&[ks]),
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

/// A test hook run after a load's query returned and before its result is installed.
pub type LoadHook = Arc<dyn Fn(Arc<str>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// One keyspace.
pub struct Keyspace {
    pub config: KeyspaceConfig,
    pub l1: L1,
    pub(crate) flights: Flights<LoadResult>,
    source: RwLock<Option<Arc<TableSource>>>,
    blockers: Mutex<std::collections::BTreeMap<Blocker, String>>,
    load_hook: RwLock<Option<LoadHook>>,
    /// Write-behind writes not yet flushed: reads see them first.
    pub pending: crate::patterns::write_behind::PendingWrites,
    /// Refresh-ahead, when the keyspace has it on.
    refresher: Option<crate::patterns::refresh_ahead::Refresher>,
    pub(crate) hlc: Arc<Hlc>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) m: KeyspaceMetrics,
    max_key_bytes: usize,
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
            l1: L1::new(config.capacity, config.ttl, config.negative_ttl),
            flights: Flights::default(),
            source: RwLock::new(None),
            blockers: Mutex::new(blockers),
            load_hook: RwLock::new(None),
            pending: Default::default(),
            refresher: (config.refresh_ahead > 0.0).then(|| {
                crate::patterns::refresh_ahead::Refresher::new(
                    config.refresh_ahead,
                    config.refresh_concurrency,
                    &metrics,
                    &config.name,
                )
            }),
            m: KeyspaceMetrics::new(&metrics, &config.name),
            metrics,
            hlc,
            max_key_bytes,
            config,
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

    /// Refresh-ahead state, when on.
    pub fn refresher(&self) -> Option<&crate::patterns::refresh_ahead::Refresher> {
        self.refresher.as_ref()
    }

    pub(crate) fn load_hook(&self) -> Option<LoadHook> {
        self.load_hook.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the table's metadata and binds the keyspace to it. On failure the keyspace stays
    /// (or becomes) not ready with the reason.
    pub async fn bind(&self, pool: &Arc<PgPool>) -> Result<(), String> {
        let table = self
            .config
            .table
            .as_ref()
            .expect("bind is only called for sourced keyspaces");
        let result = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let meta = TableMeta::load(&**client, table)
                .await
                .map_err(|e| crate::source::postgres::classify(&e).to_string())?;
            Binding::resolve(&self.config, meta.as_ref()).map_err(|p| p.join("; "))
        }
        .await;
        match result {
            Ok(binding) => {
                *self.source.write().unwrap_or_else(|p| p.into_inner()) =
                    Some(Arc::new(TableSource::new(pool.clone(), binding)));
                self.set_blocker(Blocker::Bind, None);
                Ok(())
            }
            Err(reason) => {
                self.set_blocker(Blocker::Bind, Some(reason.clone()));
                Err(reason)
            }
        }
    }

    /// Parses a key from its URL form for this keyspace.
    pub fn parse_key(&self, raw: &str) -> Result<Key, KeyspaceError> {
        if !self.is_sourced() {
            return Ok(key::parse_opaque(raw, self.max_key_bytes)?);
        }
        let source = self.source()?;
        Ok(key::parse_columns(
            raw,
            &self.config.name,
            &source.binding().key,
            self.max_key_bytes,
        )?)
    }

    /// Reads a key: L1, then (read-through) the table.
    pub async fn get(self: &Arc<Self>, key: &Key) -> Result<Read, KeyspaceError> {
        if let Some(p) = self.pending.get(&key.cache_key) {
            // An acknowledged write not yet flushed: read-your-writes, whatever L1 holds.
            let mut entry = Entry::new(p.doc, Lsn::ZERO, p.version);
            entry.stored_at = p.at;
            self.m.hits_l1.inc();
            return Ok(Read {
                entry: Arc::new(entry),
                origin: Origin::Hit,
            });
        }
        read_through::get(self, key).await
    }

    /// Writes a key's value (a JSON document). Returns the entry now cached.
    pub async fn put(&self, key: &Key, body: &Bytes) -> Result<Arc<Entry>, KeyspaceError> {
        if !self.is_sourced() {
            let value: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| KeyspaceError::BadJson(e.to_string()))?;
            let bytes = Bytes::from(serde_json::to_vec(&value).map_err(|e| KeyspaceError::BadJson(e.to_string()))?);
            let entry = Entry::new(Some(bytes), Lsn::ZERO, self.hlc.now());
            self.mutate(key.cache_key.clone(), entry.clone()).await;
            return Ok(Arc::new(entry));
        }
        match self.config.write {
            WriteMode::None => Err(KeyspaceError::ReadOnly(self.config.name.clone())),
            WriteMode::Through => write_through::put(self, key, body).await,
            WriteMode::Behind => Err(KeyspaceError::Unsupported(
                "write-behind writes go through the server's write-behind service",
            )),
        }
    }

    /// Deletes a key. `false` when there was nothing to delete.
    pub async fn delete(&self, key: &Key) -> Result<bool, KeyspaceError> {
        if !self.is_sourced() {
            let existed = self.l1.get(&key.cache_key).await.is_some_and(|e| e.value.is_some());
            self.flights.invalidate(&key.cache_key);
            self.l1.remove(&key.cache_key).await;
            return Ok(existed);
        }
        match self.config.write {
            WriteMode::None => Err(KeyspaceError::ReadOnly(self.config.name.clone())),
            WriteMode::Through => write_through::delete(self, key).await,
            WriteMode::Behind => Err(KeyspaceError::Unsupported(
                "write-behind writes go through the server's write-behind service",
            )),
        }
    }

    /// Installs a mutation's result: marks the key's in-flight load stale first, then installs
    /// unless the cached state is newer (see `cache` for why this order is safe).
    pub async fn mutate(&self, key: Arc<str>, entry: Entry) -> Installed {
        self.flights.invalidate(&key);
        self.l1.install(key, entry, Install::IfNotOlder).await
    }

    /// Forgets a key after a change whose new state is not known.
    pub async fn invalidate(&self, key: &str) {
        self.flights.invalidate(key);
        self.l1.remove(key).await;
    }

    /// Forgets every key (a TRUNCATE, or a resnapshot); loads in flight will not install.
    pub fn clear(&self) {
        self.flights.invalidate_all();
        self.l1.clear();
    }
}
