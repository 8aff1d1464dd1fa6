//! The connection to the L2 tier: one server (a reconnecting multiplexed connection) or a Redis
//! Cluster (the `redis` crate's cluster client: slot map, MOVED/ASK, reconnects), behind one
//! handle, with a deadline on every request and a circuit breaker.
//!
//! The breaker: after `breaker_failures` requests in a row fail (or time out), it opens and
//! requests fail at once, without touching the network, for a backoff that doubles up to
//! `breaker_max_backoff`; then one request probes Redis (half-open) and its result closes or
//! reopens it. So while Redis is down a read pays nothing for it and goes on to Postgres.
//!
//! Connections are opened lazily: a sidecar whose Redis is down starts and serves anyway.
//! Errors never carry the URL (it may hold a password).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, RedisFuture, Value};
use tokio::time::Instant;

use super::config::{RedisConfig, RedisTarget};

/// Why an L2 request did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum L2Error {
    #[error("the Redis tier is unavailable (circuit breaker open)")]
    Open,
    #[error("the Redis tier did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Redis tier failed: {0}")]
    Failed(String),
}

/// A connection to either shape of the tier; cheap to clone (a handle on a shared connection).
#[derive(Clone)]
pub enum Conn {
    Server(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A redis error without anything that could quote the URL.
fn describe(e: &redis::RedisError) -> String {
    let kind = format!("{:?}", e.kind());
    match e.code() {
        Some(code) => format!("{kind} ({code})"),
        None if e.is_timeout() => "timed out".into(),
        None if e.is_connection_refusal() => "connection refused".into(),
        None if e.is_connection_dropped() => "connection dropped".into(),
        None => kind,
    }
}

impl From<redis::RedisError> for L2Error {
    fn from(e: redis::RedisError) -> Self {
        L2Error::Failed(describe(&e))
    }
}

#[derive(Debug)]
struct BreakerState {
    failures: u32,
    /// Open until then; `None`: closed.
    open_until: Option<Instant>,
    backoff: Duration,
    /// A probe is out while half-open.
    probing: bool,
}

/// Counts failures in a row; open, it refuses requests until its backoff has passed.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    max_backoff: Duration,
    state: Mutex<BreakerState>,
}

/// Shortest time the breaker stays open.
const MIN_BACKOFF: Duration = Duration::from_millis(50);

impl Breaker {
    pub fn new(threshold: u32, max_backoff: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            max_backoff,
            state: Mutex::new(BreakerState {
                failures: 0,
                open_until: None,
                backoff: MIN_BACKOFF,
                probing: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request may go out now.
    pub fn allow(&self) -> bool {
        let mut s = self.lock();
        match s.open_until {
            None => true,
            Some(t) if Instant::now() >= t && !s.probing => {
                s.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    pub fn success(&self) {
        let mut s = self.lock();
        s.failures = 0;
        s.open_until = None;
        s.probing = false;
        s.backoff = MIN_BACKOFF;
    }

    /// Records a failure; true when this one opened (or reopened) the breaker.
    pub fn failure(&self) -> bool {
        let mut s = self.lock();
        s.failures += 1;
        let reopen = s.probing;
        s.probing = false;
        if reopen || (s.open_until.is_none() && s.failures >= self.threshold) {
            let wait = if reopen {
                (s.backoff * 2).min(self.max_backoff)
            } else {
                MIN_BACKOFF.min(self.max_backoff)
            };
            s.backoff = wait;
            s.open_until = Some(Instant::now() + wait);
            return true;
        }
        false
    }

    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }
}

/// The tier's connection, its deadline and its breaker.
pub struct Client {
    config: RedisConfig,
    conn: tokio::sync::Mutex<Option<Conn>>,
    pub breaker: Breaker,
    on_open: Box<dyn Fn(bool) + Send + Sync>,
}

impl Client {
    /// A client that connects on first use. `on_open` is told when the breaker opens or closes.
    pub fn new(config: RedisConfig, on_open: Box<dyn Fn(bool) + Send + Sync>) -> Arc<Client> {
        Arc::new(Client {
            breaker: Breaker::new(config.breaker_failures, config.breaker_max_backoff),
            config,
            conn: tokio::sync::Mutex::new(None),
            on_open,
        })
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Opens a connection of the configured shape; `response_timeout` bounds each reply
    /// (`None`: a blocking reader's own connection).
    pub async fn open(config: &RedisConfig, response_timeout: Option<Duration>) -> Result<Conn, L2Error> {
        let connect = config.timeout.max(Duration::from_millis(100));
        match &config.target {
            RedisTarget::Server(url) => {
                let client = redis::Client::open(url.expose()).map_err(L2Error::from)?;
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(response_timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let c = tokio::time::timeout(connect * 2, client.get_connection_manager_with_config(cfg))
                    .await
                    .map_err(|_| L2Error::Timeout(connect))??;
                Ok(Conn::Server(c))
            }
            RedisTarget::Cluster(nodes) => {
                let mut b = redis::cluster::ClusterClientBuilder::new(nodes.iter().map(|n| n.expose().to_string()))
                    .connection_timeout(connect)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if let Some(t) = response_timeout {
                    b = b.response_timeout(t);
                } else {
                    b = b.response_timeout(Duration::from_secs(3600));
                }
                let client = b.build().map_err(L2Error::from)?;
                let c = tokio::time::timeout(connect * 2, client.get_async_connection())
                    .await
                    .map_err(|_| L2Error::Timeout(connect))??;
                Ok(Conn::Cluster(c))
            }
        }
    }

    async fn conn(&self) -> Result<Conn, L2Error> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = Self::open(&self.config, Some(self.config.timeout)).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` on the connection within the deadline, through the breaker.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, L2Error>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_as(true, f).await
    }

    /// [`Client::call`], or — `guarded` false — past an open breaker (the publisher: it must
    /// reach Redis the moment Redis is back, and it keeps its own backoff). Its result still
    /// closes or opens the breaker.
    pub async fn call_as<T, F, Fut>(&self, guarded: bool, f: F) -> Result<T, L2Error>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if guarded && !self.breaker.allow() {
            return Err(L2Error::Open);
        }
        let deadline = self.config.timeout;
        let result = match tokio::time::timeout(deadline, async {
            let c = self.conn().await?;
            f(c).await.map_err(L2Error::from)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(L2Error::Timeout(deadline)),
        };
        match &result {
            Ok(_) => {
                let was_open = self.breaker.is_open();
                self.breaker.success();
                if was_open {
                    tracing::info!("the Redis tier answers again; circuit breaker closed");
                    (self.on_open)(false);
                }
            }
            Err(e) => {
                if self.breaker.failure() {
                    tracing::warn!(error = %e, "the Redis tier is failing; circuit breaker open");
                    (self.on_open)(true);
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_backs_off_and_probes() {
        let b = Breaker::new(3, Duration::from_secs(1));
        assert!(b.allow());
        assert!(!b.failure() && !b.failure());
        assert!(b.allow(), "two failures leave it closed");
        assert!(b.failure(), "the third opens it");
        assert!(!b.allow(), "open: requests fail at once");
        tokio::time::advance(MIN_BACKOFF).await;
        assert!(b.allow(), "one probe after the backoff");
        assert!(!b.allow(), "only one");
        assert!(b.failure(), "a failed probe reopens it");
        tokio::time::advance(MIN_BACKOFF).await;
        assert!(!b.allow(), "for twice as long");
        tokio::time::advance(MIN_BACKOFF).await;
        assert!(b.allow());
        b.success();
        assert!(!b.is_open() && b.allow() && b.allow());
        for _ in 0..20 {
            b.failure();
            tokio::time::advance(Duration::from_secs(2)).await;
            b.allow();
        }
        b.failure();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allow(), "the backoff is capped");
    }
}
