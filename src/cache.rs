//! The cache front of one keyspace: the L1 tier (moka) holding versioned entries, and the
//! registry of in-flight loads that gives single-flight and closes the fill/invalidate race.
//!
//! Ordering rules, in one place (see "Freshness and consistency rules" in the design):
//! - Every entry records the source position (`lsn`) of the state it holds: the commit LSN for a
//!   CDC change, the WAL position read inside a write's statement, the WAL position read just
//!   after a load's snapshot. A *mutation* (a write's result, a CDC change) replaces an entry only
//!   if it is at least as new ([`Install::IfNotOlder`]), inside moka's per-key
//!   `and_compute_with`, so two installs of one key never interleave.
//! - Comparing positions alone is not enough for loaded state: a transaction can write its
//!   commit record (at a lower LSN) a moment before it becomes visible, so a load's snapshot can
//!   miss a commit whose LSN is below the position read after it. A loaded entry therefore keeps
//!   the load's [`Snapshot`] (`xmax` and the in-progress xids, from `pg_current_snapshot()`),
//!   and a mutation from a transaction that snapshot could not see is newer, whatever its LSN.
//! - A *fill* (a read-through load) holds a lease: the [`Flight`] registered before its query was
//!   sent. Any mutation of that key first marks the key's flight stale ([`Flights::invalidate`]);
//!   a stale flight's result is handed to the callers that were already waiting for it but never
//!   installed. Because the stale check runs inside the same per-key compute as installs, a
//!   mutation that lands after the check still runs after the fill and wins.
//! - Entry lifetime is measured on `tokio::time` (so tests can pause it); moka's own TTL is only
//!   the backstop that frees memory.

pub mod compact;
pub mod l1;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::lsn::Lsn;
pub use l1::{Capacity, L1, StoreKind};

/// One cached key.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The JSON document, or `None` when the source has no such row (a negative entry).
    pub value: Option<Bytes>,
    /// Source position of the state held; zero when unknown (an in-memory keyspace).
    pub lsn: Lsn,
    /// The transaction that produced this state, when known (a CDC change or a write).
    pub xid: Option<u32>,
    /// For state read by a load: what its snapshot could not see.
    pub snapshot: Option<Arc<Snapshot>>,
    /// HLC timestamp of the install: orders this node's writes of the key. (The `ETag` is the
    /// value's [`etag`], so every node and restart names the same bytes alike.)
    pub version: u64,
    /// When this state was stored: the start of its TTL life and the base of `Age`.
    pub stored_at: Instant,
    /// When this state was read from Postgres itself (a load's query, a write-through's
    /// statement): it is known fresh as of then, whatever the change stream has confirmed.
    pub read_at: Option<Instant>,
    /// For a keyspace with an L2 tier: when this state was last confirmed current (read from
    /// L2 or Postgres, or found equal to L2's version); `None`: as of `stored_at`.
    pub checked_at: Option<Instant>,
    /// For state of a federated keyspace: the event that made it (its conflict order is
    /// `(version, origin)`). Such an entry never expires by time — a federated keyspace is a
    /// replicated store, and a delete stays as a versioned tombstone (`value: None`) until
    /// every peer has passed it.
    pub fed: Option<Arc<FedMeta>>,
    /// A deadline of this key's own (`SET … EX`, `EXPIRE` over RESP, in-memory keyspaces
    /// only): it replaces the keyspace's `ttl` for this entry.
    pub expires_at: Option<Instant>,
    /// The value is opaque bytes written over RESP to an in-memory keyspace, not a JSON
    /// document: HTTP serves it as `application/octet-stream`.
    pub raw: bool,
}

/// Which federated event made an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FedMeta {
    pub origin: Arc<str>,
    /// Its place in its origin's sequence, once known (a write applied at its origin before the
    /// log numbered it has none until the applier sees it).
    pub stamp: Option<crate::event::Stamp>,
}

/// What a federated merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// The event's state is now the entry's.
    Stored,
    /// The entry already holds this very event.
    Same,
    /// The entry holds a later event from another origin: this one lost the conflict.
    Lost,
    /// The entry holds a later event from the same origin (no conflict: just an old event).
    Superseded,
}

