//! The node's hybrid logical clock: versions that grow monotonically on one node and stay close
//! to wall-clock time, so versions from different nodes can be compared without trusting any
//! single wall clock (see "Event federation" in the design).
//!
//! A timestamp is one `u64`: the high 48 bits are milliseconds since the Unix epoch, the low 16
//! bits a logical counter that breaks ties within one millisecond. `now` never returns the same
//! value twice and never goes backwards, even when the wall clock does; `observe` folds in a
//! timestamp seen from another node so causally later events get larger versions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock shared by everything on one node.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    pub fn new() -> Self {
        Hlc {
            last: AtomicU64::new(0),
        }
    }

    fn wall() -> u64 {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        ms << LOGICAL_BITS
    }

    /// A new timestamp, greater than every one this clock gave or observed before.
    pub fn now(&self) -> u64 {
        let wall = Self::wall();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = if wall > last { wall } else { last + 1 };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Folds in a timestamp from elsewhere so later `now` calls exceed it.
    pub fn observe(&self, remote: u64) {
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// Folds in a remote timestamp, but moves this clock at most `max_drift` past the local wall
    /// clock; returns whether the timestamp was within that bound. A node whose clock runs far
    /// ahead cannot drag every other node's versions along (its own events keep their versions;
    /// they win conflicts until local clocks pass them).
    pub fn observe_bounded(&self, remote: u64, max_drift: std::time::Duration) -> bool {
        let bound = Self::wall().saturating_add((max_drift.as_millis() as u64) << LOGICAL_BITS);
        if remote <= bound {
            self.observe(remote);
            true
        } else {
            self.observe(bound);
            false
        }
    }

    /// Milliseconds since the epoch carried by a timestamp.
    pub fn millis(ts: u64) -> u64 {
        ts >> LOGICAL_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_across_threads() {
        let clock = std::sync::Arc::new(Hlc::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| c.now()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "no timestamp handed out twice");
    }

    #[test]
    fn a_remote_clock_far_ahead_moves_this_one_only_to_the_bound() {
        let clock = Hlc::new();
        let far = (Hlc::wall() >> LOGICAL_BITS).saturating_add(10_000) << LOGICAL_BITS;
        assert!(!clock.observe_bounded(far, std::time::Duration::from_millis(500)));
        let now = clock.now();
        assert!(now < far);
        assert!(Hlc::millis(now) <= (Hlc::wall() >> LOGICAL_BITS) + 500);
        let near = Hlc::wall() + (100 << LOGICAL_BITS);
        assert!(clock.observe_bounded(near, std::time::Duration::from_millis(500)));
        assert!(clock.now() > near);
    }

    #[test]
    fn observe_moves_the_clock_past_a_remote_timestamp() {
        let clock = Hlc::new();
        let far = (Hlc::wall() >> LOGICAL_BITS).saturating_add(60_000) << LOGICAL_BITS;
        clock.observe(far);
        assert!(clock.now() > far);
        assert!(Hlc::millis(clock.now()) >= Hlc::millis(far));
    }
}
