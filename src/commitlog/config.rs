//! `[log]`: how the commit log is kept — its directory, durability policy, segment size,
//! retention and queue bounds — with their defaults, and the reader of its section.

use std::path::PathBuf;
use std::time::Duration;

use crate::section::Section;

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// After `fdatasync` of the batch (group commit). The default.
    Always,
    /// After the next periodic `fdatasync`, at most this long.
    Interval(#[serde(with = "crate::section::humantime_serde_shim")] Duration),
    /// After the write; the OS flushes when it likes (a crash of the machine can lose data).
    Never,
}

impl FsyncPolicy {
    /// Parses `"always"`, `"never"` or a duration such as `"10ms"`.
    pub fn parse(text: &str) -> Result<FsyncPolicy, String> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => match humantime::parse_duration(other) {
                Ok(d) if !d.is_zero() => Ok(FsyncPolicy::Interval(d)),
                _ => Err(format!(
                    "invalid fsync policy {text:?}; expected \"always\", \"never\" or an interval such as \"10ms\""
                )),
            },
        }
    }
}

/// Segment size when none is configured.
pub const DEFAULT_SEGMENT_BYTES: u64 = 128 * 1024 * 1024;
/// Largest segment size accepted (index positions are u32).
pub const MAX_SEGMENT_BYTES: u64 = 1024 * 1024 * 1024;
/// Bytes of records between sparse index entries.
pub const DEFAULT_INDEX_INTERVAL_BYTES: u64 = 4096;
/// Appends that may wait for the writer before appenders are held back.
pub const DEFAULT_MAX_QUEUED_APPENDS: usize = 4096;
/// Payload bytes that may wait for the writer before appenders are held back.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 64 * 1024 * 1024;
/// How often retention runs.
pub const DEFAULT_RETENTION_CHECK: Duration = Duration::from_secs(30);
/// How the log is kept.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogConfig {
    /// Directory of segments and cursors.
    pub dir: PathBuf,
    /// Durability of appends.
    pub fsync: FsyncPolicy,
    /// A segment rolls once it reaches this size.
    pub segment_bytes: u64,
    /// Bytes between sparse index entries.
    pub index_interval_bytes: u64,
    /// Keep at most about this many bytes of segments (whole sealed segments are removed).
    pub retention_bytes: Option<u64>,
    /// Remove sealed segments whose newest record is older than this.
    #[serde(with = "crate::section::humantime_serde_shim::option")]
    pub retention_age: Option<Duration>,
    /// How often retention runs.
    #[serde(with = "crate::section::humantime_serde_shim")]
    pub retention_check: Duration,
    /// Bound of the append queue.
    pub max_queued_appends: usize,
    /// Most payload bytes waiting for the writer; appenders wait beyond it (one append larger
    /// than this waits until the queue is empty and then goes alone).
    pub max_queued_bytes: u64,
}

impl LogConfig {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            fsync: FsyncPolicy::Always,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            index_interval_bytes: DEFAULT_INDEX_INTERVAL_BYTES,
            retention_bytes: None,
            retention_age: None,
            retention_check: DEFAULT_RETENTION_CHECK,
            max_queued_appends: DEFAULT_MAX_QUEUED_APPENDS,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}

pub(crate) fn read_log(mut s: Section<'_, '_>) -> Option<LogConfig> {
    let dir: Option<String> = s.required("dir");
    let mut c = LogConfig::new(dir.clone().unwrap_or_default());
    if let Some(text) = s.get::<String>("fsync") {
        match FsyncPolicy::parse(&text) {
            Ok(p) => c.fsync = p,
            Err(e) => s.problem_at("fsync", e),
        }
    }
    if let Some(n) = s.byte_size("segment_bytes") {
        if !(4096..=MAX_SEGMENT_BYTES).contains(&n) {
            s.problem_at(
                "segment_bytes",
                format!("must be between 4KiB and {}MiB", MAX_SEGMENT_BYTES >> 20),
            );
        }
        c.segment_bytes = n;
    }
    if let Some(n) = s.byte_size("index_interval_bytes") {
        if n == 0 {
            s.problem_at("index_interval_bytes", "must be greater than zero");
        }
        c.index_interval_bytes = n;
    }
    c.retention_bytes = s.byte_size("retention_bytes");
    c.retention_age = s.duration("retention_age");
    if let Some(d) = s.duration("retention_check") {
        if d.is_zero() {
            s.problem_at("retention_check", "must be greater than zero");
        }
        c.retention_check = d;
    }
    if let Some(n) = s.byte_size("max_queued_bytes") {
        if n == 0 {
            s.problem_at("max_queued_bytes", "must be greater than zero");
        }
        c.max_queued_bytes = n;
    }
    if let Some(n) = s.get::<usize>("max_queued_appends") {
        if n == 0 {
            s.problem_at("max_queued_appends", "must be at least 1");
        }
        c.max_queued_appends = n;
    }
    s.finish();
    dir.map(|_| c)
}
