//! The flusher: drains write-behind writes from the commit log to Postgres.
//!
//! It follows the log from its durable cursor and gathers a batch (up to `batch_rows` keys, or
//! `batch_delay` after its first write). Writes of one key are coalesced in log order — later
//! fields win, a delete wins over earlier puts, a put after a delete re-inserts — so per-key
//! order is kept and each key costs one row. The batch becomes one transaction: a
//! `pg_logical_emit_message(true, 'cachesync.flush', node)` marker (when CDC follows a
//! write-behind keyspace, so the echo is recognised), then per keyspace one set-based `DELETE`
//! and one set-based upsert per set of written columns — its rows `COPY`ed into a session
//! staging table when there are many, else bound as one JSON array
//! ([`crate::source::postgres::TableSource::upsert_rows`]). The cursor advances only after the
//! transaction commits; the stored rows are installed in L1 with their WAL position and xid,
//! and the pending writes are settled. Postgres sends the stored rows back (`RETURNING`) only
//! when the cache cannot know them: rows whose every output column takes exactly what was
//! written (text, integers, booleans, NULL; no default, no rewriting trigger) are rendered from
//! the writes, at the WAL position and xid read once at the end of the transaction — which
//! also catches a trigger created since the binding was read (those rows are not installed).
//! Reading, writing and settling are three stages (see [`Flusher`]), so Postgres is kept busy
//! while the next batch is coalesced and the last one settled.
//!
//! Failures: Postgres unreachable → capped exponential backoff with jitter, the same batch
//! again, writes keep being accepted up to the backlog bound. Postgres rejects the data → the
//! batch is bisected until the rejected rows are alone; each is set aside as a dead letter with
//! Postgres's error and the rest commit — the queue never stalls on one bad row.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::deadletters::DeadLetter;
use super::{CURSOR, WriteBehind};
use crate::cache::Entry;
use crate::commitlog::{Offset, Record};
use crate::event::{ChangeEvent, EventView, Op, Source};
use crate::keyspace::Keyspace;
use crate::lifecycle::{Backoff, Tasks};
use crate::source::postgres::fields::Fields;
use crate::source::postgres::sqlstate::{self, Fault};
use crate::source::postgres::{self, BatchError, PgPool, UpsertRow};

/// The cursor is moved past records that need no flush at least this often.
const IDLE_CURSOR_EVERY: u64 = 10_000;
/// Most log payload bytes one batch gathers.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Keys settled together after a flush (see [`Flusher::settle`]): their stripes are held for
/// that long, so a write of one of them waits at most for that many L1 installs.
const SETTLE_CHUNK: usize = 64;

/// How long a batch whose first write was taken at `taken_ms` (the log's timestamp) may still
/// wait to fill: `batch_delay` after that write was taken, not after it was read. A backlog's
/// writes (Postgres was away, or the flusher behind) have waited long enough and go at once;
/// only a trickle of fresh writes is held. A timestamp ahead of this clock (another node's
/// record, a clock step) waits the whole delay, never longer.
fn fill_wait(batch_delay: Duration, taken_ms: u64, now_ms: u64) -> Duration {
    batch_delay.saturating_sub(Duration::from_millis(now_ms.saturating_sub(taken_ms)))
}

/// What one key's coalesced writes do.
#[derive(Debug, Clone)]
pub enum Kind {
    /// Set the named fields (insert the row if missing).
    Upsert(Fields),
    /// Delete the row.
    Delete,
    /// Delete the row, then insert it with these fields only (a put after a delete).
    Replace(Fields),
}

/// One key's flush.
#[derive(Clone)]
pub struct FlushOp {
    pub ks: Arc<Keyspace>,
    pub key: Arc<str>,
    pub kind: Kind,
    /// Version of the last write coalesced: what the flush settles.
    pub version: u64,
    /// Offset of the last write coalesced: the dead letter's id if it is rejected.
    pub offset: Offset,
    /// The last write coalesced, as the log holds it: a dead letter takes its document, fields
    /// and origin (the node that took it — another region's, for a federated keyspace with a
    /// home — is told when Postgres rejects it) from here, so a flush decodes only what it needs.
    pub record: bytes::Bytes,
}

/// Counts per keyspace name over a batch in keyspace order, for the metrics: a run of one name
/// is one count (a hashed map per op, with std's SipHash, was 5 % of the flusher's
/// instructions). A name met again after another counts apart; the sums are the same.
#[derive(Default)]
struct Tally<'a>(Vec<(&'a str, u64)>);

impl<'a> Tally<'a> {
    fn add(&mut self, name: &'a str) {
        self.add_n(name, 1);
    }

    fn add_n(&mut self, name: &'a str, by: u64) {
        match self.0.last_mut() {
            Some((last, n)) if *last == name => *n += by,
            _ => self.0.push((name, by)),
        }
    }
}

/// Orders `ops` by keyspace name, then key (see [`key_order`]), in place: each cycle of the
/// permutation is followed with swaps, so no second array of ~140-byte ops is allocated per
/// batch (one grown by reallocation showed as first-touch page clearing in a drain's profile;
/// the drain's CPU did not measurably change without it).
fn in_key_order(ops: &mut [FlushOp]) {
    let mut from = key_order(&ops.iter().map(|op| (op.ks.name(), &*op.key)).collect::<Vec<_>>());
    permute(ops, &mut from);
}

