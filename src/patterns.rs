//! The caching patterns, one file each, each described for users in `patterns/*.md` at the top
//! of the repository, and the [`Pipeline`] that assembles them per keyspace at start:
//!
//! - [`read_through`]: a miss loads the row; concurrent misses share one load; "not found" is
//!   remembered for `negative_ttl`; a load never installs over a change made while it ran.
//! - [`refresh_ahead`]: a read late in an entry's life reloads it in the background.
//! - [`write_through`]: Postgres first, then the cache holds exactly what Postgres stored.
//! - [`write_behind`]: durable in the commit log, acknowledged, flushed to Postgres in batches.
//!
//! A pipeline is one keyspace's reader (L1, then read-through with refresh-ahead when
//! configured; room for more tiers between them) and its writer (memory, none, through or
//! behind), chosen once from the configuration. The API calls only the pipeline; the pipeline
//! calls the keyspace's door (`keyspace`), the source and the commit log below it. Nothing
//! below calls back up.

pub mod read_through;
pub mod refresh_ahead;
pub mod write_behind;
pub mod write_through;

use std::sync::Arc;

use bytes::Bytes;

use crate::cache::{Condition, Entry};
use crate::commitlog::LogError;
use crate::federation::Federation;
use crate::key::{Key, KeyError};
use crate::keyspace::config::WriteMode;
use crate::keyspace::{Keyspace, KeyspaceError, Read};
use crate::lifecycle::Tasks;
use crate::lsn::Lsn;
use crate::source::SourceError;
use refresh_ahead::Refresher;
use write_behind::{Accepted, WriteBehind, WriteItem};

/// What a read or a write through a pipeline can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PatternError {
    #[error(transparent)]
    Keyspace(#[from] KeyspaceError),
    #[error(
        "keyspace {0} is read-only (write = \"none\"); configure write = \"through\" or \"behind\" to accept writes"
    )]
    ReadOnly(String),
    /// A federated keyspace whose data lives in another region.
    #[error(
        "keyspace {keyspace} is a read-only view here: its home is node {home}; write there (or configure write = \"behind\" to land writes in the home's Postgres)"
    )]
    HomedElsewhere { keyspace: String, home: String },
    /// A conditional write where the current row is only known at the home.
    #[error(
        "keyspace {0} lands its writes in its home region's Postgres: a conditional write (If-Match / If-None-Match) cannot be checked here; send it to the home"
    )]
    Conditional(String),
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationError),
    #[error("the body is not valid JSON: {0}")]
    BadJson(String),
    /// Write-behind: too many writes are waiting for Postgres.
    #[error(
        "the write-behind backlog is full ({records} writes, {bytes} bytes unflushed; limits {max_records} and {max_bytes}); retry later"
    )]
    BacklogFull {
        records: u64,
        bytes: u64,
        max_records: u64,
        max_bytes: u64,
    },
    /// Write-behind: the commit log could not make the write durable.
    #[error("the commit log refused the write: {0}")]
    Log(#[from] LogError),
    /// The dead-letter store could not be changed.
    #[error(transparent)]
    DeadLetters(#[from] write_behind::deadletters::DeadLetterError),
    /// An operation on opaque values or per-key lifetimes (RESP `EXPIRE`, `INCR`…) on a
    /// keyspace that holds JSON documents.
    #[error(
        "keyspace {0} holds JSON documents (a table's rows, or federated state): {1} works on in-memory keyspaces only"
    )]
    NotInMemory(String, &'static str),
}

impl From<SourceError> for PatternError {
    fn from(e: SourceError) -> Self {
        PatternError::Keyspace(e.into())
    }
}

impl From<KeyError> for PatternError {
    fn from(e: KeyError) -> Self {
        PatternError::Keyspace(e.into())
    }
}

/// A write's body as a JSON object of fields (both write modes on a table take only that).
pub(crate) fn fields_of(body: &Bytes) -> Result<serde_json::Map<String, serde_json::Value>, PatternError> {
    use serde_json::Value;
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            let kind = match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            };
            Err(SourceError::BadBody(format!("got {kind}")).into())
        }
        Err(e) => Err(PatternError::BadJson(e.to_string())),
    }
}

