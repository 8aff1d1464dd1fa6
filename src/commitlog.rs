//! The commit log: cachesync's local durable log of change events. Every change is appended here
//! before anyone acts on it; consumers (the cache applier, the write-behind flusher, peers) read
//! it from durable cursors. It is what lets CDC confirm a position to Postgres only once the
//! change is safe, what makes write-behind survive a crash, and what peers replicate.
//!
//! # On disk
//!
//! ```text
//! DIR/
//!   LOCK                           held (flock) by the one process that writes this log
//!   IDENTITY                       this log's identity: offsets mean something only within it
//!   00000000000000000000.log       segment: framed records from offset 0
//!   00000000000000000000.index     sparse index of that segment
//!   00000000000000052817.log       next segment: its first record has offset 52817
//!   00000000000000052817.index
//!   cursors/flusher.cursor         a named durable consumer position
//! ```
//!
//! | File | Layout |
//! |---|---|
//! | `NNNNNNNNNNNNNNNNNNNN.log` (20-digit base offset) | records back to back; each: `magic 0xCA (1) \| payload length u32 LE (4) \| crc32c u32 LE (4) of the next three fields \| offset u64 LE (8) \| append time ms u64 LE (8) \| payload` |
//! | `NNNNNNNNNNNNNNNNNNNN.index` | `(offset − base: u32 LE, file position: u32 LE)` every `index_interval_bytes` of records; rebuilt from the segment when missing or invalid |
//! | `cursors/NAME.cursor` | `"CSC1" (4) \| offset u64 LE (8) \| crc32c u32 LE (4)` of the first 12 bytes; replaced atomically (temp file, fsync, rename, fsync of the directory) |
//! | `IDENTITY` | `"cachesync-log "` + 32 hex digits (128 random bits) + `"\n"`; made when the log is created, or when its segments are found wiped (see `identity`) |
//! | payload | an encoded [`ChangeEvent`](crate::event::ChangeEvent), format byte first (see `event`) |
//!
//! # Guarantees
//!
//! - `append` resolves once its records are durable under the policy: `always` — after
//!   `fdatasync` (concurrent appenders share one write and one sync: group commit); an interval —
//!   after the next periodic sync (at most that long); `never` — after the write (the OS decides).
//!   The queue to the writer is bounded, so appenders wait rather than grow memory.
//! - Readers only ever see durable records, wait for new ones without polling, and read
//!   concurrently with the writer and each other.
//! - On open, a torn tail of the active segment is truncated; bad bytes followed by valid records
//!   are reported as corruption with file and position (never a panic, never a silent cut).
//! - Retention (by total size, by age) removes whole sealed segments, never one holding records a
//!   *required* cursor or a live [`Hold`] (a connected follower) has not passed.

pub mod config;
pub mod cursor;
pub mod identity;
pub mod inspect;
mod metrics;
pub mod reader;
pub mod record;
pub mod segment;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::Registry;
use tokio::sync::{mpsc, oneshot, watch};

use crate::event::ChangeEvent;
use crate::lifecycle::Tasks;
pub use config::{
    DEFAULT_INDEX_INTERVAL_BYTES, DEFAULT_MAX_QUEUED_APPENDS, DEFAULT_MAX_QUEUED_BYTES, DEFAULT_RETENTION_CHECK,
    DEFAULT_SEGMENT_BYTES, FsyncPolicy, LogConfig, MAX_SEGMENT_BYTES,
};
pub use cursor::Cursor;
pub use metrics::LogMetrics;
pub use reader::{Record, Tail};
use segment::Segment;

/// A record's position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Offset(pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Most bytes of records the writer puts in one write + sync.
pub const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;

