//! Named, durable consumer positions. A cursor's position is the next offset its consumer will
//! read: everything below it has been handled. Committing writes `cursors/NAME.cursor` atomically
//! — temp file, fsync, rename, fsync of the directory — so after a crash a cursor holds either
//! its old or its new position, never a torn one.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{LogError, Offset, Shared, sync_dir};

const MAGIC: &[u8; 4] = b"CSC1";

/// One consumer's durable position.
#[derive(Debug)]
pub struct Cursor {
    pub name: String,
    /// Whether retention must keep records this cursor has not passed.
    pub required: bool,
    position: AtomicU64,
    path: PathBuf,
    dir: PathBuf,
    write: Mutex<()>,
}

impl Cursor {
    /// The next offset to handle.
    pub fn position(&self) -> Offset {
        Offset(self.position.load(Ordering::Acquire))
    }

    /// Durably records that everything below `offset` has been handled (blocking I/O).
    pub fn commit(&self, offset: Offset) -> Result<(), LogError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&offset.0.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let tmp = self.path.with_extension("cursor.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| LogError::io(&self.path, e))?;
        sync_dir(&self.dir)?;
        self.position.store(offset.0, Ordering::Release);
        Ok(())
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
    if bytes.len() != 16 || &bytes[..4] != MAGIC {
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
        write: Mutex::new(()),
    });
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
