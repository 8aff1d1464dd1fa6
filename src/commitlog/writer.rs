//! The writer: the only code that writes segment files, run by whoever holds its lock — an
//! appender that found the log idle (leader), or else the writer thread (see [`Pipe`]).
//!
//! Group commit: it takes the first queued append, drains whatever else is queued (up to
//! `MAX_GROUP_BYTES`), frames all of it into one buffer, writes it with one `write`, syncs once
//! (per the policy), then publishes the new durable end to readers and answers every appender.
//! Under load many appenders share each `fdatasync`; idle, a lone append pays one sync, on its
//! own thread.
//!
//! Segments are preallocated: a thread of the writer's own extends the file with written,
//! synced zeros a chunk ahead of the records (asked after a group's appenders have been
//! answered, so no acknowledgement waits for it unless the records outrun it), and records are
//! written into it by position. Appending to a file makes every `fdatasync`
//! also journal the file's new size; writing into blocks that already exist does not — on this
//! kind of ext4 disk that is 6.4–7.5k syncs/s against 10.8k/s (Postgres preallocates its WAL
//! segments for the same reason). The zero tail is harmless to recovery: a scan that meets zeros
//! to the end of the file has met the end of the log (see `segment::scan`), and a sealed segment
//! is cut to its records before the next one starts.
//!
//! A failed write is undone (the file is cut back to its previous length) and reported to the
//! appenders in that group. A failed `fdatasync` leaves the page cache in an unknown state (the
//! "fsyncgate" lesson), so the log fails: it refuses all further writes rather than acknowledge
//! data it cannot vouch for.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::Instant;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::record;
use super::segment::{self, IndexEntry, Segment};
use super::{AdmitHook, Command, FsyncPolicy, LogError, MAX_GROUP_BYTES, Offset, Shared, now_ms, sync_dir};

type Reply = oneshot::Sender<Result<Range<Offset>, LogError>>;

