//! Write-behind: the database off the request path. A `PUT`/`DELETE` on a `write = "behind"`
//! keyspace is appended to the commit log and acknowledged (202) once durable on local disk; a
//! flusher (`flusher`) drains the log to Postgres in coalesced, set-based batches, even when the
//! write happened while Postgres was down. Nothing acknowledged is lost: a crash leaves the write
//! in the log, past the flusher's durable cursor, and it is flushed on the next start.
//!
//! - **Read-your-writes.** Each keyspace keeps its *pending writes* ([`PendingWrites`]): the
//!   document each unflushed key will have. Reads consult it before L1, so a read after the 202
//!   returns the write even if L1 evicted the key, and however stale the database state under it.
//!   A pending write is settled (removed) once the flush that carries it has committed and its
//!   stored row is installed in L1, versioned like a write-through result — so neither an older
//!   CDC change nor the flush's own echo can make the key go back.
//! - **Partial writes.** A `PUT` names the fields it writes, as with write-through. The document
//!   readers see is the key's previous document (pending, else cached) with those fields replaced;
//!   the flush writes only the named fields. Concurrent writes of one key are serialized (striped
//!   locks) so neither loses the other's fields, and their log order is their version order.
//! - **Back-pressure.** Above `max_backlog_records` or `max_backlog_bytes` of unflushed writes,
//!   writes answer 503 with `Retry-After` — never a silent drop.

pub mod config;
pub mod deadletters;
pub mod flusher;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::cache::Condition;
use crate::commitlog::{CommitLog, Offset};
use crate::event::{ChangeEvent, Op, Source};
use crate::hlc::Hlc;
use crate::key::Key;
use crate::keyspace::overlay::Pending;
use crate::keyspace::{Keyspace, KeyspaceError};
use crate::metrics::Metrics;
use crate::patterns::write_behind::config::WriteBehindConfig;
use crate::patterns::{PatternError, Stripes, fields_of};
use crate::source::SourceError;
use crate::source::postgres::render::{ObjectWriter, render_value};
use deadletters::DeadLetters;

/// Striped locks serializing writes of one key.
const STRIPES: usize = 256;

/// What a 202 reports.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The document readers now see (`None` after a delete).
    pub doc: Option<Bytes>,
    pub version: u64,
    /// The write's offset in the commit log.
    pub offset: Offset,
}

/// A write taken for a federated keyspace's home region is accepted like a local one.
impl From<crate::federation::Taken> for Accepted {
    fn from(t: crate::federation::Taken) -> Accepted {
        Accepted {
            doc: t.doc,
            version: t.version,
            offset: t.offset,
        }
    }
}

/// One write of a batch ([`WriteBehind::write_many`]).
#[derive(Debug, Clone)]
pub enum WriteItem {
    Put { key: Key, body: Bytes, cond: Condition },
    Delete { key: Key, cond: Condition },
}

/// A batch item that parsed and validated: its index, key, fields (none for a delete) and
/// precondition.
type Checked<'a> = (usize, &'a Key, Option<Map<String, Value>>, &'a Condition);

/// A write that passed its checks, ready to append.
struct Staged {
    key: Arc<str>,
    op: Op,
    doc: Option<Bytes>,
    written: Vec<String>,
}

/// Whether a `PUT` names only some of the keyspace's fields: its document is the current one
/// with those replaced, so the current one must be known (loaded if need be) — a partial write
/// never leaves a pending document missing the other columns.
fn is_partial(b: &crate::source::postgres::schema::Binding, fields: Option<&Map<String, Value>>) -> bool {
    fields.is_some_and(|f| {
        b.fields
            .iter()
            .any(|bf| !f.contains_key(&bf.name) && !b.key.iter().any(|k| k.name == bf.column.name))
    })
}

/// A stored document's fields, each kept as its raw JSON text: the merge never looks inside
/// them, so a value nested deeper than a parser's recursion limit is carried over whole
/// (serde_json skips a raw value without recursing).
type StoredFields = HashMap<String, Box<RawValue>>;

