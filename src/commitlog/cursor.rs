//! Named, durable consumer positions. A cursor's position is the next offset its consumer will
//! read: everything below it has been handled.
//!
//! `cursors/NAME.cursor` holds two fixed-size slots (`CSC2`, a sequence number, the offset,
//! CRC32C); a commit overwrites the older slot in place and `fdatasync`s, so after a crash the
//! file holds the old or the new position — a torn slot fails its checksum and the other slot
//! wins — and a commit never needs a new disk block. That matters when the disk is full: the
//! write-behind flusher must still record its progress to drain what was acknowledged. The file
//! is created when the cursor is opened, atomically (temp file, fsync, rename, fsync of the
//! directory). A format-1
//! file (one `CSC1` record, from earlier builds) is read and replaced on the next commit.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{LogError, Offset, Shared, sync_dir};

const MAGIC_V1: &[u8; 4] = b"CSC1";
const MAGIC: &[u8; 4] = b"CSC2";
/// Bytes of one slot: magic, sequence, offset, CRC32C of the first 20 bytes.
const SLOT: usize = 24;

/// One consumer's durable position.
#[derive(Debug)]
pub struct Cursor {
    pub name: String,
    /// Whether retention must keep records this cursor has not passed.
    pub required: bool,
    position: AtomicU64,
    path: PathBuf,
    dir: PathBuf,
    /// The open two-slot file and the sequence number of its newest slot; `None` until the
    /// first commit of this process has made sure the file has the two-slot format.
    write: Mutex<Option<(File, u64)>>,
}

fn slot(seq: u64, offset: Offset) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[..4].copy_from_slice(MAGIC);
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12..20].copy_from_slice(&offset.0.to_le_bytes());
    let crc = crc32c::crc32c(&b[..20]);
    b[20..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A slot's sequence and offset, when it is whole.
fn read_slot(b: &[u8]) -> Option<(u64, Offset)> {
    if b.len() != SLOT || &b[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[20..24].try_into().ok()?);
    if crc32c::crc32c(&b[..20]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(b[4..12].try_into().ok()?);
    let off = u64::from_le_bytes(b[12..20].try_into().ok()?);
    Some((seq, Offset(off)))
}

impl Cursor {
    /// The next offset to handle.
    pub fn position(&self) -> Offset {
        Offset(self.position.load(Ordering::Acquire))
    }

    /// Durably records that everything below `offset` has been handled (blocking I/O).
    pub fn commit(&self, offset: Offset) -> Result<(), LogError> {
        let mut guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.prepare()?);
        }
        let (file, seq) = guard.as_mut().expect("prepared above");
        let next = *seq + 1;
        let at = (next % 2) * SLOT as u64;
        let written = file
            .write_all_at(&slot(next, offset), at)
            .and_then(|_| file.sync_data());
        if let Err(e) = written {
            // The slot may be torn: the other one still holds the last committed position.
            return Err(LogError::io(&self.path, e));
        }
        *seq = next;
        self.position.store(offset.0, Ordering::Release);
        Ok(())
    }

    /// Opens the two-slot file, creating it (or converting a format-1 file) atomically with the
    /// current position in slot 0.
    fn prepare(&self) -> Result<(File, u64), LogError> {
        let io = |e| LogError::io(&self.path, e);
        if let Ok(bytes) = std::fs::read(&self.path)
            && bytes.len() == 2 * SLOT
        {
            let seq = [read_slot(&bytes[..SLOT]), read_slot(&bytes[SLOT..])]
                .into_iter()
                .flatten()
                .map(|(seq, _)| seq)
                .max();
            if let Some(seq) = seq {
                let file = std::fs::OpenOptions::new().write(true).open(&self.path).map_err(io)?;
                return Ok((file, seq));
            }
        }
        let mut bytes = Vec::with_capacity(2 * SLOT);
        bytes.extend_from_slice(&slot(0, self.position()));
        bytes.extend_from_slice(&[0u8; SLOT]);
        let tmp = self.path.with_extension("cursor.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(io)?;
        sync_dir(&self.dir)?;
        let file = std::fs::OpenOptions::new().write(true).open(&self.path).map_err(io)?;
        Ok((file, 0))
    }

    /// `commit` on the blocking pool, for async callers.
    pub async fn commit_async(self: &Arc<Self>, offset: Offset) -> Result<(), LogError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.commit(offset))
            .await
            .map_err(|e| LogError::Failed(e.to_string()))?
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        && !name.starts_with('.')
}

/// Reads a cursor file: `Ok(None)` when absent.
pub fn read_file(path: &std::path::Path) -> Result<Option<Offset>, LogError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(path, e)),
    };
    let bad = |detail: &str| LogError::Corrupt {
        file: path.to_path_buf(),
        position: 0,
        detail: detail.to_string(),
    };
    if bytes.len() == 2 * SLOT {
        // The newest whole slot; a torn one fails its checksum.
        return [read_slot(&bytes[..SLOT]), read_slot(&bytes[SLOT..])]
            .into_iter()
            .flatten()
            .max_by_key(|(seq, _)| *seq)
            .map(|(_, off)| Some(off))
            .ok_or_else(|| bad("neither cursor slot is whole"));
    }
    if bytes.len() != 16 || &bytes[..4] != MAGIC_V1 {
        return Err(bad("not a cursor file"));
    }
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if crc32c::crc32c(&bytes[..12]) != crc {
        return Err(bad("cursor checksum mismatch"));
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&bytes[4..12]);
    Ok(Some(Offset(u64::from_le_bytes(off))))
}

/// The cursor named `name`, loaded from disk or new at the log's start.
pub(crate) fn open(shared: &Shared, name: &str, required: bool) -> Result<Arc<Cursor>, LogError> {
    if !valid_name(name) {
        return Err(LogError::BadCursorName(name.to_string()));
    }
    let mut cursors = shared.cursors.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = cursors.get(name)
        && (c.required || !required)
    {
        return Ok(c.clone());
    }
    let dir = shared.config.dir.join("cursors");
    let path = dir.join(format!("{name}.cursor"));
    let position = read_file(&path)?.unwrap_or_else(|| shared.start());
    let cursor = Arc::new(Cursor {
        name: name.to_string(),
        required,
        position: AtomicU64::new(cursors.get(name).map_or(position.0, |c| c.position().0)),
        path,
        dir,
        write: Mutex::new(None),
    });
    // Make the two-slot file now, while there is room: later commits only overwrite it.
    let prepared = cursor.prepare()?;
    *cursor.write.lock().unwrap_or_else(|p| p.into_inner()) = Some(prepared);
    cursors.insert(name.to_string(), cursor.clone());
    Ok(cursor)
}

/// A cursor file's name and what reading it gave.
pub type CursorFile = (String, Result<Offset, LogError>);

/// Every cursor file in `dir/cursors`, by name.
pub fn list(dir: &std::path::Path) -> Result<Vec<CursorFile>, LogError> {
    let cdir = dir.join("cursors");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&cdir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(LogError::io(&cdir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(&cdir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_suffix(".cursor") {
            let pos = read_file(&entry.path()).and_then(|p| {
                p.ok_or_else(|| LogError::io(&entry.path(), std::io::Error::from(std::io::ErrorKind::NotFound)))
            });
            out.push((n.to_string(), pos));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
