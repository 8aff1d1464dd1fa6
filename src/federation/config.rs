//! `[federation]` (how this node federates: clock bound, tombstone hold) and `[[peer]]` (a node
//! whose log this node follows by version vector), with their defaults and section readers. A
//! `[[peer]]` has the shape of an `[[upstream]]`: name, url, token_file, ca_file, link_timeout.

use std::time::Duration;

use serde::Serialize;

use crate::replication::config::{UpstreamConfig, read_upstream};
use crate::section::{Section, humantime_serde_shim};

/// How far ahead of this node's wall clock a remote version may pull its hybrid logical clock
/// (CockroachDB's default bound).
pub const DEFAULT_MAX_CLOCK_DRIFT: Duration = Duration::from_millis(500);
/// A tombstone every node has passed is still kept this long (events stamped just before a
/// node reported its vector may still be on their way).
pub const DEFAULT_TOMBSTONE_HOLD: Duration = Duration::from_secs(10);
/// How often the version vector is checkpointed and the tombstones checked.
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// `[federation]`.
#[derive(Debug, Clone, Serialize)]
pub struct FederationConfig {
    /// A remote version further ahead of the local wall clock than this is counted and logged,
    /// and cannot move the local clock further than this.
    #[serde(with = "humantime_serde_shim")]
    pub max_clock_drift: Duration,
    /// How long a tombstone every node has passed is kept before it is dropped.
    #[serde(with = "humantime_serde_shim")]
    pub tombstone_hold: Duration,
    /// How often the version vector is checkpointed and the tombstones checked.
    #[serde(with = "humantime_serde_shim")]
    pub checkpoint_every: Duration,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            max_clock_drift: DEFAULT_MAX_CLOCK_DRIFT,
            tombstone_hold: DEFAULT_TOMBSTONE_HOLD,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
        }
    }
}

pub(crate) fn read_federation(mut s: Section<'_, '_>) -> FederationConfig {
    let d = FederationConfig::default();
    let c = FederationConfig {
        max_clock_drift: s.duration("max_clock_drift").unwrap_or(d.max_clock_drift),
        tombstone_hold: s.duration("tombstone_hold").unwrap_or(d.tombstone_hold),
        checkpoint_every: s.duration("checkpoint_every").unwrap_or(d.checkpoint_every),
    };
    if c.checkpoint_every < Duration::from_millis(10) {
        s.problem_at("checkpoint_every", "must be at least 10ms");
    }
    s.finish();
    c
}

/// `[[peer]]`: a node this one follows, by version vector.
pub(crate) fn read_peer(s: Section<'_, '_>) -> Option<UpstreamConfig> {
    read_upstream(s)
}