/// The fields of the key's current document, for a partial write to merge onto. A document
/// that cannot be read field by field is refused, never merged as if it were empty.
fn stored_fields(doc: &[u8]) -> Result<StoredFields, PatternError> {
    serde_json::from_slice(doc).map_err(|e| {
        PatternError::BadJson(format!(
            "the key's current document cannot be merged with a partial write: {e}"
        ))
    })
}

/// The document a partial `PUT` leaves: `base` (the key's current document, from
/// [`fields_of_stored`]) with the named fields replaced, key fields as their column type
/// renders them; and the fields the write names (what the flush writes).
fn document_after(
    b: &crate::source::postgres::schema::Binding,
    key: &Key,
    fields: &Map<String, Value>,
    base: Option<&StoredFields>,
) -> (Bytes, Vec<String>) {
    let mut doc = Vec::with_capacity(64 * b.fields.len());
    let mut obj = ObjectWriter::new(&mut doc);
    for f in &b.fields {
        let key_part = b
            .key
            .iter()
            .position(|k| k.name == f.column.name)
            .map(|i| &key.parts[i]);
        let stored = base.and_then(|m| m.get(&f.name));
        match (fields.get(&f.name), stored, key_part) {
            (Some(v), _, _) => obj.value(&f.name, v),
            (None, Some(raw), _) => obj.field(&f.name).extend_from_slice(raw.get().as_bytes()),
            // The key as its column type renders it (42, not "42").
            (None, None, Some(part)) => render_value(&f.column.kind, Some(part), obj.field(&f.name)),
            (None, None, None) => {}
        }
    }
    obj.finish();
    let written = b
        .fields
        .iter()
        .filter(|f| fields.contains_key(&f.name))
        .map(|f| f.name.clone())
        .collect();
    (Bytes::from(doc), written)
}

/// Counters of unflushed writes, shared by the accept path, the flusher and the metrics.
#[derive(Debug, Default)]
pub struct Backlog {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    /// Append time (ms since the epoch) of the oldest unflushed write; 0 when none.
    pub oldest_ms: AtomicU64,
}

/// The write-behind service of one server: accepts writes, and owns the flusher's state.
pub struct WriteBehind {
    pub(crate) log: CommitLog,
    pub(crate) node: String,
    pub(crate) config: WriteBehindConfig,
    pub(crate) hlc: Arc<Hlc>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) keyspaces: HashMap<String, Arc<Keyspace>>,
    pub backlog: Backlog,
    pub deadletters: DeadLetters,
    stripes: Stripes,
    /// `cachesync_wb_accepted_total{keyspace, op}` of each keyspace's puts and deletes, looked
    /// up once (see [`WriteBehind::count_accepted`]).
    accepted: HashMap<String, [prometheus::IntCounter; 2]>,
    /// This node's federation, when a write-behind keyspace federates: a rejected write taken
    /// in another region is reported back to it.
    pub(crate) federation: std::sync::OnceLock<Arc<crate::federation::Federation>>,
}

/// The name of the flusher's durable cursor.
pub const CURSOR: &str = "write_behind";

impl WriteBehind {
    pub fn new(
        log: CommitLog,
        node: String,
        config: WriteBehindConfig,
        hlc: Arc<Hlc>,
        metrics: Arc<Metrics>,
        keyspaces: HashMap<String, Arc<Keyspace>>,
    ) -> Result<WriteBehind, deadletters::DeadLetterError> {
        let deadletters = DeadLetters::open(&log.config().dir.join("deadletters"))?;
        metrics.wb_deadletters.set(deadletters.len() as i64);
        let accepted = keyspaces
            .keys()
            .map(|ks| {
                let series = [Op::Put, Op::Delete].map(|op| metrics.wb_accepted.with_label_values(&[ks, op.label()]));
                (ks.clone(), series)
            })
            .collect();
        Ok(WriteBehind {
            accepted,
            log,
            node,
            config,
            hlc,
            metrics,
            keyspaces,
            backlog: Backlog::default(),
            deadletters,
            stripes: Stripes::new(STRIPES),
            federation: std::sync::OnceLock::new(),
        })
    }

    /// Reports rejected writes of federated keyspaces through `f`.
    pub fn set_federation(&self, f: Arc<crate::federation::Federation>) {
        let _ = self.federation.set(f);
    }

