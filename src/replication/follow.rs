//! The follower (`[[upstream]]`, an edge's `[cdc] source = "upstream"`): streams the upstream's
//! log into this node's own log, where this node's applier takes it to the keyspaces through the
//! same versioned door as local CDC.
//!
//! A session:
//! 1. **Bootstrap** when this process has not yet been fed, or has no usable place in the
//!    upstream's log (none stored, retention passed it, the upstream's log was recreated): hold
//!    the applier, forget what the keyspaces held if anything, load the upstream's snapshot (its
//!    entries with their versions, as of upstream offset `P`), and plan to apply the tail from
//!    `P`. A stored place before `P` is still fetched from, so this node's log stays whole, but
//!    what lies before `P` is not applied (the snapshot already holds it).
//! 2. **Stream** from the place: each batch's change events (CDC events only — another node's
//!    write-behind journal is its own business; its writes come back as CDC echoes) are appended
//!    to this node's log byte for byte, origin kept. Once durable, the place moves on; it is stored
//!    (identity and offset) a few times a second and reported to the upstream, whose retention
//!    keeps what a connected follower still needs.
//! 3. **Freshness.** Progress frames say "the upstream's log below *covered* holds every change
//!    committed before *as of*". Once this node has that much durable and applied, its cache is
//!    fresh as of then: the edge keeps the same `max_staleness` contract as a node with its own
//!    slot, and a dead link shows as a growing lag, not as silently old data.
//!
//! A link that sends nothing for `link_timeout` (the upstream sends progress every heartbeat) is
//! dead: a blackhole is detected, reported, and the follower reconnects. While the upstream is
//! unreachable the keyspaces keep serving from memory with their lag; past `[cdc] ready_grace`
//! those that cannot read through are not ready.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::UpstreamConfig;
use super::position::{Position, PositionFile};
use super::tls::trust;
use super::wire::{self, Frame};
use super::{CONNECTION_HEADER, EPOCH_HEADER, IDENTITY_HEADER, LOG_START_HEADER, ReplicationMetrics, UpstreamState};
use crate::cdc::Gate;
use crate::commitlog::{CommitLog, Offset};
use crate::event::{ChangeEvent, Source};
use crate::keyspace::freshness::Freshness;
use crate::keyspace::{Blocker, Keyspace};
use crate::lifecycle::{Backoff, Tasks};

/// Appends awaiting durability at once; the follower reads no further until one completes.
const MAX_INFLIGHT: usize = 64;
/// How often the place is stored and reported.
const REPORT_EVERY: Duration = Duration::from_millis(250);
/// Progress marks kept while their records are not yet durable here.
const MAX_MARKS: usize = 4096;
/// First wait before reconnecting.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between reconnects.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Everything a follower needs.
pub struct FollowerParts {
    pub config: UpstreamConfig,
    pub node_id: String,
    pub log: CommitLog,
    /// The keyspaces the upstream feeds (this node's CDC keyspaces).
    pub keyspaces: Vec<Arc<Keyspace>>,
    pub freshness: Arc<Freshness>,
    pub metrics: Arc<ReplicationMetrics>,
    pub state: Arc<UpstreamState>,
    pub ready_grace: Duration,
    pub tasks: Tasks,
}

/// Why a session ended.
#[derive(Debug)]
struct Ended {
    why: String,
    /// The link was up and streaming (retry at once).
    streamed: bool,
}

/// A batch made durable here.
struct Done {
    /// The next upstream offset after the batch.
    next: u64,
    /// This node's log end after the batch, when it appended anything.
    local_end: Option<Offset>,
}

type Inflight = FuturesOrdered<futures::future::BoxFuture<'static, Result<Done, String>>>;

/// Follows one upstream's log.
pub struct Follower {
    p: FollowerParts,
    client: reqwest::Client,
    gate: watch::Sender<Gate>,
    file: PositionFile,
    /// Where this node is in the upstream's log (everything below `next` is durable here).
    at: Option<Position>,
    /// The place last stored.
    stored: Option<Position>,
    /// The keyspaces hold upstream-fed data from this process.
    fed: bool,
    /// Why the next bootstrap happens (a metric label).
    reason: &'static str,
    /// The upstream's (instance, reloads) as of the snapshot this node holds: when the upstream
    /// reloads its caches outside its log, this node takes a new snapshot.
    epoch: Option<(u64, u64)>,
}