/// Rearranges `items` so that position `j` holds what was at `from[j]` (`from` a permutation of
/// the positions; it is used up as the marks of positions done).
fn permute<T>(items: &mut [T], from: &mut [usize]) {
    for start in 0..items.len() {
        let mut j = start;
        // Each cycle carries the item first at `start` along, until its place comes up.
        while from[j] != j {
            let k = std::mem::replace(&mut from[j], j);
            if k == start {
                break;
            }
            items.swap(j, k);
            j = k;
        }
    }
}

/// The positions of `(keyspace, key)` pairs in the order of their names, then keys. Sorts
/// small `(key prefix, keyspace rank, position)` triples, by rank and then prefix: most
/// comparisons are of integers (the first eight bytes of each key, big-endian and
/// zero-padded, order keys as their bytes do), and only keys alike in those bytes are
/// compared whole. Sorting the ops themselves
/// compared strings through `memcmp` and moved ~140-byte ops at every step (18 % of the
/// flusher's instructions over a drain, by callgrind).
fn key_order(pairs: &[(&str, &str)]) -> Vec<usize> {
    let mut names: Vec<&str> = Vec::new();
    for (ks, _) in pairs {
        if !names.contains(ks) {
            names.push(ks);
        }
    }
    names.sort_unstable();
    let rank = |ks: &str| names.iter().position(|n| *n == ks).unwrap_or(0) as u32;
    let prefix = |key: &str| {
        let mut b = [0u8; 8];
        let n = key.len().min(8);
        b[..n].copy_from_slice(&key.as_bytes()[..n]);
        u64::from_be_bytes(b)
    };
    // (key prefix, keyspace rank, position): sixteen bytes, moved in registers.
    let mut order: Vec<(u64, u32, u32)> = pairs
        .iter()
        .enumerate()
        .map(|(i, (ks, key))| (prefix(key), if names.len() == 1 { 0 } else { rank(ks) }, i as u32))
        .collect();
    order.sort_unstable_by(|a, b| {
        (a.1, a.0)
            .cmp(&(b.1, b.0))
            .then_with(|| pairs[a.2 as usize].1.cmp(pairs[b.2 as usize].1))
    });
    order.into_iter().map(|(_, _, i)| i as usize).collect()
}

/// What one flush transaction returns: deleted rows as entries by keyspace and key, and what
/// each upsert stored.
type Transacted = (HashMap<String, Stored>, Vec<Upserted>);

/// What an upsert stored, not yet made entries (the settling stage does that, so the writer
/// stage is free for the next batch sooner).
enum Upserted {
    /// The rows Postgres returned.
    Returned(Arc<Keyspace>, Vec<tokio_postgres::Row>),
    /// Rows stored exactly as written ([`crate::source::postgres::TableSource::stores_as_written`]):
    /// the ops (by index in the batch) and their documents, rendered from the ops themselves
    /// when the flush was planned, at the transaction's WAL position and id.
    AsWritten {
        ops: Vec<(usize, bytes::Bytes)>,
        /// Ops whose table turned out to rewrite rows (a trigger created since its binding
        /// was read): their keys are dropped from L1 instead.
        dropped: Vec<usize>,
        lsn: crate::lsn::Lsn,
        xid: Option<u32>,
    },
}

/// What Postgres stored or deleted in one keyspace, as entries by key.
type Stored = HashMap<Arc<str>, Entry, ahash::RandomState>;

/// A batch's flush, planned ahead of its transaction ([`Flusher::plan`]).
#[derive(Default)]
struct Plan {
    keyspaces: Vec<KeyspacePlan>,
}

/// One keyspace's part of a planned flush.
struct KeyspacePlan {
    ks: Arc<Keyspace>,
    /// The source planned against (its binding shaped the rows' text).
    source: Arc<postgres::TableSource>,
    /// Keys of the rows to delete.
    deletes: Vec<Vec<String>>,
    /// One upsert per set of written columns.
    upserts: Vec<UpsertPlan>,
}

/// One set-based upsert of a planned flush.
#[derive(Default)]
struct UpsertPlan {
    /// Its ops, by index in the flushed part, and their keys' components.
    ops: Vec<usize>,
    keys: Vec<Vec<String>>,
    /// Postgres stores the rows as written: nothing is sent back.
    known: bool,
    /// When `known`, each row's document as Postgres stores it
    /// ([`postgres::TableSource::written_doc`]), in the order of `ops`.
    docs: Vec<bytes::Bytes>,
    /// The rows' `COPY` text (`None`: too few rows to stage; they go as JSON).
    copy: Option<postgres::CopyText>,
}

impl UpsertPlan {
    fn rows<'a>(&'a self, ops: &'a [FlushOp]) -> Vec<UpsertRow<'a>> {
        self.keys
            .iter()
            .zip(&self.ops)
            .filter_map(|(key, &i)| match &ops[i].kind {
                Kind::Upsert(m) | Kind::Replace(m) => Some((key.as_slice(), m)),
                Kind::Delete => None,
            })
            .collect()
    }
}

/// Why a flush failed.
#[derive(Debug, Clone)]
pub enum FlushError {
    /// Postgres is unreachable or overloaded; try the same batch later.
    Unavailable(String),
    /// Postgres rejected the data.
    Rejected(String),
}