    /// The lock serializing writes of one key. The flusher takes it too before it settles a
    /// key, so a write's pending entry and backlog count are recorded before its flush can
    /// settle them (the log makes a record readable before `accept` has returned).
    pub(crate) fn stripe(&self, ks: &str, key: &str) -> &tokio::sync::Mutex<()> {
        self.stripes.of(ks, key)
    }

    /// This node's current document of the key (`None`: absent): its pending write, else the
    /// cached entry, else — with `load`, for a precondition — the row loaded from Postgres, which
    /// must then be reachable. Without `load` an uncached key counts as absent: a partial write
    /// then carries only the fields it names.
    /// The key's current document as this node knows it: its pending write, else the cached
    /// entry, else (with `load`) the row in Postgres. With `load`, a cached entry outside the
    /// CDC freshness contract is reloaded too — a condition or a partial write must not build on
    /// an old document — falling back to it only when Postgres cannot be reached.
    async fn current(&self, ks: &Keyspace, key: &Key, load: bool) -> Result<Option<Bytes>, PatternError> {
        if let Some(p) = ks.pending(&key.cache_key) {
            return Ok(p.doc);
        }
        let cached = ks.cached(&key.cache_key);
        if let Some(e) = &cached
            && (!load || ks.is_fresh(e))
        {
            return Ok(e.value.clone());
        }
        if load {
            return match (ks.reload(key).await, cached) {
                (Ok((e, _)), _) => Ok(e.value.clone()),
                (Err(KeyspaceError::Source(SourceError::Unavailable(_))), Some(e)) => Ok(e.value.clone()),
                (Err(e), _) => Err(e.into()),
            };
        }
        Ok(None)
    }

    /// Counts an accepted write of keyspace `ks`.
    fn count_accepted(&self, ks: &str, op: Op) {
        let held = self.accepted.get(ks).and_then(|[put, delete]| match op {
            Op::Put => Some(put),
            Op::Delete => Some(delete),
            _ => None,
        });
        match held {
            Some(counter) => counter.inc(),
            None => self.metrics.wb_accepted.with_label_values(&[ks, op.label()]).inc(),
        }
    }

    fn check_backlog(&self, adding: u64) -> Result<(), PatternError> {
        let (records, bytes) = (
            self.backlog.records.load(Ordering::Relaxed),
            self.backlog.bytes.load(Ordering::Relaxed),
        );
        if records + adding > self.config.max_backlog_records || bytes >= self.config.max_backlog_bytes {
            self.metrics.wb_rejected.inc_by(adding);
            return Err(PatternError::BacklogFull {
                records,
                bytes,
                max_records: self.config.max_backlog_records,
                max_bytes: self.config.max_backlog_bytes,
            });
        }
        Ok(())
    }

    /// Accepts a `PUT`: validates the body against the table, appends the write durably, and
    /// makes it visible to reads on this node.
    pub async fn put(
        &self,
        ks: &Keyspace,
        key: &Key,
        body: &Bytes,
        cond: &Condition,
    ) -> Result<Accepted, PatternError> {
        let item = WriteItem::Put {
            key: key.clone(),
            body: body.clone(),
            cond: cond.clone(),
        };
        self.write_many(ks, vec![item])
            .await
            .pop()
            .expect("one result per item")
    }

    /// Accepts a `DELETE`.
    pub async fn delete(&self, ks: &Keyspace, key: &Key, cond: &Condition) -> Result<Accepted, PatternError> {
        let item = WriteItem::Delete {
            key: key.clone(),
            cond: cond.clone(),
        };
        self.write_many(ks, vec![item])
            .await
            .pop()
            .expect("one result per item")
    }