/// The visibility of a load's snapshot, from `pg_current_snapshot()` (`xmin:xmax:xip,...`):
/// a transaction is visible when it precedes `xmax` and is not in `xip`. Xids are compared in
/// Postgres's modulo-2³² order, as pgoutput sends 32-bit xids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmax: u32,
    pub xip: Vec<u32>,
}

/// The entity tag of a stored document: 64 bits of two CRC32C digests of its bytes, quoted.
/// Derived from the bytes alone, so it is the same on every node and across restarts, and a
/// conditional write can be checked against Postgres's row (rendered the same way) or against
/// any node's copy.
pub fn etag(doc: &[u8]) -> String {
    let tag = etag_bytes(doc);
    String::from_utf8_lossy(&tag).into_owned()
}

/// [`etag`] as bytes, written without the formatting machinery (a key read's hot path).
pub fn etag_bytes(doc: &[u8]) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = crc32c::crc32c(doc);
    let lo = crc32c::crc32c_append(0x9e37_79b9, doc);
    let both = (u64::from(hi) << 32) | u64::from(lo);
    let mut tag = [b'"'; 18];
    for (i, out) in tag[1..17].iter_mut().enumerate() {
        *out = HEX[((both >> (60 - 4 * i)) & 0xf) as usize];
    }
    tag
}

/// Which entity tags a precondition names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tags {
    /// `*`: any current document.
    Any,
    /// A list of tags as the client sent them (quoted; weak ones `W/"…"`).
    List(Vec<String>),
}

impl Tags {
    /// Parses an `If-Match` / `If-None-Match` value.
    pub fn parse(header: &str) -> Tags {
        let items: Vec<String> = header
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if items.iter().any(|t| t == "*") {
            Tags::Any
        } else {
            Tags::List(items)
        }
    }

    /// Strong comparison (`If-Match`): a weak tag never matches.
    fn matches_strong(&self, doc: &[u8]) -> bool {
        match self {
            Tags::Any => true,
            Tags::List(l) => {
                let tag = etag(doc);
                l.contains(&tag)
            }
        }
    }

    /// Weak comparison (`If-None-Match`).
    fn matches_weak(&self, doc: &[u8]) -> bool {
        match self {
            Tags::Any => true,
            Tags::List(l) => {
                let tag = etag(doc);
                l.iter().any(|t| t.strip_prefix("W/").unwrap_or(t) == tag)
            }
        }
    }
}

/// A write's precondition on the key's current document (HTTP `If-Match` / `If-None-Match`,
/// Redis `SET NX`/`XX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Always,
    /// Write only if there is a current document and it matches (`*`: any).
    IfMatch(Tags),
    /// Write only if there is no current document matching (`*`: none at all — create only).
    IfNoneMatch(Tags),
}

impl Condition {
    /// Whether the write may go ahead given the current document (`None`: absent).
    pub fn holds(&self, current: Option<&[u8]>) -> bool {
        match self {
            Condition::Always => true,
            Condition::IfMatch(t) => current.is_some_and(|d| t.matches_strong(d)),
            Condition::IfNoneMatch(t) => !current.is_some_and(|d| t.matches_weak(d)),
        }
    }

    pub fn is_always(&self) -> bool {
        *self == Condition::Always
    }
}

/// `a` precedes `b` in Postgres's circular xid order.
pub fn xid_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl Snapshot {
    /// Parses `pg_current_snapshot()` text (64-bit xids; the low 32 bits are the xid).
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let _xmin = parts.next()?;
        let xmax: u64 = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse::<u64>().map(|v| v as u32))
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Snapshot { xmax: xmax as u32, xip })
    }

    /// Whether the snapshot saw the changes of transaction `xid`.
    pub fn sees(&self, xid: u32) -> bool {
        xid_precedes(xid, self.xmax) && !self.xip.contains(&xid)
    }
}

impl Entry {
    pub fn new(value: Option<Bytes>, lsn: Lsn, version: u64) -> Entry {
        Entry::stored(value, lsn, version, Instant::now())
    }