/// What can go wrong with the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("{}: {detail}", path.display())]
    Io { path: PathBuf, detail: String },
    #[error("the disk under the commit log is full (writing {}); free space or move [log] dir", path.display())]
    DiskFull { path: PathBuf },
    #[error("corrupt log data in {} at byte {position}: {detail}", file.display())]
    Corrupt {
        file: PathBuf,
        position: u64,
        detail: String,
    },
    #[error("offset {requested} is no longer in the log (it starts at {start}); retention removed it")]
    OffsetOutOfRange { requested: Offset, start: Offset },
    #[error("log directory {} is in use by another process", dir.display())]
    Locked { dir: PathBuf },
    #[error("the log has failed and refuses writes: {0}")]
    Failed(String),
    #[error("the log is closed")]
    Closed,
    #[error("append too large: {0}")]
    TooLarge(String),
    #[error("invalid cursor name {0:?}: use letters, digits, `_`, `-`, `.` and `:`")]
    BadCursorName(String),
}

impl LogError {
    /// An I/O error on `path`; a full disk is told apart ([`LogError::DiskFull`]) so callers can
    /// say so instead of a generic failure.
    pub fn io(path: &Path, e: std::io::Error) -> LogError {
        if e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded {
            return LogError::DiskFull {
                path: path.to_path_buf(),
            };
        }
        LogError::Io {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    }
}

/// Requests to the writer (see [`writer::Pipe`]).
enum Command {
    Append {
        payloads: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<Range<Offset>, LogError>>,
        /// This append's share of the queue's byte budget, released once it is written.
        budget: tokio::sync::OwnedSemaphorePermit,
    },
    /// Sync now if anything is written but not yet durable (interval and never policies).
    Flush {
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    /// The interval timer.
    Tick,
    /// Apply retention (file removals happen only on the writer thread, so none can race a
    /// reopen after the writer has stopped).
    Retention {
        reply: Option<oneshot::Sender<Result<usize, LogError>>>,
    },
    /// Make everything durable and stop, whatever other handles exist.
    Close,
}

/// An admission hook, run by the writer thread on every record as it is framed, in log order:
/// it may change the payload in place (without changing its length) or keep it out of the log.
/// The federation's sequencer is one: it numbers this node's own events and drops an event from
/// another node that is already here. A group whose write fails is undone in the hook too.
pub trait Admit: Send + Sync {
    /// A group of records begins.
    fn begin(&self);
    /// Whether `payload` goes into the log (it may be rewritten first).
    fn admit(&self, payload: &mut [u8]) -> bool;
    /// The group's write failed: forget what was admitted since [`Admit::begin`].
    fn undo(&self);
}

/// State shared by the handle, readers, cursors and the writer.
pub struct Shared {
    pub(crate) config: LogConfig,
    pub(crate) segments: RwLock<Vec<Arc<Segment>>>,
    /// Offset after the last durable record; readers wait on it.
    pub(crate) durable: watch::Sender<u64>,
    /// Readers waiting for the durable end to reach an offset (woken once, when it does).
    pub(crate) thresholds: reader::Thresholds,
    pub(crate) cursors: Mutex<BTreeMap<String, Arc<Cursor>>>,
    pub(crate) failed: Mutex<Option<String>>,
    /// Set when the writer has stopped; waiting tails return `Closed`.
    pub(crate) closed: std::sync::atomic::AtomicBool,
    pub(crate) metrics: LogMetrics,
    /// The log's identity (see [`identity`]); `None` only for a read-only open of a log that
    /// has none yet.
    pub(crate) identity: Option<String>,
    /// In-memory retention floors ([`Hold`]): a connected follower's position.
    pub(crate) holds: Mutex<Vec<std::sync::Weak<Hold>>>,
}

/// The writer's admission hook, if any.
pub type AdmitHook = Option<Arc<dyn Admit>>;

impl Shared {
    pub fn start(&self) -> Offset {
        self.segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .map_or(Offset(0), |s| s.base)
    }

    pub fn end(&self) -> Offset {
        Offset(*self.durable.borrow())
    }