/// Classifies a driver error for the flusher by the one SQLSTATE classification. Only errors
/// about the data itself — or a column the table no longer has, which no retry will bring back —
/// set a write aside; anything else (connection, permissions, a missing table) is retried,
/// keeping the writes, until it is fixed.
pub fn flush_error(e: &tokio_postgres::Error) -> FlushError {
    match (sqlstate::fault(e), e.as_db_error()) {
        (Fault::Data | Fault::Schema, Some(db)) => {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            FlushError::Rejected(format!("{}{detail} [SQLSTATE {}]", db.message(), db.code().code()))
        }
        _ => FlushError::Unavailable(e.to_string()),
    }
}

fn batch_error(e: BatchError) -> FlushError {
    match e {
        BatchError::Db(e) => flush_error(&e),
        BatchError::Invalid(why) => FlushError::Rejected(why),
    }
}

/// Folds one write (held by `record`) into a key's coalesced flush. A key's only write keeps
/// its fields where the record has them ([`Fields`]).
fn fold(prev: Option<Kind>, e: &EventView<'_>, record: &bytes::Bytes) -> Kind {
    match e.op {
        Op::Delete => Kind::Delete,
        _ => {
            let patch = match e.value {
                Some(doc) => Fields::of_write(record, doc, e.written()),
                None => Fields::default(),
            };
            match prev {
                None => Kind::Upsert(patch),
                Some(Kind::Upsert(m)) => Kind::Upsert(m.extend(patch)),
                Some(Kind::Delete) => Kind::Replace(patch),
                Some(Kind::Replace(m)) => Kind::Replace(m.extend(patch)),
            }
        }
    }
}

/// A coalesced batch, from the reader stage to the writer stage.
struct Batch {
    ops: Vec<FlushOp>,
    /// Writes and payload bytes it coalesced (for the backlog counters).
    raw: u64,
    bytes: u64,
    /// The log offset just past it: where the cursor moves once it is settled.
    end: Offset,
    /// Timestamp of its first write, ms since the epoch; zero when it has none.
    first_ms: u64,
    /// Its flush, planned by the reader stage (`None` when that failed: the writer stage plans
    /// again and meets the failure there).
    plan: Option<Plan>,
}

/// What flushing a batch did, from the writer stage to the settling stage.
#[derive(Default)]
struct Outcome {
    /// What Postgres stored or deleted, as entries by keyspace and key.
    stored: HashMap<String, Stored>,
    /// What upserts stored, not yet rendered.
    upserted: Vec<Upserted>,
    /// The ops Postgres rejected (by index in the batch), with its error.
    rejected: Vec<(usize, String)>,
}

/// The flusher: three stages joined by short queues, so that while Postgres runs one batch the
/// next is read and coalesced and the previous one is settled.
///
/// 1. *read*: follows the log from the cursor, gathers and coalesces batches;
/// 2. *write*: one transaction per batch (bisecting around rejected rows), in log order;
/// 3. *settle*: installs the stored rows, settles the pending writes, stores dead letters, and
///    only then moves the durable cursor past the batch.
pub struct Flusher {
    wb: Arc<WriteBehind>,
    pool: Arc<PgPool>,
    /// Mark flush transactions for CDC (when CDC follows a write-behind keyspace and the role may
    /// call `pg_logical_emit_message`).
    marker: std::sync::atomic::AtomicBool,
    probed: std::sync::atomic::AtomicBool,
}

impl Flusher {
    pub fn new(wb: Arc<WriteBehind>, pool: Arc<PgPool>, marker: bool) -> Flusher {
        Flusher {
            wb,
            pool,
            marker: marker.into(),
            probed: false.into(),
        }
    }

    /// Checks once that marking is allowed; a role without the right flushes unmarked.
    async fn probe_marker(&self) {
        if !self.marker.load(Ordering::Relaxed) || self.probed.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(mut client) = self.pool.get().await else {
            self.probed.store(false, Ordering::Relaxed);
            return;
        };
        let Ok(tx) = client.transaction().await else {
            self.probed.store(false, Ordering::Relaxed);
            return;
        };
        if let Err(e) = tx
            .execute("SELECT pg_logical_emit_message(true, 'cachesync.probe', '')", &[])
            .await
        {
            tracing::warn!(error = %e, "write-behind flushes cannot be marked for CDC (EXECUTE on pg_logical_emit_message is needed); their echoes will not be recognised");
            self.marker.store(false, Ordering::Relaxed);
        }
        let _ = tx.rollback().await;
    }

