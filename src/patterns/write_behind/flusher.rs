//! The flusher: drains write-behind writes from the commit log to Postgres.
//!
//! It follows the log from its durable cursor and gathers a batch (up to `batch_rows` keys, or
//! `batch_delay` after its first write). Writes of one key are coalesced in log order — later
//! fields win, a delete wins over earlier puts, a put after a delete re-inserts — so per-key
//! order is kept and each key costs one row. The batch becomes one transaction: a
//! `pg_logical_emit_message(true, 'cachesync.flush', node)` marker (when CDC follows a
//! write-behind keyspace, so the echo is recognised), then per keyspace one set-based `DELETE`
//! and one set-based upsert per set of written columns (`jsonb_populate_recordset`). The
//! cursor advances only after the transaction commits; the stored rows (`RETURNING`) are
//! installed in L1 with their WAL position and xid, and the pending writes are settled.
//!
//! Failures: Postgres unreachable → capped exponential backoff with jitter, the same batch
//! again, writes keep being accepted up to the backlog bound. Postgres rejects the data → the
//! batch is bisected until the rejected rows are alone; each is set aside as a dead letter with
//! Postgres's error and the rest commit — the queue never stalls on one bad row.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::deadletters::DeadLetter;
use super::{CURSOR, WriteBehind};
use crate::cache::Entry;
use crate::commitlog::{Offset, Record};
use crate::event::{ChangeEvent, Op, Source};
use crate::keyspace::Keyspace;
use crate::source::postgres::{BatchError, PgPool};

/// Records read from the log per step while gathering a batch.
const READ_RECORDS: usize = 4096;
/// The cursor is moved past records that need no flush at least this often.
const IDLE_CURSOR_EVERY: u64 = 10_000;

/// What one key's coalesced writes do.
#[derive(Debug, Clone)]
pub enum Kind {
    /// Set the named fields (insert the row if missing).
    Upsert(Map<String, Value>),
    /// Delete the row.
    Delete,
    /// Delete the row, then insert it with these fields only (a put after a delete).
    Replace(Map<String, Value>),
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
    /// The document of the last write, for a dead letter.
    pub doc: Option<Value>,
    pub written: Vec<String>,
}

/// One row of a set-based upsert: its key components and the fields it writes.
type UpsertRow<'a> = (Vec<String>, &'a Map<String, Value>);

/// Why a flush failed.
#[derive(Debug, Clone)]
pub enum FlushError {
    /// Postgres is unreachable or overloaded; try the same batch later.
    Unavailable(String),
    /// Postgres rejected the data.
    Rejected(String),
}

