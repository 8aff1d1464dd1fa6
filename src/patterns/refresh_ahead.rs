//! Refresh-ahead: hot entries are reloaded in the background before they expire, so readers of
//! a hot key never wait for a load.
//!
//! A read that finds an entry older than `refresh_ahead × lifetime` (the lifetime is `ttl`, or
//! `negative_ttl` for "not found") returns it at once — `X-Cache: stale-refreshing` — and
//! schedules one background reload of the key, as Coherence's refresh-ahead factor and
//! Caffeine's `refreshAfterWrite` do. moka has no refresh of its own; this module adds it on
//! top, with its own clock on `tokio::time` (moka's TTL stays the backstop).
//!
//! - **One refresh per key.** A key is marked pending when its refresh is scheduled; reads of it
//!   meanwhile only report `stale-refreshing`. The reload itself goes through the keyspace's
//!   load flights, so a reader that misses after the entry expired joins the refresh's query.
//! - **Bounded.** At most `refresh_concurrency` refreshes of a keyspace run at once; the rest
//!   wait for a slot, and a waiting refresh whose entry was changed, evicted or expired in the
//!   meantime is dropped. At most [`PENDING_PER_SLOT`] × `refresh_concurrency` refreshes are
//!   pending; beyond that a stale read schedules nothing (a later read will).
//! - **A failure keeps the old value.** A failed reload installs nothing: the entry is served
//!   until it really expires, the failure is counted, and the key is not retried for a moment
//!   (a quarter of its refresh window, at most a second) so a database outage does not turn
//!   every read into a query.
//! - **Writes and changes win.** The reload is a fill under the flight's lease: a write or a CDC
//!   change of the key while it runs revokes the lease and the reload's result is not
//!   installed (counted `superseded`). Versions decide; an older value is never installed.
//! - **Cold keys expire.** Only reads schedule refreshes; an entry nobody reads is left to expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cache::Entry;
use crate::key::Key;
use crate::keyspace::{Keyspace, Origin};
use crate::lifecycle::Tasks;
use crate::metrics::Metrics;

/// Pending refreshes (queued or running) allowed per refresh slot.
pub const PENDING_PER_SLOT: usize = 256;
/// Longest a key whose refresh failed waits before a read may schedule another.
pub const RETRY_AFTER_FAILURE_MAX: Duration = Duration::from_secs(1);

/// What a read of an entry should do about refreshing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Young enough: serve it.
    Fresh,
    /// In its refresh window with a refresh underway; `start` for the read that must start it.
    Refreshing { start: bool },
    /// In its refresh window, but not refreshed now: its last refresh failed moments ago, or
    /// too many are pending.
    Later,
}

#[derive(Debug, Clone, Copy)]
enum KeyState {
    Pending,
    Failed { at: Instant, retry: Duration },
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<Arc<str>, KeyState>,
    pending: usize,
}

/// Metric handles of one keyspace's refreshes, resolved once.
struct RefreshMetrics {
    started: IntCounter,
    succeeded: IntCounter,
    failed: IntCounter,
    superseded: IntCounter,
    duration: Histogram,
    in_flight: IntGauge,
    queued: IntGauge,
}

/// The refresh-ahead state of one keyspace.
pub struct Refresher {
    factor: f64,
    slots: Arc<Semaphore>,
    max_pending: usize,
    state: Mutex<State>,
    m: RefreshMetrics,
}