/// A JSON body as compact bytes (an in-memory keyspace stores any JSON document).
fn canonical_json(body: &Bytes) -> Result<Bytes, PatternError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| PatternError::BadJson(e.to_string()))?;
    Ok(Bytes::from(
        serde_json::to_vec(&value).map_err(|e| PatternError::BadJson(e.to_string()))?,
    ))
}

/// What [`Pipeline::update`] stores for a key of an in-memory keyspace.
#[derive(Debug, Clone)]
pub enum Update {
    /// Leave the key as it is.
    Keep,
    /// Store these bytes (`raw`: not a JSON document), expiring at `deadline` when given.
    Set {
        value: Bytes,
        raw: bool,
        deadline: Option<tokio::time::Instant>,
    },
    /// Remove the key.
    Delete,
}

/// What a `PUT` did.
#[derive(Debug, Clone)]
pub enum Written {
    /// Stored (in Postgres first, for write-through); the entry now cached.
    Stored(Arc<Entry>),
    /// Durable in the log, Postgres later (write-behind).
    Accepted(Accepted),
}

/// What a `DELETE` did.
#[derive(Debug, Clone)]
pub enum Removed {
    Deleted,
    /// There was nothing to delete.
    Absent,
    /// Durable in the log, Postgres later (write-behind).
    Accepted(Accepted),
}

/// How a keyspace's writes are handled.
enum Writer {
    /// An in-memory keyspace: the cache is the store.
    Memory,
    /// `write = "none"` on a table.
    ReadOnly,
    Through,
    Behind(Arc<WriteBehind>),
    /// A federated in-memory keyspace: the write is this node's next federated event.
    Federated(Arc<Federation>),
    /// A federated view of another region's table.
    View(String),
    /// A federated view whose writes land in the home region's Postgres (`write = "behind"`).
    Home(Arc<Federation>),
}

/// One keyspace's reader and writer, assembled once at start.
pub struct Pipeline {
    ks: Arc<Keyspace>,
    refresher: Option<Arc<Refresher>>,
    writer: Writer,
    tasks: Tasks,
    /// Serializes an in-memory keyspace's writes per key, so a conditional write's check and
    /// its install are one step.
    stripes: Stripes,
}

/// Striped async locks by key.
pub(crate) struct Stripes {
    locks: Vec<tokio::sync::Mutex<()>>,
    hasher: ahash::RandomState,
}

impl Stripes {
    pub(crate) fn new(n: usize) -> Stripes {
        Stripes {
            locks: (0..n.max(1)).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    fn index(&self, keyspace: &str, key: &str) -> usize {
        (self.hasher.hash_one((keyspace, key)) as usize) % self.locks.len()
    }

    /// The lock of `key` in `keyspace`.
    pub(crate) fn of(&self, keyspace: &str, key: &str) -> &tokio::sync::Mutex<()> {
        &self.locks[self.index(keyspace, key)]
    }

    /// The locks of all `keys`, taken in stripe order so two batches never wait on each other
    /// in a circle.
    pub(crate) async fn lock_all<'a>(
        &self,
        keyspace: &str,
        keys: impl Iterator<Item = &'a str>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        // The stripes as a bitset, read back in order: sorting and deduplicating their indexes
        // was ~400 instructions a key when the flusher settles 64 keys at a time.
        let mut bits = vec![0u64; self.locks.len().div_ceil(64)];
        for k in keys {
            let i = self.index(keyspace, k);
            bits[i / 64] |= 1 << (i % 64);
        }
        let mut guards = Vec::with_capacity(bits.iter().map(|w| w.count_ones() as usize).sum());
        for (w, mut word) in bits.into_iter().enumerate() {
            while word != 0 {
                let i = w * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                guards.push(self.locks[i].lock().await);
            }
        }
        guards
    }
}

/// Stripes of an in-memory keyspace's write locks.
const MEMORY_STRIPES: usize = 64;

impl Pipeline {
    /// Assembles the keyspace's pipeline. Background work it starts (refreshes) runs under
    /// `tasks`. `write_behind` must be given for a `write = "behind"` keyspace (config
    /// validation guarantees the log it needs).
    pub fn new(
        ks: Arc<Keyspace>,
        write_behind: Option<&Arc<WriteBehind>>,
        federation: Option<&Arc<Federation>>,
        tasks: Tasks,
    ) -> Result<Pipeline, String> {
        let c = &ks.config;
        let fed = || {
            federation
                .cloned()
                .ok_or_else(|| format!("keyspace {}: federate = true needs the federation", c.name))
        };
        let writer = match (c.table.is_some(), c.write) {
            (false, _) if c.federate => match (&c.home, federation) {
                (Some(home), Some(f)) if *home != f.node && c.write == WriteMode::Behind => Writer::Home(f.clone()),
                (Some(home), Some(f)) if *home != f.node => Writer::View(home.clone()),
                _ => Writer::Federated(fed()?),
            },
            (false, _) => Writer::Memory,
            (true, WriteMode::None) => Writer::ReadOnly,
            (true, WriteMode::Through) => Writer::Through,
            (true, WriteMode::Behind) => Writer::Behind(
                write_behind
                    .ok_or_else(|| format!("keyspace {}: write = \"behind\" needs the commit log ([log])", c.name))?
                    .clone(),
            ),
        };
        let refresher = (c.refresh_ahead > 0.0).then(|| {
            Arc::new(Refresher::new(
                c.refresh_ahead,
                c.refresh_concurrency,
                &ks.metrics,
                &c.name,
            ))
        });
        Ok(Pipeline {
            ks,
            refresher,
            writer,
            tasks,
            stripes: Stripes::new(MEMORY_STRIPES),
        })
    }

