//! `[redis]`: the shared L2 tier — where it is (one server, or a Redis Cluster), how long a
//! request to it may take, the invalidation channel's bound and backstops, and the circuit
//! breaker. The URLs are [`Secret`]s (they may carry a password): never logged or printed.

use std::time::Duration;

use serde::Serialize;

use crate::section::{Section, humantime_serde_shim};
use crate::source::postgres::config::Secret;

/// Longest a request to Redis may take before it counts as failed (and the read goes on to
/// Postgres).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// How long after a change is acknowledged on one node another node may still serve the old
/// value from its L1: the invalidation channel's bound. Past it, an L1 entry not confirmed
/// since is revalidated before it is served.
pub const DEFAULT_MAX_INVALIDATION_DELAY: Duration = Duration::from_secs(1);
/// How often every L1 entry of an L2 keyspace is compared with L2 by version.
pub const DEFAULT_RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// The last backstop: an L1 entry not confirmed for this long is revalidated before it is served.
pub const DEFAULT_L1_MAX_AGE: Duration = Duration::from_secs(300);
/// How long a delete's (or an invalidation's) versioned tombstone stays in Redis: longer than
/// any load can take, so a load that read the row before the delete cannot put it back.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(120);
/// Entries each keyspace's invalidation stream keeps (approximately; `XADD MAXLEN ~`).
pub const DEFAULT_STREAM_MAXLEN: u64 = 100_000;
/// Consecutive failed requests that open the circuit breaker.
pub const DEFAULT_BREAKER_FAILURES: u32 = 3;
/// Longest the breaker stays open before it lets one request probe Redis again.
pub const DEFAULT_BREAKER_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Prefix of every key cachesync writes in Redis.
pub const DEFAULT_PREFIX: &str = "cachesync";
/// How long a node that missed L2 holds the key's load lease (others wait for its fill
/// instead of querying Postgres too); zero turns leases off.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(250);
/// An L2 entry's lifetime in Redis when the keyspace sets none.
pub const DEFAULT_L2_TTL: Duration = Duration::from_secs(600);

/// Where the tier lives.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisTarget {
    /// One server (`redis://[user:password@]host:port[/db]`).
    Server(Secret),
    /// A Redis Cluster: some of its nodes; the rest are discovered.
    Cluster(Vec<Secret>),
}

/// `[redis]`.
#[derive(Debug, Clone, Serialize)]
pub struct RedisConfig {
    pub target: RedisTarget,
    #[serde(with = "humantime_serde_shim")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub max_invalidation_delay: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub reconcile_every: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub l1_max_age: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub tombstone_ttl: Duration,
    pub stream_maxlen: u64,
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde_shim")]
    pub breaker_max_backoff: Duration,
    pub prefix: String,
    #[serde(with = "humantime_serde_shim")]
    pub lease: Duration,
}

impl RedisConfig {
    /// A config for one server with the defaults (tests and benchmarks).
    pub fn server(url: &str) -> RedisConfig {
        RedisConfig {
            target: RedisTarget::Server(Secret::new(url)),
            timeout: DEFAULT_TIMEOUT,
            max_invalidation_delay: DEFAULT_MAX_INVALIDATION_DELAY,
            reconcile_every: DEFAULT_RECONCILE_EVERY,
            l1_max_age: DEFAULT_L1_MAX_AGE,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
            stream_maxlen: DEFAULT_STREAM_MAXLEN,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_max_backoff: DEFAULT_BREAKER_MAX_BACKOFF,
            prefix: DEFAULT_PREFIX.into(),
            lease: DEFAULT_LEASE,
        }
    }
}

/// Why `url` does not name a Redis server this build can reach (`redis://` only), if it does not.
fn url_problem(url: &str) -> Option<String> {
    if url.starts_with("rediss://") {
        return Some("TLS to Redis (rediss://) is not supported by this build; reach Redis over a private network or a local TLS tunnel".into());
    }
    if !url.starts_with("redis://") {
        return Some("must be a redis:// URL".into());
    }
    match redis::parse_redis_url(url) {
        Some(_) => None,
        // The parser's message could quote the URL (and a password in it): say only what is wrong.
        None => Some("is not a valid Redis URL".into()),
    }
}

