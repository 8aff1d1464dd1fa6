//! Write-through: the write reaches Postgres before the caller gets its answer, and the cache
//! then holds what Postgres stored.
//!
//! `PUT` upserts (`INSERT … ON CONFLICT (key) DO UPDATE … RETURNING`) only the fields the body
//! names — a column left out keeps its value on update and takes its default on insert — and the
//! entry becomes the returned row, so defaults, triggers and type coercions show up in the cache
//! exactly as stored. `DELETE` deletes and caches "absent". A write that fails changes nothing in
//! the cache.
//!
//! Ordering: the statement reads the WAL insert position after it has locked the row, so of two
//! writes to one row the one that commits later carries the larger position, and the cache
//! installs a write's result only over an entry that is not newer ([`Install::IfNotOlder`]).
//! Each write also marks the key's in-flight load stale, so a load that began before the write
//! cannot install the old row after it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::cache::{Condition, Entry};
use crate::key::Key;
use crate::keyspace::Keyspace;
use crate::patterns::{PatternError, fields_of};

/// Installs what Postgres stored through the keyspace's door and, with an L2 tier, waits until
/// the change is in Redis and announced: once the write is acknowledged, every other node can
/// learn of it (see `l2`).
async fn changed(ks: &Keyspace, key: &Key, entry: Entry) {
    ks.mutate(key.cache_key.clone(), entry).await;
    ks.published(&key.cache_key).await;
}

/// Upserts the row from a JSON object body, if `cond` holds for the stored row (checked in
/// Postgres under the row's lock), and caches what Postgres stored.
pub async fn put(ks: &Keyspace, key: &Key, body: &Bytes, cond: &Condition) -> Result<Arc<Entry>, PatternError> {
    let fields = fields_of(body)?;
    let source = ks.source()?;
    let started = Instant::now();
    let written = source.upsert(&key.parts, &fields, cond).await;
    observe(ks, "put", started, written.is_ok());
    let written = written?;
    let entry = Entry::new(Some(written.value), written.lsn, ks.hlc.now())
        .with_xid(written.xid)
        .read_at(tokio::time::Instant::from_std(started));
    changed(ks, key, entry.clone()).await;
    Ok(Arc::new(entry))
}

/// Upserts many rows in one Postgres transaction (each item validated, conditioned and run
/// under its own savepoint, so one refused item does not fail the rest) and caches what Postgres
/// stored for each. One result per item, in order.
pub async fn put_many(ks: &Keyspace, items: Vec<(Key, Bytes, Condition)>) -> Vec<Result<Arc<Entry>, PatternError>> {
    let source = match ks.source() {
        Ok(s) => s,
        Err(e) => return items.iter().map(|_| Err(PatternError::from(e.clone()))).collect(),
    };
    let mut results: Vec<Option<Result<Arc<Entry>, PatternError>>> = (0..items.len()).map(|_| None).collect();
    let mut batch = Vec::with_capacity(items.len());
    let mut index = Vec::with_capacity(items.len());
    for (i, (key, body, cond)) in items.iter().enumerate() {
        match fields_of(body) {
            Ok(fields) => {
                batch.push((key.parts.clone(), fields, cond.clone()));
                index.push(i);
            }
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    let started = Instant::now();
    let written = source.upsert_many(&batch).await;
    observe(ks, "put", started, written.iter().all(Result::is_ok));
    for (i, w) in index.into_iter().zip(written) {
        let key = &items[i].0;
        results[i] = Some(match w {
            Ok(w) => {
                let entry = Entry::new(Some(w.value), w.lsn, ks.hlc.now())
                    .with_xid(w.xid)
                    .read_at(tokio::time::Instant::from_std(started));
                changed(ks, key, entry.clone()).await;
                Ok(Arc::new(entry))
            }
            Err(e) => Err(e.into()),
        });
    }
    results.into_iter().map(|r| r.expect("every item answered")).collect()
}

/// Deletes many rows in one Postgres transaction (see [`put_many`]); `Ok(false)` for a row that
/// was not there.
pub async fn delete_many(ks: &Keyspace, items: Vec<(Key, Condition)>) -> Vec<Result<bool, PatternError>> {
    let source = match ks.source() {
        Ok(s) => s,
        Err(e) => return items.iter().map(|_| Err(PatternError::from(e.clone()))).collect(),
    };
    let batch: Vec<(Vec<String>, Condition)> = items.iter().map(|(k, c)| (k.parts.clone(), c.clone())).collect();
    let started = Instant::now();
    let deleted = source.delete_many(&batch).await;
    observe(ks, "delete", started, deleted.iter().all(Result::is_ok));
    let mut out = Vec::with_capacity(items.len());
    for ((key, _), d) in items.iter().zip(deleted) {
        out.push(match d {
            Ok(Some(d)) => {
                changed(
                    ks,
                    key,
                    Entry::new(None, d.lsn, ks.hlc.now())
                        .with_xid(d.xid)
                        .read_at(tokio::time::Instant::from_std(started)),
                )
                .await;
                Ok(true)
            }
            Ok(None) => {
                ks.invalidate(&key.cache_key).await;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        });
    }
    out
}

/// Deletes the row, if `cond` holds for it, and caches "absent". `false` when there was no such
/// row.
pub async fn delete(ks: &Keyspace, key: &Key, cond: &Condition) -> Result<bool, PatternError> {
    let source = ks.source()?;
    let started = Instant::now();
    let deleted = source.delete(&key.parts, cond).await;
    observe(ks, "delete", started, deleted.is_ok());
    match deleted? {
        Some(d) => {
            let entry = Entry::new(None, d.lsn, ks.hlc.now())
                .with_xid(d.xid)
                .read_at(tokio::time::Instant::from_std(started));
            changed(ks, key, entry).await;
            Ok(true)
        }
        None => {
            // Nothing was there; whatever the cache held for the key was stale.
            ks.invalidate(&key.cache_key).await;
            Ok(false)
        }
    }
}

fn observe(ks: &Keyspace, op: &str, started: Instant, ok: bool) {
    let m = &ks.metrics;
    m.write_duration
        .with_label_values(&[ks.name(), op])
        .observe(started.elapsed().as_secs_f64());
    m.writes
        .with_label_values(&[ks.name(), op, if ok { "ok" } else { "error" }])
        .inc();
}