    pub fn keyspace(&self) -> &Arc<Keyspace> {
        &self.ks
    }

    /// Refreshes queued or running, when refresh-ahead is on.
    pub fn refreshes_pending(&self) -> Option<usize> {
        self.refresher.as_ref().map(|r| r.pending())
    }

    /// Whether the keyspace is an in-memory store of any bytes (not a table, not federated):
    /// [`Pipeline::update`] works on it.
    pub fn is_in_memory(&self) -> bool {
        matches!(self.writer, Writer::Memory)
    }

    /// Reads and changes one key of an in-memory keyspace as one step (under the key's write
    /// lock): `f` sees the live entry and says what to store and what to answer. The RESP
    /// front's `SET` options, `GETDEL`, `EXPIRE`, `INCR`… are built on it. `what` names the
    /// operation for the error other keyspaces get.
    pub async fn update<R>(
        &self,
        key: &Key,
        what: &'static str,
        f: impl FnOnce(Option<&Arc<Entry>>) -> Result<(Update, R), PatternError>,
    ) -> Result<R, PatternError> {
        if !self.is_in_memory() {
            return Err(PatternError::NotInMemory(self.ks.name().to_string(), what));
        }
        let _key = self.stripes.of(self.ks.name(), &key.cache_key).lock().await;
        let current = self.ks.cached(&key.cache_key).filter(|e| e.value.is_some());
        let (update, answer) = f(current.as_ref())?;
        match update {
            Update::Keep => {}
            Update::Set { value, raw, deadline } => {
                let entry = Entry::new(Some(value), Lsn::ZERO, self.ks.hlc.now()).opaque(raw, deadline);
                self.ks.mutate(key.cache_key.clone(), entry).await;
            }
            Update::Delete => {
                if current.is_some() {
                    self.ks.invalidate(&key.cache_key).await;
                }
            }
        }
        Ok(answer)
    }

    /// Stores bytes under a key of an in-memory keyspace whatever it holds (a plain `SET`):
    /// [`Pipeline::update`] without reading the current entry first. It still takes the key's
    /// write lock, so a conditional update of the key never interleaves with it.
    pub async fn store(
        &self,
        key: &Key,
        what: &'static str,
        value: Bytes,
        raw: bool,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), PatternError> {
        if !self.is_in_memory() {
            return Err(PatternError::NotInMemory(self.ks.name().to_string(), what));
        }
        let _key = self.stripes.of(self.ks.name(), &key.cache_key).lock().await;
        let entry = Entry::new(Some(value), Lsn::ZERO, self.ks.hlc.now()).opaque(raw, deadline);
        self.ks.mutate(key.cache_key.clone(), entry).await;
        Ok(())
    }