    /// [`Entry::new`], stored at `stored_at` (a bulk load reads the clock once per batch).
    pub fn stored(value: Option<Bytes>, lsn: Lsn, version: u64, stored_at: Instant) -> Entry {
        Entry {
            value,
            lsn,
            xid: None,
            snapshot: None,
            version,
            stored_at,
            read_at: None,
            checked_at: None,
            fed: None,
            expires_at: None,
            raw: false,
        }
    }

    /// The same entry, holding opaque bytes (`raw`) and expiring at `deadline` when given.
    pub fn opaque(mut self, raw: bool, deadline: Option<Instant>) -> Entry {
        self.raw = raw;
        self.expires_at = deadline;
        self
    }

    /// The same entry, made by the federated event from `origin` (stamp when known).
    pub fn federated(mut self, origin: Arc<str>, stamp: Option<crate::event::Stamp>) -> Entry {
        self.fed = Some(Arc::new(FedMeta { origin, stamp }));
        self
    }

    /// When this state was last known current: its confirmation, else its install.
    pub fn confirmed_at(&self) -> Instant {
        self.checked_at.unwrap_or(self.stored_at)
    }

    /// The federated conflict order: highest `(version, origin)` wins; within one origin and
    /// version (the changes of one source transaction share its version) the later sequence
    /// number. A write applied at its origin before the log numbered it counts as sequence 0.
    pub fn merge_order(&self) -> (u64, &str, u64) {
        match &self.fed {
            Some(f) => (self.version, &*f.origin, f.stamp.map_or(0, |s| s.seq)),
            None => (self.version, "", 0),
        }
    }

