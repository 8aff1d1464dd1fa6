//! One segment: a `.log` file of framed records starting at its base offset, and a sparse
//! `.index` file of `(relative offset: u32 LE, file position: u32 LE)` pairs written every
//! `index_interval_bytes`. Readers use positional reads (`read_at`) on a shared handle, so any
//! number of them read concurrently, and never past the segment's durable length.
//!
//! The writer preallocates the active segment with written zeros ahead of its records, so a
//! scan that meets a zero byte where a record should start, and zeros from there to the end of
//! the file, has met the end of the data, not damage: that tail is left in place for the writer
//! (or cut, on a sealed segment).
//!
//! Opening scans records to validate them: the active segment entirely (torn tail → truncate;
//! bad bytes *followed by valid records* → that is corruption of acknowledged data, reported,
//! never silently cut), a sealed segment only where its index is missing or invalid (rebuilt
//! from the scan) and at its tail. Corruption found in a sealed segment is remembered and
//! reported to readers that reach it, with file and position.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::record::{self, FrameError, HEADER_LEN};
use super::{LogError, Offset};

/// Bytes read per scan step.
const SCAN_CHUNK: usize = 1024 * 1024;

/// `00000000000000000042.log`
pub fn log_name(base: Offset) -> String {
    format!("{:020}.log", base.0)
}

pub fn index_name(base: Offset) -> String {
    format!("{:020}.index", base.0)
}

/// The base offset named by a segment file name, if it is one.
pub fn parse_log_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok().map(Offset))?
}

/// One sparse index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative: u32,
    pub position: u32,
}

/// Where validation of a segment's bytes stopped, if not at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptAt {
    pub position: u64,
    pub expected_offset: Offset,
    pub detail: String,
}

/// A segment as readers and the writer share it.
#[derive(Debug)]
pub struct Segment {
    pub base: Offset,
    pub path: PathBuf,
    pub index_path: PathBuf,
    file: File,
    index: RwLock<Vec<IndexEntry>>,
    /// Bytes that hold durable records; readers stop here.
    durable_len: AtomicU64,
    /// Offset after the last durable record.
    end: AtomicU64,
    first_ts: AtomicU64,
    last_ts: AtomicU64,
    /// Where a sealed segment's bytes stop being valid, if they do.
    corrupt: RwLock<Option<CorruptAt>>,
}

/// What a validating scan found.
#[derive(Debug)]
pub struct Scan {
    /// Position after the last valid record.
    pub valid_len: u64,
    pub next_offset: Offset,
    pub first_ts: u64,
    pub last_ts: u64,
    pub index: Vec<IndexEntry>,
    /// Why the scan stopped before the end of the file (`None` = it reached the end cleanly).
    pub stopped: Option<(u64, String)>,
    /// Bytes of preallocated zeros after the last record (part of a clean end).
    pub zero_tail: u64,
}