    /// Parses a key from its URL form for this keyspace.
    pub fn parse_key(&self, raw: &str) -> Result<Key, PatternError> {
        Ok(self.ks.parse_key(raw)?)
    }

    /// Reads a key: the pending write, else L1, else (read-through) the table.
    pub async fn get(&self, key: &Key) -> Result<Read, PatternError> {
        Ok(read_through::get(&self.ks, self.refresher.as_ref(), &self.tasks, key).await?)
    }

    /// [`Pipeline::get`] when the answer needs no waiting (a pending write or a live L1 entry
    /// served as it is), else `None`.
    pub fn get_now(&self, key: &Key) -> Option<Read> {
        read_through::get_now(&self.ks, self.refresher.as_ref(), &self.tasks, key)
    }

    /// Writes a key's value (a JSON document), if `cond` holds for the key's current document.
    pub async fn put(&self, key: &Key, body: &Bytes, cond: &Condition) -> Result<Written, PatternError> {
        match &self.writer {
            Writer::Memory => {
                let bytes = canonical_json(body)?;
                let _key = self.stripes.of(self.ks.name(), &key.cache_key).lock().await;
                self.check_memory(key, cond)?;
                let entry = Entry::new(Some(bytes), Lsn::ZERO, self.ks.hlc.now());
                self.ks.mutate(key.cache_key.clone(), entry.clone()).await;
                Ok(Written::Stored(Arc::new(entry)))
            }
            Writer::Federated(fed) => {
                let bytes = canonical_json(body)?;
                let _key = self.stripes.of(self.ks.name(), &key.cache_key).lock().await;
                self.check_memory(key, cond)?;
                let entry = fed.originate(&self.ks, key.cache_key.clone(), Some(bytes)).await?;
                Ok(Written::Stored(entry))
            }
            Writer::View(home) => Err(self.homed_elsewhere(home)),
            Writer::Home(fed) => {
                if !cond.is_always() {
                    return Err(PatternError::Conditional(self.ks.name().to_string()));
                }
                let fields = fields_of(body)?;
                let t = fed.write_home(&self.ks, key.cache_key.clone(), Some(fields)).await?;
                Ok(Written::Accepted(t.into()))
            }
            Writer::ReadOnly => Err(PatternError::ReadOnly(self.ks.name().to_string())),
            Writer::Through => write_through::put(&self.ks, key, body, cond).await.map(Written::Stored),
            Writer::Behind(wb) => wb.put(&self.ks, key, body, cond).await.map(Written::Accepted),
        }
    }

    /// Writes many keys (`_mput`): each item validated and conditioned like a single `PUT` and
    /// answered on its own; write-through runs them in one Postgres transaction, write-behind
    /// makes them durable with one log append. One result per item, in order.
    pub async fn put_many(&self, items: Vec<(Key, Bytes, Condition)>) -> Vec<Result<Written, PatternError>> {
        match &self.writer {
            Writer::Through => write_through::put_many(&self.ks, items)
                .await
                .into_iter()
                .map(|r| r.map(Written::Stored))
                .collect(),
            Writer::Behind(wb) => {
                let items = items
                    .into_iter()
                    .map(|(key, body, cond)| WriteItem::Put { key, body, cond })
                    .collect();
                wb.write_many(&self.ks, items)
                    .await
                    .into_iter()
                    .map(|r| r.map(Written::Accepted))
                    .collect()
            }
            Writer::Memory | Writer::ReadOnly | Writer::Federated(_) | Writer::View(_) | Writer::Home(_) => {
                let mut out = Vec::with_capacity(items.len());
                for (key, body, cond) in items {
                    out.push(self.put(&key, &body, &cond).await);
                }
                out
            }
        }
    }

