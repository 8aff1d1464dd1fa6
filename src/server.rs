//! Assembles a running sidecar from a [`Config`]: metrics, clock, Postgres pool, keyspaces and
//! their pipelines, the HTTP listener, and the background tasks; and takes it down again in
//! order.
//!
//! Lifecycle: every task runs under one [`Lifecycle`], in the phase it belongs to. `start` binds
//! the listener (failing fast if the address is taken) and returns at once; sourced keyspaces
//! bind to their tables in the background, retrying with capped [`Backoff`] while Postgres is
//! unreachable, so the sidecar comes up before its database does and `/readyz` reports the wait.
//! `shutdown` runs the phases in order within one grace period: stop accepting and let in-flight
//! requests finish (serve), stop capture after confirming what is durable (capture), flush what
//! write-behind has left (drain), then sync and close the log (log) — and reports whether every
//! phase finished in time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::cache::StoreKind;
use crate::cdc::applier::Applier;
use crate::cdc::config::CdcSource;
use crate::cdc::postgres::{Capture, CaptureParts};
use crate::commitlog::CommitLog;
use crate::config::Config;
use crate::federation::link::PeerLink;
use crate::federation::serve::FedServer;
use crate::federation::{Federation, PeerState};
use crate::hlc::Hlc;
use crate::keyspace::Keyspace;
use crate::keyspace::config::{CdcMode, WriteMode};
use crate::keyspace::freshness::Freshness;
use crate::lifecycle::{Backoff, Lifecycle, Phase};
use crate::metrics::Metrics;
use crate::patterns::Pipeline;
use crate::patterns::write_behind::WriteBehind;
use crate::patterns::write_behind::deadletters::DeadLetterError;
use crate::patterns::write_behind::flusher::Flusher;
use crate::replication::follow::{Follower, FollowerParts};
use crate::replication::serve::LogServer;
use crate::replication::{self, ReplicationMetrics, ReplicationStatus, UpstreamState};
use crate::source::SourceError;
use crate::source::postgres::PgPool;
use std::collections::HashMap;
use tokio::sync::watch;

/// First wait before retrying to bind a keyspace to its table.
pub const BIND_RETRY_INITIAL: Duration = Duration::from_millis(250);
/// Longest wait between bind retries.
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot open the commit log: {0}")]
    Log(#[from] crate::commitlog::LogError),
    #[error("cannot open the write-behind dead letters: {0}")]
    DeadLetters(#[from] DeadLetterError),
    #[error("{0}")]
    Assembly(String),
}

/// How shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every request and task finished within the grace period.
    Complete,
    /// The grace period ran out; what was still running was cut off.
    TimedOut,
}

/// What a running server exposes about its CDC.
#[derive(Clone)]
pub struct CdcStatus {
    /// The replication slot in use (none on an edge, which follows an upstream).
    pub slot: Option<String>,
    /// The commit log offset the applier has reached.
    pub applied: crate::cdc::applier::Applied,
}

/// A running sidecar.
pub struct Server {
    addr: SocketAddr,
    cdc: Option<CdcStatus>,
    /// Tells the flusher to flush what is left and stop (set at shutdown, after requests).
    drain: Option<watch::Sender<bool>>,
    state: Arc<AppState>,
    life: Lifecycle,
    http: JoinHandle<()>,
    grace: Duration,
    /// Where the RESP front listens, when it is on.
    resp_addr: Option<SocketAddr>,
}

