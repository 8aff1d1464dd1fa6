//! `[write_behind]`: how acknowledged writes reach Postgres — batch size and delay, the backlog
//! bound, and the retry backoff.

use std::time::Duration;

use serde::Serialize;

use crate::section::{Section, humantime_serde_shim};

/// `[write_behind]`: how acknowledged writes reach Postgres.
#[derive(Debug, Clone, Serialize)]
pub struct WriteBehindConfig {
    /// Most rows per flush transaction (after coalescing).
    pub batch_rows: usize,
    /// How long the flusher waits to fill a batch once it has a first write.
    #[serde(with = "humantime_serde_shim")]
    pub batch_delay: Duration,
    /// Unflushed writes above which new writes get 503 with `Retry-After`.
    pub max_backlog_records: u64,
    /// Unflushed bytes above which new writes get 503 with `Retry-After`.
    pub max_backlog_bytes: u64,
    /// First wait after a failed flush (Postgres unreachable); doubles up to `retry_max`.
    #[serde(with = "humantime_serde_shim")]
    pub retry_initial: Duration,
    /// Longest wait between flush retries.
    #[serde(with = "humantime_serde_shim")]
    pub retry_max: Duration,
}

/// Rows per flush transaction when none is configured. A drain of 100k rows (the
/// `write_behind` bench) ran 0.40 s at 10,000 against 0.455 s at 5,000 (medians of twelve
/// drains each, alternated); 20,000 gained nothing more. Only a backlog fills a batch: under
/// light load `batch_delay` cuts it first.
pub const DEFAULT_BATCH_ROWS: usize = 10_000;

/// Wait to fill a flush batch when none is configured. Under a steady trickle of writes each
/// wait ends in one Postgres transaction (a WAL sync on Postgres's disk, the backend's CPU), so
/// this bounds the flusher to ~20 transactions a second rather than ~200 at 5 ms. At 1 writer
/// those transactions shared the disk and the two cores with the acknowledged writes: the
/// `write_behind` bench read, in two sets of runs alternated three ways (README "Measured"),
/// 1.26× and 1.20× of autocommit upserts at 5 ms, 1.33× and 1.24× at 20 ms, 1.28× and 1.39×
/// at 50 ms. Readers through a sidecar see a write at once (its pending write,
/// the log's replication); only readers of Postgres itself see it up to this much later.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(50);

/// Unflushed writes accepted before writes get 503.
pub const DEFAULT_MAX_BACKLOG_RECORDS: u64 = 1_000_000;

/// Unflushed bytes accepted before writes get 503.
pub const DEFAULT_MAX_BACKLOG_BYTES: u64 = 512 * 1024 * 1024;

/// First wait after a failed flush.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(100);

/// Longest wait between flush retries.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(10);

impl Default for WriteBehindConfig {
    fn default() -> Self {
        WriteBehindConfig {
            batch_rows: DEFAULT_BATCH_ROWS,
            batch_delay: DEFAULT_BATCH_DELAY,
            max_backlog_records: DEFAULT_MAX_BACKLOG_RECORDS,
            max_backlog_bytes: DEFAULT_MAX_BACKLOG_BYTES,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }
}

pub(crate) fn read_write_behind(mut s: Section<'_, '_>) -> WriteBehindConfig {
    let d = WriteBehindConfig::default();
    let c = WriteBehindConfig {
        batch_rows: s.get("batch_rows").unwrap_or(d.batch_rows),
        batch_delay: s.duration("batch_delay").unwrap_or(d.batch_delay),
        max_backlog_records: s.get("max_backlog_records").unwrap_or(d.max_backlog_records),
        max_backlog_bytes: s.byte_size("max_backlog_bytes").unwrap_or(d.max_backlog_bytes),
        retry_initial: s.duration("retry_initial").unwrap_or(d.retry_initial),
        retry_max: s.duration("retry_max").unwrap_or(d.retry_max),
    };
    if c.batch_rows == 0 {
        s.problem_at("batch_rows", "must be at least 1");
    }
    if c.retry_initial.is_zero() || c.retry_max < c.retry_initial {
        s.problem_at("retry_max", "retry_initial must be positive and at most retry_max");
    }
    s.finish();
    c
}
