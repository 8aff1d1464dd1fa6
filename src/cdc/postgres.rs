//! Postgres CDC: the stream that turns committed transactions into durable change events.
//!
//! Layers (as in ReadySet's replicators): [`protocol`] parses pgoutput messages one-to-one from
//! the docs; [`decoder`] keeps the relation map; [`mapping`] turns row changes into change
//! events per keyspace; this module owns the I/O — publication, slot, warm start, the stream
//! and its position feedback — over the [`transport`].
//!
//! A session:
//! 1. Makes sure the publication covers every CDC table (creating or extending it when
//!    `create_publication` is on).
//! 2. Looks at the slot. *Missing* (first start) or *lost* (dropped, or invalidated by
//!    `max_slot_wal_keep_size`): holds the applier, clears the CDC keyspaces if they had data
//!    (they may now be stale — never serve that silently), creates the slot with an exported
//!    snapshot, loads the warm keyspaces from it, and releases the applier from the current log
//!    end. *Present* on a fresh start: warms from the snapshot of a temporary slot (whose
//!    consistent point orders it against the stream just as exactly), then streams from the
//!    slot's confirmed position.
//! 3. Streams: events of a transaction are appended to the commit log (in chunks for large
//!    transactions) and, once durable, the commit's end position is confirmed to Postgres —
//!    never before. Between transactions, keepalives' positions are confirmed too, so an idle
//!    slot does not pin WAL; optional heartbeats (`pg_logical_emit_message`) keep a quiet
//!    database's slot moving.
//!
//! Any error ends the session; the supervisor retries with capped, jittered [`Backoff`]. CDC
//! keyspaces are not ready until their first warm load is done, and stop being ready when the
//! stream has been down longer than `ready_grace`.

pub mod catalog;
pub mod decoder;
pub mod mapping;
pub mod prerequisites;
pub mod protocol;
pub mod reshape;
pub mod snapshot;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CdcError, Gate, ReplicationSource, StreamEvent};
use crate::cdc::config::CdcConfig;
use crate::commitlog::{CommitLog, Offset};
use crate::event::{ChangeEvent, Source};
use crate::hlc::Hlc;
use crate::keyspace::freshness::Freshness;
use crate::keyspace::{Blocker, Keyspace};
use crate::lifecycle::{Backoff, Tasks};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::source::postgres::PgPool;
use crate::source::postgres::config::PostgresConfig;
use catalog::SlotState;
use decoder::{Change, Decoder};
use mapping::{TableMapping, TxnInfo};
use reshape::Reshaper;
use transport::{Closed, PgwireSource};

/// Events of one transaction appended per log write; bounds memory for huge transactions.
const CHUNK_EVENTS: usize = 4096;
/// First wait before reconnecting.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Longest wait between reconnects.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A session that streamed this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Appends awaiting durability at once; the stream reads no further until one completes.
const MAX_INFLIGHT: usize = 256;
/// Appends in flight, in commit order, each resolving to the position it allows confirming.
type Inflight = FuturesOrdered<futures::future::BoxFuture<'static, Result<Option<Lsn>, CdcError>>>;
/// Prefix of the logical decoding message that marks a write-behind flush transaction.
pub const FLUSH_MARKER: &str = "cachesync.flush";

struct Txn {
    info: TxnInfo,
    events: Vec<ChangeEvent>,
}

/// The capture side of CDC for one database.
pub struct Capture {
    pg: PostgresConfig,
    pool: Arc<PgPool>,
    config: CdcConfig,
    slot: String,
    node: Arc<str>,
    /// `application_name` of this process's replication sessions (node id and instance).
    app: String,
    log: CommitLog,
    keyspaces: Vec<Arc<Keyspace>>,
    hlc: Arc<Hlc>,
    metrics: Arc<Metrics>,
    gate: watch::Sender<Gate>,
    max_key_bytes: usize,
    tasks: Tasks,
    freshness: Arc<Freshness>,
    reshaper: Arc<Reshaper>,
    /// A warm start has happened in this process (the caches hold stream-fed data).
    warmed: bool,
    /// The highest position this process confirmed to the slot: a slot found past it was
    /// consumed by someone else, and this node's caches missed what they took.
    confirmed: AtomicU64,
}