    /// Runs until `tasks`' phase stops; when `drain` turns true it flushes what is left and
    /// returns. Its stages run as tasks of the same phase.
    pub async fn run(self, drain: watch::Receiver<bool>, tasks: Tasks) {
        let stop = tasks.token().clone();
        let cursor = match self.wb.log.cursor(CURSOR, true) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "write-behind flusher cannot open its cursor");
                return;
            }
        };
        let me = Arc::new(self);
        let (batch_tx, batch_rx) = mpsc::channel(1);
        let (done_tx, done_rx) = mpsc::channel(1);
        let reader = tasks.spawn(me.clone().read(cursor.position(), batch_tx, drain, stop.clone()));
        let settler = tasks.spawn(me.clone().settle_batches(cursor, done_rx, stop.clone()));
        me.write_batches(batch_rx, done_tx, &stop).await;
        let _ = reader.await;
        let _ = settler.await;
        if !stop.is_cancelled() {
            let left = me.wb.backlog.records.load(Ordering::Relaxed);
            tracing::info!(unflushed = left, "write-behind flusher stopped after draining");
        }
    }

    /// Stage 1: gathers batches from the log — up to `batch_rows` writes, or what arrived within
    /// `batch_delay` of the first being taken — and coalesces them. When draining, stops at the
    /// log's end.
    async fn read(
        self: Arc<Self>,
        from: Offset,
        out: mpsc::Sender<Batch>,
        mut drain: watch::Receiver<bool>,
        stop: CancellationToken,
    ) {
        let cfg = &self.wb.config;
        let mut tail = self.wb.log.tail(from);
        let mut idle_from = from;
        loop {
            let draining = *drain.borrow();
            let first = if draining {
                match tail.try_next(cfg.batch_rows, MAX_BATCH_BYTES) {
                    Ok(r) if r.is_empty() => return,
                    r => r,
                }
            } else {
                tokio::select! {
                    r = tail.next(cfg.batch_rows, MAX_BATCH_BYTES) => r,
                    _ = drain.changed() => continue,
                    _ = stop.cancelled() => return,
                }
            };
            let mut records = match first {
                Ok(r) => r,
                Err(e) => {
                    if !matches!(e, crate::commitlog::LogError::Closed) {
                        tracing::error!(error = %e, "write-behind flusher cannot read the commit log");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let mut bytes: usize = records.iter().map(|r| r.payload.len()).sum();
            let taken_ms = records.first().map_or(u64::MAX, |r| r.timestamp_ms);
            let deadline =
                tokio::time::Instant::now() + fill_wait(cfg.batch_delay, taken_ms, crate::commitlog::now_ms());
            // Gather up to the batch's bounds: what is durable already at once; once caught up,
            // wait for whichever comes first, the batch's delay or enough records to fill it
            // ([`Tail::until_available`]). Not [`Tail::next`]: every append wakes a reader
            // waiting there, so at a few writes per delay each acknowledged write also woke the
            // flusher, a cross-core wake-up beside its request. Now a batch costs one wake-up for
            // its first write and one for its end.
            let mut waited = draining;
            while records.len() < cfg.batch_rows && bytes < MAX_BATCH_BYTES {
                let more = match tail.try_next(cfg.batch_rows - records.len(), MAX_BATCH_BYTES - bytes) {
                    Ok(more) => more,
                    Err(_) => break,
                };
                if !more.is_empty() {
                    bytes += more.iter().map(|r| r.payload.len()).sum::<usize>();
                    records.extend(more);
                    continue;
                }
                if waited {
                    break;
                }
                let wanted = (cfg.batch_rows - records.len()) as u64;
                tokio::select! {
                    r = tail.until_available(wanted) => if r.is_err() { break },
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = stop.cancelled() => return,
                }
                waited = true;
            }
            let end = tail.position();
            let batch = self.coalesce(&records, end);
            // Records that need no flush (CDC's, other keyspaces'): pass the position on now and
            // then, so the cursor follows and retention can proceed.
            if batch.ops.is_empty() && end.0 - idle_from.0 < IDLE_CURSOR_EVERY {
                continue;
            }
            idle_from = end;
            tokio::select! {
                r = out.send(batch) => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Stage 2: flushes the batches in log order and hands each on with what happened to it.
    async fn write_batches(
        &self,
        mut input: mpsc::Receiver<Batch>,
        out: mpsc::Sender<(Batch, Outcome)>,
        stop: &CancellationToken,
    ) {
        loop {
            let mut batch = tokio::select! {
                b = input.recv() => match b {
                    Some(b) => b,
                    None => return,
                },
                _ = stop.cancelled() => return,
            };
            let outcome = if batch.ops.is_empty() {
                Outcome::default()
            } else {
                // The batch being written holds the oldest unflushed write.
                self.wb.backlog.oldest_ms.store(batch.first_ms, Ordering::Relaxed);
                match self.flush_until_done(&batch.ops, batch.plan.take(), stop).await {
                    Some(o) => o,
                    None => return, // stopped while Postgres was unreachable: the writes stay in the log
                }
            };
            tokio::select! {
                r = out.send((batch, outcome)) => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Stage 3: makes each flushed batch visible and durable as flushed, in order.
    async fn settle_batches(
        self: Arc<Self>,
        cursor: Arc<crate::commitlog::Cursor>,
        mut input: mpsc::Receiver<(Batch, Outcome)>,
        stop: CancellationToken,
    ) {
        while let Some((batch, outcome)) = input.recv().await {
            if !self.settle(&batch.ops, outcome).await {
                return; // a dead letter could not be stored: keep the cursor where it is
            }
            loop {
                match cursor.commit_async(batch.end).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "write-behind cursor commit failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            }
            let b = &self.wb.backlog;
            saturating_sub(&b.records, batch.raw);
            saturating_sub(&b.bytes, batch.bytes);
            if b.records.load(Ordering::Relaxed) == 0 {
                b.oldest_ms.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Coalesces a run of records into one flush per key, ordered by keyspace and key.
    fn coalesce(&self, records: &[Record], end: Offset) -> Batch {
        // Each key's op by (keyspace, key); the keyspace by its address, as one `Arc` per name
        // is shared by every op of it.
        let mut at: HashMap<(usize, Arc<str>), usize, ahash::RandomState> =
            HashMap::with_capacity_and_hasher(records.len(), ahash::RandomState::new());
        let mut ops: Vec<FlushOp> = Vec::with_capacity(records.len());
        let (mut raw, mut bytes, mut first_ms) = (0, 0, 0);
        for r in records {
            let Ok(e) = EventView::of(&r.payload) else {
                continue;
            };
            // Writes only (a `rejected` notice is an API-sourced event too, but writes nothing).
            if e.source != Source::Api || !matches!(e.op, Op::Put | Op::Delete) {
                continue;
            }
            let Some(ks) = self.wb.keyspaces.get(e.keyspace) else {
                continue;
            };
            // A write taken in another region: the CDC echo of its flush must carry a later
            // version, so the region that took it sees the stored row supersede its pending write.
            self.wb.hlc.observe(e.version);
            raw += 1;
            bytes += r.payload.len() as u64;
            if first_ms == 0 {
                first_ms = r.timestamp_ms;
            }
            let key: Arc<str> = e.key.into();
            match at.entry((Arc::as_ptr(ks) as usize, key.clone())) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(ops.len());
                    ops.push(FlushOp {
                        ks: ks.clone(),
                        key,
                        kind: fold(None, &e, &r.payload),
                        version: e.version,
                        offset: r.offset,
                        record: r.payload.clone(),
                    });
                }
                std::collections::hash_map::Entry::Occupied(o) => {
                    let op = &mut ops[*o.get()];
                    op.kind = fold(Some(std::mem::replace(&mut op.kind, Kind::Delete)), &e, &r.payload);
                    op.version = e.version;
                    op.offset = r.offset;
                    op.record = r.payload.clone();
                }
            }
        }
        in_key_order(&mut ops);
        // Planned here, so the writer stage has only Postgres's part to wait for.
        let plan = (!ops.is_empty()).then(|| self.plan(&ops).ok()).flatten();
        Batch {
            ops,
            raw,
            bytes,
            end,
            first_ms,
            plan,
        }
    }

    /// Flushes `ops`, retrying while Postgres is unreachable; a part Postgres rejects is halved
    /// until each rejected row is alone, and the rest commits. `None` if stopped first.
    async fn flush_until_done(
        &self,
        ops: &[FlushOp],
        planned: Option<Plan>,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        let cfg = &self.wb.config;
        let m = &self.wb.metrics;
        let started = Instant::now();
        let mut backoff = Backoff::new(cfg.retry_initial, cfg.retry_max);
        let mut last_error = String::new();
        let mut outcome = Outcome::default();
        // Parts still to flush, the next one last.
        let mut work = Vec::with_capacity(8);
        work.push(0..ops.len());
        // The reader's plan serves the first attempt at the whole batch; any other attempt (a
        // retry, a part) is planned again, against the keyspaces' sources as they are then.
        let mut planned = planned;
        while let Some(part) = work.pop() {
            let plan = match planned.take() {
                Some(p) => Ok(p),
                None => self.plan(&ops[part.clone()]),
            };
            let done = match plan {
                Ok(plan) => self.transaction(&ops[part.clone()], plan).await,
                Err(e) => Err(e),
            };
            match done {
                Ok((stored, mut upserted)) => {
                    for (ks, rows) in stored {
                        outcome.stored.entry(ks).or_default().extend(rows);
                    }
                    // Indexes in the part are indexes in the batch from here on.
                    for u in &mut upserted {
                        if let Upserted::AsWritten { ops, dropped, .. } = u {
                            ops.iter_mut().for_each(|(i, _)| *i += part.start);
                            dropped.iter_mut().for_each(|i| *i += part.start);
                        }
                    }
                    outcome.upserted.extend(upserted);
                    if !last_error.is_empty() {
                        tracing::info!("write-behind flushing again after Postgres returned");
                        last_error.clear();
                    }
                    backoff.reset();
                }
                Err(FlushError::Rejected(why)) if part.len() == 1 => outcome.rejected.push((part.start, why)),
                Err(FlushError::Rejected(_)) => {
                    m.wb_flush_failures.with_label_values(&["rejected"]).inc();
                    let mid = part.start + part.len() / 2;
                    work.push(mid..part.end);
                    work.push(part.start..mid);
                }
                Err(FlushError::Unavailable(e)) => {
                    m.wb_flush_failures.with_label_values(&["unavailable"]).inc();
                    if e != last_error {
                        tracing::warn!(error = %e, backlog = self.wb.backlog.records.load(Ordering::Relaxed), "write-behind flush failed; writes stay queued and will be retried");
                        last_error = e;
                    }
                    work.push(part);
                    if !backoff.wait(stop).await {
                        return None;
                    }
                }
            }
        }
        m.wb_batch_rows.observe(ops.len() as f64);
        m.wb_flush_seconds.observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            rows = ops.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "flushed a batch"
        );
        Some(outcome)
    }

    /// Plans the flush of `ops`: per keyspace (in name order) the keys to delete, and the
    /// upserts, one per set of written columns in the order first seen — each with its rows'
    /// keys, whether Postgres stores them as written, and their `COPY` text (when there are
    /// enough rows to stage). Pure work, no I/O: the reader stage plans a batch while the
    /// writer stage runs the one before.
    fn plan(&self, ops: &[FlushOp]) -> Result<Plan, FlushError> {
        let mut by_ks: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            by_ks.entry(op.ks.name()).or_default().push(i);
        }
        let mut plan = Plan::default();
        for at in by_ks.into_values() {
            let ks = &ops[at[0]].ks;
            let source = ks.source().map_err(|e| FlushError::Unavailable(e.to_string()))?;
            let parts = |op: &FlushOp| {
                ks.parse_key_parts(&op.key)
                    .map_err(|e| FlushError::Rejected(e.to_string()))
            };
            // Deletes first (a put after a delete re-inserts in the same transaction).
            let mut deletes = Vec::new();
            for &i in &at {
                if matches!(ops[i].kind, Kind::Delete | Kind::Replace(_)) {
                    deletes.push(parts(&ops[i])?);
                }
            }
            let mut upserts: Vec<UpsertPlan> = Vec::new();
            let mut cols_of: Vec<Vec<&str>> = Vec::new();
            let mut group_of: HashMap<Vec<&str>, usize> = HashMap::new();
            let mut last: Option<(usize, &Fields)> = None;
            for &i in &at {
                let (Kind::Upsert(m) | Kind::Replace(m)) = &ops[i].kind else {
                    continue;
                };
                // Most ops write the columns the one before wrote, in the same order: no list to
                // build or search then.
                let g = match last {
                    Some((g, prev)) if m.len() == prev.len() && m.names().eq(prev.names()) => g,
                    Some((g, _))
                        if cols_of[g].len() == m.len() && m.names().all(|k| cols_of[g].binary_search(&k).is_ok()) =>
                    {
                        g
                    }
                    _ => {
                        let mut cols: Vec<&str> = m.names().collect();
                        cols.sort_unstable();
                        *group_of.entry(cols.clone()).or_insert_with(|| {
                            cols_of.push(cols);
                            upserts.push(UpsertPlan::default());
                            upserts.len() - 1
                        })
                    }
                };
                upserts[g].keys.push(parts(&ops[i])?);
                upserts[g].ops.push(i);
                last = Some((g, m));
            }
            let mut scratch = Vec::with_capacity(256);
            for u in &mut upserts {
                let rows = u.rows(ops);
                // Postgres sends back the stored rows only when the cache cannot know them: the
                // rows it stores as written are rendered here, in the pass that finds whether
                // each is knowable, so settling only stamps them.
                let mut docs = Vec::new();
                if rows.first().is_some_and(|(_, m)| source.stores_as_written(m)) {
                    docs.reserve_exact(rows.len());
                    for (key, m) in &rows {
                        match source.written_doc(key, m, &mut scratch) {
                            Some(doc) => docs.push(doc),
                            None => {
                                docs = Vec::new();
                                break;
                            }
                        }
                    }
                }
                // Every row rendered, or none (a row that cannot be known empties the list).
                let known = !docs.is_empty();
                let copy = source.copy_text(&rows);
                drop(rows);
                (u.known, u.docs, u.copy) = (known, docs, copy);
            }
            plan.keyspaces.push(KeyspacePlan {
                ks: ks.clone(),
                source,
                deletes,
                upserts,
            });
        }
        Ok(plan)
    }

    /// One flush transaction, as planned ([`Flusher::plan`]). Returns the deleted rows as
    /// entries by keyspace and key, and what the upserts stored.
    async fn transaction(&self, ops: &[FlushOp], plan: Plan) -> Result<Transacted, FlushError> {
        self.probe_marker().await;
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| FlushError::Unavailable(e.to_string()))?;
        let tx = client.transaction().await.map_err(|e| flush_error(&e))?;
        if self.marker.load(Ordering::Relaxed) {
            tx.execute(
                "SELECT pg_logical_emit_message(true, 'cachesync.flush', $1::text)",
                &[&self.wb.node],
            )
            .await
            .map_err(|e| flush_error(&e))?;
        }
        let mut stored = HashMap::new();
        let mut upserted = Vec::new();
        // Rows stored as written, and their tables, for the stamp read before the commit.
        let mut as_written: Vec<(usize, bytes::Bytes)> = Vec::new();
        let mut written_tables: Vec<u32> = Vec::new();
        for KeyspacePlan {
            ks,
            source,
            deletes,
            upserts,
        } in plan.keyspaces
        {
            let name = ks.name();
            let rows: &mut Stored = stored.entry(name.to_string()).or_default();
            if !deletes.is_empty() {
                let deleted = source.delete_rows(&tx, &deletes).await.map_err(batch_error)?;
                rows.extend(deleted.into_iter().filter_map(|(k, e)| Some((ks.key_of_texts(&k)?, e))));
            }
            let mut staged = false;
            for u in upserts {
                let done = source
                    .upsert_rows(&tx, &u.rows(ops), u.copy.as_ref(), &mut staged, u.known)
                    .await
                    .map_err(batch_error)?;
                match done {
                    postgres::Upsert::Returned(returned) => upserted.push(Upserted::Returned(ks.clone(), returned)),
                    postgres::Upsert::AsWritten { inserted_first } => {
                        if let Some(inserted) = inserted_first {
                            let result = if inserted { "inserted" } else { "conflict" };
                            self.wb.metrics.wb_insert_first.with_label_values(&[name, result]).inc();
                        }
                        as_written.extend(u.ops.into_iter().zip(u.docs));
                        let table = source.binding().table_oid;
                        if !written_tables.contains(&table) {
                            written_tables.push(table);
                        }
                    }
                }
            }
        }
        if !as_written.is_empty() {
            let (lsn, xid, rewriting) = postgres::written_stamp(&tx, &written_tables)
                .await
                .map_err(|e| flush_error(&e))?;
            // A table that rewrote rows after all (a trigger created since its binding was
            // read): its rows are not installed; L1 drops the key and the next read loads it.
            let mut dropped = Vec::new();
            if !rewriting.is_empty() {
                as_written.retain(|(i, _)| {
                    // A keyspace whose source is gone meanwhile: dropped too.
                    let table = ops[*i].ks.source().map(|s| s.binding().table_oid);
                    let keep = table.is_ok_and(|t| !rewriting.contains(&t));
                    if !keep {
                        dropped.push(*i);
                    }
                    keep
                });
            }
            upserted.push(Upserted::AsWritten {
                ops: as_written,
                dropped,
                lsn,
                xid,
            });
        }
        tx.commit().await.map_err(|e| flush_error(&e))?;
        Ok((stored, upserted))
    }

    /// After a commit: install what Postgres stored, set the rejected writes aside, then stop
    /// overlaying the flushed writes. `false` if a dead letter could not be stored.
    async fn settle(&self, ops: &[FlushOp], mut outcome: Outcome) -> bool {
        let stored_at = tokio::time::Instant::now();
        // What each op installs when it is known by position (rows upserted as written:
        // `Some(None)` drops the key); the rest is found by key among what Postgres returned or
        // deleted. An upsert's outcome wins over the same key's delete (a put after a delete).
        let mut by_op: Vec<Option<Option<Entry>>> = Vec::new();
        for upserted in std::mem::take(&mut outcome.upserted) {
            match upserted {
                Upserted::Returned(ks, rows) => {
                    let Ok(source) = ks.source() else { continue };
                    let entries = source.stored_entries(&rows);
                    drop(rows);
                    let stored = outcome.stored.entry(ks.name().to_string()).or_default();
                    stored.reserve(entries.len());
                    stored.extend(entries);
                }
                Upserted::AsWritten {
                    ops: written,
                    dropped,
                    lsn,
                    xid,
                } => {
                    if by_op.is_empty() {
                        by_op.resize_with(ops.len(), || None);
                    }
                    for i in dropped {
                        by_op[i] = Some(None);
                    }
                    let mut installed = Tally::default();
                    for (i, doc) in written {
                        installed.add(ops[i].ks.name());
                        by_op[i] = Some(Some(Entry::stored(Some(doc), lsn, 0, stored_at).with_xid(xid)));
                    }
                    for (ks, n) in installed.0 {
                        self.wb.metrics.wb_as_written.with_label_values(&[ks]).inc_by(n);
                    }
                }
            }
        }
        let mut rejected = vec![false; ops.len()];
        for (i, why) in std::mem::take(&mut outcome.rejected) {
            if !self.dead_letter(&ops[i], why).await {
                return false;
            }
            rejected[i] = true;
        }
        let mut flushed = Tally::default();
        let settled: Vec<usize> = (0..ops.len()).filter(|i| !rejected[*i]).collect();
        let mut writes: Vec<(&str, u64)> = Vec::with_capacity(SETTLE_CHUNK);
        // In runs of one keyspace (the batch is in keyspace order), a few keys at a time: their
        // stripes are held while L1 takes each stored row and the pending writes are settled
        // together, so a write accepted meanwhile never falls between the two.
        for run in settled.chunk_by(|a, b| Arc::ptr_eq(&ops[*a].ks, &ops[*b].ks)) {
            let ks = &ops[run[0]].ks;
            for chunk in run.chunks(SETTLE_CHUNK) {
                let _accepting = self
                    .wb
                    .stripes
                    .lock_all(ks.name(), chunk.iter().map(|&i| &*ops[i].key))
                    .await;
                for &i in chunk {
                    let op = &ops[i];
                    let entry = match by_op.get_mut(i).and_then(Option::take) {
                        Some(known) => known,
                        None => outcome.stored.get_mut(ks.name()).and_then(|rows| rows.remove(&op.key)),
                    };
                    match entry {
                        Some(mut entry) => {
                            // Keep the write's version as the entry's: its ETag does not change.
                            entry.version = op.version;
                            ks.mutate(op.key.clone(), entry).await;
                        }
                        // A delete of a row that was not there: whatever L1 held is stale.
                        None => ks.invalidate(&op.key).await,
                    }
                }
                writes.clear();
                writes.extend(chunk.iter().map(|&i| (&*ops[i].key, ops[i].version)));
                ks.settle_all(&writes);
            }
            flushed.add_n(ks.name(), run.len() as u64);
        }
        for (ks, n) in flushed.0 {
            self.wb.metrics.wb_flushed.with_label_values(&[ks]).inc_by(n);
        }
        true
    }

    /// Sets a rejected write aside (durably); the writes after it go on.
    async fn dead_letter(&self, op: &FlushOp, why: String) -> bool {
        tracing::warn!(keyspace = op.ks.name(), key = %op.key, error = %why, "Postgres rejected a write-behind write; it is set aside as a dead letter");
        // The coalescing stage read this record already: it decodes.
        let write = ChangeEvent::decode_shared(&op.record).unwrap_or_else(|_| {
            let mut e = ChangeEvent::of(Op::Put, op.ks.name(), &*op.key, None);
            e.origin = self.wb.node.clone();
            e
        });
        let letter = DeadLetter {
            id: op.offset.0,
            keyspace: op.ks.name().to_string(),
            key: op.key.to_string(),
            op: if matches!(op.kind, Kind::Delete) {
                Op::Delete
            } else {
                Op::Put
            },
            doc: write.value.as_ref().and_then(|d| serde_json::from_slice(d).ok()),
            written: write.written,
            version: op.version,
            error: why,
            failed_at_ms: crate::commitlog::now_ms(),
        };
        let wb = self.wb.clone();
        let copy = letter.clone();
        let stored = tokio::task::spawn_blocking(move || wb.deadletters.add(letter)).await;
        if let Err(e) = stored
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::error!(error = %e, "cannot store a dead letter; the flusher stops here and resumes from this write on restart");
            return false;
        }
        self.wb.metrics.wb_deadlettered.inc();
        // A write taken in another region: that region shows it too (and stops showing the
        // write to its readers).
        if op.ks.config.federate
            && write.origin != self.wb.node
            && let Some(fed) = self.wb.federation.get()
            && let Err(e) = fed
                .reject(
                    &op.ks,
                    &op.key,
                    serde_json::to_value(&copy).unwrap_or_default(),
                    &write.origin,
                )
                .await
        {
            tracing::error!(error = %e, origin = %write.origin, "cannot tell the region that took a rejected write; it is kept here as a dead letter");
        }
        // The write did not happen: reads go back to the database's state.
        let _accepting = self.wb.stripe(op.ks.name(), &op.key).lock().await;
        op.ks.settle(&op.key, op.version);
        op.ks.invalidate(&op.key).await;
        true
    }
}

fn saturating_sub(counter: &std::sync::atomic::AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{fill_wait, key_order, permute};

    #[test]
    fn a_batch_waits_its_delay_from_when_its_first_write_was_taken() {
        let delay = Duration::from_millis(50);
        let now = 1_700_000_000_000;
        // Fresh: the whole delay.
        assert_eq!(fill_wait(delay, now, now), delay);
        // Taken 20 ms ago: what is left of it.
        assert_eq!(fill_wait(delay, now - 20, now), Duration::from_millis(30));
        // A backlog's write, as old as the delay or older: at once.
        assert_eq!(fill_wait(delay, now - 50, now), Duration::ZERO);
        assert_eq!(fill_wait(delay, now - 60_000, now), Duration::ZERO);
        // Stamped ahead of this clock: the whole delay, never more.
        assert_eq!(fill_wait(delay, now + 5_000, now), delay);
        // No first record: the whole delay.
        assert_eq!(fill_wait(delay, u64::MAX, now), delay);
    }

    #[test]
    fn permute_puts_each_item_where_its_position_says() {
        // Every permutation of five positions, and a few longer ones with fixed points and
        // cycles of several lengths.
        let mut cases: Vec<Vec<usize>> = Vec::new();
        let mut p: Vec<usize> = (0..5).collect();
        loop {
            cases.push(p.clone());
            // The next permutation in lexicographic order.
            let Some(i) = (0..p.len() - 1).rev().find(|&i| p[i] < p[i + 1]) else {
                break;
            };
            let j = (i + 1..p.len()).rev().find(|&j| p[j] > p[i]).expect("a larger one");
            p.swap(i, j);
            p[i + 1..].reverse();
        }
        assert_eq!(cases.len(), 120);
        cases.push(vec![]);
        cases.push(vec![0]);
        cases.push(vec![3, 0, 1, 2, 4, 9, 5, 6, 7, 8, 10]);
        for from in cases {
            let items: Vec<String> = (0..from.len()).map(|i| format!("item {i}")).collect();
            let want: Vec<String> = from.iter().map(|&i| items[i].clone()).collect();
            let mut got = items.clone();
            permute(&mut got, &mut from.clone());
            assert_eq!(got, want, "from {from:?}");
        }
    }

    #[test]
    fn ops_are_ordered_by_keyspace_name_then_key_bytes() {
        // Keys alike in their first eight bytes, a key that is another's prefix, a NUL byte,
        // multi-byte characters, and two keyspaces whose names sort against their arrival.
        let keys = [
            "10000002",
            "10000001",
            "100000010",
            "1000000",
            "abcdefgh",
            "abcdefgi",
            "abcdefghz",
            "abcdefgh\0",
            "ab\0c",
            "ab",
            "é",
            "e",
            "zz",
            "",
            "Z",
        ];
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            pairs.push((if i % 3 == 0 { "users" } else { "orders" }, k));
            pairs.push(("users", k));
        }
        let order = key_order(&pairs);
        let got: Vec<(&str, &str)> = order.iter().map(|&i| pairs[i]).collect();
        let mut want = pairs.clone();
        want.sort();
        assert_eq!(got, want);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..pairs.len()).collect::<Vec<_>>(), "each op once");
        // One keyspace: the same order as a plain sort of the keys.
        let one: Vec<(&str, &str)> = keys.iter().map(|k| ("users", *k)).collect();
        let got: Vec<&str> = key_order(&one).into_iter().map(|i| one[i].1).collect();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(got, want);
    }
}
