//! The compact store: the L1 tier of a keyspace configured `store = "compact"`, for keyspaces
//! that hold whole tables (warm CDC keyspaces) or Redis-like data (in-memory keyspaces over
//! RESP), where bytes per entry matter more than a cache's admission policy.
//!
//! Each entry is **one allocation**: a thin reference-counted record (`triomphe::ThinArc`)
//! holding a small header, the key's bytes and the value's bytes, so the table's slot is one
//! pointer. The fields most entries never have (a load's snapshot, read and confirmation
//! times, federation metadata) live in one optional box. Times are nanoseconds since the
//! store's epoch on the tokio clock, so paused-clock tests see the same lifetimes as the
//! cache store. The table is 64 shards of a `hashbrown` open-addressing table, each behind its
//! own lock; every install of a key happens under its shard's write lock, which gives the
//! per-key atomicity the cache store gets from moka's `and_compute_with`.
//!
//! Reads hand out the same [`Entry`] the cache store does: its value is a `Bytes` that borrows
//! the record (no copy of the value), at the cost of two small allocations per read (the
//! `Bytes` owner and the `Arc<Entry>`), measured in `benches/http_latency.rs`.
//!
//! Bounds: past `max_entries` / `max_bytes` the store evicts like Redis's approximated LRU — it
//! samples a few random slots of the shard just written and drops the entry read longest ago (a
//! per-entry access clock in seconds); evicting where it inserts keeps every shard's table at
//! its share of the bound. The bound is checked against totals to which each shard adds its own
//! counts in steps of 1/256 of its share — so two cores putting at once do not trade one cache
//! line per entry — with room for what the shards hold back: the store never holds more than
//! its bound, and after evicting at most 1/128 less (a bound under 16,384 entries or bytes is
//! checked exactly). The entry count and weight it reports are the shards' exact sums.
//! Lifetimes are checked on every read; memory of expired entries is freed by
//! [`Compact::sweep`], which skips a shard until its earliest deadline has passed.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicIsize, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use hashbrown::HashTable;
use hashbrown::hash_table::{Entry as Slot, OccupiedEntry};
use tokio::time::Instant;
use triomphe::ThinArc;

use super::{Capacity, Entry, FedMeta, Snapshot};
use crate::lsn::Lsn;

/// Shards of the table: enough that two cores rarely meet on one lock.
const SHARDS: usize = 64;
/// Slots sampled per eviction (Redis samples 5 by default; more is closer to true LRU).
const EVICTION_SAMPLE: usize = 8;
/// `expires_ns` of an entry without a deadline of its own.
const NO_DEADLINE: u64 = u64::MAX;
const HAS_VALUE: u8 = 1;
const RAW: u8 = 2;
const HAS_XID: u8 = 4;
/// The entry was read from Postgres when it was stored (`read_at == stored_at`): a warm load's
/// rows, all read at their snapshot, carry that time without a box of their own.
const READ_AT_STORED: u8 = 8;

/// Bytes of a record besides key and value: triomphe's count and slice length, and [`Head`].
pub const RECORD_FIXED_BYTES: usize = 16 + std::mem::size_of::<Head>();
/// The table's share per entry: an 8-byte slot and a control byte at hashbrown's load of
/// 44–88 %, and under evictions the deleted-slot markers that make each shard's table double
/// once more than its live entries need (measured by `tests/it/memory.rs`).
pub const SLOT_BYTES: usize = 24;
/// Every shard: what [`Compact::sweep`] is given to sweep the whole store.
pub const ALL_SHARDS: usize = SHARDS;

/// The fields few entries have, kept out of the record unless one is set.
#[derive(Debug)]
struct Extra {
    snapshot: Option<Arc<Snapshot>>,
    read_at: Option<Instant>,
    checked_at: Option<Instant>,
    fed: Option<Arc<FedMeta>>,
}

/// A record's fixed part (56 bytes).
#[derive(Debug)]
pub struct Head {
    lsn: u64,
    version: u64,
    stored_ns: u64,
    expires_ns: u64,
    extra: Option<Box<Extra>>,
    key_len: u32,
    xid: u32,
    /// Seconds since the epoch at the last read: the eviction sample's order.
    used: AtomicU32,
    flags: u8,
}

type Rec = ThinArc<Head, u8>;

fn key_of(r: &Rec) -> &[u8] {
    &r.slice[..r.header.header.key_len as usize]
}

/// A record's value as the owner of a `Bytes`: reads share the record instead of copying.
struct ValueOf(Rec);