/// Scans records from `start` (a record boundary holding `start_offset`), validating each one,
/// building index entries every `interval` bytes.
pub fn scan(
    file: &File,
    base: Offset,
    start: u64,
    start_offset: Offset,
    file_len: u64,
    interval: u64,
    mut index: Vec<IndexEntry>,
) -> std::io::Result<Scan> {
    let mut pos = start;
    let mut expected = start_offset;
    let (mut first_ts, mut last_ts) = (0, 0);
    let mut last_indexed = index.last().map(|e| e.position as u64);
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_at = pos;
    let mut stopped = None;
    let mut zero_tail = 0;
    while pos < file_len {
        let rel = (pos - buf_at) as usize;
        let frame = match record::decode(&buf[rel.min(buf.len())..]) {
            Ok(f) => f,
            Err(FrameError::Incomplete { needed }) => {
                if pos + needed as u64 > file_len {
                    stopped = Some((
                        pos,
                        format!("record at byte {pos} runs past the end of the file ({file_len} bytes)"),
                    ));
                    break;
                }
                // Refill from `pos` with at least `needed` bytes.
                let want = needed.max(SCAN_CHUNK).min((file_len - pos) as usize);
                buf.resize(want, 0);
                file.read_exact_at(&mut buf, pos)?;
                buf_at = pos;
                continue;
            }
            Err(FrameError::BadMagic(0)) if zeros_to_end(file, pos, file_len)? => {
                zero_tail = file_len - pos;
                break;
            }
            Err(e) => {
                stopped = Some((pos, describe(e)));
                break;
            }
        };
        if frame.offset != expected {
            stopped = Some((
                pos,
                format!(
                    "record at byte {pos} has offset {} where {} was expected",
                    frame.offset, expected
                ),
            ));
            break;
        }
        if last_indexed.is_none_or(|at| pos - at >= interval) {
            index.push(IndexEntry {
                relative: (expected.0 - base.0) as u32,
                position: pos as u32,
            });
            last_indexed = Some(pos);
        }
        if first_ts == 0 {
            first_ts = frame.timestamp_ms;
        }
        last_ts = frame.timestamp_ms;
        pos += frame.len() as u64;
        expected = Offset(expected.0 + 1);
    }
    Ok(Scan {
        valid_len: pos,
        next_offset: expected,
        first_ts,
        last_ts,
        index,
        stopped,
        zero_tail,
    })
}

