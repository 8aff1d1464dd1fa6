//! The applier: tails the commit log and applies change events to the keyspaces, in log order.
//!
//! Each event becomes a versioned install (`Keyspace::mutate`), so an entry is never replaced by
//! an older version of itself whatever raced it (loads, writes). A put whose event names
//! unchanged (TOASTed) fields merges them from the cached entry; with no cached entry to merge
//! from, the entry is dropped and the next read loads it whole.
//!
//! The cache is memory, so on start the applier begins at the log's end: events from before a
//! restart describe a cache that no longer exists. The stream moves it with the [`Gate`]: held
//! while a snapshot loads, then released from the offset the stream chose.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Gate;
use crate::cache::Entry;
use crate::commitlog::{CommitLog, LogError, Offset, Record};
use crate::event::{ChangeEvent, Op, Source};
use crate::keyspace::Keyspace;
use crate::keyspace::freshness::Freshness;
use crate::lsn::Lsn;
use crate::metrics::Metrics;

/// Records read per batch.
const BATCH: usize = 1024;
/// Payload bytes read per batch.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Where the applier is, for tests and metrics.
pub type Applied = watch::Receiver<Offset>;

/// Applies CDC events from `log` to `keyspaces` until `stop`.
pub struct Applier {
    log: CommitLog,
    keyspaces: HashMap<String, Arc<Keyspace>>,
    metrics: Arc<Metrics>,
    applied: watch::Sender<Offset>,
    /// Told how far the log is applied: the freshness watermark moves with it.
    freshness: Arc<Freshness>,
}

impl Applier {
    pub fn new(
        log: CommitLog,
        keyspaces: HashMap<String, Arc<Keyspace>>,
        metrics: Arc<Metrics>,
        freshness: Arc<Freshness>,
    ) -> (Applier, Applied) {
        let (applied, rx) = watch::channel(log.end());
        (
            Applier {
                log,
                keyspaces,
                metrics,
                applied,
                freshness,
            },
            rx,
        )
    }

    pub async fn run(self, mut gate: watch::Receiver<Gate>, stop: CancellationToken) {
        let mut tail = self.log.tail(self.log.end());
        let mut generation = 0;
        loop {
            let g = *gate.borrow_and_update();
            if !g.open {
                tokio::select! {
                    r = gate.changed() => if r.is_err() { return },
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            if g.generation != generation {
                generation = g.generation;
                tail.seek(g.from);
                self.applied.send_replace(g.from);
                self.freshness.applied(g.from);
            }
            let batch = tokio::select! {
                r = tail.next(BATCH, BATCH_BYTES) => r,
                _ = gate.changed() => continue,
                _ = stop.cancelled() => return,
            };
            match batch {
                Ok(records) => {
                    for r in &records {
                        self.apply(r).await;
                    }
                    let at = tail.position();
                    self.metrics.cdc_applied_offset.set(at.0 as i64);
                    self.applied.send_replace(at);
                    self.freshness.applied(at);
                }
                Err(LogError::Closed) => return,
                Err(e) => {
                    tracing::error!(error = %e, "the CDC applier cannot read the commit log; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn apply(&self, r: &Record) {
        let e = match ChangeEvent::decode(&r.payload) {
            Ok(e) => e,
            Err(err) => {
                tracing::error!(offset = %r.offset, error = %err, "skipping an undecodable log record");
                return;
            }
        };
        // Write-behind and federation events are applied by their own paths.
        if e.source != Source::Cdc {
            return;
        }
        let Some(ks) = self.keyspaces.get(&e.keyspace) else {
            return;
        };
        apply_event(ks, &e).await;
        let op = e.op.label();
        self.metrics.cdc_applied.with_label_values(&[ks.name(), op]).inc();
        if e.source_time_us > 0 {
            let now = crate::commitlog::now_ms() as f64 * 1000.0;
            self.metrics
                .cdc_apply_lag
                .observe(((now - e.source_time_us as f64) / 1e6).max(0.0));
        }
    }
}

/// Applies one change event to its keyspace. A change this node captured is also announced on
/// the keyspace's L2 tier (when it has one); a change replicated from the node that captured
/// it was announced there.
pub async fn apply_event(ks: &Keyspace, e: &ChangeEvent) {
    ks.hlc.observe(e.version);
    let key: Arc<str> = e.key.as_str().into();
    let lsn = Lsn(e.source_position);
    let own = ks.l2().is_some_and(|t| t.is_node(&e.origin));
    let install = |entry: Entry| async {
        if own {
            ks.mutate(key.clone(), entry).await
        } else {
            ks.mutate_local(key.clone(), entry).await
        }
    };
    let forget = || async {
        if own {
            ks.invalidate_at(key.clone(), lsn, e.source_xid).await
        } else {
            ks.invalidate_at_local(key.clone(), lsn, e.source_xid).await
        }
    };
    match e.op {
        Op::Put => {
            let Some(value) = e.value.clone() else {
                forget().await;
                return;
            };
            let value = if e.unchanged.is_empty() {
                value
            } else {
                match merge_unchanged(ks, &key, &value, &e.unchanged) {
                    Some(v) => v,
                    None => {
                        // Nothing to take the unsent values from: never guess.
                        forget().await;
                        return;
                    }
                }
            };
            install(Entry::new(Some(value), lsn, e.version).with_xid(e.source_xid)).await;
        }
        Op::Delete => {
            install(Entry::new(None, lsn, e.version).with_xid(e.source_xid)).await;
        }
        // Versioned: a change replayed from before what is cached (a restart's replay after a
        // newer warm load) leaves the newer entry alone.
        Op::Invalidate => {
            forget().await;
        }
        Op::Clear if own => ks.clear_at(lsn),
        Op::Clear => ks.clear(),
        Op::Rejected => {}
    }
}

/// The new row with its unchanged fields taken from the cached entry, in the cached field
/// order; `None` when the entry (or one of the fields) is not there.
pub fn merge_unchanged(ks: &Keyspace, key: &str, new: &Bytes, unchanged: &[String]) -> Option<Bytes> {
    let cached = ks.cached(key)?.value.clone()?;
    let old: Map<String, Value> = serde_json::from_slice(&cached).ok()?;
    let mut new: Map<String, Value> = serde_json::from_slice(new).ok()?;
    if unchanged.iter().any(|f| !old.contains_key(f)) {
        return None;
    }
    let mut merged = Map::with_capacity(old.len().max(new.len()));
    for (k, v) in old {
        let value = new.shift_remove(&k).unwrap_or(v);
        merged.insert(k, value);
    }
    merged.extend(new);
    serde_json::to_vec(&merged).ok().map(Bytes::from)
}