/// Progress the stream has made but not yet made durable and applied here.
struct Stream {
    /// The next upstream offset expected in a records frame.
    received: u64,
    /// The next upstream offset durable here.
    durable: u64,
    /// This node's log end after the last durable batch.
    local_end: Offset,
    /// (covered, as of in the freshness clock), waiting for `durable` to pass `covered`.
    marks: VecDeque<(u64, u64)>,
    /// Records below this upstream offset are not applied (the snapshot holds them).
    apply_from: Option<u64>,
}

impl Follower {
    /// A follower, and the gate this node's applier obeys. The keyspaces start not ready.
    pub fn new(p: FollowerParts) -> (Follower, watch::Receiver<Gate>) {
        let (gate, rx) = watch::channel(Gate::closed());
        for ks in &p.keyspaces {
            ks.set_blocker(
                Blocker::Cdc,
                Some(format!("waiting for upstream {} ({})", p.config.name, p.config.url)),
            );
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(p.config.link_timeout)
            .tcp_nodelay(true);
        // Checked when the configuration was read; a file changed since is reported here.
        match p.config.ca_file.as_deref().map(trust) {
            Some(Ok(certs)) => {
                for c in certs {
                    builder = builder.add_root_certificate(c);
                }
            }
            Some(Err(why)) => tracing::error!(upstream = %p.config.name, reason = %why, "ca_file cannot be used"),
            None => {}
        }
        let client = builder.build().expect("an HTTP client builds");
        let file = PositionFile::new(&p.log.config().dir, &p.config.name);
        (
            Follower {
                p,
                client,
                gate,
                file,
                at: None,
                stored: None,
                fed: false,
                reason: "start",
                epoch: None,
            },
            rx,
        )
    }

    fn label(&self) -> &str {
        &self.p.config.name
    }

    fn request(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.p.config.token {
            Some(t) => req.bearer_auth(t.expose()),
            None => req,
        }
    }

    /// Follows until `stop`, reconnecting after failures: at once after a session that
    /// streamed, then with capped, jittered backoff.
    pub async fn run(mut self, stop: CancellationToken) {
        match self.file.load() {
            Ok(at) => {
                self.at = at.clone();
                self.stored = at;
            }
            Err(e) => {
                tracing::error!(upstream = %self.label(), error = %e, "the stored upstream position is damaged; bootstrapping from the upstream's snapshot");
                self.reason = "damaged";
            }
        }
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        let mut down_since: Option<Instant> = None;
        loop {
            let ended = self.session(&stop).await;
            self.p.state.connected.store(false, Ordering::Relaxed);
            self.p
                .metrics
                .upstream_connected
                .with_label_values(&[self.label()])
                .set(0);
            if stop.is_cancelled() {
                self.store().await;
                return;
            }
            let wait = if ended.streamed {
                down_since = Some(Instant::now());
                backoff.reset();
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            let since = *down_since.get_or_insert_with(Instant::now);
            self.p.state.reconnects.fetch_add(1, Ordering::Relaxed);
            self.p.metrics.reconnects.with_label_values(&[self.label()]).inc();
            tracing::warn!(upstream = %self.label(), error = %ended.why, retry_in_ms = wait.as_millis() as u64, "upstream stream ended; reconnecting");
            self.p.state.set_error(Some(ended.why.clone()));
            let why = format!("upstream {} unreachable: {}", self.label(), ended.why);
            if !crate::cdc::wait_down(
                &self.p.keyspaces,
                &|| true,
                since,
                wait,
                self.p.ready_grace,
                &why,
                &stop,
            )
            .await
            {
                self.store().await;
                return;
            }
        }
    }

    /// Stores the place if it moved (blocking I/O on the blocking pool).
    async fn store(&mut self) {
        if self.at == self.stored {
            return;
        }
        match self.file.save(self.at.clone()).await {
            Ok(()) => self.stored = self.at.clone(),
            Err(e) => tracing::error!(upstream = %self.p.config.name, error = %e, "cannot store the upstream position"),
        }
    }

    /// Holds the applier and empties the keyspaces: what they hold may have missed changes.
    fn forget_all(&self, why: &str) {
        // This node's own followers must re-bootstrap too.
        self.p.freshness.reloaded();
        self.gate.send_modify(|g| g.open = false);
        for ks in &self.p.keyspaces {
            ks.set_blocker(Blocker::Cdc, Some(why.into()));
            ks.clear();
        }
    }

    /// Lets the applier go on from this node's log offset `from`.
    fn open_gate(&self, from: Offset) {
        self.p.freshness.restart(from);
        self.gate.send_modify(|g| {
            g.open = true;
            g.from = from;
            g.generation += 1;
        });
    }

    /// Loads the upstream's snapshot; returns the upstream offset it is as of. Sets `at` to
    /// where the stream starts.
    async fn bootstrap(&mut self) -> Result<u64, String> {
        let names: Vec<&str> = self.p.keyspaces.iter().map(|k| k.name()).collect();
        let url = format!("{}/v1/snapshot?keyspaces={}", self.p.config.url, names.join(","));
        let (resp, identity) = snapshot_response(self.request(self.client.get(&url)), &self.p.config.url).await?;
        let epoch = resp
            .headers()
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('.'))
            .and_then(|(i, r)| Some((i.parse::<u64>().ok()?, r.parse::<u64>().ok()?)));
        let start: u64 = resp
            .headers()
            .get(LOG_START_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        if let Some(at) = &self.at {
            if at.identity != identity {
                tracing::error!(upstream = %self.label(), stored = %at.identity, found = %identity,
                    "the upstream's log was recreated (its identity changed): the stored position means nothing there; bootstrapping");
                self.reason = "identity";
                self.at = None;
            } else if at.next.0 < start {
                tracing::warn!(upstream = %self.label(), position = at.next.0, upstream_start = start,
                    "the upstream's retention passed this node's stored position; following from its snapshot");
                self.reason = "retention";
                self.at = None;
            }
        }
        if self.fed {
            self.forget_all(&format!(
                "bootstrapping from upstream {} ({})",
                self.label(),
                self.reason
            ));
        } else {
            self.gate.send_modify(|g| g.open = false);
        }
        let started = Instant::now();
        let mut decoder = wire::Decoder::new();
        let mut resp = resp;
        let mut head: Option<(u64, Vec<Arc<Keyspace>>)> = None;
        let mut installed = 0u64;
        loop {
            let chunk = tokio::time::timeout(self.p.config.link_timeout.max(Duration::from_secs(10)), resp.chunk())
                .await
                .map_err(|_| "the upstream's snapshot stalled".to_string())?
                .map_err(|e| format!("reading the snapshot: {}", without_url(&e)))?;
            let Some(chunk) = chunk else {
                return Err("the upstream's snapshot ended early".into());
            };
            decoder.push(&chunk);
            while let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
                match frame {
                    Frame::SnapshotHead { position, keyspaces } => {
                        let mut order = Vec::new();
                        for (name, whole) in keyspaces {
                            let ks =
                                self.p.keyspaces.iter().find(|k| k.name() == name).ok_or_else(|| {
                                    format!("the snapshot has keyspace {name}, which was not asked for")
                                })?;
                            if ks.config.warm && !ks.config.read_through && !whole {
                                let why = format!(
                                    "upstream {} does not hold keyspace {name} whole (warm it there, with no ttl expiry or max_entries/max_bytes eviction), and it does not read through here",
                                    self.label()
                                );
                                ks.set_blocker(Blocker::Cdc, Some(why.clone()));
                                return Err(why);
                            }
                            order.push(ks.clone());
                        }
                        head = Some((position.0, order));
                    }
                    Frame::Entries { keyspace, entries } => {
                        let (_, order) = head.as_ref().ok_or("snapshot entries before its head")?;
                        let ks = order.get(keyspace).ok_or("snapshot entries of an unknown keyspace")?;
                        for e in entries {
                            let key: Arc<str> = e.key.as_str().into();
                            ks.hlc.observe(e.version);
                            ks.mutate_local(key, e.into_entry()).await;
                            installed += 1;
                        }
                    }
                    Frame::SnapshotEnd { entries } => {
                        let (position, _) = head.ok_or("a snapshot end without a head")?;
                        if entries != installed {
                            return Err(format!("the snapshot said {entries} entries but carried {installed}"));
                        }
                        self.p
                            .metrics
                            .bootstraps
                            .with_label_values(&[self.label(), self.reason])
                            .inc();
                        self.p.state.bootstraps.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(upstream = %self.label(), reason = self.reason, %identity, position, entries,
                            seconds = started.elapsed().as_secs_f64(), "bootstrapped from the upstream's snapshot");
                        let next = match &self.at {
                            // Fetch from the stored place (this log stays whole), apply from
                            // the snapshot's position.
                            Some(at) => at.next.0.min(position),
                            None => position,
                        };
                        self.at = Some(Position {
                            identity: identity.clone(),
                            next: Offset(next),
                        });
                        *self.p.state.identity.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity);
                        self.fed = true;
                        self.reason = "start";
                        self.epoch = epoch;
                        self.store().await;
                        return Ok(position);
                    }
                    other => return Err(format!("unexpected frame in a snapshot: {other:?}")),
                }
            }
        }
    }