    /// Deletes many keys (`_mdelete`), like [`Pipeline::put_many`].
    pub async fn delete_many(&self, items: Vec<(Key, Condition)>) -> Vec<Result<Removed, PatternError>> {
        match &self.writer {
            Writer::Through => write_through::delete_many(&self.ks, items)
                .await
                .into_iter()
                .map(|r| r.map(|d| if d { Removed::Deleted } else { Removed::Absent }))
                .collect(),
            Writer::Behind(wb) => {
                let items = items
                    .into_iter()
                    .map(|(key, cond)| WriteItem::Delete { key, cond })
                    .collect();
                wb.write_many(&self.ks, items)
                    .await
                    .into_iter()
                    .map(|r| r.map(Removed::Accepted))
                    .collect()
            }
            Writer::Memory | Writer::ReadOnly | Writer::Federated(_) | Writer::View(_) | Writer::Home(_) => {
                let mut out = Vec::with_capacity(items.len());
                for (key, cond) in items {
                    out.push(self.delete(&key, &cond).await);
                }
                out
            }
        }
    }

    fn homed_elsewhere(&self, home: &str) -> PatternError {
        PatternError::HomedElsewhere {
            keyspace: self.ks.name().to_string(),
            home: home.to_string(),
        }
    }

    /// An in-memory keyspace's precondition, checked under the key's stripe.
    fn check_memory(&self, key: &Key, cond: &Condition) -> Result<(), PatternError> {
        if cond.is_always() {
            return Ok(());
        }
        let current = self.ks.cached(&key.cache_key).and_then(|e| e.value.clone());
        if cond.holds(current.as_deref()) {
            Ok(())
        } else {
            Err(SourceError::PreconditionFailed(crate::source::postgres::describe(cond, current.as_deref())).into())
        }
    }

    /// Deletes a key, if `cond` holds for its current document.
    pub async fn delete(&self, key: &Key, cond: &Condition) -> Result<Removed, PatternError> {
        match &self.writer {
            Writer::Memory => {
                let _key = self.stripes.of(self.ks.name(), &key.cache_key).lock().await;
                self.check_memory(key, cond)?;
                let existed = self.ks.cached(&key.cache_key).is_some_and(|e| e.value.is_some());
                self.ks.invalidate(&key.cache_key).await;
                Ok(if existed { Removed::Deleted } else { Removed::Absent })
            }
            Writer::Federated(fed) => {
                let _key = self.stripes.of(self.ks.name(), &key.cache_key).lock().await;
                self.check_memory(key, cond)?;
                let existed = self.ks.cached(&key.cache_key).is_some_and(|e| e.value.is_some());
                // A tombstone, so the delete wins or loses like any write everywhere.
                fed.originate(&self.ks, key.cache_key.clone(), None).await?;
                Ok(if existed { Removed::Deleted } else { Removed::Absent })
            }
            Writer::View(home) => Err(self.homed_elsewhere(home)),
            Writer::Home(fed) => {
                if !cond.is_always() {
                    return Err(PatternError::Conditional(self.ks.name().to_string()));
                }
                let t = fed.write_home(&self.ks, key.cache_key.clone(), None).await?;
                Ok(Removed::Accepted(t.into()))
            }
            Writer::ReadOnly => Err(PatternError::ReadOnly(self.ks.name().to_string())),
            Writer::Through => Ok(if write_through::delete(&self.ks, key, cond).await? {
                Removed::Deleted
            } else {
                Removed::Absent
            }),
            Writer::Behind(wb) => wb.delete(&self.ks, key, cond).await.map(Removed::Accepted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Stripes;

    #[tokio::test]
    async fn locking_many_keys_takes_each_of_their_stripes_once_until_the_guards_drop() {
        let stripes = Stripes::new(256);
        let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        let mut want: Vec<usize> = keys.iter().map(|k| stripes.index("ks", k)).collect();
        want.sort_unstable();
        want.dedup();
        let guards = stripes.lock_all("ks", keys.iter().map(String::as_str)).await;
        assert_eq!(guards.len(), want.len());
        for k in &keys {
            assert!(stripes.of("ks", k).try_lock().is_err(), "{k}'s stripe is held");
        }
        // A stripe none of them hashes to stays free (100 keys cannot cover 256 stripes).
        let free = (0..256).find(|i| !want.contains(i)).expect("a stripe no key hashes to");
        assert!(stripes.locks[free].try_lock().is_ok());
        drop(guards);
        assert!(keys.iter().all(|k| stripes.of("ks", k).try_lock().is_ok()));
    }
}
