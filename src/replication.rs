//! The replicated log: a node serves its commit log to followers (`serve`, `[replication]`), and
//! a node follows another node's log (`follow`, `[[upstream]]`). With them one hub holds the
//! Postgres slot and every pod's sidecar (an edge, `[cdc] source = "upstream"`) follows the hub:
//! Postgres decodes its WAL once, however many pods there are.
//!
//! ```text
//!  Postgres ─slot─▶ hub: capture ─▶ commit log ─▶ applier ─▶ hub keyspaces
//!                                        │ GET /v1/log (frames, own port)      ▲ GET /v1/snapshot
//!                                        ▼                                     │ (bootstrap)
//!                   edge: follower ─append─▶ commit log ─▶ applier ─▶ edge keyspaces
//! ```
//!
//! - The stream is an HTTP response body of [`wire`] frames: batches of records exactly as they
//!   are in the hub's log, and progress frames (log end, and how fresh the log is) after each
//!   batch and every heartbeat while idle. Backpressure is TCP's: the hub reads the next batch
//!   from disk only when the follower has taken the last, so a slow follower costs the hub one
//!   batch of memory and stalls nobody else.
//! - A follower keeps its place per upstream ([`position`]), tied to the upstream log's
//!   identity; it reports its durable place to the hub, whose retention keeps what a connected
//!   follower still needs. A follower with no usable place bootstraps from the hub's snapshot:
//!   the hub's cache entries with their versions, as of a log position, then the tail from
//!   there.
//! - Events go through the same versioned door as local CDC (the edge's applier), so a replayed
//!   or reordered change never takes a key back.

pub mod config;
pub mod follow;
pub mod position;
pub mod serve;
pub mod tls;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::{Value, json};

use crate::commitlog::{CommitLog, Hold, Offset};

/// The header naming a log's identity, on answers and on a follower's requests.
pub const IDENTITY_HEADER: &str = "x-cachesync-log-identity";
/// The header giving the first offset a log still holds, on a snapshot.
pub const LOG_START_HEADER: &str = "x-cachesync-log-start";
/// The header giving a snapshot's epoch: `instance.reloads` (see `wire::Progress`).
pub const EPOCH_HEADER: &str = "x-cachesync-epoch";
/// The header naming a stream's connection id, which position reports quote.
pub const CONNECTION_HEADER: &str = "x-cachesync-connection";

/// `cachesync_replication_*`.
pub struct ReplicationMetrics {
    /// `_sent_records_total`, `_sent_bytes_total`: records streamed to followers.
    pub sent_records: IntCounter,
    pub sent_bytes: IntCounter,
    /// `_followers`: followers connected now.
    pub followers: IntGauge,
    /// `_follower_max_lag_records`: how far the furthest-behind connected follower is.
    pub follower_max_lag: IntGauge,
    /// `_refusals_total{reason}`: streams refused (`unauthorized`, `identity`, `out_of_range`,
    /// `too_many`).
    pub refusals: IntCounterVec,
    /// `_received_records_total{upstream}`, `_received_bytes_total{upstream}`.
    pub received_records: IntCounterVec,
    pub received_bytes: IntCounterVec,
    /// `_upstream_connected{upstream}`: 1 while the stream is up.
    pub upstream_connected: IntGaugeVec,
    /// `_upstream_lag_records{upstream}`: upstream log end minus what is durable here.
    pub upstream_lag_records: IntGaugeVec,
    /// `_upstream_lag_seconds{upstream}`: how far behind the database this node's cache may be.
    pub upstream_lag_seconds: GaugeVec,
    /// `_reconnects_total{upstream}`: streams that ended and were opened again.
    pub reconnects: IntCounterVec,
    /// `_bootstraps_total{upstream,reason}`: snapshots loaded (`start`, `retention`, `identity`,
    /// `ahead`).
    pub bootstraps: IntCounterVec,
    /// `_link_timeouts_total{upstream}`: links found dead (no frame within `link_timeout`).
    pub link_timeouts: IntCounterVec,
}