impl AsRef<[u8]> for ValueOf {
    fn as_ref(&self) -> &[u8] {
        &self.0.slice[self.0.header.header.key_len as usize..]
    }
}

/// The allocation size class a request of `n` bytes lands in (mimalloc's bins: 8-byte steps to
/// 64 bytes, then four classes per power of two), so weights count what the allocator hands out.
pub fn alloc_class(n: usize) -> usize {
    let words = n.div_ceil(8).max(1);
    if words <= 8 {
        return words * 8;
    }
    let b = usize::BITS - 1 - (words - 1).leading_zeros();
    let step = 1usize << (b - 2);
    words.div_ceil(step) * step * 8
}

/// Bytes one entry of `key_len` and `value_len` costs in the compact store: its record's
/// allocation class, an eighth of it for the freed blocks the allocator's per-thread heaps
/// hold while entries are replaced and evicted (records freed on one worker thread are reused by
/// the thread that allocated them), and its share of the table. With these weights a bounded
/// keyspace written past its bound by several clients grows the process by its bound, give or
/// take a few percent (`tests/it/memory.rs`); without the allowances it grew 9–13 % past it, and
/// with a sixteenth 2–7 % quiet and up to 10.5 % with the whole test suite running beside it.
pub fn weight(key_len: usize, value_len: usize) -> u64 {
    let class = alloc_class(RECORD_FIXED_BYTES + key_len + value_len);
    (class + class / 8 + SLOT_BYTES) as u64
}

fn weight_of(r: &Rec) -> i64 {
    let key_len = r.header.header.key_len as usize;
    weight(key_len, r.slice.len() - key_len) as i64
}

/// What a compute step does with the key's entry.
pub enum Step<'a> {
    Put(&'a Entry),
    Remove,
    Keep,
}

/// What a compute step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Inserted,
    Replaced,
    Removed,
    Kept,
}

/// One shard, on cache lines of its own: its lock, table and counts move between cores
/// together, and only with the lock.
#[repr(align(128))]
struct Shard {
    table: RwLock<HashTable<Rec>>,
    /// The earliest deadline of any entry put here since the last sweep (ns since the epoch).
    next_due: AtomicU64,
    /// Entries and weighed bytes here (exact). Changed only under the write lock.
    len: AtomicIsize,
    bytes: AtomicI64,
    /// Counted here and not yet added to the store's [`Totals`].
    unsent_len: AtomicIsize,
    unsent_bytes: AtomicI64,
}

/// What the bound is checked against on every put: the shards' counts, each shard adding its
/// own in steps (see [`Compact::count`]), so two cores putting at once do not pass one cache
/// line back and forth per entry.
#[repr(align(128))]
#[derive(Default)]
struct Totals {
    len: AtomicIsize,
    bytes: AtomicI64,
}

/// The compact store of one keyspace.
pub struct Compact {
    shards: Box<[Shard]>,
    hasher: ahash::RandomState,
    epoch: Instant,
    ttl_ns: u64,
    negative_ttl_ns: u64,
    capacity: Capacity,
    /// Boxed: its own cache lines, apart from the read-only fields beside it.
    totals: Box<Totals>,
    /// How far a shard's own count may run ahead of [`Totals`] before it adds it: 1/256 of its
    /// share of the bound (at least 1: then every change is added at once).
    step_len: isize,
    step_bytes: i64,
    /// The most all shards together can hold back from [`Totals`] (each less than a step): the
    /// bound is checked with this much room, so what the store holds never passes it.
    slack: i64,
    /// Picks eviction samples (a counter hashed; no lock, no RNG state to share).
    probe: AtomicU64,
    /// The shard the next partial sweep starts at.
    cursor: AtomicUsize,
}

thread_local! {
    /// Key and value are laid end to end here before they are copied into a record.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(NO_DEADLINE as u128 - 1) as u64
}