impl Refresher {
    pub fn new(factor: f64, concurrency: usize, metrics: &Metrics, keyspace: &str) -> Refresher {
        let result = |r: &str| metrics.refresh_completed.with_label_values(&[keyspace, r]);
        Refresher {
            factor,
            slots: Arc::new(Semaphore::new(concurrency)),
            max_pending: concurrency.saturating_mul(PENDING_PER_SLOT),
            state: Mutex::new(State::default()),
            m: RefreshMetrics {
                started: metrics.refresh_started.with_label_values(&[keyspace]),
                succeeded: result("succeeded"),
                failed: result("failed"),
                superseded: result("superseded"),
                duration: metrics.refresh_duration.with_label_values(&[keyspace]),
                in_flight: metrics.refresh_in_flight.with_label_values(&[keyspace]),
                queued: metrics.refresh_queued.with_label_values(&[keyspace]),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an entry stored at `stored_at` with lifetime `life` is in its refresh window.
    pub fn is_due(&self, stored_at: Instant, life: Duration) -> bool {
        stored_at.elapsed() >= life.mul_f64(self.factor)
    }

    /// Decides what a read of `key`'s entry does; marks the key pending when it says `start`.
    pub fn check(&self, key: &Arc<str>, stored_at: Instant, life: Duration) -> Check {
        if !self.is_due(stored_at, life) {
            return Check::Fresh;
        }
        let mut st = self.lock();
        match st.keys.get(key) {
            Some(KeyState::Pending) => return Check::Refreshing { start: false },
            Some(KeyState::Failed { at, retry }) if at.elapsed() < *retry => return Check::Later,
            _ => {}
        }
        if st.pending >= self.max_pending {
            return Check::Later;
        }
        if st.keys.len() >= self.max_pending.saturating_mul(4) {
            // Forget failures whose wait is over, so the map stays bounded.
            st.keys.retain(|_, s| match s {
                KeyState::Pending => true,
                KeyState::Failed { at, retry } => at.elapsed() < *retry,
            });
        }
        st.keys.insert(key.clone(), KeyState::Pending);
        st.pending += 1;
        Check::Refreshing { start: true }
    }

    /// The refresh of `key` is over. After a failure (`Some(lifetime)`), reads do not schedule
    /// another for a quarter of the refresh window, at most [`RETRY_AFTER_FAILURE_MAX`].
    pub fn finish(&self, key: &Arc<str>, failed: Option<Duration>) {
        let mut st = self.lock();
        if matches!(st.keys.get(key), Some(KeyState::Pending)) {
            st.pending = st.pending.saturating_sub(1);
        }
        match failed {
            Some(life) => {
                let window = life.mul_f64(1.0 - self.factor);
                let retry = RETRY_AFTER_FAILURE_MAX.min(window / 4);
                st.keys.insert(
                    key.clone(),
                    KeyState::Failed {
                        at: Instant::now(),
                        retry,
                    },
                );
            }
            None => {
                st.keys.remove(key);
            }
        }
    }

    /// Refreshes queued or running.
    pub fn pending(&self) -> usize {
        self.lock().pending
    }
}

/// Called on every L1 hit: schedules a refresh when the entry is in its refresh window, and
/// says how the read should be reported.
pub fn on_hit(r: &Arc<Refresher>, ks: &Arc<Keyspace>, tasks: &Tasks, key: &Key, entry: &Entry) -> Origin {
    match r.check(&key.cache_key, entry.stored_at, ks.lifetime(entry)) {
        Check::Fresh | Check::Later => Origin::Hit,
        Check::Refreshing { start } => {
            if start {
                let stop = tasks.child_token();
                let (r, ks, key) = (r.clone(), ks.clone(), key.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = refresh(&r, &ks, &key) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
            Origin::Refreshing
        }
    }
}

/// Marks the key's refresh over when dropped (also if the task panics or is cancelled at
/// shutdown).
struct Finish<'a> {
    r: &'a Refresher,
    key: &'a Arc<str>,
    failed: Option<Duration>,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.r.finish(self.key, self.failed);
    }
}

/// One background refresh: waits for a slot, reloads the key if it is still due, installs the
/// result under the load's lease.
async fn refresh(r: &Refresher, ks: &Keyspace, key: &Key) {
    let mut finish = Finish {
        r,
        key: &key.cache_key,
        failed: None,
    };
    r.m.queued.inc();
    let slot = r.slots.clone().acquire_owned().await;
    r.m.queued.dec();
    let Ok(_slot) = slot else {
        return;
    };
    // Still wanted? While it waited, the entry may have been changed, evicted or expired.
    let Some(entry) = ks.cached(&key.cache_key) else {
        return;
    };
    let life = ks.lifetime(&entry);
    if !r.is_due(entry.stored_at, life) {
        return;
    }
    r.m.started.inc();
    r.m.in_flight.inc();
    let started = Instant::now();
    let result = ks.reload(key).await.map(|(_, installed)| installed);
    r.m.in_flight.dec();
    r.m.duration.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(true) => r.m.succeeded.inc(),
        Ok(false) => r.m.superseded.inc(),
        Err(e) => {
            r.m.failed.inc();
            tracing::debug!(keyspace = ks.name(), key = %key.cache_key, error = %e, "refresh failed; the cached value is served until it expires");
            finish.failed = Some(life);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refresher(concurrency: usize) -> Refresher {
        Refresher::new(0.5, concurrency, &Metrics::new(), "t")
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_is_due_after_factor_times_its_lifetime() {
        let r = refresher(2);
        let key: Arc<str> = "k".into();
        let stored = Instant::now();
        let life = Duration::from_secs(10);
        assert_eq!(r.check(&key, stored, life), Check::Fresh);
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert_eq!(r.check(&key, stored, life), Check::Fresh);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(r.check(&key, stored, life), Check::Refreshing { start: true });
        assert_eq!(
            r.check(&key, stored, life),
            Check::Refreshing { start: false },
            "one refresh per key"
        );
        assert_eq!(r.pending(), 1);
        r.finish(&key, None);
        assert_eq!(r.pending(), 0);
        // The refreshed entry is young again.
        assert_eq!(r.check(&key, Instant::now(), life), Check::Fresh);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_holds_the_key_back_for_a_moment() {
        let r = refresher(2);
        let key: Arc<str> = "k".into();
        let stored = Instant::now();
        let life = Duration::from_secs(2);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(r.check(&key, stored, life), Check::Refreshing { start: true });
        r.finish(&key, Some(life));
        assert_eq!(r.pending(), 0);
        // A quarter of the 1 s refresh window.
        assert_eq!(r.check(&key, stored, life), Check::Later);
        tokio::time::advance(Duration::from_millis(249)).await;
        assert_eq!(r.check(&key, stored, life), Check::Later);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(r.check(&key, stored, life), Check::Refreshing { start: true });
    }

    #[tokio::test(start_paused = true)]
    async fn pending_refreshes_are_bounded() {
        let r = refresher(1);
        let stored = Instant::now();
        let life = Duration::from_secs(1);
        tokio::time::advance(life).await;
        for i in 0..PENDING_PER_SLOT {
            let key: Arc<str> = i.to_string().into();
            assert_eq!(r.check(&key, stored, life), Check::Refreshing { start: true });
        }
        let extra: Arc<str> = "extra".into();
        assert_eq!(r.check(&extra, stored, life), Check::Later);
        r.finish(&"0".into(), None);
        assert_eq!(r.check(&extra, stored, life), Check::Refreshing { start: true });
    }
}