/// Classifies a driver error for the flusher. Only errors about the data itself set a write
/// aside; anything else (connection, permissions, a missing table) is retried, keeping the
/// writes, until it is fixed.
pub fn flush_error(e: &tokio_postgres::Error) -> FlushError {
    let data = |code: &str| {
        code.starts_with("22")
            || code.starts_with("23")
            || code.starts_with("44")
            || matches!(code, "42804" | "42703" | "P0001")
    };
    match e.as_db_error() {
        Some(db) if data(db.code().code()) => {
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

/// Folds one write into a key's coalesced flush.
fn fold(prev: Option<Kind>, e: &ChangeEvent) -> Kind {
    match e.op {
        Op::Delete => Kind::Delete,
        _ => {
            let doc: Map<String, Value> = e
                .value
                .as_ref()
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or_default();
            let patch: Map<String, Value> = e
                .written
                .iter()
                .filter_map(|f| doc.get(f).map(|v| (f.clone(), v.clone())))
                .collect();
            match prev {
                None => Kind::Upsert(patch),
                Some(Kind::Upsert(mut m)) => {
                    m.extend(patch);
                    Kind::Upsert(m)
                }
                Some(Kind::Delete) => Kind::Replace(patch),
                Some(Kind::Replace(mut m)) => {
                    m.extend(patch);
                    Kind::Replace(m)
                }
            }
        }
    }
}

/// The flusher task.
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

    /// Runs until `stop`; when `drain` turns true it flushes what is left and returns.
    pub async fn run(self, mut drain: watch::Receiver<bool>, stop: CancellationToken) {
        let cursor = match self.wb.log.cursor(CURSOR, true) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "write-behind flusher cannot open its cursor");
                return;
            }
        };
        let mut tail = self.wb.log.tail(cursor.position());
        let mut committed = cursor.position();
        loop {
            // Wait for a first record, or leave when draining and nothing is left.
            let draining = *drain.borrow();
            let first = if draining {
                match tail.try_next(READ_RECORDS, usize::MAX) {
                    Ok(r) if r.is_empty() => break,
                    r => r,
                }
            } else {
                tokio::select! {
                    r = tail.next(READ_RECORDS, usize::MAX) => r,
                    _ = drain.changed() => continue,
                    _ = stop.cancelled() => return,
                }
            };
            let mut records = match first {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "write-behind flusher cannot read the commit log");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            // Fill the batch for up to `batch_delay`.
            let deadline = tokio::time::Instant::now() + self.wb.config.batch_delay;
            while records.len() < self.wb.config.batch_rows && !draining {
                tokio::select! {
                    r = tail.next(READ_RECORDS, usize::MAX) => match r {
                        Ok(more) => records.extend(more),
                        Err(_) => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = stop.cancelled() => return,
                }
            }
            let end = tail.position();
            let (ops, raw, bytes) = self.coalesce(&records);
            if ops.is_empty() {
                // Nothing to write; move the cursor now and then so retention can proceed.
                if end.0 - committed.0 >= IDLE_CURSOR_EVERY && cursor.commit_async(end).await.is_ok() {
                    committed = end;
                }
                continue;
            }
            if let Some(first_ts) = records.iter().find(|r| is_write(r)).map(|r| r.timestamp_ms) {
                self.wb.backlog.oldest_ms.store(first_ts, Ordering::Relaxed);
            }
            if !self.flush_until_done(&ops, &stop).await {
                return; // stopped while Postgres was unreachable: the writes stay in the log
            }
            loop {
                match cursor.commit_async(end).await {
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
            committed = end;
            let b = &self.wb.backlog;
            saturating_sub(&b.records, raw);
            saturating_sub(&b.bytes, bytes);
            if b.records.load(Ordering::Relaxed) == 0 {
                b.oldest_ms.store(0, Ordering::Relaxed);
            }
        }
        let left = self.wb.backlog.records.load(Ordering::Relaxed);
        tracing::info!(unflushed = left, "write-behind flusher stopped after draining");
    }

    /// The coalesced flushes of a run of records, with how many writes and bytes they were.
    fn coalesce(&self, records: &[Record]) -> (Vec<FlushOp>, u64, u64) {
        let mut by_key: BTreeMap<(String, Arc<str>), FlushOp> = BTreeMap::new();
        let (mut raw, mut bytes) = (0, 0);
        for r in records {
            let Ok(e) = ChangeEvent::decode(&r.payload) else {
                continue;
            };
            if e.source != Source::Api {
                continue;
            }
            let Some(ks) = self.wb.keyspaces.get(&e.keyspace) else {
                continue;
            };
            raw += 1;
            bytes += r.payload.len() as u64;
            let key: Arc<str> = e.key.as_str().into();
            let slot = by_key.entry((e.keyspace.clone(), key.clone()));
            let doc = e.value.as_ref().and_then(|v| serde_json::from_slice(v).ok());
            match slot {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(FlushOp {
                        ks: ks.clone(),
                        key,
                        kind: fold(None, &e),
                        version: e.version,
                        offset: r.offset,
                        doc,
                        written: e.written.clone(),
                    });
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    let op = o.get_mut();
                    op.kind = fold(Some(op.kind.clone()), &e);
                    op.version = e.version;
                    op.offset = r.offset;
                    op.doc = doc;
                    op.written = e.written.clone();
                }
            }
        }
        (by_key.into_values().collect(), raw, bytes)
    }

    /// Flushes `ops`, retrying while Postgres is unreachable. `false` if stopped first.
    async fn flush_until_done(&self, ops: &[FlushOp], stop: &CancellationToken) -> bool {
        let cfg = &self.wb.config;
        let mut wait = cfg.retry_initial;
        let mut last_error = String::new();
        loop {
            let started = Instant::now();
            match self.flush(ops).await {
                Ok(()) => {
                    let m = &self.wb.metrics;
                    m.wb_batch_rows.observe(ops.len() as f64);
                    m.wb_flush_seconds.observe(started.elapsed().as_secs_f64());
                    if !last_error.is_empty() {
                        tracing::info!("write-behind flushing again after Postgres returned");
                    }
                    return true;
                }
                Err(FlushError::Unavailable(e)) | Err(FlushError::Rejected(e)) => {
                    self.wb
                        .metrics
                        .wb_flush_failures
                        .with_label_values(&["unavailable"])
                        .inc();
                    if e != last_error {
                        tracing::warn!(error = %e, backlog = self.wb.backlog.records.load(Ordering::Relaxed), "write-behind flush failed; writes stay queued and will be retried");
                        last_error = e;
                    }
                }
            }
            let nap = wait.mul_f64(0.5 + rand::random::<f64>());
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = stop.cancelled() => return false,
            }
            wait = (wait * 2).min(cfg.retry_max);
        }
    }

    /// Flushes `ops` in one transaction; when Postgres rejects the data, halves the batch until
    /// each rejected row is alone and sets it aside. Errors only when Postgres is unreachable.
    fn flush<'a>(&'a self, ops: &'a [FlushOp]) -> BoxFuture<'a, Result<(), FlushError>> {
        Box::pin(async move {
            match self.transaction(ops).await {
                Ok(installs) => {
                    self.settle(ops, installs).await;
                    Ok(())
                }
                Err(FlushError::Rejected(why)) if ops.len() == 1 => {
                    self.dead_letter(&ops[0], why).await;
                    Ok(())
                }
                Err(FlushError::Rejected(_)) => {
                    self.wb.metrics.wb_flush_failures.with_label_values(&["rejected"]).inc();
                    let (a, b) = ops.split_at(ops.len() / 2);
                    self.flush(a).await?;
                    self.flush(b).await
                }
                Err(e) => Err(e),
            }
        })
    }

    /// One flush transaction. Returns the stored rows to install, by keyspace and key.
    async fn transaction(&self, ops: &[FlushOp]) -> Result<Vec<(Arc<Keyspace>, Arc<str>, Entry)>, FlushError> {
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
        let mut by_ks: BTreeMap<&str, Vec<&FlushOp>> = BTreeMap::new();
        for op in ops {
            by_ks.entry(op.ks.name()).or_default().push(op);
        }
        let mut installs = Vec::new();
        for ops in by_ks.values() {
            let ks = &ops[0].ks;
            let source = ks.source().map_err(|e| FlushError::Unavailable(e.to_string()))?;
            let parts = |op: &FlushOp| {
                ks.parse_key(&op.key)
                    .map(|k| k.parts)
                    .map_err(|e| FlushError::Rejected(e.to_string()))
            };
            // Deletes first (a put after a delete re-inserts in the same transaction).
            let mut deletes = Vec::new();
            for op in ops.iter().filter(|o| matches!(o.kind, Kind::Delete | Kind::Replace(_))) {
                deletes.push(parts(op)?);
            }
            if !deletes.is_empty() {
                for (key, entry) in source.delete_rows(&tx, &deletes).await.map_err(batch_error)? {
                    installs.push((ks.clone(), key, entry));
                }
            }
            // Upserts, one statement per set of written columns.
            let mut groups: HashMap<Vec<String>, Vec<UpsertRow>> = HashMap::new();
            for op in ops.iter() {
                if let Kind::Upsert(m) | Kind::Replace(m) = &op.kind {
                    let mut cols: Vec<String> = m.keys().cloned().collect();
                    cols.sort();
                    groups.entry(cols).or_default().push((parts(op)?, m));
                }
            }
            for rows in groups.values() {
                for (key, entry) in source.upsert_rows(&tx, rows).await.map_err(batch_error)? {
                    installs.push((ks.clone(), key, entry));
                }
            }
        }
        tx.commit().await.map_err(|e| flush_error(&e))?;
        Ok(installs)
    }

    /// After a commit: install what Postgres stored, then stop overlaying the flushed writes.
    async fn settle(&self, ops: &[FlushOp], installs: Vec<(Arc<Keyspace>, Arc<str>, Entry)>) {
        let mut stored: HashMap<(String, Arc<str>), Entry> = HashMap::new();
        for (ks, key, entry) in installs {
            stored.insert((ks.name().to_string(), key), entry);
        }
        for op in ops {
            match stored.remove(&(op.ks.name().to_string(), op.key.clone())) {
                Some(mut entry) => {
                    // Keep the write's version as the entry's: its ETag does not change.
                    entry.version = op.version;
                    op.ks.mutate(op.key.clone(), entry).await;
                }
                // A delete of a row that was not there: whatever L1 held is stale.
                None => op.ks.invalidate(&op.key).await,
            }
            op.ks.pending.settle(&op.key, op.version);
            self.wb.metrics.wb_flushed.with_label_values(&[op.ks.name()]).inc();
        }
    }

    /// Sets a rejected write aside; the writes after it go on.
    async fn dead_letter(&self, op: &FlushOp, why: String) {
        tracing::warn!(keyspace = op.ks.name(), key = %op.key, error = %why, "Postgres rejected a write-behind write; it is set aside as a dead letter");
        let letter = DeadLetter {
            id: op.offset.0,
            keyspace: op.ks.name().to_string(),
            key: op.key.to_string(),
            op: if matches!(op.kind, Kind::Delete) {
                Op::Delete
            } else {
                Op::Put
            },
            doc: op.doc.clone(),
            written: op.written.clone(),
            version: op.version,
            error: why,
            failed_at_ms: crate::commitlog::now_ms(),
        };
        if let Err(e) = self.wb.deadletters.add(letter) {
            tracing::error!(error = %e, "cannot store a dead letter");
        }
        self.wb.metrics.wb_deadlettered.inc();
        // The write did not happen: reads go back to the database's state.
        op.ks.pending.settle(&op.key, op.version);
        op.ks.invalidate(&op.key).await;
    }
}

fn saturating_sub(counter: &std::sync::atomic::AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
}

fn is_write(r: &Record) -> bool {
    ChangeEvent::decode(&r.payload).is_ok_and(|e| e.source == Source::Api)
}
