//! Event federation: nodes (regions) that follow each other's commit logs by version vector, so
//! chains, rings and meshes carry each event to each node once per link and never in a loop, and
//! every node's federated keyspaces converge to the same state whatever the arrival order.
//!
//! - **Identity.** A federated event carries its origin node, the origin's log *epoch* (from its
//!   log's identity: a node whose log is created afresh starts a new epoch, so it never reuses
//!   numbers its peers have seen) and a gap-free sequence number within that epoch
//!   ([`crate::event::Stamp`]), plus its hybrid-logical-clock version. The numbers are given by
//!   the [`Sequencer`], the commit log's admission hook, as records are framed: in log order,
//!   undone with a failed write, so they are gap-free and ordered in the origin's own log.
//! - **At most once.** The same hook keeps the node's version vector (highest sequence admitted
//!   per origin and epoch) and keeps out of the log any event already admitted, whatever path it
//!   came by; so each node's log holds each event once, in per-origin order, and re-forwards it
//!   with its origin unchanged. The vector is durable as a checkpoint (`federation/vector.json`
//!   in the log directory, with the offset it is exact at) plus the log after it, which retention
//!   keeps until the next checkpoint.
//! - **Conflicts.** Per key the state of the event with the highest `(version, origin)` wins
//!   (`cache::L1::merge`): commutative, associative, idempotent. A delete is a tombstone that wins
//!   or loses like a write, dropped only once every known node has passed it (see
//!   [`Federation::collect_tombstones`]).
//! - **Clocks.** A remote version more than `max_clock_drift` ahead of this node's wall clock is
//!   counted and logged and moves the local clock only up to the bound.
//! - **Links.** [`link`] follows one `[[peer]]`: it subscribes with this node's vector (and its
//!   place in that peer's log, when it has one), appends what arrives (the hook drops what is
//!   already here), detects a hole (the peer's log lacks events this node needs: retention, or a
//!   snapshot the peer itself took) and then takes the peer's snapshot. [`serve`] is the other
//!   side, on the log server's port.
//! - **Gossip.** Every link carries, both ways, what each side knows of every node's applied
//!   vector; that table is what tombstone collection and `/v1/replication` use.

pub mod config;
pub mod link;
pub mod serve;
mod vector;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::{Entry, Merged};
use crate::commitlog::{Admit, CommitLog, Hold, LogError, Offset};
use crate::event::{ChangeEvent, Op, Source, Stamp, set_stamp, stamp_of};
use crate::hlc::Hlc;
use crate::keyspace::Keyspace;
use crate::lsn::Lsn;
pub use config::FederationConfig;
pub use vector::Vector;

/// Records read per batch by the applier and the checkpointer.
const BATCH: usize = 4096;
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The epoch of a log: the first 64 bits of its identity.
pub fn epoch_of(identity: &str) -> u64 {
    let hex: String = identity
        .chars()
        .rev()
        .filter(|c| c.is_ascii_hexdigit())
        .take(16)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or(0).max(1)
}

/// The commit log's admission hook for federation: numbers this node's own federated events
/// and drops events already admitted (see the module docs).
pub struct Sequencer {
    node: String,
    state: Mutex<SeqState>,
    /// Events kept out of the log because they were already here.
    pub duplicates: AtomicU64,
    /// Events admitted past a hole in their origin's sequence (after a snapshot, expected).
    pub gaps: AtomicU64,
}

#[derive(Default)]
struct SeqState {
    epoch: u64,
    vector: Vector,
    /// What the current group changed, to undo it if the write fails.
    undo: Vec<(String, u64, Option<u64>)>,
}

