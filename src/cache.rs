//! The cache front of one keyspace: the L1 tier (moka) holding versioned entries, and the
//! registry of in-flight loads that gives single-flight and closes the fill/invalidate race.
//!
//! Ordering rules, in one place (see "Freshness and consistency rules" in the design):
//! - Every entry records the source position (`lsn`) of the state it holds. A *mutation* (a
//!   write's result, a CDC change) replaces an entry only if it is at least as new
//!   ([`Install::IfNotOlder`]), inside moka's per-key `and_compute_with`, so two installs of one
//!   key never interleave.
//! - A *fill* (a read-through load) holds a lease: the [`Flight`] registered before its query was
//!   sent. Any mutation of that key first marks the key's flight stale ([`Flights::invalidate`]);
//!   a stale flight's result is handed to the callers that were already waiting for it but never
//!   installed. Because the stale check runs inside the same per-key compute as installs, a
//!   mutation that lands after the check still runs after the fill and wins.
//! - Entry lifetime is measured on `tokio::time` (so tests can pause it); moka's own TTL is only
//!   the backstop that frees memory.

pub mod l1;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::lsn::Lsn;
pub use l1::L1;

/// One cached key.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The JSON document, or `None` when the source has no such row (a negative entry).
    pub value: Option<Bytes>,
    /// Source position of the state held; zero when unknown (an in-memory keyspace, or a load
    /// made without CDC).
    pub lsn: Lsn,
    /// HLC timestamp of the install: the entry's `ETag`.
    pub version: u64,
    /// When this state was stored: the start of its TTL life and the base of `Age`.
    pub stored_at: Instant,
}

impl Entry {
    pub fn new(value: Option<Bytes>, lsn: Lsn, version: u64) -> Entry {
        Entry {
            value,
            lsn,
            version,
            stored_at: Instant::now(),
        }
    }

    /// Bytes this entry accounts for under a byte capacity.
    pub fn weight(&self, key: &str) -> u32 {
        let n = key.len() + self.value.as_ref().map_or(0, |v| v.len()) + l1::ENTRY_OVERHEAD_BYTES;
        n.min(u32::MAX as usize) as u32
    }
}

/// How an install treats an entry already there.
#[derive(Debug, Clone)]
pub enum Install {
    /// A mutation: replace unless the entry there reflects a later source position.
    IfNotOlder,
    /// A load's result: install only while its flight is still valid (no mutation since it began).
    Fill(Arc<dyn Lease>),
}

/// What an install did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    Stored,
    /// Kept the entry there: it was newer, or the fill's lease had gone stale.
    Skipped,
}

/// Something a fill checks right before installing.
pub trait Lease: Send + Sync + std::fmt::Debug {
    fn is_valid(&self) -> bool;
}

/// One load in progress for one key: concurrent callers share its result.
#[derive(Debug)]
pub struct Flight<T> {
    stale: AtomicBool,
    result: OnceCell<T>,
}

impl<T> Flight<T> {
    fn new() -> Self {
        Flight {
            stale: AtomicBool::new(false),
            result: OnceCell::new(),
        }
    }

    /// Runs `load` once for all callers of this flight and returns its result to each. If the
    /// caller running it is cancelled, the next waiter runs it instead.
    pub async fn run<F, Fut>(&self, load: F) -> T
    where
        T: Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        self.result.get_or_init(load).await.clone()
    }
}

impl<T: Send + Sync + std::fmt::Debug> Lease for Flight<T> {
    fn is_valid(&self) -> bool {
        !self.stale.load(Ordering::Acquire)
    }
}

/// The in-flight loads of one keyspace, by key.
#[derive(Debug)]
pub struct Flights<T> {
    map: Mutex<HashMap<Arc<str>, Arc<Flight<T>>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Flights<T> {
    /// Joins the key's current flight or starts one. The flag is true for the caller that started it.
    pub fn join(&self, key: &Arc<str>) -> (Arc<Flight<T>>, bool) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(key) {
            return (f.clone(), false);
        }
        let f = Arc::new(Flight::new());
        map.insert(key.clone(), f.clone());
        (f, true)
    }

    /// Removes the flight once it is done, unless a newer one has taken its place.
    pub fn finish(&self, key: &str, flight: &Arc<Flight<T>>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    /// A mutation of `key` is about to be installed: the key's flight (if any) must not install
    /// its result, and later readers must not join it.
    pub fn invalidate(&self, key: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.remove(key) {
            f.stale.store(true, Ordering::Release);
        }
    }

    /// Marks every flight stale (the keyspace was cleared).
    pub fn invalidate_all(&self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (_, f) in map.drain() {
            f.stale.store(true, Ordering::Release);
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<Flights<u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let key: Arc<str> = "k".into();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (flights, runs, key) = (flights.clone(), runs.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let (f, _) = flights.join(&key);
                let v = f
                    .run(|| async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        7
                    })
                    .await;
                flights.finish(&key, &f);
                v
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[test]
    fn invalidate_makes_the_lease_stale_and_detaches_the_flight() {
        let flights: Flights<u32> = Flights::default();
        let key: Arc<str> = "k".into();
        let (old, leader) = flights.join(&key);
        assert!(leader && old.is_valid());
        flights.invalidate("k");
        assert!(!old.is_valid());
        let (new, leader) = flights.join(&key);
        assert!(leader, "a reader after the mutation starts a fresh load");
        flights.finish("k", &old);
        assert_eq!(flights.len(), 1, "the old flight finishing does not remove the new one");
        flights.finish("k", &new);
        assert!(flights.is_empty());
    }
}
