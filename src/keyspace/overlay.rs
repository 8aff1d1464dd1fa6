//! The pending-write overlay of one keyspace: the document each key will have once its
//! write-behind writes reach Postgres. Reads see it before L1 (read-your-writes whatever the
//! database state under it); the flusher settles an entry once the flush carrying it committed
//! and its stored row is installed. Entries are ordered by the write's version, so a late
//! settle or an older write never removes or replaces a newer one.

use hashbrown::HashMap;
use hashbrown::hash_map::{Entry, EntryRef};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// One key's unflushed write, as reads see it.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The document after the write; `None` for a delete.
    pub doc: Option<Bytes>,
    /// The write's version (HLC): orders and identifies it.
    pub version: u64,
    /// When it was accepted (for `Age`).
    pub at: tokio::time::Instant,
}

/// The unflushed writes of one keyspace.
#[derive(Debug, Default)]
pub struct Overlay {
    map: Mutex<HashMap<Arc<str>, Pending, ahash::RandomState>>,
    /// Entries in the map, kept under its lock: a read that finds zero skips the lock (most
    /// keyspaces never have a pending write, and every read would take it).
    len: AtomicUsize,
}

impl Overlay {
    pub fn get(&self, key: &str) -> Option<Pending> {
        if self.len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Records a write unless a newer one is already recorded.
    pub fn set(&self, key: Arc<str>, p: Pending) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // One probe of the table whichever way it goes.
        let old = match map.entry(key) {
            Entry::Occupied(o) if o.get().version > p.version => return,
            Entry::Occupied(mut o) => Some(std::mem::replace(o.get_mut(), p)),
            Entry::Vacant(v) => {
                v.insert(p);
                None
            }
        };
        self.len.store(map.len(), Ordering::SeqCst);
        drop(map);
        drop(old); // freed outside the lock
    }

    /// The write with `version` (and any older one) is done: stop overlaying it. A newer
    /// pending write of the key stays.
    pub fn settle(&self, key: &str, version: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let gone = settled(&mut map, key, version);
        if gone.is_some() {
            self.len.store(map.len(), Ordering::SeqCst);
        }
        drop(map);
        drop(gone); // freed outside the lock
    }

    /// Settles several writes (as [`Overlay::settle`]) under one lock. One tight loop over the
    /// table lets the processor overlap the probes' cache misses; a flusher settling key by key
    /// between L1 installs waited out each miss in turn.
    pub fn settle_all<'a>(&self, writes: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut gone: Vec<Pending> = Vec::new();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        gone.extend(
            writes
                .into_iter()
                .filter_map(|(key, version)| settled(&mut map, key, version)),
        );
        if !gone.is_empty() {
            self.len.store(map.len(), Ordering::SeqCst);
        }
        drop(map);
        drop(gone); // freed outside the lock
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Takes the key's pending write out of `map` if it is the write with `version` or older.
fn settled(map: &mut HashMap<Arc<str>, Pending, ahash::RandomState>, key: &str, version: u64) -> Option<Pending> {
    match map.entry_ref(key) {
        EntryRef::Occupied(o) if o.get().version <= version => Some(o.remove()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(version: u64) -> Pending {
        Pending {
            doc: Some(Bytes::from(version.to_string())),
            version,
            at: tokio::time::Instant::now(),
        }
    }

    #[test]
    fn settling_several_writes_at_once_settles_each_as_alone() {
        let o = Overlay::default();
        o.set("a".into(), pending(2));
        o.set("b".into(), pending(7));
        o.set("c".into(), pending(4));
        // `a` settled at its version, `b` not (a newer write is pending), `c` by a later
        // version, `d` never pending.
        o.settle_all([("a", 2), ("b", 6), ("c", 9), ("d", 1)]);
        assert!(o.get("a").is_none());
        assert_eq!(o.get("b").map(|p| p.version), Some(7));
        assert!(o.get("c").is_none());
        assert_eq!(o.len(), 1);
        o.settle_all([("b", 7)]);
        assert!(o.is_empty());
        assert!(o.get("b").is_none());
    }

    #[test]
    fn an_older_write_or_settle_never_displaces_a_newer_write() {
        let o = Overlay::default();
        o.set("k".into(), pending(5));
        o.set("k".into(), pending(3));
        assert_eq!(o.get("k").unwrap().version, 5);
        o.settle("k", 4);
        assert_eq!(
            o.get("k").unwrap().version,
            5,
            "settling an older write keeps the newer one"
        );
        o.settle("k", 5);
        assert!(o.get("k").is_none() && o.is_empty());
    }
}
