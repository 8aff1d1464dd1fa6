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
use serde_json::{Map, Value};

use crate::cache::Condition;
use crate::commitlog::{CommitLog, Offset};
use crate::event::{ChangeEvent, Op, Source};
use crate::hlc::Hlc;
use crate::key::Key;
use crate::keyspace::Keyspace;
use crate::keyspace::overlay::Pending;
use crate::metrics::Metrics;
use crate::patterns::write_behind::config::WriteBehindConfig;
use crate::patterns::{PatternError, Stripes};
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
        Ok(WriteBehind {
            log,
            node,
            config,
            hlc,
            metrics,
            keyspaces,
            backlog: Backlog::default(),
            deadletters,
            stripes: Stripes::new(STRIPES),
        })
    }

    /// The lock serializing writes of one key. The flusher takes it too before it settles a
    /// key, so a write's pending entry and backlog count are recorded before its flush can
    /// settle them (the log makes a record readable before `accept` has returned).
    pub(crate) fn stripe(&self, ks: &str, key: &str) -> &tokio::sync::Mutex<()> {
        self.stripes.of(ks, key)
    }

    /// Checks a write's precondition against this node's current document of the key — its
    /// pending write, else the cached entry, else the row loaded from Postgres (which must then
    /// be reachable). Runs under the key's stripe lock, so no write of the key slips in between.
    async fn check(&self, ks: &Keyspace, key: &Key, cond: &Condition) -> Result<(), PatternError> {
        if cond.is_always() {
            return Ok(());
        }
        let current: Option<Bytes> = match ks.pending(&key.cache_key) {
            Some(p) => p.doc,
            None => match ks.cached(&key.cache_key).await {
                Some(e) => e.value.clone(),
                None => ks.load(key).await?.0.value.clone(),
            },
        };
        if cond.holds(current.as_deref()) {
            Ok(())
        } else {
            Err(SourceError::PreconditionFailed(crate::source::postgres::describe(cond, current.as_deref())).into())
        }
    }

    fn check_backlog(&self) -> Result<(), PatternError> {
        let (records, bytes) = (
            self.backlog.records.load(Ordering::Relaxed),
            self.backlog.bytes.load(Ordering::Relaxed),
        );
        if records >= self.config.max_backlog_records || bytes >= self.config.max_backlog_bytes {
            self.metrics.wb_rejected.inc();
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
        let fields = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(SourceError::BadBody("expected a JSON object of fields".into()).into()),
            Err(e) => return Err(PatternError::BadJson(e.to_string())),
        };
        let source = ks.source()?;
        source.check_body(&key.parts, &fields)?;
        let _guard = self.stripe(ks.name(), &key.cache_key).lock().await;
        self.check(ks, key, cond).await?;
        // The document after this write: what the key had (pending, else cached) with the named
        // fields replaced.
        let base: Option<Map<String, Value>> = match ks.pending(&key.cache_key) {
            Some(p) => p.doc.and_then(|d| serde_json::from_slice(&d).ok()),
            None => ks
                .cached(&key.cache_key)
                .await
                .and_then(|e| e.value.clone())
                .and_then(|d| serde_json::from_slice(&d).ok()),
        };
        let b = source.binding();
        let mut doc = Vec::with_capacity(body.len() + 64);
        let mut obj = ObjectWriter::new(&mut doc);
        for f in &b.fields {
            let key_part = b
                .key
                .iter()
                .position(|k| k.name == f.column.name)
                .map(|i| &key.parts[i]);
            let value = fields
                .get(&f.name)
                .cloned()
                .or_else(|| base.as_ref().and_then(|m| m.get(&f.name).cloned()));
            match (value, key_part) {
                (Some(v), _) => obj.value(&f.name, &v),
                // The key as its column type renders it (42, not "42").
                (None, Some(part)) => render_value(&f.column.kind, Some(part), obj.field(&f.name)),
                (None, None) => {}
            }
        }
        obj.finish();
        let doc = Bytes::from(doc);
        let written: Vec<String> = b
            .fields
            .iter()
            .filter(|f| fields.contains_key(&f.name))
            .map(|f| f.name.clone())
            .collect();
        self.accept(ks, key, Op::Put, Some(doc), written).await
    }

    /// Accepts a `DELETE`.
    pub async fn delete(&self, ks: &Keyspace, key: &Key, cond: &Condition) -> Result<Accepted, PatternError> {
        ks.source()?;
        let _guard = self.stripe(ks.name(), &key.cache_key).lock().await;
        self.check(ks, key, cond).await?;
        self.accept(ks, key, Op::Delete, None, Vec::new()).await
    }

    /// Appends the write (durably) and records it as pending. Runs under the key's stripe lock.
    async fn accept(
        &self,
        ks: &Keyspace,
        key: &Key,
        op: Op,
        doc: Option<Bytes>,
        written: Vec<String>,
    ) -> Result<Accepted, PatternError> {
        self.check_backlog()?;
        let version = self.hlc.now();
        let event = ChangeEvent::of(op, ks.name(), &*key.cache_key, doc.clone())
            .from_origin(&self.node, version, Source::Api)
            .at_source(0, crate::commitlog::now_ms() * 1000, None)
            .with_written(written);
        let payload = event.encode();
        let size = payload.len() as u64;
        let range = self.log.append(vec![payload]).await?;
        // Through the keyspace's door: a load in flight for the key read the old row and must
        // not install it.
        ks.write_pending(
            key.cache_key.clone(),
            Pending {
                doc: doc.clone(),
                version,
                at: tokio::time::Instant::now(),
            },
        );
        self.backlog.records.fetch_add(1, Ordering::Relaxed);
        self.backlog.bytes.fetch_add(size, Ordering::Relaxed);
        let _ = self.backlog.oldest_ms.compare_exchange(
            0,
            crate::commitlog::now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.metrics
            .wb_accepted
            .with_label_values(&[ks.name(), op.label()])
            .inc();
        Ok(Accepted {
            doc,
            version,
            offset: range.start,
        })
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
                if e.source != Source::Api {
                    continue;
                }
                let Some(ks) = self.keyspaces.get(&e.keyspace) else {
                    continue;
                };
                ks.write_pending(
                    e.key.as_str().into(),
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
        let accepted = self
            .accept(
                ks,
                &key,
                letter.op,
                letter.doc.as_ref().map(|d| Bytes::from(d.to_string())),
                letter.written.clone(),
            )
            .await?;
        self.deadletters.remove(id)?;
        Ok(Some(accepted))
    }
}