/// Whether every byte from `from` to the end of the file is zero (a preallocated tail).
fn zeros_to_end(file: &File, from: u64, file_len: u64) -> std::io::Result<bool> {
    let mut chunk = vec![0u8; SCAN_CHUNK.min((file_len - from) as usize)];
    let mut at = from;
    while at < file_len {
        let n = ((file_len - at) as usize).min(chunk.len());
        file.read_exact_at(&mut chunk[..n], at)?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

fn describe(e: FrameError) -> String {
    match e {
        FrameError::BadMagic(b) => format!("bad record magic 0x{b:02X}"),
        FrameError::TooLarge(n) => format!("record length {n} exceeds the limit"),
        FrameError::BadCrc => "record checksum mismatch".to_string(),
        FrameError::Incomplete { .. } => "truncated record".to_string(),
    }
}

/// Whether any valid record frame starts anywhere after `from` (distinguishes a torn tail,
/// which has none, from corruption in the middle of acknowledged data). Reads in chunks; a
/// candidate frame is read whole only when its magic byte and length are plausible.
pub fn valid_frame_after(file: &File, from: u64, file_len: u64) -> std::io::Result<Option<u64>> {
    let mut chunk = vec![0u8; SCAN_CHUNK];
    let mut at = from + 1;
    while at < file_len {
        let n = ((file_len - at) as usize).min(SCAN_CHUNK);
        file.read_exact_at(&mut chunk[..n], at)?;
        for (i, &b) in chunk[..n].iter().enumerate() {
            let pos = at + i as u64;
            if b != record::MAGIC || pos + HEADER_LEN as u64 > file_len {
                continue;
            }
            let mut head = [0u8; HEADER_LEN];
            file.read_exact_at(&mut head, pos)?;
            let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as u64;
            if len as usize > record::MAX_PAYLOAD || pos + HEADER_LEN as u64 + len > file_len {
                continue;
            }
            let mut frame = vec![0u8; HEADER_LEN + len as usize];
            file.read_exact_at(&mut frame, pos)?;
            if record::decode(&frame).is_ok() {
                return Ok(Some(pos));
            }
        }
        at += n as u64;
    }
    Ok(None)
}

fn read_index(path: &Path, file_len: u64) -> Option<Vec<IndexEntry>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() % 8 != 0 {
        return None;
    }
    let mut out: Vec<IndexEntry> = Vec::with_capacity(bytes.len() / 8);
    for c in bytes.chunks_exact(8) {
        let e = IndexEntry {
            relative: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            position: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        };
        if let Some(prev) = out.last()
            && (e.relative <= prev.relative || e.position <= prev.position)
        {
            return None;
        }
        if e.position as u64 >= file_len {
            return None;
        }
        out.push(e);
    }
    Some(out)
}

/// Writes a whole index file atomically (temp file, fsync, rename).
pub fn write_index(path: &Path, index: &[IndexEntry]) -> std::io::Result<()> {
    let tmp = path.with_extension("index.tmp");
    let mut f = File::create(&tmp)?;
    let mut bytes = Vec::with_capacity(index.len() * 8);
    for e in index {
        bytes.extend_from_slice(&e.relative.to_le_bytes());
        bytes.extend_from_slice(&e.position.to_le_bytes());
    }
    f.write_all(&bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}

impl Segment {
    fn new(base: Offset, dir: &Path, file: File, scan: &Scan) -> Segment {
        Segment {
            base,
            path: dir.join(log_name(base)),
            index_path: dir.join(index_name(base)),
            file,
            index: RwLock::new(scan.index.clone()),
            durable_len: AtomicU64::new(scan.valid_len),
            end: AtomicU64::new(scan.next_offset.0),
            first_ts: AtomicU64::new(scan.first_ts),
            last_ts: AtomicU64::new(scan.last_ts),
            corrupt: RwLock::new(None),
        }
    }

    /// Creates an empty segment file for `base` (the caller fsyncs the directory).
    pub fn create(dir: &Path, base: Offset) -> Result<Segment, LogError> {
        let path = dir.join(log_name(base));
        OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| LogError::io(&path, e))?;
        let file = File::open(&path).map_err(|e| LogError::io(&path, e))?;
        let empty = Scan {
            valid_len: 0,
            next_offset: base,
            first_ts: 0,
            last_ts: 0,
            index: Vec::new(),
            stopped: None,
            zero_tail: 0,
        };
        Ok(Segment::new(base, dir, file, &empty))
    }

    /// Opens a sealed segment; a missing or invalid index is rebuilt (and, unless `read_only`,
    /// written back).
    pub fn open_sealed(dir: &Path, base: Offset, interval: u64, read_only: bool) -> Result<Segment, LogError> {
        let path = dir.join(log_name(base));
        let file = File::open(&path).map_err(|e| LogError::io(&path, e))?;
        let len = file.metadata().map_err(|e| LogError::io(&path, e))?.len();
        let index_path = dir.join(index_name(base));
        let (scan, rebuilt) = match read_index(&index_path, len) {
            // Trust the index; validate from its last entry to the end.
            Some(index) if !index.is_empty() => {
                let last = *index.last().expect("not empty");
                let s = scan(
                    &file,
                    base,
                    last.position as u64,
                    Offset(base.0 + last.relative as u64),
                    len,
                    interval,
                    index,
                )
                .map_err(|e| LogError::io(&path, e))?;
                (s, false)
            }
            _ => (
                scan(&file, base, 0, base, len, interval, Vec::new()).map_err(|e| LogError::io(&path, e))?,
                true,
            ),
        };
        if rebuilt && scan.stopped.is_none() && !read_only {
            write_index(&index_path, &scan.index).map_err(|e| LogError::io(&index_path, e))?;
        }
        if scan.zero_tail > 0 && scan.stopped.is_none() && !read_only {
            // Sealed segments are cut to their records before the next one starts; a zero tail
            // here is preallocation that outlived a crash at that moment.
            let w = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| LogError::io(&path, e))?;
            w.set_len(scan.valid_len)
                .and_then(|()| w.sync_all())
                .map_err(|e| LogError::io(&path, e))?;
        }
        let seg = Segment::new(base, dir, file, &scan);
        if scan.valid_len > 0 {
            // A scan from the last index entry saw only the tail; the first record has the
            // segment's first timestamp.
            seg.first_ts
                .store(seg.read_first_ts().unwrap_or(scan.first_ts), Ordering::Relaxed);
        }
        if let Some((position, detail)) = scan.stopped {
            *seg.corrupt.write().unwrap_or_else(|p| p.into_inner()) = Some(CorruptAt {
                position,
                expected_offset: scan.next_offset,
                detail,
            });
        }
        Ok(seg)
    }

    /// Opens the active (last) segment: validates every record, truncates a torn tail, and
    /// refuses to open (an error, not a panic) when valid records follow bad bytes.
    pub fn open_active(
        dir: &Path,
        base: Offset,
        interval: u64,
        read_only: bool,
    ) -> Result<(Segment, Option<u64>), LogError> {
        let path = dir.join(log_name(base));
        let file = File::open(&path).map_err(|e| LogError::io(&path, e))?;
        let len = file.metadata().map_err(|e| LogError::io(&path, e))?.len();
        let s = scan(&file, base, 0, base, len, interval, Vec::new()).map_err(|e| LogError::io(&path, e))?;
        let mut truncated = None;
        if let Some((position, detail)) = &s.stopped {
            if let Some(at) = valid_frame_after(&file, *position, len).map_err(|e| LogError::io(&path, e))? {
                return Err(LogError::Corrupt {
                    file: path.clone(),
                    position: *position,
                    detail: format!(
                        "{detail}, but a valid record follows at byte {at}: acknowledged records may be damaged; move the segment aside to start without it"
                    ),
                });
            }
            if !read_only {
                let w = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| LogError::io(&path, e))?;
                w.set_len(*position).map_err(|e| LogError::io(&path, e))?;
                w.sync_all().map_err(|e| LogError::io(&path, e))?;
            }
            truncated = Some(len - position);
        }
        Ok((Segment::new(base, dir, file, &s), truncated))
    }

    fn read_first_ts(&self) -> Option<u64> {
        let mut head = [0u8; HEADER_LEN];
        self.file.read_exact_at(&mut head, 0).ok()?;
        Some(u64::from_le_bytes(head[17..25].try_into().ok()?))
    }

    pub fn durable_len(&self) -> u64 {
        self.durable_len.load(Ordering::Acquire)
    }

    /// Offset after the last durable record.
    pub fn end(&self) -> Offset {
        Offset(self.end.load(Ordering::Acquire))
    }

    pub fn first_ts(&self) -> u64 {
        self.first_ts.load(Ordering::Relaxed)
    }

    pub fn last_ts(&self) -> u64 {
        self.last_ts.load(Ordering::Relaxed)
    }

    pub fn corrupt(&self) -> Option<CorruptAt> {
        self.corrupt.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes records up to `end` (in `len` bytes) visible to readers.
    pub fn publish(&self, len: u64, end: Offset, first_ts: u64, last_ts: u64) {
        if self.first_ts.load(Ordering::Relaxed) == 0 {
            self.first_ts.store(first_ts, Ordering::Relaxed);
        }
        if last_ts != 0 {
            self.last_ts.store(last_ts, Ordering::Relaxed);
        }
        self.durable_len.store(len, Ordering::Release);
        self.end.store(end.0, Ordering::Release);
    }

    pub fn push_index(&self, e: IndexEntry) {
        self.index.write().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    pub fn index_snapshot(&self) -> Vec<IndexEntry> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The greatest indexed (offset, position) at or before `offset`.
    pub fn locate(&self, offset: Offset) -> (Offset, u64) {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let rel = offset.0.saturating_sub(self.base.0);
        let i = index.partition_point(|e| (e.relative as u64) <= rel);
        if i == 0 {
            (self.base, 0)
        } else {
            let e = index[i - 1];
            (Offset(self.base.0 + e.relative as u64), e.position as u64)
        }
    }

    /// Reads `len` bytes at `pos` (within the durable length).
    pub fn read_at(&self, pos: u64, len: usize) -> Result<Vec<u8>, LogError> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, pos)
            .map_err(|e| LogError::io(&self.path, e))?;
        Ok(buf)
    }

    /// Bytes of the `.log` and `.index` files on disk.
    pub fn disk_bytes(&self) -> u64 {
        let idx = std::fs::metadata(&self.index_path).map(|m| m.len()).unwrap_or(0);
        self.durable_len() + idx
    }
}
