//! The freshness contract of CDC keyspaces: how far behind the database a read may be
//! (`[cdc] max_staleness`), and how the sidecar knows where it stands.
//!
//! The stream alone cannot say how fresh the cache is: a quiet stream may mean a quiet database
//! or a dead connection, and a stream catching up after a restart delivers old changes as
//! promptly as new ones. So the capture *probes*: every `max_staleness / 4` it reads
//! `pg_current_wal_flush_lsn()` at time `t` — every commit acknowledged before `t` ends at or
//! before that position. Once the stream has confirmed a position at or past it (a commit, or
//! the server's keepalive between transactions) *and* the applier has applied the log up to
//! where those events were appended, the cache holds every change committed before `t`: it is
//! fresh as of `t`.
//!
//! A read then checks its entry: it is within the contract when the later of the watermark and
//! the moment the entry was read from Postgres (a load, a write-through) is at most
//! `max_staleness` ago. Outside it, a read-through keyspace reloads the key from Postgres; any
//! other keyspace serves the entry and says how far behind it may be (`X-Cache-Lag-Ms` and
//! `cachesync_stale_reads_total`). Before the first probe has been passed — a start, a restart —
//! nothing is known fresh.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::commitlog::Offset;
use crate::lsn::Lsn;

/// Probes kept while the stream has not passed them (the newest are kept).
const MAX_PROBES: usize = 1024;
/// Confirmed positions kept while the applier has not reached them.
const MAX_PASSED: usize = 4096;

/// Where the cache stands against the database, shared by the capture (probes, confirmed
/// positions), the applier (applied offsets) and the keyspaces (reads).
pub struct Freshness {
    max_staleness: Duration,
    base: Instant,
    /// Milliseconds after `base` (plus one) as of which the cache holds every acknowledged
    /// commit; 0: not known.
    as_of: AtomicU64,
    /// The last probe reached Postgres.
    reachable: AtomicBool,
    progress: Mutex<Progress>,
    notify: watch::Sender<u64>,
    /// This tracker's process instance (random) and how many times its keyspaces were reloaded
    /// outside the log since (a lost slot, a schema change): followers of this node's log must
    /// then take a new snapshot, since the log alone does not carry what the reload found.
    instance: u64,
    reloads: AtomicU64,
    /// Asks the prober for a probe before its next tick (see [`Freshness::request_probe`]).
    probe_now: tokio::sync::Notify,
}

#[derive(Default)]
struct Progress {
    /// Probes not yet passed: (flush position, taken at).
    probes: VecDeque<(Lsn, u64)>,
    /// Positions confirmed by the stream, with the log offset the applier must reach first.
    passed: VecDeque<(Lsn, Offset)>,
    applied: Offset,
    /// Highest confirmed position the applier has applied.
    through: Lsn,
    /// Positions numbered for [`Freshness::reached`] (a follower has no WAL positions).
    relayed: u64,
}

impl Freshness {
    pub fn new(max_staleness: Duration) -> Freshness {
        Freshness {
            max_staleness,
            base: Instant::now(),
            as_of: AtomicU64::new(0),
            reachable: AtomicBool::new(true),
            progress: Mutex::new(Progress::default()),
            notify: watch::channel(0).0,
            instance: rand::random::<u64>() | 1,
            reloads: AtomicU64::new(0),
            probe_now: tokio::sync::Notify::new(),
        }
    }

    /// The keyspaces were (or are being) reloaded outside the log: followers re-bootstrap.
    pub fn reloaded(&self) {
        self.reloads.fetch_add(1, Ordering::AcqRel);
    }

    /// (instance, reloads): see [`Freshness::reloaded`].
    pub fn epoch(&self) -> (u64, u64) {
        (self.instance, self.reloads.load(Ordering::Acquire))
    }

    /// Asks for a probe now rather than at the next tick: a stream that has just begun is
    /// caught up only once a probe taken after it began is passed, and a tick can be a quarter
    /// of `max_staleness` away.
    pub fn request_probe(&self) {
        self.probe_now.notify_one();
    }

    /// Resolves when a probe is asked for.
    pub async fn probe_requested(&self) {
        self.probe_now.notified().await;
    }