impl ReplicationMetrics {
    pub fn new(r: &Registry) -> ReplicationMetrics {
        use crate::metrics::{counter1, gauge1, reg};
        let counter = |name: &str, help: &str| counter1(r, name, help);
        let counters = |name: &str, help: &str, labels: &[&str]| crate::metrics::counter(r, name, help, labels);
        let gauges = |name: &str, help: &str, labels: &[&str]| crate::metrics::gauge(r, name, help, labels);
        ReplicationMetrics {
            sent_records: counter(
                "cachesync_replication_sent_records_total",
                "Log records streamed to followers.",
            ),
            sent_bytes: counter(
                "cachesync_replication_sent_bytes_total",
                "Bytes of log records streamed to followers.",
            ),
            followers: gauge1(r, "cachesync_replication_followers", "Followers connected now."),
            follower_max_lag: gauge1(
                r,
                "cachesync_replication_follower_max_lag_records",
                "Records the furthest-behind connected follower has not reported durable.",
            ),
            refusals: counters(
                "cachesync_replication_refusals_total",
                "Log streams refused, by reason.",
                &["reason"],
            ),
            received_records: counters(
                "cachesync_replication_received_records_total",
                "Log records received from an upstream.",
                &["upstream"],
            ),
            received_bytes: counters(
                "cachesync_replication_received_bytes_total",
                "Bytes of log records received from an upstream.",
                &["upstream"],
            ),
            upstream_connected: gauges(
                "cachesync_replication_upstream_connected",
                "1 while the stream from the upstream is up.",
                &["upstream"],
            ),
            upstream_lag_records: gauges(
                "cachesync_replication_upstream_lag_records",
                "Records the upstream's log holds that are not yet durable here.",
                &["upstream"],
            ),
            upstream_lag_seconds: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "cachesync_replication_upstream_lag_seconds",
                        "How far behind the database this node's cache may be (the freshness watermark's age).",
                    ),
                    &["upstream"],
                ),
            ),
            reconnects: counters(
                "cachesync_replication_reconnects_total",
                "Streams from the upstream that ended and were opened again.",
                &["upstream"],
            ),
            bootstraps: counters(
                "cachesync_replication_bootstraps_total",
                "Snapshots loaded from the upstream, by reason.",
                &["upstream", "reason"],
            ),
            link_timeouts: counters(
                "cachesync_replication_link_timeouts_total",
                "Links to the upstream found dead: no frame within link_timeout.",
                &["upstream"],
            ),
        }
    }
}

/// One connected follower, as the log server sees it.
#[derive(Debug)]
pub struct FollowerState {
    pub id: u64,
    pub name: String,
    pub peer: Option<SocketAddr>,
    pub connected_at: std::time::Instant,
    /// The next offset the stream will send.
    pub sent: AtomicU64,
    /// Its reported place and when it reported.
    pub reports: Reports,
}

/// What a connected follower (of the log, or a federation peer) has reported: its durable
/// place, which holds retention, and when it last said so.
#[derive(Debug)]
pub struct Reports {
    pub hold: Arc<Hold>,
    /// When it last reported (ms since the Unix epoch).
    pub reported_ms: AtomicU64,
}

impl Reports {
    /// Holding retention at `hold`, as reported now.
    pub fn new(hold: Arc<Hold>) -> Reports {
        Reports {
            hold,
            reported_ms: AtomicU64::new(crate::commitlog::now_ms()),
        }
    }

    /// The follower has `position` durable (never past `end`, the log's end).
    pub fn reported(&self, position: u64, end: Offset) {
        self.hold.advance(Offset(position.min(end.0)));
        self.reported_ms.store(crate::commitlog::now_ms(), Ordering::Relaxed);
    }

    /// How long since the last report, in ms.
    pub fn silent_ms(&self) -> u64 {
        crate::commitlog::now_ms().saturating_sub(self.reported_ms.load(Ordering::Relaxed))
    }
}

