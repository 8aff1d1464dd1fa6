//! Read-only inspection of a log directory, for `cachesync log stat` and `cachesync log dump`.
//! Safe to run beside a live sidecar: it takes no lock and changes nothing (a torn tail is
//! reported, not cut).

use std::path::Path;

use prometheus::Registry;
use serde::Serialize;

use super::reader;
use super::{LogConfig, LogError, LogMetrics, Offset, Record, cursor, open_dir};
use crate::event::ChangeEvent;

/// One segment's numbers.
#[derive(Debug, Serialize)]
pub struct SegmentStat {
    pub file: String,
    pub base_offset: u64,
    pub records: u64,
    pub bytes: u64,
    pub first_timestamp_ms: u64,
    pub last_timestamp_ms: u64,
    pub corrupt: Option<String>,
}

/// A log directory's numbers.
#[derive(Debug, Serialize)]
pub struct LogStat {
    pub dir: String,
    /// The log's identity (`None` for a log written before identities existed).
    pub identity: Option<String>,
    pub start_offset: u64,
    pub end_offset: u64,
    pub records: u64,
    pub disk_bytes: u64,
    pub torn_tail_bytes: Option<u64>,
    pub segments: Vec<SegmentStat>,
    pub cursors: Vec<CursorStat>,
}

#[derive(Debug, Serialize)]
pub struct CursorStat {
    pub name: String,
    pub position: Option<u64>,
    pub lag_records: Option<u64>,
    pub error: Option<String>,
}

fn open(dir: &Path) -> Result<(std::sync::Arc<super::Shared>, super::Recovery), LogError> {
    let super::Opened { shared, recovery, .. } =
        open_dir(LogConfig::new(dir), LogMetrics::new(&Registry::new()), true)?;
    Ok((shared, recovery))
}

/// Numbers about the log in `dir`.
pub fn stat(dir: &Path) -> Result<LogStat, LogError> {
    let (shared, recovery) = open(dir)?;
    let segs = shared.segments.read().unwrap_or_else(|p| p.into_inner()).clone();
    let end = shared.end();
    let segments: Vec<SegmentStat> = segs
        .iter()
        .map(|s| SegmentStat {
            file: s
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            base_offset: s.base.0,
            records: s.end().0 - s.base.0,
            bytes: s.durable_len(),
            first_timestamp_ms: s.first_ts(),
            last_timestamp_ms: s.last_ts(),
            corrupt: s.corrupt().map(|c| format!("at byte {}: {}", c.position, c.detail)),
        })
        .collect();
    let cursors = cursor::list(dir)?
        .into_iter()
        .map(|(name, pos)| match pos {
            Ok(p) => CursorStat {
                name,
                position: Some(p.0),
                lag_records: Some(end.0.saturating_sub(p.0)),
                error: None,
            },
            Err(e) => CursorStat {
                name,
                position: None,
                lag_records: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    Ok(LogStat {
        dir: dir.display().to_string(),
        identity: shared.identity.clone(),
        start_offset: shared.start().0,
        end_offset: end.0,
        records: end.0 - shared.start().0,
        disk_bytes: segs.iter().map(|s| s.disk_bytes()).sum(),
        torn_tail_bytes: recovery.truncated_bytes,
        segments,
        cursors,
    })
}

/// One record as a JSON line: the event's fields, the value as the JSON document it is.
pub fn record_json(r: &Record) -> serde_json::Value {
    match ChangeEvent::decode(&r.payload) {
        Ok(e) => {
            let value = e.value.as_ref().map(|v| {
                serde_json::from_slice::<serde_json::Value>(v)
                    .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(v).into_owned()))
            });
            serde_json::json!({
                "offset": r.offset.0,
                "timestamp_ms": r.timestamp_ms,
                "keyspace": e.keyspace,
                "key": e.key,
                "op": e.op,
                "value": value,
                "origin": e.origin,
                "version": e.version,
                "source": e.source,
                "source_position": e.source_position,
                "source_time_us": e.source_time_us,
                "stamp": e.stamp.map(|s| serde_json::json!({"seq": s.seq, "epoch": s.epoch})),
            })
        }
        Err(err) => serde_json::json!({
            "offset": r.offset.0,
            "timestamp_ms": r.timestamp_ms,
            "error": err.to_string(),
            "payload_bytes": r.payload.len(),
        }),
    }
}

/// Calls `each` for up to `limit` records from `from` (default: the log's start).
pub fn dump(
    dir: &Path,
    from: Option<Offset>,
    limit: Option<u64>,
    mut each: impl FnMut(&Record),
) -> Result<u64, LogError> {
    let (shared, _) = open(dir)?;
    let mut next = from.unwrap_or_else(|| shared.start());
    let mut left = limit.unwrap_or(u64::MAX);
    let mut n = 0;
    while left > 0 {
        let batch = reader::read(&shared, next, left.min(1024) as usize, 16 * 1024 * 1024)?;
        let Some(last) = batch.last() else { break };
        next = Offset(last.offset.0 + 1);
        for r in &batch {
            each(r);
        }
        n += batch.len() as u64;
        left -= batch.len() as u64;
    }
    Ok(n)
}