    /// A federated delete: no value, kept until every peer has passed it.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none() && self.fed.is_some()
    }

    /// The same entry, read from Postgres at `at`.
    pub fn read_at(mut self, at: Instant) -> Entry {
        self.read_at = Some(at);
        self
    }

    /// The same entry, produced by transaction `xid`.
    pub fn with_xid(mut self, xid: Option<u32>) -> Entry {
        self.xid = xid;
        self
    }

    /// The same entry, read through `snapshot`.
    pub fn with_snapshot(mut self, snapshot: Option<Snapshot>) -> Entry {
        self.snapshot = snapshot.map(Arc::new);
        self
    }

    /// Whether this entry, as a mutation, may replace `old` (see the module docs). Between a
    /// change and state read through a snapshot, the snapshot's visibility of the change's
    /// transaction decides, in either direction; otherwise the positions do.
    pub fn supersedes(&self, old: &Entry) -> bool {
        match (&old.snapshot, self.xid, &self.snapshot, old.xid) {
            (Some(snap), Some(xid), _, _) if self.lsn < old.lsn => !snap.sees(xid),
            // Read through a snapshot (a resnapshot's row) over a change: newer exactly when
            // the snapshot saw that change.
            (_, _, Some(snap), Some(xid)) => snap.sees(xid),
            _ => self.lsn >= old.lsn,
        }
    }

    /// Bytes this entry accounts for under a byte capacity of the cache store.
    pub fn weight(&self, key: &str) -> u32 {
        let n = key.len() + self.value.as_ref().map_or(0, |v| v.len()) + l1::CACHE_ENTRY_OVERHEAD_BYTES;
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
    /// Flights in the map, raised before a flight is inserted (SeqCst): a mutation that reads
    /// zero after its change is in place cannot miss a load that began before it, so it skips
    /// the lock — in-memory keyspaces never load, and every write would take it.
    count: std::sync::atomic::AtomicUsize,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            count: std::sync::atomic::AtomicUsize::new(0),
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
        self.count.fetch_add(1, Ordering::SeqCst);
        map.insert(key.clone(), f.clone());
        (f, true)
    }

    /// Removes the flight once it is done, unless a newer one has taken its place.
    pub fn finish(&self, key: &str, flight: &Arc<Flight<T>>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A mutation of `key` is about to be installed: the key's flight (if any) must not install
    /// its result, and later readers must not join it.
    pub fn invalidate(&self, key: &str) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.remove(key) {
            self.count.fetch_sub(1, Ordering::SeqCst);
            f.stale.store(true, Ordering::Release);
        }
    }

    /// Marks every flight stale (the keyspace was cleared).
    pub fn invalidate_all(&self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (_, f) in map.drain() {
            self.count.fetch_sub(1, Ordering::SeqCst);
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

    #[test]
    fn an_etag_is_both_checksums_in_hex_quoted() {
        for doc in [&b""[..], br#"{"n":1}"#, &[0xffu8; 300][..]] {
            let (hi, lo) = (crc32c::crc32c(doc), crc32c::crc32c_append(0x9e37_79b9, doc));
            assert_eq!(etag(doc), format!("\"{hi:08x}{lo:08x}\""));
        }
    }

    #[test]
    fn conditions_follow_http_semantics() {
        let doc = br#"{"n":1}"#;
        let tag = etag(doc);
        assert_eq!(tag, etag(doc), "stable");
        assert_ne!(tag, etag(br#"{"n":2}"#));
        let if_match = |h: &str| Condition::IfMatch(Tags::parse(h));
        let if_none = |h: &str| Condition::IfNoneMatch(Tags::parse(h));
        assert!(if_match(&tag).holds(Some(doc)));
        assert!(if_match(&format!("\"x\", {tag}")).holds(Some(doc)), "a list");
        assert!(
            !if_match(&format!("W/{tag}")).holds(Some(doc)),
            "If-Match compares strongly"
        );
        assert!(!if_match(&tag).holds(None), "nothing to match");
        assert!(if_match("*").holds(Some(doc)) && !if_match("*").holds(None));
        assert!(
            if_none("*").holds(None) && !if_none("*").holds(Some(doc)),
            "create only"
        );
        assert!(
            !if_none(&format!("W/{tag}")).holds(Some(doc)),
            "If-None-Match compares weakly"
        );
        assert!(if_none(&tag).holds(Some(br#"{"n":2}"#)));
        assert!(Condition::Always.holds(None));
    }

    #[test]
    fn snapshots_parse_and_decide_visibility() {
        let s = Snapshot::parse("1000:1005:1001,1003").unwrap();
        assert!(s.sees(999) && s.sees(1002) && s.sees(1004));
        assert!(!s.sees(1001) && !s.sees(1003), "in progress at the snapshot");
        assert!(!s.sees(1005) && !s.sees(2000), "started after the snapshot");
        assert_eq!(Snapshot::parse("7:7:").unwrap(), Snapshot { xmax: 7, xip: vec![] });
        // 64-bit xids: the epoch is dropped, and order wraps around 2^32.
        let wrapped = Snapshot::parse("4294967290:4294967306:").unwrap();
        assert!(wrapped.sees(u32::MAX - 1));
        assert!(!wrapped.sees(10), "xid 4294967306 = epoch 1, xid 10");
        assert!(Snapshot::parse("garbage").is_none());
    }

    #[test]
    fn a_mutation_the_load_could_not_see_supersedes_it_whatever_its_lsn() {
        let loaded = Entry::new(None, Lsn(500), 1).with_snapshot(Snapshot::parse("90:100:95"));
        let invisible = Entry::new(None, Lsn(400), 2).with_xid(Some(95));
        let visible = Entry::new(None, Lsn(400), 2).with_xid(Some(94));
        let later = Entry::new(None, Lsn(600), 2).with_xid(Some(94));
        assert!(invisible.supersedes(&loaded));
        assert!(!visible.supersedes(&loaded));
        assert!(later.supersedes(&loaded));
        // Between changes with known positions, the position decides.
        let applied = Entry::new(None, Lsn(500), 1).with_xid(Some(96));
        assert!(!invisible.supersedes(&applied));
        // A row read through a snapshot replaces a change exactly when the snapshot saw it,
        // whatever the positions say (a commit record can precede its visibility).
        let reread = Entry::new(None, Lsn(450), 3).with_snapshot(Snapshot::parse("90:100:95"));
        assert!(reread.supersedes(&visible), "saw xid 94");
        assert!(!reread.supersedes(&invisible), "xid 95 was in progress");
        assert!(reread.supersedes(&later), "saw xid 94 although its position is later");
    }

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