    /// How often the capture probes.
    pub fn probe_interval(&self) -> Duration {
        (self.max_staleness / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
    }

    /// Now, in this tracker's clock.
    pub fn now(&self) -> u64 {
        self.stamp(Instant::now())
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    /// A probe taken at `at` read the flush position `lsn`.
    pub fn probed(&self, lsn: Lsn, at: u64) {
        self.reachable.store(true, Ordering::Relaxed);
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.probes.len() >= MAX_PROBES {
            p.probes.pop_front();
        }
        p.probes.push_back((lsn, at));
        self.advance(&mut p);
    }

    /// A probe could not reach Postgres.
    pub fn unreachable(&self) {
        self.reachable.store(false, Ordering::Relaxed);
    }

    /// Whether the last probe reached Postgres.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// The stream confirmed `lsn`; its events end before log offset `needs`.
    pub fn confirmed(&self, lsn: Lsn, needs: Offset) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.passed.len() >= MAX_PASSED {
            p.passed.pop_front();
        }
        p.passed.push_back((lsn, needs));
        self.advance(&mut p);
    }

    /// An upstream said its log below what this node's log now holds up to `needs` has every
    /// change committed before `at` (this tracker's clock): once the applier is there, the
    /// cache is fresh as of `at`. A follower's whole contract rests on these.
    pub fn reached(&self, at: u64, needs: Offset) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.relayed += 1;
        let seq = Lsn(p.relayed);
        if p.probes.len() >= MAX_PROBES {
            p.probes.pop_front();
        }
        p.probes.push_back((seq, at));
        if p.passed.len() >= MAX_PASSED {
            p.passed.pop_front();
        }
        p.passed.push_back((seq, needs));
        self.advance(&mut p);
    }

    /// A wall-clock time (ms since the Unix epoch) in this tracker's clock; 0 for 0. Positions
    /// relayed between nodes carry wall-clock times: across machines the bound is then as good
    /// as their clocks agree.
    pub fn from_unix_ms(&self, ms: u64) -> u64 {
        if ms == 0 {
            return 0;
        }
        let ago = crate::commitlog::now_ms().saturating_sub(ms);
        self.now().saturating_sub(ago).max(1)
    }

    /// The watermark as a wall-clock time (ms since the Unix epoch); 0 when not known.
    pub fn as_of_unix_ms(&self) -> u64 {
        match self.as_of() {
            0 => 0,
            t => crate::commitlog::now_ms().saturating_sub(self.now().saturating_sub(t)),
        }
    }

    /// The applier has applied the log up to `offset`.
    pub fn applied(&self, offset: Offset) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.applied = p.applied.max(offset);
        self.advance(&mut p);
    }

    /// The applier was moved (a new session, a resnapshot): positions waiting for the old place
    /// no longer say anything.
    pub fn restart(&self, applied: Offset) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.passed.clear();
        p.applied = applied;
    }

    fn advance(&self, p: &mut Progress) {
        while let Some(&(lsn, needs)) = p.passed.front() {
            if needs > p.applied {
                break;
            }
            p.through = p.through.max(lsn);
            p.passed.pop_front();
        }
        let mut newest = None;
        while let Some(&(lsn, at)) = p.probes.front() {
            if lsn > p.through {
                break;
            }
            newest = Some(at);
            p.probes.pop_front();
        }
        if let Some(at) = newest
            && self.as_of.fetch_max(at, Ordering::AcqRel) < at
        {
            self.notify.send_replace(at);
        }
    }

    /// The watermark: the cache holds every commit acknowledged before this (0: unknown).
    pub fn as_of(&self) -> u64 {
        self.as_of.load(Ordering::Acquire)
    }

    /// Changes of the watermark.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// How far behind the database the cache may be; `None` when nothing is known yet.
    pub fn behind(&self) -> Option<Duration> {
        match self.as_of() {
            0 => None,
            t => Some(Duration::from_millis(self.now().saturating_sub(t))),
        }
    }

    /// Whether state read from Postgres at `read_at` (if it was) is within the contract. For a
    /// keyspace the stream is not following (`followed = false`: its table changed so that
    /// changes cannot be mapped) only its own reads from Postgres count, not the watermark.
    pub fn is_fresh_as(&self, read_at: Option<Instant>, followed: bool) -> bool {
        let watermark = if followed { self.as_of() } else { 0 };
        let known = watermark.max(read_at.map_or(0, |t| self.stamp(t)));
        known != 0 && Duration::from_millis(self.now().saturating_sub(known)) <= self.max_staleness
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_probe_is_passed_only_when_the_stream_and_the_applier_are_past_it() {
        let f = Freshness::new(Duration::from_millis(100));
        assert!(
            f.behind().is_none() && !f.is_fresh_as(None, true),
            "nothing known at start"
        );
        let t = f.now();
        f.probed(Lsn(100), t);
        f.confirmed(Lsn(120), Offset(10));
        assert_eq!(f.as_of(), 0, "confirmed, but the applier is not there yet");
        f.applied(Offset(9));
        assert_eq!(f.as_of(), 0);
        f.applied(Offset(10));
        assert_eq!(f.as_of(), t, "applied past the probe's position");
        assert!(f.is_fresh_as(None, true));
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(!f.is_fresh_as(None, true), "no newer probe passed: outside the bound");
        assert!(
            f.is_fresh_as(Some(Instant::now()), true),
            "an entry just read from Postgres is fresh"
        );
        // A probe past what the stream confirmed waits for it.
        let t2 = f.now();
        f.probed(Lsn(200), t2);
        assert_eq!(f.as_of(), t);
        f.confirmed(Lsn(200), Offset(10));
        assert_eq!(f.as_of(), t2, "already applied up to that offset");
    }
}
