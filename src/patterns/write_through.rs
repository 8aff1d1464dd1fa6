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
use serde_json::Value;

use crate::cache::{Condition, Entry};
use crate::key::Key;
use crate::keyspace::Keyspace;
use crate::patterns::PatternError;
use crate::source::SourceError;

/// Upserts the row from a JSON object body, if `cond` holds for the stored row (checked in
/// Postgres under the row's lock), and caches what Postgres stored.
pub async fn put(ks: &Keyspace, key: &Key, body: &Bytes, cond: &Condition) -> Result<Arc<Entry>, PatternError> {
    let fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(other) => return Err(SourceError::BadBody(format!("got {}", kind_of(&other))).into()),
        Err(e) => return Err(PatternError::BadJson(e.to_string())),
    };
    let source = ks.source()?;
    let started = Instant::now();
    let written = source.upsert(&key.parts, &fields, cond).await;
    observe(ks, "put", started, written.is_ok());
    let written = written?;
    let entry = Entry::new(Some(written.value), written.lsn, ks.hlc.now()).with_xid(written.xid);
    ks.mutate(key.cache_key.clone(), entry.clone()).await;
    Ok(Arc::new(entry))
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
            let entry = Entry::new(None, d.lsn, ks.hlc.now()).with_xid(d.xid);
            ks.mutate(key.cache_key.clone(), entry).await;
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

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