    pub(crate) fn fail(&self, why: String) {
        tracing::error!(reason = %why, "commit log failed; refusing further writes");
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// An append whose order is fixed; [`durable`](Pending::durable) waits for it to be safe.
pub struct Pending(PendingInner);

enum PendingInner {
    Ready(Range<Offset>),
    Waiting(oneshot::Receiver<Result<Range<Offset>, LogError>>),
}

impl Pending {
    /// The appended offsets, once durable under the policy.
    pub async fn durable(self) -> Result<Range<Offset>, LogError> {
        match self.0 {
            PendingInner::Ready(r) => Ok(r),
            PendingInner::Waiting(rx) => rx.await.map_err(|_| LogError::Closed)?,
        }
    }
}

/// A handle on an open log. Cheap to clone; the writer stops when the last handle is dropped or
/// [`close`](CommitLog::close) is called.
#[derive(Clone)]
pub struct CommitLog {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    /// Byte budget of the append queue (permits are bytes, returned once written).
    queued_bytes: Arc<tokio::sync::Semaphore>,
    /// Declared after `tx`: the last handle drops its sender before it rings the writer thread,
    /// which then finds every sender gone and closes the log.
    writer: Arc<WriterHandle>,
}

/// The writer's queue lock and thread, shared by the handles.
struct WriterHandle {
    pipe: Arc<writer::Pipe>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.pipe.ring();
    }
}

/// What opening found and did.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Bytes cut from a torn tail of the active segment.
    pub truncated_bytes: Option<u64>,
    pub segments: usize,
}

impl CommitLog {
    /// Opens (creating if needed) the log in `config.dir`, recovering the active segment, and
    /// starts its writer thread, interval timer and retention task, the timers as tasks of a
    /// lifecycle of their own (tests, tools); a server uses [`CommitLog::open_with_tasks`].
    pub async fn open(config: LogConfig, registry: &Registry) -> Result<(CommitLog, Recovery), LogError> {
        CommitLog::open_with_tasks(config, registry, &Tasks::detached()).await
    }

    /// [`CommitLog::open`], with the timers spawned under `tasks`: they end when its phase
    /// stops (or when every handle on the log is gone).
    pub async fn open_with_tasks(
        config: LogConfig,
        registry: &Registry,
        tasks: &Tasks,
    ) -> Result<(CommitLog, Recovery), LogError> {
        CommitLog::open_with(config, registry, tasks, None).await
    }