impl Sequencer {
    pub fn new(node: &str) -> Sequencer {
        Sequencer {
            node: node.to_string(),
            state: Mutex::new(SeqState::default()),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The vector of everything admitted to the log (durable or about to be).
    pub fn vector(&self) -> Vector {
        self.lock().vector.clone()
    }

    /// This node's epoch.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Takes in events known to be held elsewhere in this node's state (a snapshot's vector),
    /// so they are not admitted again.
    pub fn adopt(&self, v: &Vector) {
        self.lock().vector.merge(v);
    }

    fn start(&self, epoch: u64, vector: Vector) {
        let mut st = self.lock();
        st.epoch = epoch;
        st.vector.merge(&vector);
    }
}

impl Admit for Sequencer {
    fn begin(&self) {
        self.lock().undo.clear();
    }

    fn admit(&self, payload: &mut [u8]) -> bool {
        let Some(sa) = stamp_of(payload) else {
            return true;
        };
        let Ok(origin) = std::str::from_utf8(sa.origin) else {
            return true;
        };
        let mut st = self.lock();
        let st = &mut *st;
        if sa.stamp.seq == 0 {
            // This node's own event: the next number of its sequence.
            if origin != self.node {
                return true;
            }
            let epoch = st.epoch;
            let last = st.vector.get(origin, epoch);
            st.undo.push((origin.to_string(), epoch, Some(last)));
            st.vector.set(origin, epoch, last + 1);
            let at = sa.at;
            set_stamp(payload, at, Stamp { seq: last + 1, epoch });
            return true;
        }
        let last = st.vector.get(origin, sa.stamp.epoch);
        if sa.stamp.seq <= last {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if sa.stamp.seq > last + 1 {
            self.gaps.fetch_add(1, Ordering::Relaxed);
        }
        st.undo.push((origin.to_string(), sa.stamp.epoch, Some(last)));
        st.vector.set(origin, sa.stamp.epoch, sa.stamp.seq);
        true
    }

    fn undo(&self) {
        let mut st = self.lock();
        let undo = std::mem::take(&mut st.undo);
        for (node, epoch, prev) in undo.into_iter().rev() {
            st.vector.set(&node, epoch, prev.unwrap_or(0));
        }
    }
}

/// Federation counters and gauges (`cachesync_federation_*`).
pub struct FederationMetrics {
    pub conflicts: IntCounterVec,
    pub drift_rejections: IntCounter,
    pub tombstones: IntGauge,
    pub tombstones_dropped: IntCounter,
    pub snapshots: IntCounterVec,
    pub received: IntCounterVec,
    pub duplicates: IntGauge,
    pub gaps: IntGauge,
    pub applied: IntCounterVec,
    pub peer_connected: IntGaugeVec,
    pub peer_lag_events: IntGaugeVec,
}

impl FederationMetrics {
    pub fn new(registry: &Registry) -> FederationMetrics {
        use crate::metrics::{counter as counters, counter1, gauge as gauges, gauge1};
        let counter = |name: &str, help: &str, labels: &[&str]| counters(registry, name, help, labels);
        let gauge = |name: &str, help: &str, labels: &[&str]| gauges(registry, name, help, labels);
        let plain_gauge = |name: &str, help: &str| gauge1(registry, name, help);
        let drift = counter1(
            registry,
            "cachesync_federation_drift_rejections_total",
            "Remote versions further ahead of the local clock than max_clock_drift (the clock moved only to the bound)",
        );
        let dropped = counter1(
            registry,
            "cachesync_federation_tombstones_dropped_total",
            "Tombstones dropped after every known node passed them",
        );
        FederationMetrics {
            conflicts: counter(
                "cachesync_federation_conflicts_total",
                "Federated events that lost to a later (version, origin) already held for their key",
                &["keyspace"],
            ),
            drift_rejections: drift,
            tombstones: plain_gauge(
                "cachesync_federation_tombstones",
                "Tombstones held (deletes not yet passed by every known node)",
            ),
            tombstones_dropped: dropped,
            snapshots: counter(
                "cachesync_federation_snapshots_total",
                "Snapshots taken from a peer (its log lacked events this node needed)",
                &["peer"],
            ),
            received: counter(
                "cachesync_federation_received_events_total",
                "Federated events received from a peer (before duplicates are dropped)",
                &["peer"],
            ),
            duplicates: plain_gauge(
                "cachesync_federation_duplicates",
                "Events kept out of the log since start because they were already here (another path brought them)",
            ),
            gaps: plain_gauge(
                "cachesync_federation_gaps",
                "Events admitted past a hole in their origin's sequence since start (expected only after a snapshot)",
            ),
            applied: counter(
                "cachesync_federation_applied_events_total",
                "Federated events applied to this node's keyspaces",
                &["keyspace"],
            ),
            peer_connected: gauge(
                "cachesync_federation_peer_connected",
                "1 while the link to a peer streams",
                &["peer"],
            ),
            peer_lag_events: gauge(
                "cachesync_federation_peer_lag_events",
                "Events a peer has applied that this node has not",
                &["peer"],
            ),
        }
    }
}

/// What one node knows of another: its epoch and applied vector, as last heard, and when that
/// node said so (its own wall clock, ms: only ever compared with the same node's other reports).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Known {
    pub epoch: u64,
    pub vector: Vector,
    #[serde(default)]
    pub at_ms: u64,
}

/// What a node knows of every node: gossiped over every link, both ways.
pub type Table = BTreeMap<String, Known>;

/// The live state of one `[[peer]]` link, for `/v1/replication`.
pub struct PeerState {
    pub name: String,
    pub url: String,
    /// The peer's node id, once it has said.
    pub node: Mutex<Option<String>>,
    pub connected: AtomicBool,
    pub received: AtomicU64,
    pub snapshots: AtomicU64,
    pub lag_events: AtomicU64,
    pub error: Mutex<Option<String>>,
}

impl PeerState {
    pub fn new(name: &str, url: &str) -> PeerState {
        PeerState {
            name: name.into(),
            url: url.into(),
            node: Mutex::new(None),
            connected: AtomicBool::new(false),
            received: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            lag_events: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }
}

/// Where the federation applier is: the log offset and the vector of what it has applied.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub offset: Offset,
    pub vector: Vector,
}

/// A write taken for a home region ([`Federation::write_home`]): durable here, pending here.
#[derive(Debug, Clone)]
pub struct Taken {
    pub doc: Option<Bytes>,
    pub version: u64,
    pub offset: Offset,
}

/// Why a federated write was not taken.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FederationError {
    #[error("the commit log refused the write: {0}")]
    Log(#[from] LogError),
}

/// One node's federation: its sequencer, its federated keyspaces, its links' state and the
/// gossip table.
pub struct Federation {
    pub node: String,
    pub config: FederationConfig,
    pub sequencer: Arc<Sequencer>,
    pub hlc: Arc<Hlc>,
    /// The federated keyspaces of this node.
    pub keyspaces: BTreeMap<String, Arc<Keyspace>>,
    pub metrics: FederationMetrics,
    pub peers: Vec<Arc<PeerState>>,
    table: Mutex<Table>,
    log: OnceLock<CommitLog>,
    applied: watch::Sender<Applied>,
    /// Keeps the log after the last checkpoint (the vector is exact only with it).
    hold: OnceLock<Arc<Hold>>,
    /// When each tombstone was first seen passed by every known node.
    stable_since: Mutex<BTreeMap<(String, String), tokio::time::Instant>>,
    /// The local log lacks part of this node's history (retention removed some): the first link
    /// to connect takes a snapshot before this node's state is whole.
    pub needs_snapshot: AtomicBool,
    /// Writes taken here that their home's Postgres rejected (rebuilt from the log on start).
    rejected: Mutex<Vec<serde_json::Value>>,
    checkpointing: tokio::sync::Mutex<()>,
    /// Keys whose last federated state was a delete: where tombstone collection looks.
    tombstoned: Mutex<std::collections::HashSet<(String, Arc<str>)>>,
    /// Per keyspace: (applied, conflicts) counters, resolved once.
    counters: BTreeMap<String, (IntCounter, IntCounter)>,
}

/// The checkpoint file: the applied vector, exact at `offset` of the log with `identity`.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    identity: String,
    offset: u64,
    vector: Vector,
}

impl Federation {
    pub fn new(
        node: &str,
        config: FederationConfig,
        hlc: Arc<Hlc>,
        keyspaces: BTreeMap<String, Arc<Keyspace>>,
        peers: Vec<Arc<PeerState>>,
        registry: &Registry,
    ) -> Federation {
        let metrics = FederationMetrics::new(registry);
        let counters = keyspaces
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    (
                        metrics.applied.with_label_values(&[k]),
                        metrics.conflicts.with_label_values(&[k]),
                    ),
                )
            })
            .collect();
        Federation {
            node: node.to_string(),
            config,
            sequencer: Arc::new(Sequencer::new(node)),
            hlc,
            keyspaces,
            metrics,
            peers,
            table: Mutex::new(Table::new()),
            log: OnceLock::new(),
            applied: watch::channel(Applied::default()).0,
            hold: OnceLock::new(),
            stable_since: Mutex::new(BTreeMap::new()),
            needs_snapshot: AtomicBool::new(false),
            rejected: Mutex::new(Vec::new()),
            checkpointing: tokio::sync::Mutex::new(()),
            tombstoned: Mutex::new(std::collections::HashSet::new()),
            counters,
        }
    }

    /// The admission hook to open the log with.
    pub fn admit_hook(&self) -> Arc<dyn Admit> {
        self.sequencer.clone()
    }

    pub fn log(&self) -> &CommitLog {
        self.log.get().expect("federation recovered before use")
    }

    /// This node's epoch.
    pub fn epoch(&self) -> u64 {
        self.sequencer.epoch()
    }

    fn checkpoint_path(log: &CommitLog) -> std::path::PathBuf {
        log.config().dir.join("federation").join("vector.json")
    }

    /// Rebuilds the vector and the federated keyspaces from the checkpoint and the log, before
    /// anything appends: every federated event still in the log is applied again (the merge is
    /// idempotent), so an in-memory federated keyspace comes back whole after a restart.
    pub async fn recover(&self, log: CommitLog) -> Result<(), LogError> {
        let epoch = epoch_of(log.identity());
        let path = Self::checkpoint_path(&log);
        let checkpoint = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Checkpoint>(&bytes) {
                Ok(c) if c.identity == log.identity() => Some(c),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "the federation checkpoint belongs to another log (it was recreated); starting a new epoch");
                    None
                }
                Err(e) => return Err(LogError::Failed(format!("{} is damaged: {e}", path.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(LogError::io(&path, e)),
        };
        let mut vector = checkpoint.as_ref().map(|c| c.vector.clone()).unwrap_or_default();
        let start = log.start();
        if start.0 > 0 && self.keyspaces.values().any(|k| !k.is_sourced()) {
            self.needs_snapshot.store(true, Ordering::Relaxed);
        }
        let mut tail = log.tail(start);
        let end = log.end();
        let mut replayed = 0u64;
        while tail.position() < end {
            let records = tail.try_next(BATCH, BATCH_BYTES)?;
            if records.is_empty() {
                break;
            }
            for r in &records {
                if stamp_of(&r.payload).is_none() && !is_state_record(&r.payload) {
                    continue;
                }
                if let Ok(e) = ChangeEvent::decode(&r.payload) {
                    if let Some(st) = e.stamp {
                        vector.raise(&e.origin, st.epoch, st.seq);
                    }
                    self.apply(&e, false).await;
                    replayed += 1;
                }
            }
        }
        self.sequencer.start(epoch, vector.clone());
        let at = tail.position();
        self.hold.get_or_init(|| log.hold(at));
        self.applied.send_replace(Applied { offset: at, vector });
        let _ = self.log.set(log);
        self.write_checkpoint().await?;
        tracing::info!(node = %self.node, epoch = format!("{epoch:016x}"), replayed, "federation recovered its vector and keyspaces from the log");
        Ok(())
    }

    /// Writes the applied vector and its offset (temp file, fsync, rename), then lets retention
    /// pass the offset.
    async fn write_checkpoint(&self) -> Result<(), LogError> {
        // One writer of the file at a time (housekeeping, and the applier at stop).
        let _one = self.checkpointing.lock().await;
        let log = self.log().clone();
        let a = self.applied.borrow().clone();
        let path = Self::checkpoint_path(&log);
        let c = Checkpoint {
            identity: log.identity().to_string(),
            offset: a.offset.0,
            vector: a.vector,
        };
        let bytes = serde_json::to_vec(&c).map_err(|e| LogError::Failed(e.to_string()))?;
        let p = path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), LogError> {
            let dir = p.parent().expect("a checkpoint path has a parent");
            std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
            let tmp = p.with_extension("json.tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
                f.write_all(&bytes).map_err(|e| LogError::io(&tmp, e))?;
                f.sync_all().map_err(|e| LogError::io(&tmp, e))?;
            }
            std::fs::rename(&tmp, &p).map_err(|e| LogError::io(&p, e))?;
            crate::commitlog::sync_dir(dir)
        })
        .await
        .map_err(|e| LogError::Failed(e.to_string()))??;
        if let Some(h) = self.hold.get() {
            h.advance(Offset(c.offset));
        }
        Ok(())
    }

    /// The applier's place and vector.
    pub fn applied(&self) -> Applied {
        self.applied.borrow().clone()
    }

    pub fn subscribe_applied(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }

    /// Observes a remote version, moving the local clock at most `max_clock_drift` past the
    /// wall clock. Returns whether the version was within the bound.
    fn observe(&self, origin: &str, version: u64) -> bool {
        if self.hlc.observe_bounded(version, self.config.max_clock_drift) {
            return true;
        }
        self.metrics.drift_rejections.inc();
        tracing::warn!(
            origin,
            ahead_ms = Hlc::millis(version).saturating_sub(crate::commitlog::now_ms()),
            bound_ms = self.config.max_clock_drift.as_millis() as u64,
            "a federated event's clock is further ahead than max_clock_drift; the local clock moved only to the bound"
        );
        false
    }

    /// Applies one federated event to its keyspace under the conflict rule. A CDC event of a
    /// keyspace this node itself captures is the CDC applier's, not this one's.
    pub async fn apply(&self, e: &ChangeEvent, observe: bool) {
        let Some(ks) = self.keyspaces.get(&e.keyspace) else {
            return;
        };
        if observe && e.origin != self.node {
            self.observe(&e.origin, e.version);
        }
        if e.op == Op::Rejected {
            self.take_rejection(ks, e);
            return;
        }
        // The home: its own table's changes are the CDC applier's; another region's write is
        // the flusher's; nothing else comes to it.
        if ks.is_sourced() {
            return;
        }
        // A write to a homed keyspace is not state: the home's flusher lands it in Postgres,
        // and the home's CDC brings the stored row to every region.
        if (ks.config.home.is_some() || ks.is_sourced()) && e.source == Source::Api {
            // This node's own write (replayed after a restart, or met again by the applier):
            // shown to this node's readers until the stored row comes back, which is later in
            // the log and settles it.
            if e.origin == self.node && !ks.is_sourced() {
                ks.write_pending(
                    &e.key,
                    crate::keyspace::overlay::Pending {
                        doc: if e.op == Op::Delete { None } else { e.value.clone() },
                        version: e.version,
                        at: tokio::time::Instant::now(),
                    },
                );
            }
            return;
        }
        if ks.config.home.is_some() && e.source == Source::Cdc {
            // The stored row supersedes this node's pending writes of the key up to it (the
            // home observed their versions before it flushed them).
            ks.settle(&e.key, e.version);
        }
        let origin: Arc<str> = e.origin.as_str().into();
        let key: Arc<str> = e.key.as_str().into();
        let value = match (&e.value, e.unchanged.is_empty()) {
            (Some(v), false) => match crate::cdc::applier::merge_unchanged(ks, &e.key, v, &e.unchanged) {
                Some(merged) => Some(merged),
                None => {
                    // The home did not send fields its update left unchanged (TOAST), and this
                    // node holds no copy to take them from: never guess a document.
                    tracing::warn!(
                        keyspace = ks.name(),
                        "a federated row arrived without its unchanged large fields and no copy is held here; dropping the key until an update brings the whole row"
                    );
                    ks.invalidate(&e.key).await;
                    return;
                }
            },
            (v, _) => v.clone(),
        };
        let entry = match e.op {
            Op::Put => Entry::new(value, Lsn(e.source_position), e.version),
            Op::Delete => Entry::new(None, Lsn(e.source_position), e.version),
            // Neither carries state to converge on: a federated view drops the key; the next
            // event for it brings the state back.
            Op::Invalidate => {
                ks.invalidate(&e.key).await;
                return;
            }
            // A federated clear (a TRUNCATE, or the sweep after a home's load) removes what its
            // origin had made before it; anything newer stays.
            Op::Clear => {
                let n = ks.sweep(&e.origin, e.version).await;
                tracing::debug!(keyspace = ks.name(), origin = %e.origin, removed = n, "federated clear");
                return;
            }
            Op::Rejected => return,
        }
        .federated(origin, e.stamp.filter(|s| s.seq > 0));
        let tombstone = e.op == Op::Delete;
        let merged = ks.merge(key.clone(), entry).await;
        if tombstone && merged == Merged::Stored {
            self.note_tombstone(ks, key);
        }
        if let Some((applied, conflicts)) = self.counters.get(ks.name()) {
            if merged == Merged::Lost {
                conflicts.inc();
            }
            applied.inc();
        }
    }

    fn note_tombstone(&self, ks: &Keyspace, key: Arc<str>) {
        self.tombstoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((ks.name().to_string(), key));
    }

    /// A write to a keyspace whose data lives in another region's Postgres (`home`, `write =
    /// "behind"`): durable here as this node's next federated event, shown to this node's
    /// readers as a pending write until the home's CDC brings the stored row back, and carried
    /// to the home, whose flusher lands it in Postgres. `fields: None` deletes.
    pub async fn write_home(
        &self,
        ks: &Keyspace,
        key: Arc<str>,
        fields: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Taken, FederationError> {
        let version = self.hlc.now();
        let (event, doc) = match fields {
            Some(f) => {
                let written: Vec<String> = f.keys().cloned().collect();
                let doc = Bytes::from(serde_json::to_vec(&f).unwrap_or_default());
                (
                    ChangeEvent::put(ks.name(), &*key, doc.clone()).with_written(written),
                    Some(doc),
                )
            }
            None => (ChangeEvent::delete(ks.name(), &*key), None),
        };
        let event = event
            .from_origin(&self.node, version, Source::Api)
            .at_source(0, crate::commitlog::now_ms() * 1000, None)
            .federated();
        let range = self.log().append(vec![event.encode()]).await?;
        ks.write_pending(
            &key,
            crate::keyspace::overlay::Pending {
                doc: doc.clone(),
                version,
                at: tokio::time::Instant::now(),
            },
        );
        Ok(Taken {
            doc,
            version,
            offset: range.start,
        })
    }

    /// Tells the region that took a write this home's Postgres rejected: a federated event
    /// carrying the dead letter (JSON, with its `version`), addressed to `origin`.
    pub async fn reject(
        &self,
        ks: &Keyspace,
        key: &str,
        letter: serde_json::Value,
        origin: &str,
    ) -> Result<(), LogError> {
        let body = serde_json::json!({ "for": origin, "home": self.node, "letter": letter });
        let event = ChangeEvent::of(Op::Rejected, ks.name(), key, Some(Bytes::from(body.to_string())))
            .from_origin(&self.node, self.hlc.now(), Source::Api)
            .federated();
        self.log().append(vec![event.encode()]).await?;
        Ok(())
    }

    /// A dead letter from a home: kept when the rejected write was taken here, and the write no
    /// longer shown to this node's readers.
    fn take_rejection(&self, ks: &Keyspace, e: &ChangeEvent) {
        let Some(body) = e
            .value
            .as_ref()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
        else {
            return;
        };
        if body["for"].as_str() != Some(self.node.as_str()) {
            return;
        }
        if let Some(version) = body["letter"]["version"].as_u64() {
            ks.settle(&e.key, version);
        }
        tracing::warn!(keyspace = ks.name(), key = %e.key, home = %e.origin, "the home region's Postgres rejected a write taken here; see /v1/deadletters");
        let mut r = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        let id = body["letter"]["id"].clone();
        if !r.iter().any(|x| x["home"] == body["home"] && x["letter"]["id"] == id) {
            r.push(body);
        }
    }

    /// Writes another region's home rejected, taken here: (home, dead letter), oldest first.
    pub fn rejected(&self) -> Vec<serde_json::Value> {
        self.rejected.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A write taken here: made durable in the log as this node's next federated event, then
    /// applied (read-your-writes); returns the entry now held. `value: None` deletes.
    pub async fn originate(
        &self,
        ks: &Keyspace,
        key: Arc<str>,
        value: Option<Bytes>,
    ) -> Result<Arc<Entry>, FederationError> {
        let version = self.hlc.now();
        let event = match &value {
            Some(v) => ChangeEvent::put(ks.name(), &*key, v.clone()),
            None => ChangeEvent::delete(ks.name(), &*key),
        }
        .from_origin(&self.node, version, Source::Api)
        .federated();
        self.log().append(vec![event.encode()]).await?;
        let entry = Entry::new(value, Lsn::ZERO, version).federated(self.node.as_str().into(), None);
        if ks.merge(key.clone(), entry.clone()).await == Merged::Stored && entry.value.is_none() {
            self.note_tombstone(ks, key);
        }
        Ok(Arc::new(entry))
    }

    /// Tails the log from where recovery left it and applies federated events as they become
    /// durable (checkpointing at stop).
    pub async fn run_applier(self: Arc<Self>, stop: CancellationToken) {
        let log = self.log().clone();
        let mut tail = log.tail(self.applied.borrow().offset);
        loop {
            let batch = tokio::select! {
                r = tail.next(BATCH, BATCH_BYTES) => r,
                _ = stop.cancelled() => break,
            };
            match batch {
                Ok(records) => {
                    let mut raised = Vec::new();
                    for r in &records {
                        if stamp_of(&r.payload).is_none() && !is_state_record(&r.payload) {
                            continue;
                        }
                        match ChangeEvent::decode(&r.payload) {
                            Ok(e) => {
                                if let Some(st) = e.stamp {
                                    raised.push((e.origin.clone(), st));
                                }
                                self.apply(&e, true).await;
                            }
                            Err(err) => {
                                tracing::error!(offset = %r.offset, error = %err, "skipping an undecodable federated record")
                            }
                        }
                    }
                    let at = tail.position();
                    self.applied.send_modify(|a| {
                        a.offset = at;
                        for (origin, st) in &raised {
                            a.vector.raise(origin, st.epoch, st.seq);
                        }
                    });
                }
                Err(LogError::Closed) => break,
                Err(e) => {
                    tracing::error!(error = %e, "the federation applier cannot read the commit log; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
        }
        if let Err(e) = self.write_checkpoint().await {
            tracing::error!(error = %e, "cannot write the federation checkpoint at stop");
        }
    }

    /// Every `checkpoint_every` until `stop`: checkpoints the vector, collects tombstones,
    /// refreshes gauges. A task of its own, so the applier never waits on a file sync.
    pub async fn run_housekeeping(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.checkpoint_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.write_checkpoint().await {
                tracing::error!(error = %e, "cannot write the federation checkpoint");
            }
            let s = &self.sequencer;
            self.metrics.duplicates.set(s.duplicates.load(Ordering::Relaxed) as i64);
            self.metrics.gaps.set(s.gaps.load(Ordering::Relaxed) as i64);
            self.collect_tombstones().await;
        }
    }

    /// The gossip table with this node's own applied vector in it.
    pub fn table(&self) -> Table {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner()).clone();
        t.insert(
            self.node.clone(),
            Known {
                epoch: self.epoch(),
                vector: self.applied.borrow().vector.clone(),
                at_ms: crate::commitlog::now_ms(),
            },
        );
        t
    }

    /// Folds in what another node knows (vectors only grow; an epoch change replaces).
    pub fn learn(&self, other: &Table) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for (node, k) in other {
            if *node == self.node {
                continue;
            }
            let mine = t.entry(node.clone()).or_default();
            if mine.epoch == k.epoch {
                // Within one epoch a node's vector only grows.
                mine.vector.merge(&k.vector);
                mine.at_ms = mine.at_ms.max(k.at_ms);
            } else if k.at_ms > mine.at_ms {
                // A recreated node starts over: its newest report is what it holds now (an
                // older report of its previous epoch, arriving late, is ignored).
                *mine = k.clone();
            }
        }
    }

    /// Drops tombstones every known node has passed, once everything each node had originated
    /// when it said so has reached every node too (so no older write of the key is still on its
    /// way to someone), and they have been stable for `tombstone_hold`. Nodes never heard of
    /// cannot hold on to a tombstone; configured peers not yet heard from keep every tombstone.
    pub async fn collect_tombstones(&self) {
        let table = self.table();
        let heard_all = self
            .peers
            .iter()
            .all(|p| p.node.lock().unwrap_or_else(|e| e.into_inner()).is_some());
        // The vector of what every node has.
        let mut everywhere: Option<Vector> = None;
        for k in table.values() {
            everywhere = Some(match everywhere {
                None => k.vector.clone(),
                Some(v) => v.min(&k.vector),
            });
        }
        let everywhere = everywhere.unwrap_or_default();
        let quiet = table
            .iter()
            .all(|(node, k)| everywhere.get(node, k.epoch) >= k.vector.get(node, k.epoch));
        let now = tokio::time::Instant::now();
        let mut held = 0i64;
        let mut stable = self.stable_since.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut seen = std::collections::BTreeSet::new();
        // Only keys whose last state was a delete; a key written again since leaves the list.
        let candidates: Vec<(String, Arc<str>)> = self
            .tombstoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut gone = Vec::new();
        for (name, key) in candidates {
            let Some(ks) = self.keyspaces.get(&name) else { continue };
            let e = match ks.cached(&key) {
                Some(e) if e.is_tombstone() => e,
                _ => {
                    gone.push((name, key));
                    continue;
                }
            };
            held += 1;
            let Some(f) = &e.fed else { continue };
            let passed = heard_all && quiet && f.stamp.is_some_and(|st| everywhere.get(&f.origin, st.epoch) >= st.seq);
            let id = (name.clone(), key.to_string());
            if !passed {
                stable.remove(&id);
                continue;
            }
            seen.insert(id.clone());
            let since = *stable.entry(id.clone()).or_insert(now);
            if now.duration_since(since) >= self.config.tombstone_hold && ks.drop_tombstone(key.clone(), &e).await {
                held -= 1;
                stable.remove(&id);
                gone.push((name, key));
                self.metrics.tombstones_dropped.inc();
            }
        }
        {
            let mut t = self.tombstoned.lock().unwrap_or_else(|p| p.into_inner());
            for g in gone {
                t.remove(&g);
            }
        }
        stable.retain(|id, _| seen.contains(id));
        *self.stable_since.lock().unwrap_or_else(|p| p.into_inner()) = stable;
        self.metrics.tombstones.set(held);
    }

    /// The federation part of `/v1/replication`.
    pub fn report(&self) -> serde_json::Value {
        use serde_json::json;
        let applied = self.applied();
        let admitted = self.sequencer.vector();
        let sum = |c: &IntCounterVec| -> u64 { self.keyspaces.keys().map(|k| c.with_label_values(&[k]).get()).sum() };
        let peers: Vec<serde_json::Value> = self
            .peers
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "url": p.url,
                    "node": *p.node.lock().unwrap_or_else(|e| e.into_inner()),
                    "connected": p.connected.load(Ordering::Relaxed),
                    "received_events": p.received.load(Ordering::Relaxed),
                    "lag_events": p.lag_events.load(Ordering::Relaxed),
                    "snapshots": p.snapshots.load(Ordering::Relaxed),
                    "last_error": *p.error.lock().unwrap_or_else(|e| e.into_inner()),
                })
            })
            .collect();
        let known: serde_json::Map<String, serde_json::Value> = self
            .table()
            .into_iter()
            .map(|(node, k)| (node, json!({"epoch": k.epoch, "vector": k.vector})))
            .collect();
        json!({
            "node": self.node,
            "epoch": self.epoch(),
            "keyspaces": self.keyspaces.keys().collect::<Vec<_>>(),
            "vector": admitted,
            "applied": {"offset": applied.offset.0, "vector": applied.vector},
            "clock_ms": Hlc::millis(self.hlc.now()),
            "peers": peers,
            "known": known,
            "conflicts": sum(&self.metrics.conflicts),
            "drift_rejections": self.metrics.drift_rejections.get(),
            "tombstones": self.metrics.tombstones.get(),
            "tombstones_dropped": self.metrics.tombstones_dropped.get(),
            "duplicates": self.sequencer.duplicates.load(Ordering::Relaxed),
            "gaps": self.sequencer.gaps.load(Ordering::Relaxed),
        })
    }

    /// Writes a peer's snapshot into this node: each entry is appended to the log as a *state
    /// record* (kept and replayed here, never forwarded: it is not an event of its origin's
    /// sequence) and merged into its keyspace; then the snapshot's vector is adopted, so the
    /// events it covers are not admitted again.
    pub async fn install_snapshot(
        &self,
        entries: Vec<(Arc<Keyspace>, Arc<str>, Entry)>,
        vector: &Vector,
    ) -> Result<u64, LogError> {
        let mut payloads = Vec::with_capacity(entries.len());
        for (ks, key, e) in &entries {
            let Some(f) = &e.fed else { continue };
            let ev = ChangeEvent::of(
                if e.value.is_some() { Op::Put } else { Op::Delete },
                ks.name(),
                &**key,
                e.value.clone(),
            )
            .from_origin(&*f.origin, e.version, Source::Federation)
            .at_source(e.lsn.0, 0, None);
            payloads.push(encode_state_record(&ev, f.stamp));
        }
        for chunk in payloads.chunks(1024) {
            self.log().append(chunk.to_vec()).await?;
        }
        let n = entries.len() as u64;
        for (ks, key, e) in entries {
            if let Some(f) = &e.fed {
                self.observe(&f.origin, e.version);
            }
            let tombstone = e.value.is_none();
            if ks.merge(key.clone(), e).await == Merged::Stored && tombstone {
                self.note_tombstone(&ks, key);
            }
        }
        self.sequencer.adopt(vector);
        self.applied.send_modify(|a| a.vector.merge(vector));
        self.write_checkpoint().await?;
        Ok(n)
    }

    /// The federated keyspaces' entries (tombstones too) with the vector they cover: the vector
    /// is read first, so every event it names is in the entries (later ones may be too; the
    /// merge makes that harmless).
    pub fn snapshot(&self, names: &[String]) -> Result<(Applied, Vec<(String, crate::keyspace::Entries)>), String> {
        let vector = self.applied.borrow().clone();
        let mut out = Vec::new();
        for (name, ks) in &self.keyspaces {
            if !names.is_empty() && !names.contains(name) {
                continue;
            }
            let (entries, _) = ks.entries();
            let entries = if ks.is_sourced() {
                // The home: its table's rows, as this node's state.
                let me: Arc<str> = self.node.as_str().into();
                entries
                    .into_iter()
                    .filter(|(_, e)| e.value.is_some())
                    .map(|(k, e)| {
                        let mut copy = (*e).clone().federated(me.clone(), None);
                        copy.snapshot = None;
                        copy.xid = None;
                        copy.read_at = None;
                        (k, Arc::new(copy))
                    })
                    .collect()
            } else {
                entries.into_iter().filter(|(_, e)| e.fed.is_some()).collect()
            };
            out.push((name.clone(), entries));
        }
        for n in names {
            if !self.keyspaces.contains_key(n) {
                return Err(format!("keyspace {n} does not federate on this node"));
            }
        }
        Ok((vector, out))
    }
}