/// Everything a capture needs.
pub struct CaptureParts {
    pub pg: PostgresConfig,
    pub pool: Arc<PgPool>,
    pub config: CdcConfig,
    pub node_id: String,
    pub log: CommitLog,
    pub keyspaces: Vec<Arc<Keyspace>>,
    pub hlc: Arc<Hlc>,
    pub metrics: Arc<Metrics>,
    pub max_key_bytes: usize,
    /// Where the capture's own tasks (heartbeat, probes, snapshot workers) run.
    pub tasks: Tasks,
    /// The keyspaces' freshness contract, which the capture's probes and positions feed.
    pub freshness: Arc<Freshness>,
}

impl Capture {
    /// A capture, and the gate its applier obeys. CDC keyspaces start not ready.
    pub fn new(p: CaptureParts) -> (Capture, watch::Receiver<Gate>) {
        let (gate, rx) = watch::channel(Gate::closed());
        for ks in &p.keyspaces {
            ks.set_blocker(Blocker::Cdc, Some("waiting for the replication stream to start".into()));
        }
        let slot = p.config.slot_name(&p.node_id);
        let instance = format!("{:08x}", rand::random::<u32>());
        let reshaper = Arc::new(Reshaper::new(
            p.pool.clone(),
            p.pg.clone(),
            p.hlc.clone(),
            p.metrics.clone(),
            p.max_key_bytes,
            p.tasks.clone(),
        ));
        (
            Capture {
                app: transport::application_name(&p.node_id, &instance),
                pg: p.pg,
                pool: p.pool,
                config: p.config,
                slot,
                node: p.node_id.into(),
                log: p.log,
                keyspaces: p.keyspaces,
                hlc: p.hlc,
                metrics: p.metrics,
                gate,
                max_key_bytes: p.max_key_bytes,
                tasks: p.tasks,
                freshness: p.freshness,
                reshaper,
                warmed: false,
                confirmed: AtomicU64::new(0),
            },
            rx,
        )
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    fn block_all(&self, reason: Option<String>) {
        for ks in &self.keyspaces {
            ks.set_blocker(Blocker::Cdc, reason.clone());
        }
    }

    /// Runs sessions until its phase stops, reconnecting after failures: at once after a
    /// session that streamed, then with capped, jittered backoff.
    pub async fn run(mut self) {
        let stop = self.tasks.child_token();
        if let Some(every) = self.config.heartbeat {
            self.tasks
                .spawn(catalog::heartbeat(self.pool.clone(), every, stop.clone()));
        }
        self.tasks.spawn(catalog::probe(
            self.pg.clone(),
            self.freshness.clone(),
            self.metrics.clone(),
            self.tasks.clone(),
            stop.clone(),
        ));
        if let Some(every) = self.config.schema_check {
            self.tasks.spawn(reshape::watch(
                self.reshaper.clone(),
                self.keyspaces.clone(),
                every,
                stop.clone(),
            ));
        }
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        let mut down_since: Option<Instant> = None;
        loop {
            self.metrics
                .set_cdc_state(if self.warmed { "reconnecting" } else { "starting" });
            let mut streaming_since = None;
            let result = self.session(&stop, &mut streaming_since).await;
            if stop.is_cancelled() {
                return;
            }
            let e = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            self.metrics.set_cdc_state("reconnecting");
            let wait = if let Some(t) = streaming_since {
                // The stream was up: try again at once (a dropped connection, a restarted
                // server that is already back); back off only if that fails too.
                down_since = Some(Instant::now());
                if t.elapsed() >= HEALTHY_SESSION {
                    backoff.reset();
                }
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            let since = *down_since.get_or_insert_with(Instant::now);
            tracing::warn!(slot = %self.slot, error = %e, retry_in_ms = wait.as_millis() as u64, "replication stream failed; reconnecting");
            // Wait out the backoff, marking the keyspaces not ready once the grace has passed.
            let freshness = self.freshness.clone();
            let why = format!("replication stream down: {e}");
            if !super::wait_down(
                &self.keyspaces,
                &|| freshness.is_reachable(),
                since,
                wait,
                self.config.ready_grace,
                &why,
                &stop,
            )
            .await
            {
                return;
            }
        }
    }

    /// One session: set up, warm if needed, stream until an error or `stop`.
    async fn session(
        &mut self,
        stop: &CancellationToken,
        streaming_since: &mut Option<Instant>,
    ) -> Result<(), CdcError> {
        // The warm load and the mappings need every keyspace bound to its table.
        for ks in &self.keyspaces {
            if ks.source().is_err() {
                ks.bind(&self.pool)
                    .await
                    .map_err(|why| CdcError::Setup(format!("keyspace {}: {why}", ks.name())))?;
            }
        }
        catalog::ensure_publication(&self.pool, &self.config, &self.keyspaces).await?;
        let state = catalog::slot_state(&self.pool, &self.slot).await?;
        if let SlotState::InUse(holder) = &state {
            return Err(self.slot_held(holder));
        }
        let mut client = PgwireSource::connect_gated(&self.pg, &self.slot, &self.config.publication, &self.app).await?;
        match state {
            SlotState::Missing | SlotState::Lost => {
                let lost = state == SlotState::Lost || self.warmed;
                if lost {
                    self.metrics.cdc_slot_recreations.inc();
                    tracing::warn!(slot = %self.slot, "replication slot is gone or invalidated: recreating it and reloading the CDC keyspaces");
                    self.forget_all("replication slot was lost; reloading from a new snapshot");
                    if state == SlotState::Lost {
                        catalog::drop_slot(&self.pool, &self.slot).await?;
                    }
                }
                // What a new slot's snapshot loads was never in the log: followers of this
                // node's log take a new snapshot.
                self.freshness.reloaded();
                let (cp, snapshot) = client.create_slot(&self.slot, false).await?;
                tracing::info!(slot = %self.slot, consistent_point = %cp, "created the replication slot");
                self.warm(&snapshot, cp).await?;
            }
            SlotState::Present { confirmed } => {
                let mine = Lsn(self.confirmed.load(Ordering::Acquire));
                let advanced = self.warmed && confirmed > mine;
                if advanced {
                    // Another process consumed this slot (one node id on two nodes): the
                    // changes it took never reached this node's caches. Never resume blind.
                    self.metrics.cdc_slot_conflicts.with_label_values(&["advanced"]).inc();
                    tracing::error!(slot = %self.slot, slot_confirmed = %confirmed, this_node_confirmed = %mine,
                        "the replication slot was advanced past this node's position by another consumer (is node_id {} used twice?); reloading the CDC keyspaces from a new snapshot", self.node);
                    self.forget_all("replication slot was consumed by another process; reloading from a new snapshot");
                }
                // From here this node is consistent with the slot's position (it resumes from
                // there, or reloads from a snapshot taken after it).
                self.confirmed.fetch_max(confirmed.0, Ordering::AcqRel);
                if !self.warmed || advanced {
                    if self.keyspaces.iter().any(|k| k.config.warm) {
                        let mut temp =
                            PgwireSource::connect_gated(&self.pg, &self.slot, &self.config.publication, &self.app)
                                .await?;
                        let name = format!("{}_w{}", &self.slot[..self.slot.len().min(50)], std::process::id());
                        let (cp, snapshot) = temp.create_slot(&name, true).await?;
                        self.warm(&snapshot, cp).await?;
                        // Ending the session drops the temporary slot.
                        if temp.close().await == Closed::TimedOut {
                            self.metrics.cdc_close_timeouts.inc();
                        }
                    } else {
                        self.open_gate(self.log.end());
                    }
                }
            }
            // Refused above, before connecting.
            SlotState::InUse(_) => {}
        }
        self.warmed = true;
        client.start().await?;
        *streaming_since = Some(Instant::now());
        self.metrics.set_cdc_state("streaming");
        tracing::info!(slot = %self.slot, "streaming changes");
        let result = self.stream(&mut client, stop).await;
        if client.close().await == Closed::TimedOut {
            self.metrics.cdc_close_timeouts.inc();
        }
        result
    }

    /// The slot is held by a live session: refuse, naming who holds it.
    fn slot_held(&self, holder: &catalog::Holder) -> CdcError {
        let (twin, why) = holder.conflict(&self.slot, &self.node, &self.app);
        if twin {
            self.metrics.cdc_slot_conflicts.with_label_values(&["held"]).inc();
        }
        tracing::error!(slot = %self.slot, reason = %why, "refusing to share the replication slot");
        self.block_all(Some(why.clone()));
        CdcError::Setup(why)
    }

    /// Holds the applier and empties every CDC keyspace: what they hold may be stale.
    fn forget_all(&self, why: &str) {
        self.freshness.reloaded();
        self.gate.send_modify(|g| g.open = false);
        for ks in &self.keyspaces {
            ks.set_blocker(Blocker::Cdc, Some(why.into()));
            ks.clear();
        }
    }

    /// Lets the applier go on from `from` (where the stream's next events will be), and starts
    /// the freshness watermark's bookkeeping over from there.
    fn open_gate(&self, from: Offset) {
        self.freshness.restart(from);
        self.gate.send_modify(|g| {
            g.open = true;
            g.from = from;
            g.generation += 1;
        });
    }

    /// Loads the warm keyspaces from `snapshot` (version `cp`), then lets the applier go on from
    /// the log's current end: everything the stream appends from here on is newer.
    async fn warm(&mut self, snapshot: &str, cp: Lsn) -> Result<(), CdcError> {
        self.gate.send_modify(|g| g.open = false);
        let from = self.log.end();
        let warm: Vec<Arc<Keyspace>> = self.keyspaces.iter().filter(|k| k.config.warm).cloned().collect();
        if !warm.is_empty() {
            self.metrics.set_cdc_state("snapshotting");
            self.metrics.cdc_snapshots.inc();
            let started = Instant::now();
            // Every version the load installs, and every streamed change after it, is later.
            let base = self.hlc.now();
            let rows = snapshot::warm(
                &self.pg,
                snapshot,
                cp,
                &warm,
                &self.hlc,
                &self.metrics,
                self.max_key_bytes,
                &self.tasks,
            )
            .await?;
            tracing::info!(rows, seconds = started.elapsed().as_secs_f64(), consistent_point = %cp, "warm start loaded the CDC keyspaces");
            for ks in warm.iter().filter(|k| k.config.federate) {
                self.federate_base(ks, cp, base).await?;
            }
        }
        self.open_gate(from);
        Ok(())
    }

    /// A federated keyspace's whole table, as loaded, for the other regions: a put per row, then
    /// a sweep at `base` (a federated clear: every entry of this node's older than `base` that
    /// the load did not refresh is a row deleted meanwhile). Appended before the stream starts,
    /// so every streamed change comes after them.
    async fn federate_base(&self, ks: &Arc<Keyspace>, cp: Lsn, base: u64) -> Result<(), CdcError> {
        let (entries, _) = ks.entries();
        let mut events: Vec<Vec<u8>> = entries
            .iter()
            .filter(|(_, e)| e.value.is_some() && e.version >= base)
            .map(|(k, e)| {
                ChangeEvent::put(ks.name(), &**k, e.value.clone().unwrap_or_default())
                    .from_origin(&*self.node, e.version, Source::Federation)
                    .at_source(cp.0, 0, None)
                    .federated()
                    .encode()
            })
            .collect();
        let rows = events.len();
        events.push(
            ChangeEvent::clear(ks.name())
                .from_origin(&*self.node, base, Source::Federation)
                .at_source(cp.0, 0, None)
                .federated()
                .encode(),
        );
        for chunk in events.chunks(4096) {
            self.log.append(chunk.to_vec()).await?;
        }
        tracing::info!(
            keyspace = ks.name(),
            rows,
            "the loaded table is federated to the other regions"
        );
        Ok(())
    }

    /// Queues a transaction's events (or a chunk of them) in the log, in commit order, without
    /// waiting for durability; the returned future resolves once they are durable, with the
    /// position to confirm then (`None` for a chunk of a transaction not yet committed).
    async fn submit(
        &self,
        events: &mut Vec<ChangeEvent>,
        confirm: Option<Lsn>,
        inflight: &mut Inflight,
    ) -> Result<(), CdcError> {
        let mut counts: HashMap<(String, &'static str), u64> = HashMap::new();
        for e in events.iter() {
            *counts.entry((e.keyspace.clone(), e.op.label())).or_default() += 1;
        }
        let pending = self
            .log
            .enqueue(events.iter().map(ChangeEvent::encode).collect())
            .await?;
        events.clear();
        let metrics = self.metrics.clone();
        inflight.push_back(Box::pin(async move {
            pending.durable().await?;
            for ((ks, op), n) in counts {
                metrics.cdc_events.with_label_values(&[&ks, op]).inc_by(n);
            }
            Ok(confirm)
        }));
        Ok(())
    }

    fn confirm(&self, client: &impl ReplicationSource, lsn: Lsn) {
        client.confirm(lsn);
        self.confirmed.fetch_max(lsn.0, Ordering::AcqRel);
        // Everything up to `lsn` is in the log before its current end.
        self.freshness.confirmed(lsn, self.log.end());
        self.metrics.cdc_confirmed_lsn.set(lsn.0 as i64);
        self.metrics
            .cdc_slot_lag
            .set(client.server_wal_end().0.saturating_sub(lsn.0) as i64);
    }

    /// The stream loop of one session. Transactions are appended in commit order with up to
    /// `MAX_INFLIGHT` appends awaiting durability at once (so they share group commits), and
    /// each commit's position is confirmed, in order, once its events are durable.
    async fn stream(&self, client: &mut impl ReplicationSource, stop: &CancellationToken) -> Result<(), CdcError> {
        let mut decoder = Decoder::new();
        let mut mappings: HashMap<u32, Vec<TableMapping>> = HashMap::new();
        let mut txn: Option<Txn> = None;
        let mut inflight: Inflight = FuturesOrdered::new();
        // Ready once the cache holds every change committed before this session began: a
        // restarted node does not report ready while it replays what it missed.
        let began = self.freshness.now();
        self.freshness.request_probe();
        let mut fresh = self.freshness.subscribe();
        let mut caught_up = false;
        loop {
            if !caught_up && self.freshness.as_of() >= began {
                caught_up = true;
                self.block_all(None);
                tracing::info!(slot = %self.slot, "caught up with the database");
            }
            let ev = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Confirm what is already durable before leaving.
                    while let Some(done) = inflight.next().await {
                        if let Some(lsn) = done? {
                            self.confirm(client, lsn);
                        }
                    }
                    return Ok(());
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    if let Some(lsn) = done? {
                        // Only now is the transaction durable here: Postgres may release it.
                        self.confirm(client, lsn);
                    }
                    continue;
                }
                _ = fresh.changed(), if !caught_up => continue,
                ev = client.recv(), if inflight.len() < MAX_INFLIGHT => ev?,
            };
            let Some(ev) = ev else {
                return Err(CdcError::Connection("the server ended the replication stream".into()));
            };
            match ev {
                StreamEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_us,
                } => {
                    txn = Some(Txn {
                        info: TxnInfo {
                            lsn: final_lsn.0,
                            xid,
                            commit_time_us,
                            version: self.hlc.now(),
                            origin: self.node.clone(),
                            node: self.node.clone(),
                        },
                        events: Vec::new(),
                    });
                }
                StreamEvent::Data(data) => {
                    let change = decoder.decode(&data).map_err(|e| CdcError::Protocol(e.to_string()))?;
                    let Some(t) = txn.as_mut() else { continue };
                    match &change {
                        Change::Relation { rel, .. } => {
                            let built = self
                                .reshaper
                                .mappings(&self.keyspaces, rel, Lsn(t.info.lsn), self.max_key_bytes)
                                .await;
                            mappings.insert(rel.oid, built);
                        }
                        Change::Insert { rel, .. } | Change::Update { rel, .. } | Change::Delete { rel, .. } => {
                            for m in mappings.get(&rel.oid).into_iter().flatten() {
                                m.events(&change, &t.info, &mut t.events);
                            }
                        }
                        Change::Truncate { rels } => {
                            for rel in rels {
                                for m in mappings.get(&rel.oid).into_iter().flatten() {
                                    m.events(&change, &t.info, &mut t.events);
                                }
                            }
                        }
                        Change::Other => {}
                    }
                    if t.events.len() >= CHUNK_EVENTS {
                        self.submit(&mut t.events, None, &mut inflight).await?;
                    }
                }
                StreamEvent::Message {
                    lsn,
                    transactional,
                    prefix,
                    content,
                } => {
                    match txn.as_mut() {
                        // A write-behind flush marks its transaction: its changes echo writes
                        // already acknowledged on the node named in the message.
                        Some(t) if transactional && prefix == FLUSH_MARKER => {
                            t.info.origin = String::from_utf8_lossy(&content).into_owned().into();
                            self.metrics.cdc_echoes.inc();
                        }
                        // Heartbeats outside a transaction: nothing to keep; the position may be
                        // released once everything before it is durable.
                        None if !transactional && inflight.is_empty() => self.confirm(client, lsn),
                        _ => {}
                    }
                }
                StreamEvent::Commit { end_lsn } => {
                    let mut events = txn.take().map(|t| t.events).unwrap_or_default();
                    self.metrics.cdc_transactions.inc();
                    self.submit(&mut events, Some(end_lsn), &mut inflight).await?;
                }
                StreamEvent::KeepAlive { wal_end } => {
                    tracing::trace!(%wal_end, in_txn = txn.is_some(), inflight = inflight.len(), "keepalive");
                    // Between transactions, with everything before durable, every change before
                    // the server's position has been handled: confirm it so the slot advances.
                    if txn.is_none() && inflight.is_empty() && wal_end > Lsn::ZERO {
                        self.confirm(client, wal_end);
                    }
                }
            }
        }
    }
}