    /// [`CommitLog::open_with_tasks`], with an admission hook run on every appended record.
    pub async fn open_with(
        config: LogConfig,
        registry: &Registry,
        tasks: &Tasks,
        admit: AdmitHook,
    ) -> Result<(CommitLog, Recovery), LogError> {
        let metrics = LogMetrics::new(registry);
        let cfg = config.clone();
        let Opened {
            shared,
            active,
            recovery,
            lock,
        } = tokio::task::spawn_blocking(move || open_dir(cfg, metrics, false))
            .await
            .map_err(|e| LogError::Failed(e.to_string()))??;
        let (tx, rx) = mpsc::channel(config.max_queued_appends.max(1));
        // The writer thread owns the directory lock: it is released exactly when writing stops, even
        // if readers keep the shared state alive longer.
        let writer = writer::Writer::new(shared.clone(), active, lock, admit)?;
        let (pipe, handle) = writer::Pipe::start(writer, rx)
            .map_err(|e| LogError::Failed(format!("cannot start the log writer thread: {e}")))?;
        let queued_bytes = Arc::new(tokio::sync::Semaphore::new(
            config.max_queued_bytes.clamp(1, u32::MAX as u64) as usize,
        ));
        let log = CommitLog {
            shared,
            tx,
            queued_bytes,
            writer: Arc::new(WriterHandle {
                pipe,
                thread: Mutex::new(Some(handle)),
            }),
        };
        if let FsyncPolicy::Interval(every) = config.fsync {
            let tx = log.tx.downgrade();
            let pipe = Arc::downgrade(&log.writer.pipe);
            let stop = tasks.child_token();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let Some(tx) = tx.upgrade() else { return };
                    // A full queue means the writer is busy and will sync anyway.
                    let _ = tx.try_send(Command::Tick);
                    ring_after(tx, &pipe);
                }
            });
        }
        if config.retention_bytes.is_some() || config.retention_age.is_some() {
            let tx = log.tx.downgrade();
            let pipe = Arc::downgrade(&log.writer.pipe);
            let every = config.retention_check;
            let stop = tasks.child_token();
            tasks.spawn(async move {
                // First pass one interval after opening, then every interval.
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let Some(tx) = tx.upgrade() else { return };
                    let _ = tx.try_send(Command::Retention { reply: None });
                    ring_after(tx, &pipe);
                }
            });
        }
        log.refresh_metrics();
        Ok((log, recovery))
    }

    /// Appends encoded payloads; resolves with their offsets once durable under the policy.
    ///
    /// When no one is writing, the append is written and synced on the calling thread (see
    /// [`writer::Pipe`]); otherwise it waits for the writer that is.
    pub async fn append(&self, payloads: Vec<Vec<u8>>) -> Result<Range<Offset>, LogError> {
        match self.queue(payloads).await? {
            PendingInner::Waiting(rx) => {
                if !self.writer.pipe.try_lead(|| !rx.is_empty()) {
                    self.writer.pipe.ring();
                }
                rx.await.map_err(|_| LogError::Closed)?
            }
            PendingInner::Ready(r) => Ok(r),
        }
    }

    /// Queues payloads for appending and returns once their place in the log is fixed (appends
    /// queued one after another keep that order), without waiting for durability: the
    /// [`Pending`] resolves when they are durable. Lets a producer keep several appends in
    /// flight — sharing group commits — while acting on each only once it is safe.
    pub async fn enqueue(&self, payloads: Vec<Vec<u8>>) -> Result<Pending, LogError> {
        let pending = self.queue(payloads).await?;
        self.writer.pipe.ring();
        Ok(Pending(pending))
    }

    /// Puts an append in the writer's queue (its place in the log is fixed from then on).
    async fn queue(&self, payloads: Vec<Vec<u8>>) -> Result<PendingInner, LogError> {
        if payloads.is_empty() {
            let end = self.end();
            return Ok(PendingInner::Ready(end..end));
        }
        if let Some(p) = payloads.iter().find(|p| p.len() > record::MAX_PAYLOAD) {
            return Err(LogError::TooLarge(format!(
                "a record of {} bytes exceeds the {} byte limit",
                p.len(),
                record::MAX_PAYLOAD
            )));
        }
        if let Some(why) = self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(LogError::Failed(why));
        }
        let bytes: u64 = payloads.iter().map(|p| p.len() as u64).sum();
        let max = self.shared.config.max_queued_bytes.clamp(1, u32::MAX as u64);
        let permits = bytes.clamp(1, max) as u32;
        let budget = self
            .queued_bytes
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| LogError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append {
                payloads,
                reply,
                budget,
            })
            .await
            .map_err(|_| LogError::Closed)?;
        Ok(PendingInner::Waiting(rx))
    }

    /// Appends events (encoded here).
    pub async fn append_events(&self, events: &[ChangeEvent]) -> Result<Range<Offset>, LogError> {
        self.append(events.iter().map(ChangeEvent::encode).collect()).await
    }

    /// Makes everything appended so far durable now (for the interval and never policies).
    pub async fn flush(&self) -> Result<(), LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush { reply })
            .await
            .map_err(|_| LogError::Closed)?;
        self.writer.pipe.ring();
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Flushes, stops the writer and waits for it.
    /// Flushes, stops the writer and waits for it. Other handles' appends fail with `Closed`
    /// from then on; their tails see the end of the log.
    pub async fn close(self) -> Result<(), LogError> {
        let flushed = self.flush().await;
        let handle = self.writer.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = self.tx.send(Command::Close).await;
        drop(self.tx);
        self.writer.pipe.ring();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        flushed
    }

    /// First offset still in the log.
    pub fn start(&self) -> Offset {
        self.shared.start()
    }

    /// Offset the next record will get; every offset below it is durable.
    pub fn end(&self) -> Offset {
        self.shared.end()
    }

    /// The log's identity: 128 random bits in hex, made when the log was created (or its
    /// segments were found wiped). An offset means something only together with it: a follower
    /// that finds another identity behind the same address knows the log was recreated.
    pub fn identity(&self) -> &str {
        self.shared.identity.as_deref().unwrap_or_default()
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// A reader that follows the log from `from`.
    pub fn tail(&self, from: Offset) -> Tail {
        Tail::new(self.shared.clone(), from)
    }

    /// Reads up to `max_records` durable records from `from` (no waiting).
    pub fn read(&self, from: Offset, max_records: usize) -> Result<Vec<Record>, LogError> {
        reader::read(&self.shared, from, max_records, usize::MAX)
    }

    /// The named durable cursor, created at the log's start if new. A *required* cursor holds
    /// back retention until it has passed a segment's records.
    pub fn cursor(&self, name: &str, required: bool) -> Result<Arc<Cursor>, LogError> {
        cursor::open(&self.shared, name, required)
    }

    /// An in-memory retention floor at `at`: while the returned [`Hold`] lives, retention keeps
    /// every record from its position on (a connected follower that has not yet made them its
    /// own). Nothing is written; a hold ends when it is dropped.
    pub fn hold(&self, at: Offset) -> Arc<Hold> {
        let hold = Arc::new(Hold {
            position: std::sync::atomic::AtomicU64::new(at.0),
        });
        let mut holds = self.shared.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.retain(|h| h.strong_count() > 0);
        holds.push(Arc::downgrade(&hold));
        hold
    }

    /// Runs retention once now.
    pub async fn apply_retention(&self) -> Result<usize, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Retention { reply: Some(reply) })
            .await
            .map_err(|_| LogError::Closed)?;
        self.writer.pipe.ring();
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.segments.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Updates the gauges (segments, bytes, offsets, cursor lags).
    pub fn refresh_metrics(&self) {
        let s = &self.shared;
        let segments = s.segments.read().unwrap_or_else(|p| p.into_inner()).clone();
        let m = &s.metrics;
        m.segments.set(segments.len() as i64);
        m.disk_bytes
            .set(segments.iter().map(|g| g.disk_bytes()).sum::<u64>() as i64);
        m.start_offset.set(s.start().0 as i64);
        let end = s.end();
        m.end_offset.set(end.0 as i64);
        for (name, c) in s.cursors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            m.cursor_lag
                .with_label_values(&[name])
                .set(end.0.saturating_sub(c.position().0) as i64);
        }
    }
}

