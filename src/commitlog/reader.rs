//! Reading the log: positioned reads of durable records, and [`Tail`], which follows the log
//! from an offset and waits (on a watch channel, not by polling) for records to become durable.
//!
//! A tail that wants a batch rather than every record ([`Tail::until_available`]) registers the
//! offset it waits for with [`Thresholds`] instead, and is woken once, when the durable end
//! reaches it: the writer checks one atomic per publish and takes a lock only when a waiter is
//! due.
//!
//! A read finds the segment holding the offset, jumps to the nearest earlier sparse index entry,
//! and scans forward. A `Tail` remembers where it stopped (segment and file position), so a
//! consumer keeping up with the writer never consults the index.

use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, watch};

use super::record::{self, FrameError, HEADER_LEN};
use super::segment::Segment;
use super::{LogError, Offset, Shared};

/// Bytes read from a segment per I/O.
const READ_CHUNK: usize = 256 * 1024;

/// One durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: Offset,
    /// Append time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The record's bytes, shared with the other records of the same read (one buffer of up to
    /// `READ_CHUNK`, not an allocation and a copy per record): a consumer that keeps a payload
    /// (or a slice of it) past the batch it reads copies it, or it keeps the whole buffer alive.
    pub payload: Bytes,
}

/// A place inside a segment: the offset of the record starting at byte `pos`.
#[derive(Clone)]
struct Position {
    seg: Arc<Segment>,
    offset: Offset,
    pos: u64,
}

/// Reads records of `c.seg` from `c` onwards, skipping those below `from`, up to the segment's
/// durable end or the limits. Advances `c` past what it read or skipped.
fn read_segment(
    c: &mut Position,
    from: Offset,
    max_records: usize,
    max_bytes: usize,
    out: &mut Vec<Record>,
    bytes: &mut usize,
) -> Result<(), LogError> {
    let end = c.seg.end();
    let len = c.seg.durable_len();
    let corrupt = |pos: u64, detail: String| LogError::Corrupt {
        file: c.seg.path.clone(),
        position: pos,
        detail,
    };
    while c.offset < end && out.len() < max_records && *bytes < max_bytes {
        let want = (len - c.pos).min(READ_CHUNK as u64) as usize;
        if want == 0 {
            return Err(corrupt(c.pos, format!("segment ends before offset {end}")));
        }
        let mut chunk = Bytes::from(c.seg.read_at(c.pos, want)?);
        let mut at = 0usize;
        loop {
            if c.offset >= end || out.len() >= max_records || *bytes >= max_bytes {
                return Ok(());
            }
            match record::decode(&chunk[at..]) {
                Ok(f) => {
                    if f.offset != c.offset {
                        return Err(corrupt(
                            c.pos,
                            format!("record has offset {} where {} was expected", f.offset, c.offset),
                        ));
                    }
                    if f.offset >= from {
                        *bytes += f.payload.len();
                        out.push(Record {
                            offset: f.offset,
                            timestamp_ms: f.timestamp_ms,
                            payload: chunk.slice_ref(f.payload),
                        });
                    }
                    let n = f.len();
                    at += n;
                    c.pos += n as u64;
                    c.offset = Offset(c.offset.0 + 1);
                }
                Err(FrameError::Incomplete { needed }) => {
                    if at == 0 {
                        // A record larger than the chunk: read exactly it.
                        if c.pos + needed as u64 > len {
                            return Err(corrupt(c.pos, "record runs past the durable end of the segment".into()));
                        }
                        chunk = Bytes::from(c.seg.read_at(c.pos, needed.max(HEADER_LEN))?);
                        continue;
                    }
                    break; // refill from c.pos
                }
                Err(e) => return Err(corrupt(c.pos, format!("{e:?}"))),
            }
        }
    }
    Ok(())
}

/// Finds where `from` is and reads forward across segments.
fn read_from(
    shared: &Shared,
    hint: Option<Position>,
    from: Offset,
    max_records: usize,
    max_bytes: usize,
) -> Result<(Vec<Record>, Option<Position>), LogError> {
    let mut out = Vec::new();
    if from >= shared.end() || max_records == 0 {
        return Ok((out, hint));
    }
    let segs: Vec<Arc<Segment>> = shared.segments.read().unwrap_or_else(|p| p.into_inner()).clone();
    let start = segs.first().map_or(Offset(0), |s| s.base);
    if from < start {
        return Err(LogError::OffsetOutOfRange { requested: from, start });
    }
    let mut c = match hint {
        // The hint is only good while its segment is still in the log.
        Some(h) if h.offset == from && segs.iter().any(|s| Arc::ptr_eq(s, &h.seg)) => h,
        _ => {
            let i = segs.partition_point(|s| s.base <= from) - 1;
            let seg = segs[i].clone();
            let (offset, pos) = seg.locate(from);
            Position { seg, offset, pos }
        }
    };
    let mut bytes = 0usize;
    loop {
        if let Some(bad) = c.seg.corrupt()
            && (c.pos >= bad.position || c.offset >= c.seg.end())
        {
            return Err(LogError::Corrupt {
                file: c.seg.path.clone(),
                position: bad.position,
                detail: bad.detail,
            });
        }
        read_segment(&mut c, from, max_records, max_bytes, &mut out, &mut bytes)?;
        if out.len() >= max_records || bytes >= max_bytes || c.offset < c.seg.end() {
            break;
        }
        // This segment is exhausted; move on if a later one exists.
        let next = segs
            .iter()
            .position(|s| Arc::ptr_eq(s, &c.seg))
            .and_then(|i| segs.get(i + 1))
            .cloned();
        match next {
            Some(seg) if seg.base == c.offset => {
                c = Position {
                    offset: seg.base,
                    pos: 0,
                    seg,
                }
            }
            Some(seg) => {
                return Err(LogError::Corrupt {
                    file: c.seg.path.clone(),
                    position: c.pos,
                    detail: format!(
                        "segment ends at offset {} but the next one starts at {}",
                        c.offset, seg.base
                    ),
                });
            }
            None => break,
        }
    }
    Ok((out, Some(c)))
}

