//! The L1 tier: one bounded moka cache per keyspace, with per-entry lifetimes (positive entries
//! live `ttl`, negative ones `negative_ttl`) and version-checked installs.
//!
//! moka measures its TTL on the std clock, which `tokio::time::pause()` does not move; entry age
//! is therefore also checked here on `tokio::time`, and moka's expiry only frees memory.
//!
//! The cache is moka's `sync` flavour: every decision here is synchronous, and the `future`
//! flavour's per-key async locks and boxed futures cost about a quarter of a write (measured
//! with `cargo bench --bench resp`: a plain SET's server CPU went from 31 to 25 µs). A change of
//! a key reads, decides and writes under the key's stripe of this tier's own lock
//! ([`L1::key_lock`]) rather than through moka's compute, whose key lock and waiter entry live
//! in two more concurrent tables: a flush's install went from ~6,300 to ~4,500 instructions.
//! (The read counts as an access in moka's frequency sketch, as a write would.)
//! The methods stay `async` so the tier behind them can change without touching callers.
//!
//! A keyspace configured `store = "compact"` keeps its entries in the [`Compact`] store
//! instead (one allocation per entry, sampled eviction; see `cache/compact.rs`): the rules
//! above — lifetimes on the tokio clock, version-checked installs under a per-key lock — are
//! the same for both, and every method here dispatches on the store.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use moka::Expiry;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use serde::Serialize;

use super::compact::{Compact, Done, Step};
use super::{Entry, Install, Installed, Merged};

/// Bytes one entry of the cache store costs beyond its key and value: moka's node, hash-table
/// slot, deques and timer-wheel entry, the `Entry` struct, the `Arc`s and their allocation
/// classes. Measured, not estimated: 1M entries of a 16-byte key grew the process by 518–530
/// bytes each beyond key and value, at 100-byte and 1 KiB values (README, "Memory per entry").
pub const CACHE_ENTRY_OVERHEAD_BYTES: usize = 520;

/// Which structure holds a keyspace's entries (`[[keyspace]] store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// A bounded cache (moka): frequency-aware admission and eviction, for keyspaces that hold
    /// the hot part of a larger table.
    #[default]
    Cache,
    /// One allocation per entry in a sharded table, sampled least-recently-read eviction: for
    /// keyspaces that hold everything they are given (a warm CDC keyspace sized to fit its
    /// table, in-memory data over RESP) — about a fifth of the cache store's bytes per entry.
    Compact,
}

struct Lifetimes {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Lifetimes {
    /// `None`: never expires (federated state, see [`Entry::fed`]).
    fn of(&self, e: &Entry) -> Option<Duration> {
        if e.fed.is_some() {
            None
        } else if let Some(at) = e.expires_at {
            Some(at.saturating_duration_since(tokio::time::Instant::now()))
        } else if e.value.is_some() {
            Some(self.ttl)
        } else {
            Some(self.negative_ttl)
        }
    }
}

impl Expiry<Arc<str>, Arc<Entry>> for Lifetimes {
    fn expire_after_create(&self, _: &Arc<str>, v: &Arc<Entry>, _: std::time::Instant) -> Option<Duration> {
        self.of(v)
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        v: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.of(v)
    }
}

/// How an L1 bounds its memory (a keyspace's `max_entries` or `max_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    /// At most this many entries.
    Entries(u64),
    /// At most this many weighed bytes (what the store's entries cost: see [`L1::weigh`]).
    Bytes(u64),
}

enum Store {
    Cache(Cache<Arc<str>, Arc<Entry>, ahash::RandomState>),
    Compact(Compact),
}

/// Stripes of the cache store's per-key lock ([`L1::key_lock`]).
const KEY_LOCKS: usize = 256;

/// The in-memory tier of one keyspace.
pub struct L1 {
    store: Store,
    /// The cache store's per-key lock, striped: every change of a key reads, decides and writes
    /// under its stripe, so two changes of one key never interleave. (moka's own compute does
    /// the same with a key lock and a waiter entry in two more concurrent tables, at about half
    /// again the cost of a read and a write.) Reads take no lock.
    key_locks: Box<[std::sync::Mutex<()>]>,
    key_hasher: ahash::RandomState,
    ttl: Duration,
    negative_ttl: Duration,
    /// The cache store's weighed bytes, kept exact by counting installs in and removals (of any
    /// cause, via moka's eviction listener) out — so the size is in bytes under either capacity
    /// kind. (The compact store counts its own.)
    bytes: Arc<AtomicI64>,
    /// Documents dropped for room or age (not by a change): once non-zero, this tier no longer
    /// holds every row it was warmed with.
    dropped: Arc<AtomicI64>,
    /// Told the key of each document dropped for room or age (see [`L1::on_dropped`]).
    drop_hook: Arc<OnceLock<DropHook>>,
}