pub(crate) fn read_redis(mut s: Section<'_, '_>) -> Option<RedisConfig> {
    let url: Option<String> = s.get("url");
    let cluster: Option<Vec<String>> = s.get("cluster");
    let target = match (url, cluster) {
        (Some(_), Some(_)) => {
            s.problem_at(
                "cluster",
                "set either `url` (one server) or `cluster` (Redis Cluster nodes), not both",
            );
            None
        }
        (Some(u), None) => {
            if let Some(p) = url_problem(&u) {
                s.problem_at("url", p);
            }
            Some(RedisTarget::Server(Secret::new(u)))
        }
        (None, Some(nodes)) => {
            if nodes.is_empty() {
                s.problem_at("cluster", "list at least one node of the cluster");
            }
            for (i, n) in nodes.iter().enumerate() {
                if let Some(p) = url_problem(n) {
                    s.problem_at("cluster", format!("node {}: {p}", i + 1));
                }
            }
            Some(RedisTarget::Cluster(nodes.into_iter().map(Secret::new).collect()))
        }
        (None, None) => {
            s.problem("missing `url` (one server) or `cluster` (Redis Cluster nodes)");
            None
        }
    };
    let timeout = s.duration("timeout").unwrap_or(DEFAULT_TIMEOUT);
    if timeout < Duration::from_millis(1) {
        s.problem_at("timeout", "must be at least 1ms");
    }
    let max_invalidation_delay = s
        .duration("max_invalidation_delay")
        .unwrap_or(DEFAULT_MAX_INVALIDATION_DELAY);
    if max_invalidation_delay < Duration::from_millis(50) {
        s.problem_at(
            "max_invalidation_delay",
            "must be at least 50ms (the channel is read in blocks a fifth of it long)",
        );
    }
    let reconcile_every = s.duration("reconcile_every").unwrap_or(DEFAULT_RECONCILE_EVERY);
    if reconcile_every < Duration::from_millis(100) {
        s.problem_at("reconcile_every", "must be at least 100ms");
    }
    let l1_max_age = s.duration("l1_max_age").unwrap_or(DEFAULT_L1_MAX_AGE);
    if l1_max_age.is_zero() {
        s.problem_at("l1_max_age", "must be greater than zero");
    }
    let tombstone_ttl = s.duration("tombstone_ttl").unwrap_or(DEFAULT_TOMBSTONE_TTL);
    if tombstone_ttl < Duration::from_secs(1) {
        s.problem_at("tombstone_ttl", "must be at least 1s");
    }
    let stream_maxlen = s.get::<u64>("stream_maxlen").unwrap_or(DEFAULT_STREAM_MAXLEN);
    if stream_maxlen < 100 {
        s.problem_at("stream_maxlen", "must be at least 100");
    }
    let breaker_failures = s.get::<u32>("breaker_failures").unwrap_or(DEFAULT_BREAKER_FAILURES);
    if breaker_failures == 0 {
        s.problem_at("breaker_failures", "must be at least 1");
    }
    let breaker_max_backoff = s.duration("breaker_max_backoff").unwrap_or(DEFAULT_BREAKER_MAX_BACKOFF);
    if breaker_max_backoff < Duration::from_millis(10) {
        s.problem_at("breaker_max_backoff", "must be at least 10ms");
    }
    let prefix = s.get::<String>("prefix").unwrap_or_else(|| DEFAULT_PREFIX.into());
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    {
        s.problem_at("prefix", "1 to 64 letters, digits, `_`, `-`, `.` or `:`");
    }
    let lease = s.duration("lease").unwrap_or(DEFAULT_LEASE);
    s.finish();
    Some(RedisConfig {
        target: target?,
        timeout,
        max_invalidation_delay,
        reconcile_every,
        l1_max_age,
        tombstone_ttl,
        stream_maxlen,
        breaker_failures,
        breaker_max_backoff,
        prefix,
        lease,
    })
}