pub struct Writer {
    shared: Arc<Shared>,
    seg: Arc<Segment>,
    file: File,
    /// Bytes written to the active segment (durable or not).
    len: u64,
    /// How far the active segment's file is known to hold written, synced zeros or records:
    /// records are written by position below it without changing the file's size.
    allocated: u64,
    /// How far ahead of the records the file is extended (see [`prealloc_chunk`]); 0 = off.
    chunk: u64,
    /// The thread that zero-fills ahead of the records.
    filler: Filler,
    next: Offset,
    /// Position of the last index entry of the active segment.
    last_indexed: Option<u64>,
    /// Written records not yet durable (interval policy): replies and the state to publish.
    pending: Vec<(Reply, Range<Offset>)>,
    pending_ts: (u64, u64),
    last_sync: Instant,
    /// The directory lock, held until the log closes.
    _lock: Option<File>,
    /// Run on every record as it is framed (see [`super::Admit`]).
    admit: AdmitHook,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        seg: Arc<Segment>,
        lock: Option<File>,
        admit: AdmitHook,
    ) -> Result<Writer, LogError> {
        let file = OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .map_err(|e| LogError::io(&seg.path, e))?;
        let allocated = file.metadata().map_err(|e| LogError::io(&seg.path, e))?.len();
        let index = seg.index_snapshot();
        let chunk = prealloc_chunk(shared.config.segment_bytes);
        let mut w = Writer {
            len: seg.durable_len(),
            allocated,
            chunk,
            filler: Filler::start(),
            next: seg.end(),
            last_indexed: index.last().map(|e| e.position as u64),
            shared,
            seg,
            file,
            pending: Vec::new(),
            pending_ts: (0, 0),
            last_sync: Instant::now(),
            _lock: lock,
            admit,
        };
        w.preallocate();
        Ok(w)
    }

    /// Asks the filler to extend the active segment's file with written, synced zeros when
    /// fewer than half a chunk are left ahead of the records and no fill is under way.
    fn preallocate(&mut self) {
        self.collect(false);
        if self.chunk == 0 || self.filler.in_flight.is_some() || self.allocated >= self.len + self.chunk / 2 {
            return;
        }
        let file = match self.file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "could not preallocate the log segment");
                self.chunk = 0;
                return;
            }
        };
        let (from, to) = (self.allocated.max(self.len), self.len + self.chunk);
        self.filler.send(Fill { file, from, to });
    }

    /// Takes the result of the fill under way, if it is done (or, with `wait`, once it is).
    fn collect(&mut self, wait: bool) {
        match self.filler.result(wait) {
            Some(Ok(to)) => self.allocated = self.allocated.max(to),
            Some(Err(e)) => {
                // Only the speed-up is lost: records are written by position either way.
                tracing::warn!(error = %e, "could not preallocate the log segment");
                self.chunk = 0;
            }
            None => {}
        }
    }

    /// Cuts the active segment's file to its records (a sealed segment, a clean close).
    fn cut_tail(&mut self) -> std::io::Result<()> {
        self.collect(true);
        if self.file.metadata()?.len() > self.len {
            self.file.set_len(self.len)?;
            self.file.sync_all()?;
        }
        self.allocated = self.len;
        Ok(())
    }

    fn policy(&self) -> FsyncPolicy {
        self.shared.config.fsync
    }

    /// Writes one group: `first`, then whatever else is queued (up to `MAX_GROUP_BYTES`), framed
    /// into one buffer, written with one `write` and synced once (per the policy); then publishes
    /// and answers. Sets `closing` when a `Close` is met.
    fn group(&mut self, first: Command, rx: &mut mpsc::Receiver<Command>, buf: &mut Vec<u8>, closing: &mut bool) {
        let mut group: Vec<(Reply, Range<Offset>)> = Vec::new();
        let mut flushes: Vec<oneshot::Sender<Result<(), LogError>>> = Vec::new();
        let mut tick = false;
        buf.clear();
        let start_len = self.len;
        let start_next = self.next;
        let ts = now_ms();
        if let Some(a) = &self.admit {
            a.begin();
        }
        let mut cmd = Some(first);
        while let Some(c) = cmd.take() {
            match c {
                // The byte budget is returned when `budget` drops at the end of this arm:
                // the payload has been copied into the write buffer.
                Command::Append {
                    mut payloads,
                    reply,
                    budget,
                } => {
                    let _budget = budget;
                    if let Some(why) = self.failed() {
                        let _ = reply.send(Err(LogError::Failed(why)));
                    } else {
                        let from = self.next;
                        if let Some(a) = &self.admit {
                            payloads.retain_mut(|p| a.admit(p));
                        }
                        for p in &payloads {
                            let pos = self.len + buf.len() as u64;
                            self.maybe_index(pos);
                            record::encode(self.next, ts, p, buf);
                            self.next = Offset(self.next.0 + 1);
                        }
                        group.push((reply, from..self.next));
                    }
                }
                Command::Flush { reply } => flushes.push(reply),
                Command::Tick => tick = true,
                Command::Close => *closing = true,
                Command::Retention { reply } => {
                    let r = super::retention(&self.shared);
                    if let Err(e) = &r {
                        tracing::warn!(error = %e, "log retention failed");
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
            }
            if buf.len() < MAX_GROUP_BYTES && !*closing {
                cmd = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            // Records never go where the filler may still be writing zeros.
            if self.filler.in_flight.is_some() && self.len + buf.len() as u64 > self.allocated {
                self.collect(true);
            }
            if let Err(e) = self.file.write_all_at(buf, self.len) {
                self.undo(start_len, start_next, e, group);
                return;
            }
            self.len += buf.len() as u64;
            self.allocated = self.allocated.max(self.len);
            let m = &self.shared.metrics;
            m.appended_records.inc_by(self.next.0 - start_next.0);
            m.appended_bytes.inc_by(buf.len() as u64);
            m.group_records.observe((self.next.0 - start_next.0) as f64);
            if self.pending_ts.0 == 0 {
                self.pending_ts.0 = ts;
            }
            self.pending_ts.1 = ts;
        }
        self.pending.extend(group);
        let sync_now = match self.policy() {
            FsyncPolicy::Always => !self.pending.is_empty(),
            FsyncPolicy::Interval(every) => {
                !flushes.is_empty() || ((tick || !self.pending.is_empty()) && self.last_sync.elapsed() >= every)
            }
            FsyncPolicy::Never => !flushes.is_empty(),
        };
        let result = if sync_now { self.sync() } else { Ok(()) };
        if result.is_ok() && (sync_now || self.policy() == FsyncPolicy::Never) {
            self.publish();
        }
        for f in flushes {
            let _ = f.send(result.clone());
        }
        if result.is_ok()
            && self.len >= self.shared.config.segment_bytes
            && self.pending.is_empty()
            && let Err(e) = self.roll()
        {
            self.shared.fail(e.to_string());
        }
        // Every appender of the group has its answer: have the file extended for the next.
        if result.is_ok() {
            self.preallocate();
        }
    }

    /// Closed, or every handle is gone: makes what was written durable, cuts the preallocated
    /// tail, releases the directory lock and wakes the tails so they see the log is closed.
    fn finish(&mut self) {
        if !self.pending.is_empty() && self.sync().is_ok() {
            self.publish();
        }
        // A cleanly closed log keeps no preallocated tail: its files hold exactly its records.
        if self.failed().is_none()
            && let Err(e) = self.cut_tail()
        {
            tracing::warn!(error = %e, "could not cut the preallocated tail at close");
        }
        self._lock = None;
        self.shared.closed.store(true, std::sync::atomic::Ordering::Release);
        self.shared.durable.send_modify(|_| {});
        self.shared.thresholds.close();
    }

    fn failed(&self) -> Option<String> {
        self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn maybe_index(&mut self, pos: u64) {
        if self
            .last_indexed
            .is_none_or(|at| pos - at >= self.shared.config.index_interval_bytes)
        {
            self.seg.push_index(IndexEntry {
                relative: (self.next.0 - self.seg.base.0) as u32,
                position: pos as u32,
            });
            self.last_indexed = Some(pos);
        }
    }

    /// Cuts a failed write back out of the file and answers its appenders with the error.
    fn undo(&mut self, len: u64, next: Offset, e: std::io::Error, group: Vec<(Reply, Range<Offset>)>) {
        let err = LogError::io(&self.seg.path, e);
        if let Some(a) = &self.admit {
            a.undo();
        }
        self.collect(true);
        if let Err(e2) = self.file.set_len(len) {
            self.shared
                .fail(format!("a write failed ({err}) and could not be undone ({e2})"));
        }
        self.len = len;
        self.allocated = len;
        self.next = next;
        for (reply, _) in group {
            let _ = reply.send(Err(err.clone()));
        }
    }

    fn sync(&mut self) -> Result<(), LogError> {
        let started = Instant::now();
        let r = self.file.sync_data();
        self.shared
            .metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.last_sync = Instant::now();
        if let Err(e) = r {
            let err = LogError::io(&self.seg.path, e);
            self.shared.fail(format!("fdatasync failed: {err}"));
            for (reply, _) in self.pending.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            return Err(err);
        }
        Ok(())
    }

    /// Makes everything written visible to readers and answers the waiting appenders.
    fn publish(&mut self) {
        self.seg
            .publish(self.len, self.next, self.pending_ts.0, self.pending_ts.1);
        self.pending_ts = (0, 0);
        self.shared.durable.send_replace(self.next.0);
        self.shared.thresholds.reached(self.next.0);
        for (reply, range) in self.pending.drain(..) {
            let _ = reply.send(Ok(range));
        }
    }

    /// Seals the active segment (cut to its records, its index written whole) and starts a new
    /// one.
    fn roll(&mut self) -> Result<(), LogError> {
        self.cut_tail().map_err(|e| LogError::io(&self.seg.path, e))?;
        segment::write_index(&self.seg.index_path, &self.seg.index_snapshot())
            .map_err(|e| LogError::io(&self.seg.index_path, e))?;
        let dir = self.shared.config.dir.clone();
        let seg = Arc::new(Segment::create(&dir, self.next)?);
        sync_dir(&dir)?;
        self.file = OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .map_err(|e| LogError::io(&seg.path, e))?;
        self.allocated = 0;
        self.shared
            .segments
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(seg.clone());
        self.seg = seg;
        self.len = 0;
        self.last_indexed = None;
        Ok(())
    }
}

/// The writer and the queue it drains, behind one lock: whoever holds the lock writes.
///
/// Leader and followers, as Postgres flushes its WAL: an appender on a multi-threaded runtime
/// that finds the lock free writes the queue itself — its own append and whatever is queued
/// before it — and syncs, on the worker it runs on, until its own append is answered, as a
/// Postgres backend flushes the WAL for its own commit. One that finds it held leaves its append
/// queued and rings the writer thread, which takes the lock as soon as it is free and writes
/// what is left. An idle log's lone append thus costs one `write` and one `fdatasync`, with no
/// hand-over to another thread and back (two wake-ups, ~25 µs on this kind of VM); under load
/// the writer thread takes the groups. Every command goes through the queue, so the log's order
/// is the queue's order whoever writes it.
///
/// The leader blocks its worker for the sync, and the lock makes it one worker at a time; a
/// runtime with a single worker never leads (its appends go to the writer thread), so at least
/// one worker always stays free for reads and other connections, even while a disk stalls. Not
/// `block_in_place`: that hands the worker's core to another thread before every sync, a
/// `futex` wake on the acknowledgement's path (~12–17 µs traced here) and a different thread
/// for each write — the acknowledged-write bench read 0.98–1.05× of autocommit upserts with it
/// at 1 writer against 1.12–1.18× without (`CACHESYNC_BENCH_ONLY=acks`, two runs each).
pub struct Pipe {
    core: Mutex<Core>,
    thread: OnceLock<std::thread::Thread>,
}

struct Core {
    /// `None` once the log is closed.
    writer: Option<Writer>,
    rx: mpsc::Receiver<Command>,
    buf: Vec<u8>,
    /// A `Close` was met, or every sender is gone.
    closing: bool,
}

impl Core {
    /// Writes groups while commands are queued, stopping early once `done` says so; returns
    /// how many it wrote.
    fn drain(&mut self, mut done: impl FnMut() -> bool) -> u64 {
        let Core {
            writer: Some(writer),
            rx,
            buf,
            closing,
        } = self
        else {
            return 0;
        };
        let mut groups = 0;
        while !*closing {
            let first = match rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    *closing = true;
                    break;
                }
            };
            writer.group(first, rx, buf, closing);
            groups += 1;
            if done() {
                break;
            }
        }
        groups
    }

    /// Ends writing: the writer finishes (see [`Writer::finish`]) and is dropped, and whatever
    /// is still queued is dropped unanswered (its appenders see `Closed`).
    fn close(&mut self) {
        if let Some(mut w) = self.writer.take() {
            w.finish();
        }
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }
}

impl Pipe {
    /// Starts the writer thread over `writer` and its queue.
    pub fn start(
        writer: Writer,
        rx: mpsc::Receiver<Command>,
    ) -> std::io::Result<(Arc<Pipe>, std::thread::JoinHandle<()>)> {
        let pipe = Arc::new(Pipe {
            core: Mutex::new(Core {
                writer: Some(writer),
                rx,
                buf: Vec::with_capacity(1024 * 1024),
                closing: false,
            }),
            thread: OnceLock::new(),
        });
        let p = pipe.clone();
        let handle = std::thread::Builder::new()
            .name("cachesync-log-writer".into())
            .spawn(move || p.run())?;
        // Set before any handle exists that could ring.
        let _ = pipe.thread.set(handle.thread().clone());
        Ok((pipe, handle))
    }

    /// Wakes the writer thread to write what is queued (or to see that every sender is gone).
    pub fn ring(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| Self::poisoned(p.into_inner()))
    }

    /// A writer panicked mid-group: what it had framed is in an unknown state, so the log fails.
    fn poisoned(core: MutexGuard<'_, Core>) -> MutexGuard<'_, Core> {
        if let Some(w) = &core.writer {
            w.shared.fail("a log writer panicked while writing".to_string());
        }
        core
    }

    /// The writer thread: writes whatever is queued whenever it is rung, until the log closes.
    fn run(self: Arc<Self>) {
        loop {
            {
                let mut core = self.lock();
                core.drain(|| false);
                if core.closing {
                    core.close();
                    return;
                }
            }
            std::thread::park();
        }
    }

    /// Leads: writes the queue on this thread until `done` (the caller's own append is
    /// answered) or the queue is empty. False when another writer holds the lock or this runtime
    /// has no second worker to keep serving meanwhile; the caller then rings the writer thread.
    pub fn try_lead(&self, done: impl FnMut() -> bool) -> bool {
        let spare_worker = tokio::runtime::Handle::try_current().is_ok_and(|h| {
            h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread && h.metrics().num_workers() >= 2
        });
        if !spare_worker {
            return false;
        }
        let mut core = match self.core.try_lock() {
            Ok(core) => core,
            Err(TryLockError::Poisoned(p)) => Self::poisoned(p.into_inner()),
            Err(TryLockError::WouldBlock) => return false,
        };
        if core.closing || core.writer.is_none() {
            return false;
        }
        let groups = core.drain(done);
        if let Some(w) = &core.writer {
            w.shared.metrics.led_groups.inc_by(groups);
        }
        let more = core.closing || !core.rx.is_empty();
        drop(core);
        if more {
            self.ring();
        }
        true
    }
}

/// Largest buffer of zeros a preallocation writes at once.
const ZERO_BUF: usize = 1024 * 1024;

/// One zero-fill: `[from, to)` of `file`, then `fdatasync`.
struct Fill {
    file: File,
    from: u64,
    to: u64,
}

/// The zero-filling thread and the one fill it may have under way. The writer never writes
/// records into a range being filled (it waits for the fill first), so the two never touch the
/// same bytes; the filler's `fdatasync` makes the zeros and the new size durable, after which
/// the writer's own syncs carry data only.
struct Filler {
    tx: std::sync::mpsc::Sender<Fill>,
    done: std::sync::mpsc::Receiver<Result<u64, String>>,
    /// The end of the fill under way.
    in_flight: Option<u64>,
}

impl Filler {
    fn start() -> Filler {
        let (tx, rx) = std::sync::mpsc::channel::<Fill>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("cachesync-log-fill".into())
            .spawn(move || {
                let zeros = vec![0u8; ZERO_BUF];
                // Ends when the writer (and with it `tx`) is gone.
                for fill in rx {
                    let _ = done_tx.send(fill.run(&zeros).map_err(|e| e.to_string()));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to preallocate the log with; appending instead");
        }
        Filler {
            tx,
            done,
            in_flight: None,
        }
    }

    fn send(&mut self, fill: Fill) {
        let to = fill.to;
        if self.tx.send(fill).is_ok() {
            self.in_flight = Some(to);
        }
    }

    fn result(&mut self, wait: bool) -> Option<Result<u64, String>> {
        self.in_flight?;
        let r = if wait {
            self.done
                .recv()
                .map_err(|_| "the preallocation thread is gone".to_string())
        } else {
            match self.done.try_recv() {
                Ok(r) => Ok(r),
                Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => Err("the preallocation thread is gone".to_string()),
            }
        };
        self.in_flight = None;
        Some(r.and_then(|r| r))
    }
}

impl Fill {
    fn run(&self, zeros: &[u8]) -> std::io::Result<u64> {
        let mut at = self.from;
        while at < self.to {
            let n = ((self.to - at) as usize).min(zeros.len());
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file.sync_data()?;
        Ok(self.to)
    }
}

/// How far ahead of its records a segment file is extended: an eighth of the segment size,
/// between 64 KiB and 2 MiB, and never more than a whole segment (one `fdatasync` that journals
/// a size change per chunk; a smaller fill competes less with the writer's own syncs).
pub fn prealloc_chunk(segment_bytes: u64) -> u64 {
    (segment_bytes / 8).clamp(64 * 1024, 2 * 1024 * 1024).min(segment_bytes)
}