/// What [`L1::on_dropped`] runs.
pub type DropHook = Box<dyn Fn(&str) + Send + Sync>;

impl L1 {
    pub fn new(capacity: Capacity, ttl: Duration, negative_ttl: Duration) -> L1 {
        L1::with_store(StoreKind::Cache, capacity, ttl, negative_ttl)
    }

    pub fn with_store(kind: StoreKind, capacity: Capacity, ttl: Duration, negative_ttl: Duration) -> L1 {
        let bytes = Arc::new(AtomicI64::new(0));
        let dropped = Arc::new(AtomicI64::new(0));
        let drop_hook: Arc<OnceLock<DropHook>> = Arc::default();
        let store = match kind {
            StoreKind::Cache => Store::Cache(Self::cache(capacity, ttl, negative_ttl, &bytes, &dropped, &drop_hook)),
            StoreKind::Compact => Store::Compact(Compact::new(capacity, ttl, negative_ttl)),
        };
        L1 {
            store,
            key_locks: (0..KEY_LOCKS).map(|_| std::sync::Mutex::new(())).collect(),
            key_hasher: ahash::RandomState::new(),
            ttl,
            negative_ttl,
            bytes,
            dropped,
            drop_hook,
        }
    }

    fn cache(
        capacity: Capacity,
        ttl: Duration,
        negative_ttl: Duration,
        bytes: &Arc<AtomicI64>,
        dropped: &Arc<AtomicI64>,
        drop_hook: &Arc<OnceLock<DropHook>>,
    ) -> Cache<Arc<str>, Arc<Entry>, ahash::RandomState> {
        let (out, lost, hook) = (bytes.clone(), dropped.clone(), drop_hook.clone());
        let builder = Cache::builder()
            .expire_after(Lifetimes { ttl, negative_ttl })
            .eviction_listener(move |k: Arc<Arc<str>>, v: Arc<Entry>, cause| {
                out.fetch_sub(v.weight(&k) as i64, Ordering::Relaxed);
                if v.value.is_some() && matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    lost.fetch_add(1, Ordering::Relaxed);
                    if let Some(h) = hook.get() {
                        h(&k);
                    }
                }
            });
        // A randomly keyed hasher (keys come from clients, so no fixed seed) that is much cheaper
        // than the default SipHash on the read and fill paths.
        match capacity {
            Capacity::Entries(n) => builder.max_capacity(n).build_with_hasher(ahash::RandomState::new()),
            Capacity::Bytes(n) => builder
                .max_capacity(n)
                .weigher(|k: &Arc<str>, v: &Arc<Entry>| v.weight(k))
                .build_with_hasher(ahash::RandomState::new()),
        }
    }

    /// Which store holds the entries.
    pub fn kind(&self) -> StoreKind {
        match self.store {
            Store::Cache(_) => StoreKind::Cache,
            Store::Compact(_) => StoreKind::Compact,
        }
    }

    /// Bytes an entry of `key_len` and `value_len` costs in this tier's store (what a byte
    /// capacity and `cachesync_cache_weighted_size_bytes` count).
    pub fn weigh(&self, key_len: usize, value_len: usize) -> u64 {
        match self.store {
            Store::Cache(_) => (key_len + value_len + CACHE_ENTRY_OVERHEAD_BYTES) as u64,
            Store::Compact(_) => super::compact::weight(key_len, value_len),
        }
    }

    /// Counts documents the compact store dropped for room or age and tells the hook.
    fn lost(&self, keys: Vec<Arc<str>>) {
        if keys.is_empty() {
            return;
        }
        self.dropped.fetch_add(keys.len() as i64, Ordering::Relaxed);
        if let Some(h) = self.drop_hook.get() {
            for k in &keys {
                h(k);
            }
        }
    }

    /// Runs `hook` with the key of every document this tier drops for room or age (the cache
    /// store reports them during its housekeeping, so shortly after, not at the instant). Set
    /// once.
    pub fn on_dropped(&self, hook: DropHook) {
        let _ = self.drop_hook.set(hook);
    }

    /// An entry's lifetime: `ttl`, or `negative_ttl` for "not found".
    pub fn lifetime(&self, e: &Entry) -> Duration {
        if e.value.is_some() { self.ttl } else { self.negative_ttl }
    }

    /// Whether an entry has outlived its lifetime on the tokio clock (federated state never
    /// does).
    pub fn is_expired(&self, e: &Entry) -> bool {
        if let Some(at) = e.expires_at {
            return tokio::time::Instant::now() >= at;
        }
        e.fed.is_none() && e.stored_at.elapsed() >= self.lifetime(e)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The live entry for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        match &self.store {
            Store::Cache(cache) => {
                let e = cache.get(key)?;
                if self.is_expired(&e) { None } else { Some(e) }
            }
            Store::Compact(c) => c.get(key),
        }
    }

    /// The cache store's lock of `key`'s stripe, held while one change of the key reads,
    /// decides and writes. Never held across an `await`.
    fn key_lock(&self, key: &str) -> std::sync::MutexGuard<'_, ()> {
        let stripe = self.key_hasher.hash_one(key) as usize % KEY_LOCKS;
        self.key_locks[stripe].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `decide` on the key's entry under the key's lock and applies what it returns.
    /// `decide` is given the key's entry and `new`. The compact store copies `new` into its
    /// record; only the cache store keeps it whole, behind an `Arc`.
    fn compute(&self, key: Arc<str>, new: Entry, decide: impl FnOnce(Option<&Arc<Entry>>, &Entry) -> Act) -> Done {
        match &self.store {
            Store::Cache(cache) => {
                let _key = self.key_lock(&key);
                let existing = cache.get(&key);
                match decide(existing.as_ref(), &new) {
                    Act::Put => {
                        // The entry replaced leaves the count through the eviction listener.
                        self.bytes.fetch_add(new.weight(&key) as i64, Ordering::Relaxed);
                        cache.insert(key, Arc::new(new));
                        if existing.is_some() {
                            Done::Replaced
                        } else {
                            Done::Inserted
                        }
                    }
                    Act::Remove if existing.is_some() => {
                        cache.invalidate(&key);
                        Done::Removed
                    }
                    Act::Remove | Act::Keep => Done::Kept,
                }
            }
            Store::Compact(c) => {
                let (done, evicted) = c.compute(key, |existing| match decide(existing, &new) {
                    Act::Put => Step::Put(&new),
                    Act::Remove => Step::Remove,
                    Act::Keep => Step::Keep,
                });
                self.lost(evicted);
                done
            }
        }
    }

    /// Installs `entry` under `key` according to `rule`, atomically with respect to every other
    /// install of the same key.
    pub async fn install(&self, key: Arc<str>, entry: Entry, rule: Install) -> Installed {
        if entry.value.is_none() && self.negative_ttl.is_zero() {
            // Negative caching is off: storing "absent" means forgetting the key, except that a
            // mutation must still displace an older positive entry.
            return self.remove_if(key, &entry, rule).await;
        }
        let done = self.compute(key, entry, |existing, new| {
            if self.accepts(existing, new, &rule) {
                Act::Put
            } else {
                Act::Keep
            }
        });
        match done {
            Done::Inserted | Done::Replaced => Installed::Stored,
            _ => Installed::Skipped,
        }
    }

    /// Makes room for about `entries` more entries ahead of a bulk load (the compact store's
    /// tables; moka sizes itself).
    pub fn reserve(&self, entries: usize) {
        if let Store::Compact(c) = &self.store {
            c.reserve(entries);
        }
    }

    /// Installs `entry` under `key` whatever is there, without comparing: for a keyspace whose
    /// writes are ordered by the caller (an in-memory keyspace: every entry is at source
    /// position zero, so [`Install::IfNotOlder`] always accepts, and the pipeline serializes
    /// writes per key). moka's compute costs about twice a plain insert.
    pub async fn put(&self, key: Arc<str>, entry: Entry) {
        match &self.store {
            Store::Cache(cache) => {
                let _key = self.key_lock(&key);
                let weight = entry.weight(&key) as i64;
                cache.insert(key, Arc::new(entry));
                self.bytes.fetch_add(weight, Ordering::Relaxed);
            }
            Store::Compact(c) => {
                let evicted = c.put(key, &entry);
                self.lost(evicted);
            }
        }
    }

    fn accepts(&self, existing: Option<&Arc<Entry>>, new: &Entry, rule: &Install) -> bool {
        match rule {
            Install::Fill(lease) => lease.is_valid(),
            Install::IfNotOlder => match existing {
                Some(old) if !self.is_expired(old) => new.supersedes(old),
                _ => true,
            },
        }
    }

    /// Installs a federated event's state under the conflict rule: it replaces the entry unless
    /// the entry's `(version, origin)` is higher. A delete is stored as a tombstone whatever the
    /// negative-caching settings. Atomic with respect to every other install of the key.
    pub async fn merge(&self, key: Arc<str>, entry: Entry) -> Merged {
        let mut outcome = Merged::Stored;
        self.compute(key, entry, |existing, new| match existing {
            Some(old) if old.merge_order() > new.merge_order() => {
                outcome = if old.merge_order().1 == new.merge_order().1 {
                    Merged::Superseded
                } else {
                    Merged::Lost
                };
                Act::Keep
            }
            Some(old) if old.merge_order() == new.merge_order() => {
                outcome = Merged::Same;
                Act::Keep
            }
            _ => Act::Put,
        });
        outcome
    }

    /// Removes `key` if it still holds exactly `entry` (a tombstone every peer has passed, an
    /// entry a federated clear covers).
    pub async fn remove_exact(&self, key: Arc<str>, entry: &Arc<Entry>) -> bool {
        match &self.store {
            Store::Cache(cache) => {
                let _key = self.key_lock(&key);
                let same = cache.get(&key).is_some_and(|e| Arc::ptr_eq(&e, entry));
                if same {
                    cache.invalidate(&key);
                }
                same
            }
            Store::Compact(c) => c.compute_exact(key, entry, Step::Remove) == Done::Removed,
        }
    }

    /// Replaces `key`'s entry with `new` if it still holds exactly `old` (a confirmation of the
    /// same state). Returns whether it did.
    pub async fn replace_exact(&self, key: Arc<str>, old: &Arc<Entry>, new: Entry) -> bool {
        match &self.store {
            Store::Cache(cache) => {
                let _key = self.key_lock(&key);
                let same = cache.get(&key).is_some_and(|e| Arc::ptr_eq(&e, old));
                if same {
                    self.bytes.fetch_add(new.weight(&key) as i64, Ordering::Relaxed);
                    cache.insert(key, Arc::new(new));
                }
                same
            }
            Store::Compact(c) => c.compute_exact(key, old, Step::Put(&new)) == Done::Replaced,
        }
    }

    /// Removes `key` as `rule` allows `absent` to replace what is there: a fill while its lease
    /// holds, a mutation unless the entry there is newer.
    async fn remove_if(&self, key: Arc<str>, absent: &Entry, rule: Install) -> Installed {
        let done = self.compute(key, absent.clone(), |existing, _| {
            let ok = match (&rule, existing) {
                (Install::Fill(lease), _) => lease.is_valid(),
                (Install::IfNotOlder, Some(old)) => self.is_expired(old) || absent.supersedes(old),
                (Install::IfNotOlder, None) => false,
            };
            if ok { Act::Remove } else { Act::Keep }
        });
        match done {
            Done::Removed => Installed::Stored,
            _ => Installed::Skipped,
        }
    }

    /// Forgets `key` unless the entry there is newer than `change` (a change whose new state is
    /// not known).
    pub async fn remove_unless_newer(&self, key: Arc<str>, change: &Entry) -> Installed {
        self.remove_if(key, change, Install::IfNotOlder).await
    }

    /// Forgets `key` unconditionally.
    pub async fn remove(&self, key: &str) {
        match &self.store {
            Store::Cache(cache) => {
                let _key = self.key_lock(key);
                cache.invalidate(key);
            }
            Store::Compact(c) => c.remove(key),
        }
    }

    /// Forgets every key.
    pub fn clear(&self) {
        match &self.store {
            Store::Cache(cache) => cache.invalidate_all(),
            Store::Compact(c) => c.clear(),
        }
    }

    pub fn entry_count(&self) -> u64 {
        match &self.store {
            Store::Cache(cache) => cache.entry_count(),
            Store::Compact(c) => c.len(),
        }
    }

    /// Weighed bytes held (see [`L1::weigh`]).
    pub fn weighted_size(&self) -> u64 {
        match &self.store {
            Store::Cache(_) => self.bytes.load(Ordering::Relaxed).max(0) as u64,
            Store::Compact(c) => c.weighted_size(),
        }
    }

    /// Documents dropped for room or age since this tier was made (see [`L1::entries`]).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed).max(0) as u64
    }

    /// Every live entry, in no particular order (a snapshot for a follower). Entries changing
    /// meanwhile may be seen old or new; each is whole.
    pub fn entries(&self) -> Vec<(Arc<str>, Arc<Entry>)> {
        match &self.store {
            Store::Cache(cache) => cache
                .iter()
                .filter(|(_, e)| !self.is_expired(e))
                .map(|(k, e)| (Arc::clone(&*k), e))
                .collect(),
            Store::Compact(c) => c.entries(),
        }
    }

    /// Applies pending bookkeeping so counts are exact (metrics, tests): moka's pending tasks,
    /// or the compact store's sweep of expired entries.
    pub async fn sync(&self) {
        match &self.store {
            Store::Cache(cache) => cache.run_pending_tasks(),
            Store::Compact(c) => {
                let expired = c.sweep(super::compact::ALL_SHARDS);
                self.lost(expired);
            }
        }
    }

    /// Frees the memory of some expired entries of the compact store (a few shards per call, so
    /// a periodic sweep's work stays small whatever the store's size); nothing for the cache
    /// store, whose housekeeping runs with its operations.
    pub fn sweep_some(&self) {
        if let Store::Compact(c) = &self.store {
            let expired = c.sweep(SWEEP_SHARDS);
            self.lost(expired);
        }
    }
}