    /// One session: bootstrap if needed, then stream until an error or `stop`.
    async fn session(&mut self, stop: &CancellationToken) -> Ended {
        let failed = |why: String| Ended { why, streamed: false };
        let apply_from = if !self.fed || self.at.is_none() || self.epoch.is_none() {
            match self.bootstrap().await {
                Ok(p) => Some(p),
                Err(why) => return failed(why),
            }
        } else {
            None
        };
        let Some(at) = self.at.clone() else {
            return failed("no position after bootstrap".into());
        };
        let url = format!(
            "{}/v1/log?from={}&follower={}",
            self.p.config.url, at.next.0, self.p.node_id
        );
        let resp = self
            .request(self.client.get(&url))
            .header(IDENTITY_HEADER, &at.identity)
            .send();
        let resp = match tokio::time::timeout(self.p.config.link_timeout, resp).await {
            Err(_) => {
                self.p.metrics.link_timeouts.with_label_values(&[self.label()]).inc();
                return failed(format!(
                    "the upstream did not answer within link_timeout ({:?}); the link looks dead",
                    self.p.config.link_timeout
                ));
            }
            Ok(Err(e)) => return failed(format!("connecting to {}: {}", self.p.config.url, without_url(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            match status.as_u16() {
                409 => {
                    self.reason = if body.contains("past this log's end") {
                        "ahead"
                    } else {
                        "identity"
                    };
                    self.at = None;
                }
                410 => {
                    self.reason = "retention";
                    self.at = None;
                }
                _ => {}
            }
            let why = refusal(status, &body);
            if status.as_u16() == 401 {
                tracing::error!(upstream = %self.label(), reason = %why, "the upstream refused this node");
            }
            return failed(why);
        }
        let connection: u64 = resp
            .headers()
            .get(CONNECTION_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        self.p.state.connected.store(true, Ordering::Relaxed);
        self.p.state.set_error(None);
        self.p
            .metrics
            .upstream_connected
            .with_label_values(&[self.label()])
            .set(1);
        tracing::info!(upstream = %self.label(), from = at.next.0, "following the upstream's log");
        let mut s = Stream {
            received: at.next.0,
            durable: at.next.0,
            local_end: self.p.log.end(),
            marks: VecDeque::new(),
            apply_from: apply_from.filter(|p| *p > at.next.0),
        };
        if s.apply_from.is_none() && apply_from.is_some() {
            self.open_gate(self.p.log.end());
        }
        let why = self.stream(resp, &mut s, connection, stop).await;
        Ended {
            why: why.unwrap_or_default(),
            streamed: true,
        }
    }

    /// Reads frames until the link fails (`Some(why)`) or `stop` (`None`).
    async fn stream(
        &mut self,
        mut resp: reqwest::Response,
        s: &mut Stream,
        connection: u64,
        stop: &CancellationToken,
    ) -> Option<String> {
        let mut decoder = wire::Decoder::new();
        let mut inflight: Inflight = FuturesOrdered::new();
        let began = self.p.freshness.now();
        let mut fresh = self.p.freshness.subscribe();
        let mut caught_up = false;
        let mut last_frame = Instant::now();
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let link_timeout = self.p.config.link_timeout;
        let result = loop {
            if !caught_up && self.p.freshness.as_of() >= began {
                caught_up = true;
                for ks in &self.p.keyspaces {
                    ks.set_blocker(Blocker::Cdc, None);
                }
                tracing::info!(upstream = %self.label(), "caught up with the upstream");
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break None,
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    match done {
                        Ok(d) => self.durable(s, d),
                        Err(why) => break Some(why),
                    }
                }
                _ = tick.tick() => self.report(s, connection).await,
                _ = fresh.changed(), if !caught_up => {}
                _ = tokio::time::sleep_until(last_frame + link_timeout) => {
                    self.p.metrics.link_timeouts.with_label_values(&[self.label()]).inc();
                    break Some(format!("no frame from the upstream for {link_timeout:?} (it sends one every heartbeat): the link looks dead"));
                }
                chunk = resp.chunk(), if inflight.len() < MAX_INFLIGHT => match chunk {
                    Ok(Some(bytes)) => {
                        last_frame = Instant::now();
                        decoder.push(&bytes);
                        if let Err(why) = self.frames(&mut decoder, s, &mut inflight).await {
                            break Some(why);
                        }
                    }
                    Ok(None) => break Some("the upstream ended the stream".into()),
                    Err(e) => break Some(format!("reading the stream: {}", without_url(&e))),
                },
            }
        };
        // What was queued becomes durable anyway: take it into the place.
        while let Some(done) = inflight.next().await {
            match done {
                Ok(d) => self.durable(s, d),
                Err(_) => break,
            }
        }
        self.store().await;
        result
    }

    /// Handles every whole frame received.
    async fn frames(
        &mut self,
        decoder: &mut wire::Decoder,
        s: &mut Stream,
        inflight: &mut Inflight,
    ) -> Result<(), String> {
        while let Some(frame) = decoder
            .next_frame()
            .map_err(|e| format!("the upstream's stream: {e}"))?
        {
            match frame {
                Frame::Records { first, records } => {
                    if first.0 != s.received {
                        return Err(format!(
                            "the upstream sent offset {first} where {} was expected",
                            s.received
                        ));
                    }
                    let bytes: usize = records.iter().map(|(_, p)| p.len()).sum();
                    self.p
                        .metrics
                        .received_records
                        .with_label_values(&[self.label()])
                        .inc_by(records.len() as u64);
                    self.p
                        .metrics
                        .received_bytes
                        .with_label_values(&[self.label()])
                        .inc_by(bytes as u64);
                    let start = s.received;
                    s.received += records.len() as u64;
                    // Split where the snapshot ends: what is before it is kept, not applied.
                    let split = match s.apply_from {
                        Some(p) if p <= s.received => (p - start) as usize,
                        _ => records.len(),
                    };
                    let (before, after) = records.split_at(split);
                    self.append(before, start + split as u64, inflight).await?;
                    // Reached the snapshot's position (in this batch, or at its very end).
                    if let Some(p) = s.apply_from
                        && p <= s.received
                    {
                        // Everything before the snapshot's position is durable first; the
                        // applier starts right after it.
                        while let Some(done) = inflight.next().await {
                            self.durable(s, done?);
                        }
                        s.apply_from = None;
                        self.open_gate(self.p.log.end());
                        self.append(after, s.received, inflight).await?;
                    }
                }
                Frame::Progress(p) => {
                    self.p.state.upstream_end.store(p.end.0, Ordering::Relaxed);
                    // The upstream reloaded its caches outside its log (a lost slot, a schema
                    // change) since this node's snapshot: what the reload found is not in the
                    // log, so take a new snapshot. A restarted upstream that has not reloaded
                    // rebuilt its caches from its log's own position: nothing is missing.
                    let reloaded = match self.epoch {
                        Some((instance, reloads)) if instance == p.instance => p.reloads > reloads,
                        _ => p.reloads > 0,
                    };
                    if reloaded {
                        self.epoch = None;
                        self.reason = "upstream_reload";
                        return Err("the upstream reloaded its caches outside its log; taking a new snapshot".into());
                    }
                    self.epoch = Some((p.instance, p.reloads));
                    if p.as_of_unix_ms > 0 {
                        if s.marks.len() >= MAX_MARKS {
                            s.marks.pop_front();
                        }
                        s.marks
                            .push_back((p.covered.0, self.p.freshness.from_unix_ms(p.as_of_unix_ms)));
                        self.settle_marks(s);
                    }
                }
                Frame::Failed(why) => {
                    if why.starts_with("offset_out_of_range") {
                        self.reason = "retention";
                        self.at = None;
                    }
                    return Err(format!("the upstream ended the stream: {why}"));
                }
                other => return Err(format!("unexpected frame in a log stream: {other:?}")),
            }
        }
        Ok(())
    }

    /// Queues the CDC events among `records` in this node's log; `next` is the upstream offset
    /// after them.
    async fn append(&self, records: &[(u64, bytes::Bytes)], next: u64, inflight: &mut Inflight) -> Result<(), String> {
        let payloads: Vec<Vec<u8>> = records
            .iter()
            .filter(|(_, p)| !matches!(ChangeEvent::source_of(p), Ok(Some(s)) if s != Source::Cdc))
            .map(|(_, p)| p.to_vec())
            .collect();
        if payloads.is_empty() {
            inflight.push_back(Box::pin(async move { Ok(Done { next, local_end: None }) }));
            return Ok(());
        }
        let pending = self
            .p
            .log
            .enqueue(payloads)
            .await
            .map_err(|e| format!("appending to this node's log: {e}"))?;
        inflight.push_back(Box::pin(async move {
            let range = pending
                .durable()
                .await
                .map_err(|e| format!("appending to this node's log: {e}"))?;
            Ok(Done {
                next,
                local_end: Some(range.end),
            })
        }));
        Ok(())
    }

    /// A batch is durable here: the place moves on.
    fn durable(&mut self, s: &mut Stream, d: Done) {
        s.durable = d.next;
        if let Some(end) = d.local_end {
            s.local_end = s.local_end.max(end);
        }
        if let Some(at) = &mut self.at {
            at.next = Offset(d.next);
        }
        self.p.state.next.store(d.next, Ordering::Relaxed);
        self.settle_marks(s);
    }

    /// Marks whose records are all durable here tell the freshness tracker what the applier
    /// must reach.
    fn settle_marks(&self, s: &mut Stream) {
        while let Some(&(covered, at)) = s.marks.front() {
            if covered > s.durable {
                break;
            }
            s.marks.pop_front();
            self.p.freshness.reached(at, s.local_end);
        }
    }

    /// Stores the place, reports it to the upstream, updates the lag gauges.
    async fn report(&mut self, s: &Stream, connection: u64) {
        let end = self.p.state.upstream_end.load(Ordering::Relaxed);
        self.p
            .metrics
            .upstream_lag_records
            .with_label_values(&[self.label()])
            .set(end.saturating_sub(s.durable) as i64);
        if let Some(b) = self.p.freshness.behind() {
            self.p
                .metrics
                .upstream_lag_seconds
                .with_label_values(&[self.label()])
                .set(b.as_secs_f64());
        }
        // The next tick stores again if this one fails; a crash in between only means
        // refetching records already here (their installs are versioned).
        self.store().await;
        let url = format!(
            "{}/v1/log/position?connection={connection}&position={}",
            self.p.config.url, s.durable
        );
        let req = self.request(self.client.post(url)).timeout(REPORT_EVERY * 4);
        self.p.tasks.spawn(async move {
            if let Err(e) = req.send().await {
                tracing::debug!(error = %without_url(&e), "reporting the position to the upstream failed");
            }
        });
    }
}

/// An HTTP client error without the URL (which could carry a query the operator did not mean
/// to log).
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<upstream>");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Sends a snapshot request and returns the response and the log identity it is of; a refusal
/// or a missing identity is an error in words an operator can act on.
pub(crate) async fn snapshot_response(
    req: reqwest::RequestBuilder,
    url: &str,
) -> Result<(reqwest::Response, String), String> {
    let resp = req
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .map_err(|e| format!("snapshot request to {url}: {}", without_url(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(refusal(status, &body));
    }
    let identity = resp
        .headers()
        .get(IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("the snapshot from {url} names no log identity"))?
        .to_string();
    Ok((resp, identity))
}

/// A refusal from the upstream, in words an operator can act on.
pub(crate) fn refusal(status: reqwest::StatusCode, body: &str) -> String {
    let detail = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect());
    match status.as_u16() {
        401 => format!(
            "the upstream refused this node's token (401 unauthorized: {detail}); [[upstream]] token_file must hold the upstream's [replication] token"
        ),
        _ => format!("the upstream answered {status}: {detail}"),
    }
}
