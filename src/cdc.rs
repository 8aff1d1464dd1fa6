//! Change data capture: every change committed in Postgres reaches the cache, through the
//! commit log, without TTL guesswork.
//!
//! ```text
//!  Postgres ──pgoutput──▶ cdc::postgres (stream)  ──append──▶ commitlog ──tail──▶ cdc::applier ──▶ keyspaces
//!     ▲                        │  decode → map → events          │ durable            │ versioned installs
//!     └── confirm position ◀───┘  only after the append is durable
//! ```
//!
//! - [`postgres`]: the Postgres side, in three layers — `protocol` (pgoutput parsing, pure),
//!   `decoder` (the relation map), and the stream itself (publication, slot, warm start from a
//!   consistent snapshot, position feedback, lost-slot recovery) over a [`ReplicationSource`].
//! - [`applier`]: tails the log and applies change events to the keyspaces, in log order.
//!
//! The two halves meet only in the commit log, so a change Postgres was told is safe is always
//! on local disk first, and the applier can be held back (while a snapshot loads) or moved
//! (after a resnapshot) without touching the stream. The [`Gate`] carries those instructions.

pub mod applier;
pub mod config;
pub mod postgres;

use bytes::Bytes;

use crate::commitlog::{LogError, Offset};
use crate::keyspace::{Blocker, Keyspace};
use crate::lsn::Lsn;
use crate::source::SourceError;

/// Why CDC stopped or could not start; the stream retries after each.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CdcError {
    #[error("replication connection: {0}")]
    Connection(String),
    #[error("replication slot {slot} is gone or invalidated: {detail}")]
    SlotLost { slot: String, detail: String },
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{0}")]
    Setup(String),
}

/// An event from the replication transport, before pgoutput decoding.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Begin {
        final_lsn: Lsn,
        xid: u32,
        commit_time_us: u64,
    },
    /// A pgoutput message other than Begin/Commit/Message (Relation, Insert, …).
    Data(Bytes),
    Commit {
        end_lsn: Lsn,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    KeepAlive {
        wal_end: Lsn,
    },
}

/// The replication transport, behind a project trait so the crate that speaks the wire
/// protocol can be replaced without touching the stream logic.
pub trait ReplicationSource: Send {
    /// The next event; `None` when the server ended the stream.
    fn recv(&mut self) -> impl Future<Output = Result<Option<StreamEvent>, CdcError>> + Send;
    /// Everything up to `lsn` is durable here; the server may release it.
    fn confirm(&self, lsn: Lsn);
    /// The newest WAL position the server has reported.
    fn server_wal_end(&self) -> Lsn;
    /// Ends the session after sending the last confirmed position.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// Instructions from the stream to the applier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// Apply events; when false the applier waits (a snapshot is loading).
    pub open: bool,
    /// Where to apply from when `generation` changes.
    pub from: Offset,
    /// Bumped whenever `from` must be honoured (first start, resnapshot).
    pub generation: u64,
}

impl Gate {
    pub fn closed() -> Gate {
        Gate {
            open: false,
            from: Offset(0),
            generation: 0,
        }
    }
}

/// The change source is down: keyspaces that can keep the freshness contract without it — they
/// read through and Postgres answers (`reachable`) — stay ready; the others are not ready with
/// `why`.
pub fn block_unserved(keyspaces: &[std::sync::Arc<Keyspace>], reachable: bool, why: &str) {
    for ks in keyspaces {
        if ks.config.read_through && reachable {
            ks.set_blocker(Blocker::Cdc, None);
        } else {
            ks.set_blocker(Blocker::Cdc, Some(why.to_string()));
        }
    }
}

/// Waits `wait` before a change source's next attempt; once it has been down (`since`) longer
/// than `grace`, keyspaces that cannot keep the freshness contract without it are marked not
/// ready (`why`, with how long). False when `stop` came first.
pub async fn wait_down(
    keyspaces: &[std::sync::Arc<Keyspace>],
    reachable: &(dyn Fn() -> bool + Sync),
    since: tokio::time::Instant,
    wait: std::time::Duration,
    grace: std::time::Duration,
    why: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    use tokio::time::Instant;
    let deadline = Instant::now() + wait;
    loop {
        let grace_left = grace.saturating_sub(since.elapsed());
        if grace_left.is_zero() {
            block_unserved(
                keyspaces,
                reachable(),
                &format!("{why} (down for {}s)", since.elapsed().as_secs()),
            );
        }
        if Instant::now() >= deadline {
            return true;
        }
        let nap = (deadline - Instant::now()).min(if grace_left.is_zero() {
            std::time::Duration::from_secs(1)
        } else {
            grace_left
        });
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = stop.cancelled() => return false,
        }
    }
}

/// Postgres's epoch (2000-01-01) in µs since the Unix epoch.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// µs since the Postgres epoch → µs since the Unix epoch.
pub fn pg_time_to_unix_us(t: i64) -> u64 {
    t.saturating_add(PG_EPOCH_OFFSET_US).max(0) as u64
}
