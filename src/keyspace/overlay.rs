//! The pending-write overlay of one keyspace: the document each key will have once its
//! write-behind writes reach Postgres. Reads see it before L1 (read-your-writes whatever the
//! database state under it); the flusher settles an entry once the flush carrying it committed
//! and its stored row is installed. Entries are ordered by the write's version, so a late
//! settle or an older write never removes or replaces a newer one.
//!
//! Keys are held inline in the table (up to 24 bytes; longer ones on the heap): a flush settles
//! thousands of keys in an order that is random in the table, and comparing a probed key
//! through a pointer to its own allocation cost a second cache miss per key, where inline
//! bytes arrive with the bucket. Settling 100k keys 64 at a time took ~250 ns a key with
//! `Arc<str>` keys and ~110 ns with inline ones; over a write-behind drain (`perf`), settling
//! went from 8.4 % of the sidecar's CPU samples, plus most of `memcmp`'s 3.7 %, to 3.8 % (with
//! [`Overlay::settle_all`]'s two passes).

use compact_str::CompactString;
use hashbrown::HashMap;
use hashbrown::hash_map::{Entry, EntryRef};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    map: Mutex<HashMap<CompactString, Pending, ahash::RandomState>>,
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
    pub fn set(&self, key: &str, p: Pending) {
        let key = CompactString::new(key);
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

    /// Settles several writes (as [`Overlay::settle`]) under one lock, in two passes: the
    /// first only looks each key up, independent probes the processor runs side by side, so
    /// their cache misses overlap and the second (which removes) finds the table's lines
    /// cached. Removing at once, each probe's misses came one after another: a flush settles
    /// keys in key order, which is random in the table (~110 against ~90 ns a key over a
    /// 100k-key overlay, more where other work evicts the table from the caches).
    pub fn settle_all(&self, writes: &[(&str, u64)]) {
        let mut gone: Vec<Pending> = Vec::new();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = 0u64;
        for (key, _) in writes {
            if let Some(p) = map.get(*key) {
                seen = seen.wrapping_add(p.version);
            }
        }
        // Kept, so the first pass is not dropped as having no effect.
        std::hint::black_box(seen);
        gone.extend(
            writes
                .iter()
                .filter_map(|&(key, version)| settled(&mut map, key, version)),
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
fn settled(map: &mut HashMap<CompactString, Pending, ahash::RandomState>, key: &str, version: u64) -> Option<Pending> {
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
        o.set("a", pending(2));
        o.set("b", pending(7));
        o.set("c", pending(4));
        // `a` settled at its version, `b` not (a newer write is pending), `c` by a later
        // version, `d` never pending.
        o.settle_all(&[("a", 2), ("b", 6), ("c", 9), ("d", 1)]);
        assert!(o.get("a").is_none());
        assert_eq!(o.get("b").map(|p| p.version), Some(7));
        assert!(o.get("c").is_none());
        assert_eq!(o.len(), 1);
        o.settle_all(&[("b", 7)]);
        assert!(o.is_empty());
        assert!(o.get("b").is_none());
    }

    #[test]
    fn an_older_write_or_settle_never_displaces_a_newer_write() {
        let o = Overlay::default();
        o.set("k", pending(5));
        o.set("k", pending(3));
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