/// Shards one periodic sweep of the compact store visits (of 64).
const SWEEP_SHARDS: usize = 4;

/// What a compute step decided (see [`L1::compute`]).
enum Act {
    Put,
    Remove,
    Keep,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Flights, Lease};
    use crate::lsn::Lsn;
    use bytes::Bytes;

    fn entry(v: &str, lsn: u64) -> Entry {
        Entry::new(Some(Bytes::from(v.to_string())), Lsn(lsn), lsn)
    }

    const KINDS: [StoreKind; 2] = [StoreKind::Cache, StoreKind::Compact];

    fn l1(kind: StoreKind) -> L1 {
        L1::with_store(
            kind,
            Capacity::Entries(100),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
    }

    #[tokio::test]
    async fn mutations_never_install_an_older_lsn() {
        for kind in KINDS {
            let c = l1(kind);
            assert_eq!(
                c.install("k".into(), entry("b", 20), Install::IfNotOlder).await,
                Installed::Stored
            );
            assert_eq!(
                c.install("k".into(), entry("a", 10), Install::IfNotOlder).await,
                Installed::Skipped
            );
            assert_eq!(c.get("k").unwrap().value.as_deref(), Some(&b"b"[..]));
            assert_eq!(
                c.install("k".into(), entry("c", 30), Install::IfNotOlder).await,
                Installed::Stored
            );
        }
    }

    #[tokio::test]
    async fn a_fill_whose_lease_went_stale_is_not_installed() {
        for kind in KINDS {
            let c = l1(kind);
            let flights: Flights<u8> = Flights::default();
            let key: Arc<str> = "k".into();
            let (flight, _) = flights.join(&key);
            flights.invalidate("k");
            let lease: Arc<dyn Lease> = flight;
            assert_eq!(
                c.install(key.clone(), entry("old", 0), Install::Fill(lease)).await,
                Installed::Skipped
            );
            assert!(c.get("k").is_none());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lifetimes_follow_the_tokio_clock() {
        for kind in KINDS {
            let c = l1(kind);
            c.install("p".into(), entry("v", 1), Install::IfNotOlder).await;
            c.install("n".into(), Entry::new(None, Lsn(1), 1), Install::IfNotOlder)
                .await;
            assert!(c.get("n").is_some());
            tokio::time::advance(Duration::from_millis(1500)).await;
            assert!(c.get("n").is_none(), "negative entry expires after negative_ttl");
            assert!(c.get("p").is_some());
            tokio::time::advance(Duration::from_secs(9)).await;
            assert!(c.get("p").is_none(), "positive entry expires after ttl");
            // An expired entry does not block a mutation with a lower position.
            assert_eq!(
                c.install("p".into(), entry("w", 0), Install::IfNotOlder).await,
                Installed::Stored
            );
        }
    }

    #[tokio::test]
    async fn byte_capacity_bounds_weighed_size() {
        for kind in KINDS {
            let c = L1::with_store(
                kind,
                Capacity::Bytes(10_000),
                Duration::from_secs(60),
                Duration::from_secs(1),
            );
            for i in 0..200 {
                c.install(
                    format!("key{i}").into(),
                    entry(&"x".repeat(100), 1),
                    Install::IfNotOlder,
                )
                .await;
            }
            c.sync().await;
            assert!(c.weighted_size() <= 10_000, "weighted size {}", c.weighted_size());
            assert!(c.entry_count() > 0);
        }
    }

    #[tokio::test]
    async fn weighed_bytes_are_exact_under_an_entry_capacity() {
        for kind in KINDS {
            let c = l1(kind);
            c.install("a".into(), entry("12345", 1), Install::IfNotOlder).await;
            c.install("b".into(), entry("1", 1), Install::IfNotOlder).await;
            c.install("a".into(), entry("123", 2), Install::IfNotOlder).await;
            c.remove("b").await;
            c.sync().await;
            assert_eq!(c.weighted_size(), c.weigh(1, 3), "{kind:?}");
        }
    }
}
