//! Dead letters: writes Postgres rejected (a constraint, a value that does not fit its column)
//! after the flusher isolated them. Each is kept durably — one JSON file per letter under the
//! log directory's `deadletters/`, written atomically — with the write and Postgres's error, so
//! an operator can see it (`GET /v1/deadletters`), put it back in the queue (requeue) or drop it.
//! Setting a write aside never blocks the writes after it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::commitlog::sync_dir;
use crate::event::Op;

/// Why the dead-letter store failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead letter store {}: {detail}", path.display())]
    Io { path: PathBuf, detail: String },
    #[error("{} is not a dead letter ({detail}); move it out of the directory or repair it", file.display())]
    Unreadable { file: PathBuf, detail: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> DeadLetterError {
    DeadLetterError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// One rejected write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id: the commit log offset of the write.
    pub id: u64,
    pub keyspace: String,
    pub key: String,
    pub op: Op,
    /// The document of the write (puts).
    pub doc: Option<serde_json::Value>,
    /// The fields the write named.
    pub written: Vec<String>,
    pub version: u64,
    /// What Postgres said.
    pub error: String,
    /// When it was set aside, ms since the epoch.
    pub failed_at_ms: u64,
}

/// The store.
pub struct DeadLetters {
    dir: PathBuf,
    letters: Mutex<BTreeMap<u64, DeadLetter>>,
}

impl DeadLetters {
    /// Opens (creating) the store and reads every letter in it.
    pub fn open(dir: &Path) -> Result<DeadLetters, DeadLetterError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut letters = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let path = entry.map_err(|e| io(dir, e))?.path();
            if path.extension().is_some_and(|x| x == "json") {
                let text = std::fs::read(&path).map_err(|e| io(&path, e))?;
                let letter: DeadLetter = serde_json::from_slice(&text).map_err(|e| DeadLetterError::Unreadable {
                    file: path.clone(),
                    detail: e.to_string(),
                })?;
                letters.insert(letter.id, letter);
            }
        }
        Ok(DeadLetters {
            dir: dir.to_path_buf(),
            letters: Mutex::new(letters),
        })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.json"))
    }

    /// Stores a letter durably (temp file, fsync, rename, fsync of the directory).
    pub fn add(&self, letter: DeadLetter) -> Result<(), DeadLetterError> {
        let path = self.path(letter.id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&letter).map_err(|e| io(&path, e))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| io(&path, e))?;
        sync_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        self.letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(letter.id, letter);
        Ok(())
    }

    pub fn get(&self, id: u64) -> Option<DeadLetter> {
        self.letters.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    pub fn list(&self) -> Vec<DeadLetter> {
        self.letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Removes a letter; `false` when there was none.
    pub fn remove(&self, id: u64) -> Result<bool, DeadLetterError> {
        let existed = self
            .letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .is_some();
        if existed {
            let path = self.path(id);
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            sync_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        }
        Ok(existed)
    }

    pub fn len(&self) -> usize {
        self.letters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_survive_reopening_and_can_be_removed() {
        let dir = cachesync_testkit::temp_dir("deadletters", None);
        let store = DeadLetters::open(&dir).unwrap();
        store
            .add(DeadLetter {
                id: 42,
                keyspace: "users".into(),
                key: "7".into(),
                op: Op::Put,
                doc: Some(serde_json::json!({"id": 7, "age": -1})),
                written: vec!["age".into()],
                version: 1,
                error: "violates check constraint".into(),
                failed_at_ms: 1,
            })
            .unwrap();
        let again = DeadLetters::open(&dir).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again.get(42).unwrap().doc.unwrap()["age"], -1);
        assert!(again.remove(42).unwrap());
        assert!(!again.remove(42).unwrap());
        assert!(DeadLetters::open(&dir).unwrap().is_empty());
    }
}