impl Compact {
    pub fn new(capacity: Capacity, ttl: Duration, negative_ttl: Duration) -> Compact {
        let now = Instant::now();
        // Each shard's step is 1/256 of its share of the bound; only the bound's own unit is
        // counted in steps (the other is added whenever that one is).
        let step = |bound: u64| (bound / (SHARDS as u64 * 256)).clamp(1, i32::MAX as u64) as i64;
        let (step_len, step_bytes, slack) = match capacity {
            Capacity::Entries(n) => (step(n) as isize, i64::MAX, SHARDS as i64 * (step(n) - 1)),
            Capacity::Bytes(n) => (isize::MAX, step(n), SHARDS as i64 * (step(n) - 1)),
        };
        Compact {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    table: RwLock::new(HashTable::new()),
                    next_due: AtomicU64::new(NO_DEADLINE),
                    len: AtomicIsize::new(0),
                    bytes: AtomicI64::new(0),
                    unsent_len: AtomicIsize::new(0),
                    unsent_bytes: AtomicI64::new(0),
                })
                .collect(),
            hasher: ahash::RandomState::new(),
            // An epoch a day back, when the clock allows, so an entry made just before the store
            // keeps its exact age.
            epoch: now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now),
            ttl_ns: ns(ttl),
            negative_ttl_ns: ns(negative_ttl),
            capacity,
            totals: Box::default(),
            step_len,
            step_bytes,
            slack,
            probe: AtomicU64::new(0),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Makes room in the tables for `entries` more entries (spread over the shards), so a bulk
    /// load does not grow and rehash each table many times. Never more than the bound can hold:
    /// `max_entries`, or as many of the smallest entries as fit in `max_bytes`.
    pub fn reserve(&self, entries: usize) {
        let entries = match self.capacity {
            Capacity::Entries(max) => entries.min(max as usize),
            Capacity::Bytes(max) => entries.min((max / weight(1, 0)) as usize),
        };
        let per_shard = entries.div_ceil(self.shards.len());
        for shard in self.shards.iter() {
            let mut table = shard.table.write().unwrap_or_else(|p| p.into_inner());
            table.reserve(per_shard, |r| self.hash(key_of(r)));
        }
    }

    fn now_ns(&self) -> u64 {
        ns(Instant::now().saturating_duration_since(self.epoch))
    }

    fn at(&self, t: Instant) -> u64 {
        ns(t.saturating_duration_since(self.epoch))
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[Self::shard_of(hash)]
    }

    /// Bits hashbrown uses for neither the bucket (low bits) nor the control byte (top 7).
    fn shard_of(hash: u64) -> usize {
        (hash >> 40) as usize % SHARDS
    }

    fn write(shard: &Shard) -> RwLockWriteGuard<'_, HashTable<Rec>> {
        shard.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// When the record stops being live (ns since the epoch).
    fn deadline(&self, h: &Head) -> u64 {
        if h.expires_ns != NO_DEADLINE {
            h.expires_ns
        } else if h.extra.as_ref().is_some_and(|x| x.fed.is_some()) {
            NO_DEADLINE
        } else if h.flags & HAS_VALUE != 0 {
            h.stored_ns.saturating_add(self.ttl_ns)
        } else {
            h.stored_ns.saturating_add(self.negative_ttl_ns)
        }
    }

    fn record(&self, key: &str, e: &Entry) -> Rec {
        let mut flags = 0;
        if e.value.is_some() {
            flags |= HAS_VALUE;
        }
        if e.raw {
            flags |= RAW;
        }
        if e.xid.is_some() {
            flags |= HAS_XID;
        }
        let stored_ns = self.at(e.stored_at);
        // A read time equal to the store time is a flag, not a box — when the store time reads
        // back exactly (it is never before the epoch in practice).
        let read_at = match e.read_at {
            Some(t) if t == e.stored_at && self.epoch + Duration::from_nanos(stored_ns) == t => {
                flags |= READ_AT_STORED;
                None
            }
            other => other,
        };
        let extra =
            (e.snapshot.is_some() || read_at.is_some() || e.checked_at.is_some() || e.fed.is_some()).then(|| {
                Box::new(Extra {
                    snapshot: e.snapshot.clone(),
                    read_at,
                    checked_at: e.checked_at,
                    fed: e.fed.clone(),
                })
            });
        let head = Head {
            lsn: e.lsn.0,
            version: e.version,
            stored_ns,
            expires_ns: e.expires_at.map_or(NO_DEADLINE, |t| self.at(t)),
            extra,
            key_len: key.len().min(u32::MAX as usize) as u32,
            xid: e.xid.unwrap_or(0),
            // Stored is as good as read for the eviction order, and spares a clock read per put
            // (a bulk load stores a batch at one time).
            used: AtomicU32::new((stored_ns / 1_000_000_000) as u32),
            flags,
        };
        let value = e.value.as_deref().unwrap_or(&[]);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.clear();
            s.extend_from_slice(key.as_bytes());
            s.extend_from_slice(value);
            let rec = ThinArc::from_header_and_slice(head, &s);
            if s.capacity() > 64 * 1024 {
                *s = Vec::new();
            }
            rec
        })
    }

    fn entry(&self, r: &Rec) -> Entry {
        let h = &r.header.header;
        let x = h.extra.as_deref();
        let stored_at = self.epoch + Duration::from_nanos(h.stored_ns);
        Entry {
            value: (h.flags & HAS_VALUE != 0).then(|| Bytes::from_owner(ValueOf(r.clone()))),
            lsn: Lsn(h.lsn),
            xid: (h.flags & HAS_XID != 0).then_some(h.xid),
            snapshot: x.and_then(|x| x.snapshot.clone()),
            version: h.version,
            stored_at,
            read_at: if h.flags & READ_AT_STORED != 0 {
                Some(stored_at)
            } else {
                x.and_then(|x| x.read_at)
            },
            checked_at: x.and_then(|x| x.checked_at),
            fed: x.and_then(|x| x.fed.clone()),
            expires_at: (h.expires_ns != NO_DEADLINE).then(|| self.epoch + Duration::from_nanos(h.expires_ns)),
            raw: h.flags & RAW != 0,
        }
    }

    /// Whether `e` holds exactly the state of record `r` (the cache store compares `Arc`s; a
    /// compact read makes a new `Entry` each time, whose value borrows the record).
    fn same(&self, r: &Rec, e: &Entry) -> bool {
        let h = &r.header.header;
        let value_same = match &e.value {
            Some(v) => h.flags & HAS_VALUE != 0 && std::ptr::eq(v.as_ptr(), r.slice[h.key_len as usize..].as_ptr()),
            None => h.flags & HAS_VALUE == 0,
        };
        value_same && h.lsn == e.lsn.0 && h.version == e.version && h.stored_ns == self.at(e.stored_at)
    }

    /// The entry under `key`, unless its lifetime is over.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        let hash = self.hash(key.as_bytes());
        let table = self.shard(hash).table.read().unwrap_or_else(|p| p.into_inner());
        let r = table.find(hash, |r| key_of(r) == key.as_bytes())?;
        let now = self.now_ns();
        let h = &r.header.header;
        if now >= self.deadline(h) {
            return None;
        }
        let secs = (now / 1_000_000_000) as u32;
        if h.used.load(Ordering::Relaxed) != secs {
            h.used.store(secs, Ordering::Relaxed);
        }
        Some(Arc::new(self.entry(r)))
    }

    /// Runs `f` on the key's entry (expired or not) under the shard's write lock and applies
    /// its step. Returns what it did, and the keys evicted to make room (each a document gone
    /// for room, for the caller's drop accounting).
    pub fn compute<'a>(&self, key: Arc<str>, f: impl FnOnce(Option<&Arc<Entry>>) -> Step<'a>) -> (Done, Vec<Arc<str>>) {
        let hash = self.hash(key.as_bytes());
        let shard = self.shard(hash);
        let done = {
            let mut table = Self::write(shard);
            let slot = table.entry(hash, |r| key_of(r) == key.as_bytes(), |r| self.hash(key_of(r)));
            match slot {
                Slot::Occupied(o) => {
                    let old = Arc::new(self.entry(o.get()));
                    let step = f(Some(&old));
                    self.apply(shard, &key, o, step)
                }
                Slot::Vacant(v) => match f(None) {
                    Step::Put(new) => self.place(shard, Slot::Vacant(v), self.record(&key, new)).0,
                    Step::Remove | Step::Keep => Done::Kept,
                },
            }
        };
        let evicted = match done {
            Done::Inserted | Done::Replaced => self.make_room(Self::shard_of(hash)),
            _ => Vec::new(),
        };
        (done, evicted)
    }

    /// Stores `entry` under `key` whatever is there.
    pub fn put(&self, key: Arc<str>, entry: &Entry) -> Vec<Arc<str>> {
        let hash = self.hash(key.as_bytes());
        let shard = self.shard(hash);
        let rec = self.record(&key, entry);
        let replaced = {
            let mut table = Self::write(shard);
            let slot = table.entry(hash, |r| key_of(r) == key.as_bytes(), |r| self.hash(key_of(r)));
            self.place(shard, slot, rec).1
        };
        // The old record is freed here, after the lock is released.
        drop(replaced);
        self.make_room(Self::shard_of(hash))
    }

    /// Counts `len` entries and `bytes` more (or fewer) in `shard`, whose write lock the caller
    /// holds. The shard adds what it counted to the store's totals once it reaches a step (or at
    /// once, with `now`: an eviction, so the loop making room sees each one).
    fn count(&self, shard: &Shard, len: isize, bytes: i64, now: bool) {
        shard.len.fetch_add(len, Ordering::Relaxed);
        shard.bytes.fetch_add(bytes, Ordering::Relaxed);
        let len = shard.unsent_len.load(Ordering::Relaxed) + len;
        let bytes = shard.unsent_bytes.load(Ordering::Relaxed) + bytes;
        if now || len.abs() >= self.step_len || bytes.abs() >= self.step_bytes {
            self.totals.len.fetch_add(len, Ordering::Relaxed);
            self.totals.bytes.fetch_add(bytes, Ordering::Relaxed);
            shard.unsent_len.store(0, Ordering::Relaxed);
            shard.unsent_bytes.store(0, Ordering::Relaxed);
        } else {
            shard.unsent_len.store(len, Ordering::Relaxed);
            shard.unsent_bytes.store(bytes, Ordering::Relaxed);
        }
    }

    /// Uncounts `r`, just removed from `shard` (its write lock held).
    fn forget(&self, shard: &Shard, r: &Rec, now: bool) {
        self.count(shard, -1, -weight_of(r), now);
    }

    fn over(&self) -> bool {
        match self.capacity {
            Capacity::Entries(n) => self.totals.len.load(Ordering::Relaxed) as i64 + self.slack > n as i64,
            Capacity::Bytes(n) => self.totals.bytes.load(Ordering::Relaxed) + self.slack > n as i64,
        }
    }

    /// Evicts sampled least-recently-read entries until the store is within its bound, from
    /// the shard just written first (so every shard stays near its share and no table grows
    /// past what the bound holds), then from others if that one runs out. Returns the evicted
    /// keys of documents (negative entries are not reported).
    fn make_room(&self, written: usize) -> Vec<Arc<str>> {
        let mut evicted = Vec::new();
        let mut shard_at = written;
        let mut tries = 0;
        while self.over() && tries < 2 * SHARDS {
            tries += 1;
            let shard = &self.shards[shard_at];
            let mut table = Self::write(shard);
            let buckets = table.num_buckets();
            if table.is_empty() || buckets == 0 {
                shard_at = (shard_at + 1) % SHARDS;
                continue;
            }
            let mut pick = self.hasher.hash_one(self.probe.fetch_add(1, Ordering::Relaxed));
            let mut best: Option<(u32, usize)> = None;
            let mut seen = 0;
            for _ in 0..EVICTION_SAMPLE * 8 {
                pick = pick.rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let i = (pick >> 11) as usize % buckets;
                if let Some(r) = table.get_bucket(i) {
                    let used = r.header.header.used.load(Ordering::Relaxed);
                    if best.is_none_or(|(u, _)| used < u) {
                        best = Some((used, i));
                    }
                    seen += 1;
                    if seen == EVICTION_SAMPLE {
                        break;
                    }
                }
            }
            let Some((_, i)) = best else {
                continue;
            };
            if let Ok(o) = table.get_bucket_entry(i) {
                let (r, _) = o.remove();
                self.forget(shard, &r, true);
                if r.header.header.flags & HAS_VALUE != 0 {
                    evicted.push(Arc::from(String::from_utf8_lossy(key_of(&r))));
                }
            }
        }
        evicted
    }

    /// Forgets `key`.
    pub fn remove(&self, key: &str) {
        let hash = self.hash(key.as_bytes());
        let shard = self.shard(hash);
        // Freed after the lock is released.
        let _removed = {
            let mut table = Self::write(shard);
            match table.find_entry(hash, |r| key_of(r) == key.as_bytes()) {
                Ok(o) => {
                    let (r, _) = o.remove();
                    self.forget(shard, &r, false);
                    Some(r)
                }
                Err(_) => None,
            }
        };
    }

    /// Forgets every key.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            // Freed after the lock is released.
            let _old = {
                let mut table = Self::write(shard);
                let old = std::mem::take(&mut *table);
                let bytes: i64 = old.iter().map(weight_of).sum();
                self.count(shard, -(old.len() as isize), -bytes, true);
                old
            };
        }
    }

    /// Frees the memory of expired entries in up to `limit` shards whose earliest deadline has
    /// passed, going round the shards from where the last sweep stopped. Returns the keys of the
    /// expired documents.
    pub fn sweep(&self, limit: usize) -> Vec<Arc<str>> {
        let now = self.now_ns();
        let mut expired = Vec::new();
        let start = self.cursor.load(Ordering::Relaxed);
        let mut swept = 0;
        for i in 0..SHARDS {
            if swept == limit {
                self.cursor.store((start + i) % SHARDS, Ordering::Relaxed);
                break;
            }
            let shard = &self.shards[(start + i) % SHARDS];
            if shard.next_due.load(Ordering::Relaxed) > now {
                continue;
            }
            swept += 1;
            let mut table = Self::write(shard);
            // Entries put from here on lower it again.
            shard.next_due.store(NO_DEADLINE, Ordering::Relaxed);
            let mut next = NO_DEADLINE;
            table.retain(|r| {
                let h = &r.header.header;
                let due = self.deadline(h);
                if now >= due {
                    self.forget(shard, r, false);
                    if h.flags & HAS_VALUE != 0 {
                        expired.push(Arc::from(String::from_utf8_lossy(key_of(r))));
                    }
                    false
                } else {
                    next = next.min(due);
                    true
                }
            });
            shard.next_due.fetch_min(next, Ordering::Relaxed);
        }
        expired
    }

    pub fn len(&self) -> u64 {
        let n: isize = self.shards.iter().map(|s| s.len.load(Ordering::Relaxed)).sum();
        n.max(0) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Weighed bytes held ([`weight`] of every entry).
    pub fn weighted_size(&self) -> u64 {
        let n: i64 = self.shards.iter().map(|s| s.bytes.load(Ordering::Relaxed)).sum();
        n.max(0) as u64
    }

    /// Every live entry (a snapshot, shard by shard).
    pub fn entries(&self) -> Vec<(Arc<str>, Arc<Entry>)> {
        let now = self.now_ns();
        let mut out = Vec::with_capacity(self.len() as usize);
        for shard in self.shards.iter() {
            let table = shard.table.read().unwrap_or_else(|p| p.into_inner());
            for r in table.iter() {
                if now < self.deadline(&r.header.header) {
                    out.push((Arc::from(String::from_utf8_lossy(key_of(r))), Arc::new(self.entry(r))));
                }
            }
        }
        out
    }

    /// Whether the record under `key` holds exactly `e`'s state.
    #[cfg(test)]
    fn holds(&self, key: &str, e: &Entry) -> bool {
        let hash = self.hash(key.as_bytes());
        let table = self.shard(hash).table.read().unwrap_or_else(|p| p.into_inner());
        table
            .find(hash, |r| key_of(r) == key.as_bytes())
            .is_some_and(|r| self.same(r, e))
    }

    /// Runs `f` like [`Compact::compute`], but only when the key holds exactly `e`'s state.
    pub fn compute_exact(&self, key: Arc<str>, e: &Entry, step: Step<'_>) -> Done {
        let hash = self.hash(key.as_bytes());
        let shard = self.shard(hash);
        let mut table = Self::write(shard);
        let Ok(o) = table.find_entry(hash, |r| key_of(r) == key.as_bytes()) else {
            return Done::Kept;
        };
        if !self.same(o.get(), e) {
            return Done::Kept;
        }
        self.apply(shard, &key, o, step)
    }

    /// Puts `rec` in `slot` — over the record there, or new — counting its weight, the entry
    /// count and its shard's earliest deadline. Returns what it did and the record it replaced.
    fn place(&self, shard: &Shard, slot: Slot<'_, Rec>, rec: Rec) -> (Done, Option<Rec>) {
        // Most puts share the shard's earliest deadline or come after it: no write then.
        let due = self.deadline(&rec.header.header);
        if due < shard.next_due.load(Ordering::Relaxed) {
            shard.next_due.fetch_min(due, Ordering::Relaxed);
        }
        let w = weight_of(&rec);
        match slot {
            Slot::Occupied(mut o) => {
                self.count(shard, 0, w - weight_of(o.get()), false);
                (Done::Replaced, Some(std::mem::replace(o.get_mut(), rec)))
            }
            Slot::Vacant(v) => {
                self.count(shard, 1, w, false);
                v.insert(rec);
                (Done::Inserted, None)
            }
        }
    }

    /// Applies `step` to the key's record (its shard's write lock held by `o`).
    fn apply(&self, shard: &Shard, key: &str, o: OccupiedEntry<'_, Rec>, step: Step<'_>) -> Done {
        match step {
            Step::Put(new) => self.place(shard, Slot::Occupied(o), self.record(key, new)).0,
            Step::Remove => {
                let (r, _) = o.remove();
                self.forget(shard, &r, false);
                Done::Removed
            }
            Step::Keep => Done::Kept,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_ahead_of_a_load_never_exceeds_what_the_bound_holds() {
        let capacity = |c: &Compact| -> usize { c.shards.iter().map(|s| s.table.read().unwrap().capacity()).sum() };
        let by_bytes = Compact::new(
            Capacity::Bytes(1 << 20),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        by_bytes.reserve(100_000_000);
        let most = ((1u64 << 20) / weight(1, 0)) as usize;
        assert!(capacity(&by_bytes) >= most, "room for what fits");
        assert!(capacity(&by_bytes) < 4 * most, "not for a hundred million rows");
        let by_entries = Compact::new(Capacity::Entries(1000), Duration::from_secs(60), Duration::from_secs(1));
        by_entries.reserve(100_000_000);
        assert!((1000..4000).contains(&capacity(&by_entries)));
    }

    fn doc(v: &str) -> Entry {
        Entry::new(Some(Bytes::from(v.to_string())), Lsn(7), 3)
    }

    #[test]
    fn a_record_reads_back_every_field() {
        let c = Compact::new(Capacity::Entries(10), Duration::from_secs(60), Duration::from_secs(1));
        let at = Instant::now();
        let mut e = doc("hello")
            .with_xid(Some(42))
            .read_at(at)
            .opaque(true, Some(at + Duration::from_secs(5)));
        e.snapshot = Some(Arc::new(Snapshot { xmax: 9, xip: vec![4] }));
        c.put("k".into(), &e);
        let back = c.get("k").expect("stored");
        assert_eq!(back.value.as_deref(), Some(&b"hello"[..]));
        assert_eq!(
            (back.lsn, back.xid, back.version, back.raw),
            (Lsn(7), Some(42), 3, true)
        );
        assert_eq!(back.stored_at, e.stored_at);
        assert_eq!((back.read_at, back.expires_at), (Some(at), e.expires_at));
        assert_eq!(back.snapshot, e.snapshot);
        let absent = Entry::new(None, Lsn(1), 1);
        c.put("n".into(), &absent);
        let n = c.get("n").expect("a negative entry");
        assert!(n.value.is_none() && n.xid.is_none() && !n.raw);
        assert!(c.holds("k", &back) && !c.holds("k", &e), "identity is the record's");
    }

    #[test]
    fn a_large_bound_is_never_passed_though_counted_in_steps() {
        let bound = 100_000u64;
        let c = Compact::new(
            Capacity::Entries(bound),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        assert!(c.step_len > 1, "a bound this size counts in steps");
        let mut evicted = 0;
        for i in 0..130_000 {
            evicted += c.put(format!("k{i}").into(), &doc("v")).len() as u64;
        }
        let held = c.len();
        assert!(held <= bound && held >= bound - bound / 128, "{held}");
        assert_eq!(
            held + evicted,
            130_000,
            "every entry is either held or reported evicted"
        );
        let table_len: usize = c.shards.iter().map(|s| s.table.read().unwrap().len()).sum();
        assert_eq!(held, table_len as u64, "the reported count is exact");
        // Keys of 2 to 7 bytes with a 1-byte value all land in one allocation class.
        assert_eq!(weight(2, 1), weight(7, 1));
        assert_eq!(c.weighted_size(), held * weight(7, 1), "the reported weight is exact");
        c.clear();
        assert_eq!((c.len(), c.weighted_size()), (0, 0));
        assert_eq!(
            c.totals.len.load(Ordering::Relaxed),
            0,
            "a clear sends its counts at once"
        );

        let by_bytes = Compact::new(
            Capacity::Bytes(20 << 20),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let value = "x".repeat(200);
        for i in 0..150_000 {
            by_bytes.put(format!("k{i}").into(), &doc(&value));
        }
        let size = by_bytes.weighted_size();
        assert!(size <= 20 << 20, "{size}");
        assert!(size >= (20 << 20) - (20 << 20) / 128, "{size}");
    }

    #[test]
    fn a_read_time_equal_to_the_store_time_takes_no_box() {
        let c = Compact::new(Capacity::Entries(10), Duration::from_secs(60), Duration::from_secs(1));
        let extra_of = |key: &str| {
            let hash = c.hash(key.as_bytes());
            let table = c.shard(hash).table.read().unwrap();
            table
                .find(hash, |r| key_of(r) == key.as_bytes())
                .map(|r| r.header.header.extra.is_some())
                .expect("stored")
        };
        let e = doc("warm");
        let warm = e.clone().read_at(e.stored_at);
        c.put("w".into(), &warm);
        assert!(!extra_of("w"), "a warm load's row is one allocation");
        let back = c.get("w").expect("stored");
        assert_eq!((back.read_at, back.stored_at), (Some(e.stored_at), e.stored_at));
        assert!(c.holds("w", &back));

        // Read earlier than stored (write-through): the read time keeps its own place.
        let earlier = e
            .stored_at
            .checked_sub(Duration::from_millis(3))
            .expect("a clock past 3 ms");
        c.put("t".into(), &e.clone().read_at(earlier));
        assert!(extra_of("t"));
        assert_eq!(c.get("t").expect("stored").read_at, Some(earlier));

        // Other rare fields still take the box; the read time stays exact beside them.
        let mut checked = warm.clone();
        checked.checked_at = Some(e.stored_at + Duration::from_secs(1));
        c.put("c".into(), &checked);
        assert!(extra_of("c"));
        let back = c.get("c").expect("stored");
        assert_eq!((back.read_at, back.checked_at), (Some(e.stored_at), checked.checked_at));

        // No read time at all stays no read time.
        c.put("n".into(), &e);
        assert_eq!((extra_of("n"), c.get("n").expect("stored").read_at), (false, None));
    }

    #[test]
    fn weights_follow_the_allocators_classes() {
        assert_eq!(alloc_class(1), 8);
        assert_eq!(alloc_class(64), 64);
        assert_eq!(alloc_class(65), 80);
        assert_eq!(alloc_class(160), 160);
        assert_eq!(alloc_class(161), 192);
        assert_eq!(alloc_class(1025), 1280);
        assert_eq!(RECORD_FIXED_BYTES, 72);
        let c = Compact::new(Capacity::Entries(10), Duration::from_secs(60), Duration::from_secs(1));
        c.put("key".into(), &doc(&"x".repeat(100)));
        assert_eq!(c.weighted_size(), weight(3, 100));
        c.put("key".into(), &doc("x"));
        assert_eq!(c.weighted_size(), weight(3, 1), "a replacement swaps the weights");
        c.remove("key");
        assert_eq!((c.weighted_size(), c.len()), (0, 0));
    }

    #[test]
    fn a_bound_evicts_down_to_it() {
        let c = Compact::new(Capacity::Entries(100), Duration::from_secs(60), Duration::from_secs(1));
        let mut evicted = 0;
        for i in 0..1000 {
            evicted += c.put(format!("k{i}").into(), &doc("v")).len();
        }
        assert_eq!(c.len(), 100);
        assert_eq!(evicted, 900, "every eviction is reported");
        let bytes = Compact::new(Capacity::Bytes(50_000), Duration::from_secs(60), Duration::from_secs(1));
        for i in 0..2000 {
            bytes.put(format!("k{i}").into(), &doc(&"v".repeat(200)));
        }
        assert!(bytes.weighted_size() <= 50_000, "{}", bytes.weighted_size());
        assert!(
            bytes.weighted_size() > 50_000 - weight(5, 200) - bytes.slack as u64,
            "{} (room held for the shards' unsent counts: {})",
            bytes.weighted_size(),
            bytes.slack
        );
    }

    #[test]
    fn compute_sees_the_entry_and_applies_its_step() {
        let c = Compact::new(Capacity::Entries(10), Duration::from_secs(60), Duration::from_secs(1));
        let a = doc("a");
        let (d, _) = c.compute("k".into(), |old| {
            assert!(old.is_none());
            Step::Put(&a)
        });
        assert_eq!(d, Done::Inserted);
        let (d, _) = c.compute("k".into(), |old| {
            assert_eq!(old.unwrap().value.as_deref(), Some(&b"a"[..]));
            Step::Keep
        });
        assert_eq!(d, Done::Kept);
        let held = c.get("k").unwrap();
        assert_eq!(
            c.compute_exact("k".into(), &doc("a"), Step::Remove),
            Done::Kept,
            "not the same state"
        );
        assert_eq!(c.compute_exact("k".into(), &held, Step::Remove), Done::Removed);
        assert!(c.get("k").is_none() && c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn lifetimes_expire_on_the_tokio_clock_and_sweeps_free_them() {
        let c = Compact::new(Capacity::Entries(10), Duration::from_secs(10), Duration::from_secs(1));
        c.put("p".into(), &doc("v"));
        c.put("n".into(), &Entry::new(None, Lsn(1), 1));
        let own = doc("w").opaque(false, Some(Instant::now() + Duration::from_secs(3)));
        c.put("d".into(), &own);
        assert!(c.sweep(SHARDS).is_empty());
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(c.get("n").is_none() && c.get("p").is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(c.get("d").is_none(), "its own deadline");
        assert_eq!(
            c.sweep(SHARDS),
            vec![Arc::<str>::from("d")],
            "only documents are reported"
        );
        assert_eq!(c.len(), 1);
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(c.get("p").is_none());
        assert_eq!(c.sweep(SHARDS).len(), 1);
        assert_eq!((c.len(), c.weighted_size()), (0, 0));
    }
}