/// One upstream, as its follower sees it.
#[derive(Debug)]
pub struct UpstreamState {
    pub name: String,
    pub url: String,
    pub connected: AtomicBool,
    pub identity: Mutex<Option<String>>,
    /// The next upstream offset to fetch (everything below is durable here).
    pub next: AtomicU64,
    /// The upstream log's end, as last reported.
    pub upstream_end: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub bootstraps: AtomicU64,
    pub reconnects: AtomicU64,
}

impl UpstreamState {
    pub fn new(name: &str, url: &str) -> UpstreamState {
        UpstreamState {
            name: name.into(),
            url: url.into(),
            connected: AtomicBool::new(false),
            identity: Mutex::new(None),
            next: AtomicU64::new(0),
            upstream_end: AtomicU64::new(0),
            last_error: Mutex::new(None),
            bootstraps: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    pub fn set_error(&self, why: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn identity(&self) -> Option<String> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What `GET /v1/replication` reports: this node's role, log, followers and upstreams.
pub struct ReplicationStatus {
    pub node: String,
    pub log: Option<CommitLog>,
    /// Where the log server listens, when it does.
    pub serving: Mutex<Option<SocketAddr>>,
    pub followers: Mutex<BTreeMap<u64, Arc<FollowerState>>>,
    pub upstreams: Vec<Arc<UpstreamState>>,
    /// How far behind the database the upstream-fed cache may be.
    pub freshness: Arc<crate::keyspace::freshness::Freshness>,
}

impl ReplicationStatus {
    pub fn role(&self) -> &'static str {
        let serving = self.serving.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        match (serving, !self.upstreams.is_empty()) {
            (true, true) => "relay",
            (true, false) => "hub",
            (false, true) => "edge",
            (false, false) => "standalone",
        }
    }

    /// Updates the follower-lag gauge (on scrape).
    pub fn refresh_metrics(&self, m: &ReplicationMetrics) {
        let Some(log) = &self.log else { return };
        let end = log.end().0;
        let followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let lag = followers
            .values()
            .map(|f| end.saturating_sub(f.reports.hold.position().0))
            .max()
            .unwrap_or(0);
        m.follower_max_lag.set(lag as i64);
    }

    pub fn report(&self) -> Value {
        let now_ms = crate::commitlog::now_ms();
        let log = self.log.as_ref().map(|l| {
            json!({
                "identity": l.identity(),
                "start": l.start().0,
                "end": l.end().0,
            })
        });
        let end = self.log.as_ref().map_or(0, |l| l.end().0);
        let followers: Vec<Value> = self
            .followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|f| {
                let position = f.reports.hold.position().0;
                json!({
                    "name": f.name,
                    "address": f.peer.map(|a| a.to_string()),
                    "connected_seconds": f.connected_at.elapsed().as_secs_f64(),
                    "position": position,
                    "sent": f.sent.load(Ordering::Relaxed),
                    "lag_records": end.saturating_sub(position),
                    "last_report_ms_ago": now_ms.saturating_sub(f.reports.reported_ms.load(Ordering::Relaxed)),
                })
            })
            .collect();
        let behind = self.freshness.behind();
        let upstreams: Vec<Value> = self
            .upstreams
            .iter()
            .map(|u| {
                let next = u.next.load(Ordering::Relaxed);
                let upstream_end = u.upstream_end.load(Ordering::Relaxed);
                json!({
                    "name": u.name,
                    "url": u.url,
                    "connected": u.connected.load(Ordering::Relaxed),
                    "identity": u.identity(),
                    "position": next,
                    "upstream_end": upstream_end,
                    "lag_records": upstream_end.saturating_sub(next),
                    "lag_seconds": behind.map(|d| d.as_secs_f64()),
                    "last_error": u.last_error(),
                    "bootstraps": u.bootstraps.load(Ordering::Relaxed),
                    "reconnects": u.reconnects.load(Ordering::Relaxed),
                })
            })
            .collect();
        json!({
            "node": self.node,
            "role": self.role(),
            "listen": self.serving.lock().unwrap_or_else(|p| p.into_inner()).map(|a| a.to_string()),
            "log": log,
            "followers": followers,
            "upstreams": upstreams,
        })
    }
}