/// An in-memory retention floor (see [`CommitLog::hold`]).
#[derive(Debug)]
pub struct Hold {
    position: std::sync::atomic::AtomicU64,
}

impl Hold {
    /// Moves the floor (only forwards).
    pub fn advance(&self, to: Offset) {
        self.position.fetch_max(to.0, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn position(&self) -> Offset {
        Offset(self.position.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Wall-clock milliseconds since the Unix epoch (record timestamps).
/// Drops a timer's sender, then rings the writer thread: if it was the last sender, the thread
/// finds the queue closed.
fn ring_after(tx: mpsc::Sender<Command>, pipe: &std::sync::Weak<writer::Pipe>) {
    drop(tx);
    if let Some(p) = pipe.upgrade() {
        p.ring();
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens the directory: lock, list segments, open sealed ones, recover the active one. A
/// read-only open (inspection) takes no lock, creates nothing and repairs nothing.
pub(crate) fn open_dir(config: LogConfig, metrics: LogMetrics, read_only: bool) -> Result<Opened, LogError> {
    let dir = config.dir.clone();
    let lock = if read_only {
        if !dir.is_dir() {
            return Err(LogError::io(&dir, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        None
    } else {
        std::fs::create_dir_all(dir.join("cursors")).map_err(|e| LogError::io(&dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LogError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LogError::Locked { dir }),
            Err(std::fs::TryLockError::Error(e)) => return Err(LogError::io(&lock_path, e)),
        }
        Some(lock)
    };
    let mut bases = list_segments(&dir)?;
    let mut recovery = Recovery::default();
    if bases.is_empty() && read_only {
        return Err(LogError::io(
            &dir,
            std::io::Error::other("no segment files here; is this a cachesync log directory?"),
        ));
    }
    let identity = if read_only {
        identity::read(&dir)?
    } else if bases.is_empty() {
        // A new log — or one whose segments were wiped — gets a new identity, so offsets into
        // an earlier log are never taken as offsets into this one.
        Some(identity::create(&dir)?)
    } else {
        Some(match identity::read(&dir)? {
            Some(id) => id,
            // A log written before identities existed gets one now.
            None => identity::create(&dir)?,
        })
    };
    if bases.is_empty() {
        Segment::create(&dir, Offset(0))?;
        sync_dir(&dir)?;
        bases.push(Offset(0));
    }
    let mut segments = Vec::with_capacity(bases.len());
    for (i, base) in bases.iter().enumerate() {
        let seg = if i + 1 == bases.len() {
            let (seg, truncated) = Segment::open_active(&dir, *base, config.index_interval_bytes, read_only)?;
            if let Some(n) = truncated {
                tracing::warn!(segment = %seg.path.display(), bytes = n, "truncated a torn tail of the commit log");
            }
            recovery.truncated_bytes = truncated;
            seg
        } else {
            let seg = Segment::open_sealed(&dir, *base, config.index_interval_bytes, read_only)?;
            if let Some(c) = seg.corrupt() {
                tracing::error!(segment = %seg.path.display(), position = c.position, detail = %c.detail, "corrupt sealed segment; reads past this point will fail");
            }
            seg
        };
        segments.push(Arc::new(seg));
    }
    recovery.segments = segments.len();
    let active = segments.last().expect("at least one segment").clone();
    let (durable, _) = watch::channel(active.end().0);
    let shared = Arc::new(Shared {
        config,
        segments: RwLock::new(segments),
        durable,
        thresholds: reader::Thresholds::default(),
        cursors: Mutex::new(BTreeMap::new()),
        holds: Mutex::new(Vec::new()),
        failed: Mutex::new(None),
        closed: std::sync::atomic::AtomicBool::new(false),
        metrics,
        identity,
    });
    Ok(Opened {
        shared,
        active,
        recovery,
        lock,
    })
}

/// What opening a directory produced.
pub(crate) struct Opened {
    pub shared: Arc<Shared>,
    pub active: Arc<Segment>,
    pub recovery: Recovery,
    /// The directory lock (none for a read-only open).
    pub lock: Option<File>,
}

/// Segment base offsets in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<Offset>, LogError> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        if let Some(base) = entry.file_name().to_str().and_then(segment::parse_log_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// fsync of a directory, so a created, renamed or removed entry is durable.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io(dir, e))
}

/// Removes sealed segments beyond the size or age bound, never one a required cursor or a live
/// hold still needs. Returns how many were removed.
pub(crate) fn retention(shared: &Shared) -> Result<usize, LogError> {
    let cfg = &shared.config;
    let floor = shared
        .cursors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|c| c.required)
        .map(|c| c.position())
        .chain(
            shared
                .holds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(|h| h.upgrade().map(|h| h.position())),
        )
        .min()
        .unwrap_or(Offset(u64::MAX));
    let now_ms = now_ms();
    let mut removed = Vec::new();
    {
        let mut segs = shared.segments.write().unwrap_or_else(|p| p.into_inner());
        let mut total: u64 = segs.iter().map(|s| s.disk_bytes()).sum();
        while segs.len() > 1 {
            let oldest = &segs[0];
            let over_size = cfg.retention_bytes.is_some_and(|max| total > max);
            let over_age = cfg.retention_age.is_some_and(|age| {
                oldest.last_ts() > 0 && now_ms.saturating_sub(oldest.last_ts()) > age.as_millis() as u64
            });
            // Every record of the segment is below `end`; a required cursor must have passed them.
            if !(over_size || over_age) || oldest.end() > floor {
                break;
            }
            total = total.saturating_sub(oldest.disk_bytes());
            removed.push(segs.remove(0));
        }
    }
    for seg in &removed {
        // Readers holding the segment keep their open handle; unlinking is safe.
        std::fs::remove_file(&seg.path).map_err(|e| LogError::io(&seg.path, e))?;
        let _ = std::fs::remove_file(&seg.index_path);
        tracing::info!(segment = %seg.path.display(), "retention removed a segment");
    }
    if !removed.is_empty() {
        sync_dir(&shared.config.dir)?;
    }
    Ok(removed.len())
}

#[cfg(test)]
mod tests;