    /// Accepts several writes of one keyspace with one durable append: each item is validated
    /// and its precondition checked like a single write (a failed item is answered on its own
    /// and does not stop the others); the rest become durable together and are answered 202
    /// together. Writes of one key in the batch apply in item order. Returns one result per item.
    pub async fn write_many(&self, ks: &Keyspace, items: Vec<WriteItem>) -> Vec<Result<Accepted, PatternError>> {
        let mut results: Vec<Option<Result<Accepted, PatternError>>> = (0..items.len()).map(|_| None).collect();
        let source = match ks.source() {
            Ok(s) => s,
            Err(e) => return items.iter().map(|_| Err(PatternError::from(e.clone()))).collect(),
        };
        // 1. Parse and validate, without locks.
        // (item index, key, the fields of a put — none for a delete, precondition)
        let mut parsed: Vec<Checked<'_>> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                WriteItem::Put { key, body, cond } => {
                    let fields = match fields_of(body) {
                        Ok(f) => f,
                        Err(e) => {
                            results[i] = Some(Err(e));
                            continue;
                        }
                    };
                    if let Err(e) = source.check_body(&key.parts, &fields) {
                        results[i] = Some(Err(e.into()));
                        continue;
                    }
                    parsed.push((i, key, Some(fields), cond));
                }
                WriteItem::Delete { key, cond } => parsed.push((i, key, None, cond)),
            }
        }
        // 2. Lock every key's stripe (in one order, so batches never deadlock), then check each
        // precondition against the document the earlier items of this batch leave.
        let _guards = self
            .stripes
            .lock_all(ks.name(), parsed.iter().map(|(_, k, _, _)| &*k.cache_key))
            .await;
        let mut batch_docs: HashMap<Arc<str>, Option<Bytes>> = HashMap::new();
        let mut staged: Vec<(usize, Staged)> = Vec::with_capacity(parsed.len());
        for (i, key, fields, cond) in parsed {
            let current = match batch_docs.get(&key.cache_key) {
                Some(doc) => doc.clone(),
                None => match self
                    .current(
                        ks,
                        key,
                        !cond.is_always() || is_partial(source.binding(), fields.as_ref()),
                    )
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                },
            };
            if !cond.holds(current.as_deref()) {
                let why = crate::source::postgres::describe(cond, current.as_deref());
                results[i] = Some(Err(SourceError::PreconditionFailed(why).into()));
                continue;
            }
            let write = match fields {
                Some(fields) => {
                    let base = match current.as_deref().map(stored_fields).transpose() {
                        Ok(b) => b,
                        Err(e) => {
                            results[i] = Some(Err(e));
                            continue;
                        }
                    };
                    let (doc, written) = document_after(source.binding(), key, &fields, base.as_ref());
                    Staged {
                        key: key.cache_key.clone(),
                        op: Op::Put,
                        doc: Some(doc),
                        written,
                    }
                }
                None => Staged {
                    key: key.cache_key.clone(),
                    op: Op::Delete,
                    doc: None,
                    written: Vec::new(),
                },
            };
            if items.len() > 1 {
                batch_docs.insert(key.cache_key.clone(), write.doc.clone());
            }
            staged.push((i, write));
        }
        // 3. One durable append for everything that passed.
        let (idx, writes): (Vec<usize>, Vec<Staged>) = staged.into_iter().unzip();
        match self.commit(ks, writes).await {
            Ok(accepted) => {
                for (i, a) in idx.into_iter().zip(accepted) {
                    results[i] = Some(Ok(a));
                }
            }
            Err(e) => {
                for i in idx {
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
        results.into_iter().map(|r| r.expect("every item answered")).collect()
    }

    /// Appends the writes (durably, in one append) and records them as pending. Runs under the
    /// keys' stripe locks.
    async fn commit(&self, ks: &Keyspace, mut writes: Vec<Staged>) -> Result<Vec<Accepted>, PatternError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.check_backlog(writes.len() as u64)?;
        let now_us = crate::commitlog::now_ms() * 1000;
        let mut payloads = Vec::with_capacity(writes.len());
        let mut versions = Vec::with_capacity(writes.len());
        for w in &mut writes {
            let version = self.hlc.now();
            let event = ChangeEvent::of(w.op, ks.name(), &*w.key, w.doc.clone())
                .from_origin(&self.node, version, Source::Api)
                .at_source(0, now_us, None)
                .with_written(std::mem::take(&mut w.written));
            payloads.push(event.encode());
            versions.push(version);
        }
        let size: u64 = payloads.iter().map(|p| p.len() as u64).sum();
        let range = self.log.append(payloads).await?;
        let mut out = Vec::with_capacity(writes.len());
        for (j, (w, version)) in writes.into_iter().zip(versions).enumerate() {
            // Through the keyspace's door: a load in flight for the key read the old row and
            // must not install it.
            ks.write_pending(
                &w.key,
                Pending {
                    doc: w.doc.clone(),
                    version,
                    at: tokio::time::Instant::now(),
                },
            );
            self.count_accepted(ks.name(), w.op);
            out.push(Accepted {
                doc: w.doc,
                version,
                offset: Offset(range.start.0 + j as u64),
            });
        }
        self.backlog.records.fetch_add(out.len() as u64, Ordering::Relaxed);
        self.backlog.bytes.fetch_add(size, Ordering::Relaxed);
        let _ = self.backlog.oldest_ms.compare_exchange(
            0,
            crate::commitlog::now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        Ok(out)
    }

    /// Rebuilds the pending writes and the backlog counters from the unflushed part of the log
    /// (after a restart), so reads see every acknowledged write at once.
    pub fn recover(&self) -> Result<u64, crate::commitlog::LogError> {
        let cursor = self.log.cursor(CURSOR, true)?;
        let mut from = cursor.position();
        let mut n = 0;
        loop {
            let batch = self.log.read(from, 4096)?;
            let Some(last) = batch.last() else { break };
            from = Offset(last.offset.0 + 1);
            for r in &batch {
                let Ok(e) = ChangeEvent::decode(&r.payload) else {
                    continue;
                };
                if e.source != Source::Api || !matches!(e.op, Op::Put | Op::Delete) {
                    continue;
                }
                let Some(ks) = self.keyspaces.get(&e.keyspace) else {
                    continue;
                };
                ks.write_pending(
                    &e.key,
                    Pending {
                        doc: if e.op == Op::Delete { None } else { e.value.clone() },
                        version: e.version,
                        at: tokio::time::Instant::now(),
                    },
                );
                self.hlc.observe(e.version);
                self.backlog.records.fetch_add(1, Ordering::Relaxed);
                self.backlog.bytes.fetch_add(r.payload.len() as u64, Ordering::Relaxed);
                let _ =
                    self.backlog
                        .oldest_ms
                        .compare_exchange(0, r.timestamp_ms, Ordering::Relaxed, Ordering::Relaxed);
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(
                writes = n,
                "recovered unflushed write-behind writes from the commit log"
            );
        }
        Ok(n)
    }

    /// Updates the backlog gauges.
    pub fn refresh_metrics(&self) {
        let m = &self.metrics;
        m.wb_backlog_records
            .set(self.backlog.records.load(Ordering::Relaxed) as i64);
        m.wb_backlog_bytes
            .set(self.backlog.bytes.load(Ordering::Relaxed) as i64);
        let oldest = self.backlog.oldest_ms.load(Ordering::Relaxed);
        let age = if oldest == 0 {
            0.0
        } else {
            crate::commitlog::now_ms().saturating_sub(oldest) as f64 / 1000.0
        };
        m.wb_oldest_age.set(age);
        m.wb_deadletters.set(self.deadletters.len() as i64);
    }

    /// Puts a dead letter back in the log as a new write; `None` when there is no such letter.
    pub async fn requeue(&self, id: u64) -> Result<Option<Accepted>, PatternError> {
        let Some(letter) = self.deadletters.get(id) else {
            return Ok(None);
        };
        let Some(ks) = self.keyspaces.get(&letter.keyspace) else {
            return Err(SourceError::BadBody(format!(
                "keyspace {} no longer takes write-behind writes",
                letter.keyspace
            ))
            .into());
        };
        let key = ks.parse_key(&letter.key)?;
        let _guard = self.stripe(ks.name(), &key.cache_key).lock().await;
        let write = Staged {
            key: key.cache_key.clone(),
            op: letter.op,
            doc: letter.doc.as_ref().map(|d| Bytes::from(d.to_string())),
            written: letter.written.clone(),
        };
        let accepted = self
            .commit(ks, vec![write])
            .await?
            .pop()
            .expect("one write, one answer");
        self.deadletters.remove(id)?;
        Ok(Some(accepted))
    }
}