/// Reads up to `max_records` (and about `max_bytes` of payload) durable records from `from`.
pub fn read(shared: &Shared, from: Offset, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
    read_from(shared, None, from, max_records, max_bytes).map(|(r, _)| r)
}

/// A reader that follows the log.
pub struct Tail {
    shared: Arc<Shared>,
    next: Offset,
    hint: Option<Position>,
    rx: watch::Receiver<u64>,
}

impl Tail {
    pub(crate) fn new(shared: Arc<Shared>, from: Offset) -> Tail {
        let rx = shared.durable.subscribe();
        Tail {
            shared,
            next: from,
            hint: None,
            rx,
        }
    }

    /// The offset the next read starts at.
    pub fn position(&self) -> Offset {
        self.next
    }

    /// Moves the reader.
    pub fn seek(&mut self, to: Offset) {
        self.next = to;
        self.hint = None;
    }

    /// The durable records available now (possibly none).
    pub fn try_next(&mut self, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
        let (records, hint) = read_from(&self.shared, self.hint.take(), self.next, max_records, max_bytes)?;
        self.hint = hint;
        if let Some(last) = records.last() {
            self.next = Offset(last.offset.0 + 1);
        }
        Ok(records)
    }

    /// Waits until `n` records past this reader's position are durable. Unlike
    /// [`Tail::next`], which every append wakes, this wakes once: when the durable end reaches
    /// that offset. `Closed` when the log shuts down first.
    pub async fn until_available(&self, n: u64) -> Result<(), LogError> {
        let at = self.next.0.saturating_add(n);
        let waiter = self.shared.thresholds.register(at);
        // Registered before the end is read, and the writer publishes the end before it reads
        // the registrations (both behind a full fence): one of the two sees the other.
        fence(Ordering::SeqCst);
        loop {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(LogError::Closed);
            }
            if *self.shared.durable.borrow() >= at {
                return Ok(());
            }
            waiter.notify.notified().await;
        }
    }

    /// At least one record, waiting until one is durable. `Closed` once the log has shut down
    /// and everything durable has been read.
    pub async fn next(&mut self, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
        loop {
            self.rx.borrow_and_update();
            let records = self.try_next(max_records, max_bytes)?;
            if !records.is_empty() {
                return Ok(records);
            }
            if self.shared.closed.load(std::sync::atomic::Ordering::Acquire) {
                return Err(LogError::Closed);
            }
            if self.rx.changed().await.is_err() {
                return Err(LogError::Closed);
            }
        }
    }
}

/// Tails waiting for the durable end to reach an offset ([`Tail::until_available`]).
pub(crate) struct Thresholds {
    /// The lowest offset waited for; `u64::MAX` when none is.
    lowest: AtomicU64,
    waiting: Mutex<Vec<(u64, Arc<Notify>)>>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            lowest: AtomicU64::new(u64::MAX),
            waiting: Mutex::new(Vec::new()),
        }
    }
}

/// A registration, withdrawn when dropped (a waiter that gave up leaves nothing behind).
pub(crate) struct Waiter<'a> {
    thresholds: &'a Thresholds,
    notify: Arc<Notify>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut w = self.thresholds.lock();
        w.retain(|(_, n)| !Arc::ptr_eq(n, &self.notify));
        self.thresholds.set_lowest(&w);
    }
}

impl Thresholds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Arc<Notify>)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lowest offset a tail waits for (`u64::MAX` when none does).
    #[cfg(test)]
    pub(crate) fn lowest(&self) -> u64 {
        self.lowest.load(Ordering::SeqCst)
    }

    fn set_lowest(&self, w: &[(u64, Arc<Notify>)]) {
        let lowest = w.iter().map(|(at, _)| *at).min().unwrap_or(u64::MAX);
        self.lowest.store(lowest, Ordering::SeqCst);
    }

    fn register(&self, at: u64) -> Waiter<'_> {
        let notify = Arc::new(Notify::new());
        let mut w = self.lock();
        w.push((at, notify.clone()));
        self.set_lowest(&w);
        Waiter {
            thresholds: self,
            notify,
        }
    }

    /// The durable end is now `end` (already published): wakes the waiters it reached. Called
    /// by the writer after every publish.
    pub(crate) fn reached(&self, end: u64) {
        fence(Ordering::SeqCst);
        if end < self.lowest.load(Ordering::SeqCst) {
            return;
        }
        self.wake(|at| at <= end);
    }

    /// The log closed: wakes every waiter (each then finds it closed).
    pub(crate) fn close(&self) {
        fence(Ordering::SeqCst);
        self.wake(|_| true);
    }

    fn wake(&self, due: impl Fn(u64) -> bool) {
        let mut w = self.lock();
        w.retain(|(at, n)| {
            if due(*at) {
                // A stored permit: a waiter between its check and its wait still sees it.
                n.notify_one();
                false
            } else {
                true
            }
        });
        self.set_lowest(&w);
    }
}