impl Server {
    /// Builds everything and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let life = Lifecycle::new();
        let metrics = Arc::new(Metrics::new());
        let hlc = Arc::new(Hlc::new());
        let pool = match &config.postgres {
            Some(pg) => Some(Arc::new(PgPool::new(pg)?)),
            None => None,
        };
        let keyspaces: BTreeMap<String, Arc<Keyspace>> = config
            .keyspaces
            .iter()
            .map(|k| {
                let ks = Keyspace::new(k.clone(), hlc.clone(), metrics.clone(), config.server.max_key_bytes);
                (k.name.clone(), Arc::new(ks))
            })
            .collect();
        // The compact store frees expired entries' memory by sweeping (reads already skip them).
        {
            let serve = life.tasks(Phase::Serve);
            for ks in keyspaces.values().filter(|k| k.config.store == StoreKind::Compact) {
                serve.spawn(sweep_expired(ks.clone(), serve.child_token()));
            }
        }
        // The Redis tier: one connection and publisher, a tier per `l2` keyspace with its
        // channel reader and reconciler.
        if let Some(r) = &config.redis {
            let l2 = crate::l2::L2::new(r.clone(), &config.server.node_id, &metrics.registry);
            let serve = life.tasks(Phase::Serve);
            for ks in keyspaces.values().filter(|k| k.config.l2) {
                let c = &ks.config;
                let tier = l2.tier(&c.name, c.l2_ttl, c.negative_ttl, c.cdc == CdcMode::Off);
                ks.set_l2(tier.clone());
                serve.spawn(tier.clone().run_reader(ks.clone(), serve.child_token()));
                serve.spawn(tier.run_reconciler(ks.clone(), serve.child_token()));
            }
            // Last to stop: write-behind's final flush still has changes to announce.
            let last = life.tasks(Phase::Log);
            last.spawn(l2.run_publisher(last.child_token()));
        }
        // Federation numbers and filters records as the log writes them: it exists before the log.
        let federated: BTreeMap<String, Arc<Keyspace>> = keyspaces
            .iter()
            .filter(|(_, k)| k.config.federate)
            .map(|(n, k)| (n.clone(), k.clone()))
            .collect();
        let federation = (!federated.is_empty()).then(|| {
            let peers = config
                .peers
                .iter()
                .map(|p| Arc::new(PeerState::new(&p.name, &p.url)))
                .collect();
            Arc::new(Federation::new(
                &config.server.node_id,
                config.federation.clone(),
                hlc.clone(),
                federated,
                peers,
                &metrics.registry,
            ))
        });
        let log = match &config.log {
            Some(cfg) => {
                let (log, recovery) = CommitLog::open_with(
                    cfg.clone(),
                    &metrics.registry,
                    &life.tasks(Phase::Log),
                    federation.as_ref().map(|f| f.admit_hook()),
                )
                .await?;
                tracing::info!(dir = %cfg.dir.display(), start = %log.start(), end = %log.end(), segments = recovery.segments, "commit log open");
                Some(log)
            }
            None => None,
        };
        // Before anything appends: the vector, and the federated keyspaces rebuilt from the log.
        if let (Some(f), Some(log)) = (&federation, &log) {
            f.recover(log.clone()).await?;
        }
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.server.listen,
            source,
        })?;
        // The RESP front binds now too, so a taken port fails the start like the API's.
        let resp_listener = match &config.resp {
            Some(rc) => Some(TcpListener::bind(rc.listen).await.map_err(|source| StartError::Bind {
                addr: rc.listen,
                source,
            })?),
            None => None,
        };
        let resp_addr = resp_listener.as_ref().and_then(|l| l.local_addr().ok());
        // Write-behind: the unflushed writes are rebuilt from the log before the first request, so
        // reads see every acknowledged write from the start.
        let behind: HashMap<String, Arc<Keyspace>> = keyspaces
            .values()
            // A federated view's writes land in its home's Postgres, through the home's flusher.
            .filter(|k| k.config.write == WriteMode::Behind && k.is_sourced())
            .map(|k| (k.name().to_string(), k.clone()))
            .collect();
        let write_behind = match (&log, behind.is_empty()) {
            (Some(log), false) => {
                let wb = WriteBehind::new(
                    log.clone(),
                    config.server.node_id.clone(),
                    config.write_behind.clone(),
                    hlc.clone(),
                    metrics.clone(),
                    behind,
                )?;
                let wb = Arc::new(wb);
                let w = wb.clone();
                life.tasks(Phase::Serve)
                    .spawn_blocking(move || w.recover())
                    .await
                    .map_err(|e| StartError::Log(crate::commitlog::LogError::Failed(e.to_string())))??;
                Some(wb)
            }
            _ => None,
        };
        if let (Some(wb), Some(f)) = (&write_behind, &federation) {
            wb.set_federation(f.clone());
        }
        let serve = life.tasks(Phase::Serve);
        let pipelines = keyspaces
            .iter()
            .map(|(name, ks)| {
                Pipeline::new(ks.clone(), write_behind.as_ref(), federation.as_ref(), serve.clone())
                    .map(|p| (name.clone(), p))
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(StartError::Assembly)?;
        let replication_metrics = Arc::new(ReplicationMetrics::new(&metrics.registry));
        let upstreams: Vec<Arc<UpstreamState>> = config
            .upstreams
            .iter()
            .map(|u| Arc::new(UpstreamState::new(&u.name, &u.url)))
            .collect();
        let freshness = Arc::new(Freshness::new(config.cdc.max_staleness));
        let replication = Arc::new(ReplicationStatus {
            node: config.server.node_id.clone(),
            log: log.clone(),
            serving: std::sync::Mutex::new(None),
            followers: std::sync::Mutex::new(BTreeMap::new()),
            upstreams: upstreams.clone(),
            freshness: freshness.clone(),
        });
        // The log server binds now, so a taken port fails the start like the API's.
        let replication_listener = match &config.replication {
            Some(rc) => {
                let l = TcpListener::bind(rc.listen).await.map_err(|source| StartError::Bind {
                    addr: rc.listen,
                    source,
                })?;
                *replication.serving.lock().unwrap_or_else(|p| p.into_inner()) = l.local_addr().ok();
                Some(l)
            }
            None => None,
        };
        let hot = crate::api::HotMetrics::new(&metrics, pipelines.keys());
        let state = Arc::new(AppState {
            pipelines,
            server: config.server.clone(),
            hot,
            metrics,
            pool: pool.clone(),
            log,
            write_behind,
            replication,
            replication_metrics,
            federation: federation.clone(),
        });

        if let Some(pool) = &pool {
            for ks in state.keyspaces().filter(|k| k.is_sourced()) {
                serve.spawn(bind_until_ready(ks.clone(), pool.clone(), serve.child_token()));
            }
        }
        let cdc_keyspaces: Vec<Arc<Keyspace>> = state
            .keyspaces()
            .filter(|k| k.config.cdc != CdcMode::Off)
            .cloned()
            .collect();
        let mut cdc = None;
        if !cdc_keyspaces.is_empty() {
            let Some(log) = state.log.clone() else {
                return Err(StartError::Assembly("CDC keyspaces need [log]".into()));
            };
            let capture_tasks = life.tasks(Phase::Capture);
            for ks in &cdc_keyspaces {
                ks.set_freshness(freshness.clone());
            }
            let (gate, slot) = match (config.cdc.source, config.upstreams.first()) {
                (CdcSource::Upstream, Some(upstream)) => {
                    let (follower, gate) = Follower::new(FollowerParts {
                        config: upstream.clone(),
                        node_id: config.server.node_id.clone(),
                        log: log.clone(),
                        keyspaces: cdc_keyspaces.clone(),
                        freshness: freshness.clone(),
                        metrics: state.replication_metrics.clone(),
                        state: upstreams[0].clone(),
                        ready_grace: config.cdc.ready_grace,
                        tasks: capture_tasks.clone(),
                    });
                    capture_tasks.spawn(follower.run(capture_tasks.child_token()));
                    (gate, None)
                }
                _ => {
                    // Validation guarantees [postgres] for CDC keyspaces fed by a slot.
                    let (Some(pool), Some(pg)) = (pool.clone(), config.postgres.clone()) else {
                        return Err(StartError::Source(SourceError::NotReady {
                            keyspace: cdc_keyspaces[0].name().to_string(),
                            reason: "CDC needs [postgres] and [log]".into(),
                        }));
                    };
                    let (capture, gate) = Capture::new(CaptureParts {
                        freshness: freshness.clone(),
                        pg,
                        pool,
                        config: config.cdc.clone(),
                        node_id: config.server.node_id.clone(),
                        log: log.clone(),
                        keyspaces: cdc_keyspaces.clone(),
                        hlc: hlc.clone(),
                        metrics: state.metrics.clone(),
                        max_key_bytes: config.server.max_key_bytes,
                        tasks: capture_tasks.clone(),
                    });
                    let slot = capture.slot().to_string();
                    capture_tasks.spawn(capture.run());
                    (gate, Some(slot))
                }
            };
            let by_name = cdc_keyspaces
                .iter()
                .map(|k| (k.name().to_string(), k.clone()))
                .collect();
            let (applier, applied) = Applier::new(log, by_name, state.metrics.clone(), freshness.clone());
            cdc = Some(CdcStatus { slot, applied });
            capture_tasks.spawn(applier.run(gate, capture_tasks.child_token()));
        }
        if let (Some(listener), Some(rc), Some(log)) = (replication_listener, &config.replication, state.log.clone()) {
            let serve = life.tasks(Phase::Serve);
            let server = Arc::new(LogServer {
                config: rc.clone(),
                log,
                status: state.replication.clone(),
                metrics: state.replication_metrics.clone(),
                keyspaces: cdc_keyspaces
                    .iter()
                    .map(|k| (k.name().to_string(), k.clone()))
                    .collect(),
                applied: cdc.as_ref().map(|c| c.applied.clone()),
                freshness: cdc.as_ref().map(|_| freshness.clone()),
                stop: serve.child_token(),
                next_id: std::sync::atomic::AtomicU64::new(0),
            });
            let more = match &federation {
                Some(f) => crate::federation::serve::router(Arc::new(FedServer {
                    fed: f.clone(),
                    log: server.log.clone(),
                    heartbeat: rc.heartbeat,
                    follower_timeout: rc.follower_timeout,
                    metrics: state.replication_metrics.clone(),
                    stop: server.stop.clone(),
                    next_id: std::sync::atomic::AtomicU64::new(0),
                    links: Default::default(),
                })),
                None => axum::Router::new(),
            };
            tracing::info!(addr = ?state.replication.serving.lock().unwrap_or_else(|p| p.into_inner()), "log server listening for followers");
            let tls = rc
                .tls
                .as_ref()
                .map(replication::tls::tls_acceptor)
                .transpose()
                .map_err(StartError::Assembly)?;
            serve.spawn(replication::serve::serve(listener, server, more, tls, serve.clone()));
        }
        // Federation: the applier (checkpoints, tombstones) and one link per peer, stopped with
        // capture, before the log closes.
        if let Some(f) = &federation {
            let tasks = life.tasks(Phase::Capture);
            tasks.spawn(f.clone().run_applier(tasks.child_token()));
            tasks.spawn(f.clone().run_housekeeping(tasks.child_token()));
            for (peer, state) in config.peers.iter().zip(&f.peers) {
                let link = PeerLink::new(peer.clone(), f.clone(), state.clone(), tasks.clone());
                tasks.spawn(link.run(tasks.child_token()));
            }
        }
        // The flusher runs in the drain phase: at shutdown it drains after requests and capture
        // have stopped.
        let mut drain = None;
        if let (Some(wb), Some(pool)) = (state.write_behind.clone(), pool.clone()) {
            let marker = state
                .keyspaces()
                .any(|k| k.config.write == WriteMode::Behind && k.config.cdc != CdcMode::Off);
            let (tx, rx) = watch::channel(false);
            let tasks = life.tasks(Phase::Drain);
            tasks.spawn(Flusher::new(wb, pool, marker).run(rx, tasks.clone()));
            drain = Some(tx);
        }
        let app = api::Api::new(state.clone());
        let stop = serve.token().clone();
        let http = serve.spawn(api::listener::serve(
            listener,
            app,
            api::listener::Limits::of(&config.server),
            stop,
            serve.clone(),
        ));
        if let (Some(listener), Some(rc)) = (resp_listener, &config.resp) {
            let front = crate::resp::Front::new(rc.clone(), state.clone());
            serve.spawn(crate::resp::serve(
                listener,
                front,
                serve.token().clone(),
                serve.clone(),
            ));
            tracing::info!(addr = ?resp_addr, "RESP front listening");
        }
        tracing::info!(%addr, keyspaces = state.pipelines.len(), "cachesync started");
        Ok(Server {
            addr,
            cdc,
            drain,
            state,
            life,
            http,
            grace: config.server.shutdown_grace,
            resp_addr,
        })
    }

    /// The address the log server listens on, when `[replication]` is on.
    pub fn replication_addr(&self) -> Option<SocketAddr> {
        *self.state.replication.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address the RESP front listens on, when it is on (the real port for `:0`).
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp_addr
    }

    /// The address the API listens on (the real port when the config said `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// A keyspace by name.
    pub fn keyspace(&self, name: &str) -> Option<&Arc<Keyspace>> {
        self.state.pipelines.get(name).map(Pipeline::keyspace)
    }

    /// CDC's slot and progress, when any keyspace has CDC on.
    pub fn cdc(&self) -> Option<&CdcStatus> {
        self.cdc.as_ref()
    }

    /// Waits until the CDC applier has applied everything in the commit log at the time of the
    /// call (tests use it to know a change has reached the cache).
    pub async fn cdc_caught_up(&self, timeout: Duration) -> Result<(), String> {
        let (Some(cdc), Some(log)) = (&self.cdc, &self.state.log) else {
            return Err("no CDC".into());
        };
        let target = log.end();
        let mut applied = cdc.applied.clone();
        tokio::time::timeout(timeout, applied.wait_for(|a| *a >= target))
            .await
            .map_err(|_| {
                format!(
                    "applier at {} after {timeout:?}, log at {target}",
                    *cdc.applied.borrow()
                )
            })?
            .map(|_| ())
            .map_err(|_| "applier stopped".into())
    }

    /// Whether every keyspace can serve.
    pub fn is_ready(&self) -> bool {
        self.state.keyspaces().all(|k| k.readiness().is_ok())
    }

    /// Waits until every keyspace can serve, or the deadline passes (returns the last reasons).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_ready() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let reasons: Vec<String> = self
                    .state
                    .keyspaces()
                    .filter_map(|k| k.readiness().err().map(|r| format!("{}: {r}", k.name())))
                    .collect();
                return Err(reasons.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts down in order, within the grace period: stop accepting and finish in-flight
    /// requests; stop capture (it confirms what is durable before it leaves); drain write-behind;
    /// sync and close the log. Logs each phase that ran out of time.
    pub async fn shutdown(self) -> Drain {
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut outcome = Drain::Complete;
        let mut late = |phase: Phase| {
            tracing::warn!(phase = phase.name(), "shutdown: the grace period ran out in this phase");
            outcome = Drain::TimedOut;
        };
        // 1. Serve: the listener stops accepting; requests in flight finish.
        let serve = self.life.tasks(Phase::Serve);
        serve.token().cancel();
        let mut http = self.http;
        if tokio::time::timeout_at(deadline, &mut http).await.is_err() {
            http.abort();
            late(Phase::Serve);
        }
        if !serve.stop(deadline).await {
            late(Phase::Serve);
        }
        tracing::info!(phase = "serve", "shutdown: requests finished; no new ones are accepted");
        // 2. Capture: the stream confirms its durable position and leaves; the applier stops.
        if !self.life.tasks(Phase::Capture).stop(deadline).await {
            late(Phase::Capture);
        }
        tracing::info!(
            phase = "capture",
            "shutdown: change capture stopped after confirming its durable position"
        );
        // 3. Drain: no request can add writes now; flush what is left, within the grace period.
        // What does not make it stays durable in the log and is flushed on the next start.
        let drain = self.life.tasks(Phase::Drain);
        if let Some(tx) = &self.drain {
            let _ = tx.send(true);
            if !drain.finish(deadline).await {
                late(Phase::Drain);
            }
            if let Some(wb) = &self.state.write_behind {
                let left = wb.backlog.records.load(std::sync::atomic::Ordering::Relaxed);
                if left > 0 {
                    tracing::warn!(
                        unflushed = left,
                        "shutdown: write-behind writes left unflushed; they are durable and will be flushed on the next start"
                    );
                } else {
                    tracing::info!(phase = "drain", "shutdown: every write-behind write reached Postgres");
                }
            }
        }
        // Cut off what is still draining (it resumes from its durable cursor on the next start).
        drain.stop(tokio::time::Instant::now() + CUTOFF_WAIT).await;
        // 4. Log: make everything appended durable, stop the writer and the timers.
        if let Some(log) = self.state.log.clone() {
            match log.close().await {
                Ok(()) => tracing::info!(phase = "log", "shutdown: the commit log is synced and closed"),
                Err(e) => {
                    tracing::error!(error = %e, "closing the commit log failed");
                    outcome = Drain::TimedOut;
                }
            }
        }
        if !self
            .life
            .tasks(Phase::Log)
            .stop(deadline.max(tokio::time::Instant::now() + CUTOFF_WAIT))
            .await
        {
            outcome = Drain::TimedOut;
        }
        outcome
    }
}

/// How long a phase cut off after the grace period gets to wind down.
const CUTOFF_WAIT: Duration = Duration::from_secs(2);

/// How often a compact keyspace sweeps a few of its shards for expired entries: the whole
/// store every 4 seconds.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Sweeps a compact keyspace's expired entries until the server shuts down.
async fn sweep_expired(ks: Arc<Keyspace>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => ks.sweep_some(),
            _ = stop.cancelled() => return,
        }
    }
}

/// Binds one keyspace to its table, retrying with capped exponential backoff until it works or
/// the server shuts down. Logs each distinct failure once, so a long outage is not a log flood.
async fn bind_until_ready(ks: Arc<Keyspace>, pool: Arc<PgPool>, stop: CancellationToken) {
    let mut backoff = Backoff::new(BIND_RETRY_INITIAL, BIND_RETRY_MAX);
    let mut last_reason = String::new();
    loop {
        let attempt = tokio::select! {
            r = ks.bind(&pool) => r,
            _ = stop.cancelled() => return,
        };
        match attempt {
            Ok(_) => {
                tracing::info!(keyspace = ks.name(), "keyspace bound to its table");
                return;
            }
            Err(reason) => {
                let reason = reason.to_string();
                if reason != last_reason {
                    tracing::warn!(keyspace = ks.name(), %reason, "keyspace not ready; retrying");
                    last_reason = reason;
                }
            }
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}
