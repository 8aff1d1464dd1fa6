//! The log's identity: a file `IDENTITY` holding `"cachesync-log " + 32 hex digits + "\n"`, made
//! atomically (temp file, fsync, rename, fsync of the directory) when a log is created. Offsets
//! are meaningful only within one identity: a follower that stored "offset N of log X" and finds
//! log Y behind the same address knows the log was wiped and recreated, instead of resuming at an
//! offset that now names other records.

use std::io::Write;
use std::path::Path;

use super::{LogError, sync_dir};

const FILE: &str = "IDENTITY";
const PREFIX: &str = "cachesync-log ";

/// The identity stored in `dir`, if there is one. A file that is not an identity is an error
/// (never silently replaced: what it named may matter to someone).
pub fn read(dir: &Path) -> Result<Option<String>, LogError> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(&path, e)),
    };
    match text.strip_prefix(PREFIX).map(str::trim_end) {
        Some(id) if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) => Ok(Some(id.to_string())),
        _ => Err(LogError::io(
            &path,
            std::io::Error::other(
                "not a cachesync log identity; remove the file only if this log is to be treated as new",
            ),
        )),
    }
}

/// Makes a new identity for the log in `dir`, replacing any earlier one.
pub fn create(dir: &Path) -> Result<String, LogError> {
    let id = format!("{:032x}", rand::random::<u128>());
    let path = dir.join(FILE);
    let tmp = dir.join("IDENTITY.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{PREFIX}{id}\n").as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| LogError::io(&path, e))?;
    sync_dir(dir)?;
    Ok(id)
}
