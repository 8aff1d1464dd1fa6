//! One connection's state as its commands change it: protocol version, authentication,
//! client tracking and `CLIENT CACHING`, the tracking-channel subscription, QUIT, and the
//! batch's command tally. The connection (`conn`) owns it; the commands (`admin`, `commands`)
//! read and change it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::tracking::{ClientId, Mode};
use super::{ClientInfo, Front};

/// Client tracking as one connection set it up.
#[derive(Debug, Clone, Default)]
pub struct TrackState {
    pub mode: Mode,
    pub optin: bool,
    pub optout: bool,
}

/// One connection's state, as its commands change it.
pub struct Session {
    pub id: ClientId,
    pub info: Arc<ClientInfo>,
    /// 2 or 3 (`HELLO`).
    pub proto: u8,
    pub authed: bool,
    pub tracking: Option<TrackState>,
    /// `CLIENT CACHING yes|no`: applies to the next command only.
    pub caching: Option<bool>,
    /// Subscribed to `__redis__:invalidate` (RESP2 redirect target).
    pub subscribed: bool,
    /// QUIT: answer, then close.
    pub closing: bool,
    /// Commands run in the current batch, by (table index, ok), not yet added to the shared
    /// counters: one atomic add per kind per batch instead of several per command.
    pub counts: Vec<(Option<usize>, bool, u64)>,
}

impl Session {
    /// Counts one command of the batch.
    pub fn tally(&mut self, index: Option<usize>, ok: bool) {
        match self.counts.iter_mut().find(|(i, o, _)| *i == index && *o == ok) {
            Some(c) => c.2 += 1,
            None => self.counts.push((index, ok, 1)),
        }
    }

    /// Adds the batch's counts to the shared counters.
    pub fn flush_counts(&mut self, front: &Front) {
        let mut total = 0;
        for (index, ok, n) in self.counts.drain(..) {
            front.metrics.commands(index, ok, n);
            total += n;
        }
        if total > 0 {
            front.stats.commands_processed.fetch_add(total, Ordering::Relaxed);
            self.info
                .last_active_ms
                .store(self.info.created.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Whether a read by the current command is remembered for default-mode tracking.
    pub fn tracks_reads(&self) -> bool {
        match &self.tracking {
            Some(t) if t.mode.bcast.is_none() => {
                if t.optin {
                    self.caching == Some(true)
                } else if t.optout {
                    self.caching != Some(false)
                } else {
                    true
                }
            }
            _ => false,
        }
    }
}