/// A state record (a snapshot's entry kept in this node's log) is an event whose stamp is not
/// its first field: the sequencer and the stream server pass it by, the applier and recovery
/// take it.
fn encode_state_record(e: &ChangeEvent, stamp: Option<Stamp>) -> Vec<u8> {
    let mut plain = e.clone();
    plain.stamp = None;
    let mut out = plain.encode();
    if let Some(st) = stamp {
        let mut v = [0u8; crate::event::STAMP_BYTES];
        v[..8].copy_from_slice(&st.seq.to_le_bytes());
        v[8..].copy_from_slice(&st.epoch.to_le_bytes());
        out.push(13);
        crate::event::put_varint(&mut out, v.len() as u64);
        out.extend_from_slice(&v);
    }
    out
}

/// Whether an unstamped-looking record is a snapshot's state record (source federation).
fn is_state_record(payload: &[u8]) -> bool {
    matches!(ChangeEvent::source_of(payload), Ok(Some(Source::Federation)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Capacity, L1};
    use proptest::prelude::*;

    fn stamped(origin: &str, seq: u64, epoch: u64) -> Vec<u8> {
        let mut e = ChangeEvent::put("ks", "k", Bytes::from_static(b"1"))
            .from_origin(origin, 1, Source::Api)
            .federated();
        e.stamp = Some(Stamp { seq, epoch });
        e.encode()
    }

    #[test]
    fn the_sequencer_numbers_its_own_events_and_drops_what_it_has() {
        let s = Sequencer::new("a");
        s.start(7, Vector::default());
        s.begin();
        let mut own = stamped("a", 0, 0);
        assert!(s.admit(&mut own));
        assert_eq!(stamp_of(&own).unwrap().stamp, Stamp { seq: 1, epoch: 7 });
        let mut own2 = stamped("a", 0, 0);
        assert!(s.admit(&mut own2));
        assert_eq!(stamp_of(&own2).unwrap().stamp.seq, 2);
        assert!(s.admit(&mut stamped("b", 1, 9)));
        assert!(!s.admit(&mut stamped("b", 1, 9)), "a duplicate is kept out");
        assert!(s.admit(&mut stamped("b", 1, 10)), "another epoch is another sequence");
        // A failed write is undone: the numbers are given again.
        s.begin();
        let mut own3 = stamped("a", 0, 0);
        assert!(s.admit(&mut own3));
        assert!(s.admit(&mut stamped("b", 2, 9)));
        s.undo();
        assert_eq!(s.vector().get("a", 7), 2);
        assert_eq!(s.vector().get("b", 9), 1);
        let mut again = stamped("a", 0, 0);
        assert!(s.admit(&mut again));
        assert_eq!(stamp_of(&again).unwrap().stamp.seq, 3);
        // Unfederated records pass untouched.
        let mut plain = ChangeEvent::put("ks", "k", Bytes::from_static(b"1")).encode();
        let before = plain.clone();
        assert!(s.admit(&mut plain));
        assert_eq!(plain, before);
    }

    #[test]
    fn gossip_keeps_each_nodes_newest_epoch_and_merges_within_one() {
        let f = Federation::new(
            "me",
            FederationConfig::default(),
            Arc::new(Hlc::new()),
            BTreeMap::new(),
            Vec::new(),
            &Registry::new(),
        );
        let known = |epoch, seq, at_ms| {
            let mut vector = Vector::default();
            vector.set("x", epoch, seq);
            Known { epoch, vector, at_ms }
        };
        let table = |k: Known| Table::from([("x".to_string(), k)]);
        f.learn(&table(known(1, 5, 100)));
        f.learn(&table(known(1, 3, 90)));
        assert_eq!(
            f.table()["x"].vector.get("x", 1),
            5,
            "within an epoch the vector only grows"
        );
        f.learn(&table(known(2, 1, 200)));
        assert_eq!(f.table()["x"].epoch, 2, "a newer report of a new epoch replaces");
        f.learn(&table(known(1, 9, 150)));
        assert_eq!(f.table()["x"].epoch, 2, "a late report of the old epoch is ignored");
        assert_eq!(f.table()["x"].vector.get("x", 1), 0);
        assert!(f.table().contains_key("me"), "this node's own entry is always there");
    }

    #[test]
    fn a_state_record_is_not_an_event_but_decodes_with_its_stamp() {
        let e = ChangeEvent::put("ks", "k", Bytes::from_static(b"1")).from_origin("a", 5, Source::Federation);
        let st = Stamp { seq: 4, epoch: 2 };
        let b = encode_state_record(&e, Some(st));
        assert!(stamp_of(&b).is_none());
        assert!(is_state_record(&b));
        assert_eq!(ChangeEvent::decode(&b).unwrap().stamp, Some(st));
    }

    /// One event of the merge property: a key, a version, an origin, and a value or a delete.
    fn arb_events() -> impl Strategy<Value = Vec<(u8, u64, u8, Option<u8>)>> {
        proptest::collection::vec((0u8..4, 0u64..6, 0u8..3, proptest::option::of(any::<u8>())), 1..24)
    }

    /// Per key: (value, version, origin), or nothing.
    type State = BTreeMap<String, Option<(Option<Vec<u8>>, u64, String)>>;

    fn final_state(events: &[(u8, u64, u8, Option<u8>)]) -> State {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l1 = L1::new(Capacity::Entries(1000), Duration::from_secs(60), Duration::from_secs(1));
            for (key, version, origin, value) in events {
                let origin: Arc<str> = format!("n{origin}").into();
                let e = Entry::new(value.map(|v| Bytes::from(vec![v])), Lsn::ZERO, *version).federated(origin, None);
                l1.merge(format!("k{key}").into(), e).await;
            }
            let mut out = BTreeMap::new();
            for k in 0..4 {
                let key = format!("k{k}");
                let got = l1.get(&key).map(|e| {
                    (
                        e.value.as_ref().map(|v| v.to_vec()),
                        e.version,
                        e.merge_order().1.to_string(),
                    )
                });
                out.insert(key, got);
            }
            out
        })
    }

    proptest! {
        /// Any permutation and duplication of a set of events ends in the same state: the
        /// merge is commutative, associative and idempotent. (Events with equal (version,
        /// origin) are one event, so they carry one value.)
        #[test]
        fn the_merge_rule_ignores_order_and_repetition(
            events in arb_events(),
            order in any::<prop::sample::Index>(),
            dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            seed in any::<u64>(),
        ) {
            // One value per (key, version, origin): that is one event.
            let mut unique: BTreeMap<(u8, u64, u8), Option<u8>> = BTreeMap::new();
            for (k, v, o, val) in &events {
                unique.entry((*k, *v, *o)).or_insert(*val);
            }
            let set: Vec<_> = unique.into_iter().map(|((k, v, o), val)| (k, v, o, val)).collect();
            let baseline = final_state(&set);
            let mut shuffled = set.clone();
            for d in &dups {
                shuffled.push(set[d.index(set.len())]);
            }
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x as usize) % (i + 1));
            }
            let by = order.index(shuffled.len());
            shuffled.rotate_left(by);
            prop_assert_eq!(final_state(&shuffled), baseline);
        }
    }
}
