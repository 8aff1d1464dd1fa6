//! A follower's durable place in one upstream's log: the upstream log's identity and the next
//! offset to fetch from it, in `<log dir>/upstreams/<name>.position`.
//!
//! The file is one line, `cachesync-upstream <identity> <offset> <crc32c of what precedes, hex>`,
//! replaced atomically (temp file, fsync, rename, fsync of the directory). An offset means
//! something only with its identity: a follower that meets another identity behind the same
//! address knows the upstream's log was recreated, and never resumes at a number that now names
//! other records. A file that is not whole is an error, never a silent restart from nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::commitlog::{LogError, Offset, sync_dir};

const MAGIC: &str = "cachesync-upstream";

/// Where a follower is in an upstream's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub identity: String,
    /// The next offset to fetch.
    pub next: Offset,
}

/// The position file of one upstream.
#[derive(Debug, Clone)]
pub struct PositionFile {
    path: PathBuf,
    dir: PathBuf,
}

impl PositionFile {
    pub fn new(log_dir: &Path, upstream: &str) -> PositionFile {
        let dir = log_dir.join("upstreams");
        PositionFile {
            path: dir.join(format!("{upstream}.position")),
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored position; `None` when there is none yet.
    pub fn load(&self) -> Result<Option<Position>, LogError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LogError::io(&self.path, e)),
        };
        parse(&text).map(Some).ok_or_else(|| LogError::Corrupt {
            file: self.path.clone(),
            position: 0,
            detail: "not a whole upstream position; remove the file to bootstrap this follower anew".into(),
        })
    }

    /// Durably records `p` (blocking I/O).
    pub fn store(&self, p: &Position) -> Result<(), LogError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| LogError::io(&self.dir, e))?;
        let tmp = self.path.with_extension("position.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(render(p).as_bytes())?;
            f.sync_data()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| LogError::io(&self.path, e))?;
        sync_dir(&self.dir)
    }

    /// Stores `at` (or, with `None`, forgets the position) on the blocking pool.
    pub async fn save(&self, at: Option<Position>) -> Result<(), String> {
        let file = self.clone();
        tokio::task::spawn_blocking(move || match &at {
            Some(p) => file.store(p),
            None => file.remove(),
        })
        .await
        .map_err(|e| format!("storing the position panicked: {e}"))?
        .map_err(|e| e.to_string())
    }

    /// Forgets the position (the next start bootstraps).
    pub fn remove(&self) -> Result<(), LogError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LogError::io(&self.path, e)),
        }
    }
}

fn render(p: &Position) -> String {
    let head = format!("{MAGIC} {} {}", p.identity, p.next.0);
    format!("{head} {:08x}\n", crc32c::crc32c(head.as_bytes()))
}

fn parse(text: &str) -> Option<Position> {
    let line = text.strip_suffix('\n')?;
    let (head, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(head.as_bytes()) {
        return None;
    }
    let mut parts = head.split(' ');
    if parts.next()? != MAGIC {
        return None;
    }
    let identity = parts.next()?.to_string();
    let next = Offset(parts.next()?.parse().ok()?);
    if parts.next().is_some() || identity.is_empty() {
        return None;
    }
    Some(Position { identity, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_round_trips_and_a_damaged_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("cs-pos-{}-{}", std::process::id(), rand::random::<u32>()));
        let f = PositionFile::new(&dir, "hub");
        assert_eq!(f.load().unwrap(), None, "no file: no position");
        let p = Position {
            identity: "00ff".into(),
            next: Offset(12345),
        };
        f.store(&p).unwrap();
        assert_eq!(f.load().unwrap(), Some(p));
        let text = std::fs::read_to_string(f.path()).unwrap();
        std::fs::write(f.path(), text.replace("12345", "12346")).unwrap();
        assert!(
            matches!(f.load(), Err(LogError::Corrupt { .. })),
            "a changed offset fails its checksum"
        );
        f.remove().unwrap();
        assert_eq!(f.load().unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
