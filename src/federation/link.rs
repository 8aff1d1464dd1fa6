//! One `[[peer]]` link: follows a peer's log by version vector.
//!
//! A session subscribes with this node's vector and, when it has one, its place in the peer's
//! log (identity and offset, stored in `upstreams/peer-<name>.position`); the peer streams the
//! federated events after the vector. Each batch is appended to this node's log — the sequencer
//! keeps out what another path already brought — and the place moves on once it is durable.
//!
//! Holes: events of one origin arrive in sequence order, so a number past the next one expected
//! means the peer's log lacks events this node needs (retention removed them, or the peer took a
//! snapshot itself); so does a gossip vector naming events that were never sent. Either way the
//! link takes the peer's snapshot (entries with versions, stamps and tombstones, and the vector
//! they hold), installs it, and subscribes again from the snapshot's place.
//!
//! Every `REPORT_EVERY` the link stores its place and reports it (with this node's gossip table)
//! to the peer, which holds retention for it. A link silent for `link_timeout` is dead; it
//! reconnects with backoff, and while it is down this node keeps serving and taking writes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::serve::{Gossip, Report, Resume, Subscribe};
use super::{Federation, PeerState, Vector};
use crate::commitlog::Offset;
use crate::event::stamp_of;
use crate::keyspace::Keyspace;
use crate::lifecycle::{Backoff, Tasks};
use crate::replication::config::UpstreamConfig;
use crate::replication::follow::{refusal, snapshot_response, without_url};
use crate::replication::position::{Position, PositionFile};
use crate::replication::tls::trust;
use crate::replication::wire::{self, Frame};
use crate::replication::{CONNECTION_HEADER, IDENTITY_HEADER};

/// Appends awaiting durability at once.
const MAX_INFLIGHT: usize = 64;
/// How often the place is stored and reported.
const REPORT_EVERY: Duration = Duration::from_millis(250);
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

type Inflight = FuturesOrdered<futures::future::BoxFuture<'static, Result<u64, String>>>;

/// Follows one peer.
pub struct PeerLink {
    config: UpstreamConfig,
    fed: Arc<Federation>,
    state: Arc<PeerState>,
    client: reqwest::Client,
    file: PositionFile,
    at: Option<Position>,
    stored: Option<Position>,
    /// The next session starts with the peer's snapshot.
    need_snapshot: bool,
    tasks: Tasks,
}

/// Why a session ended.
struct Ended {
    why: String,
    streamed: bool,
}

impl PeerLink {
    pub fn new(config: UpstreamConfig, fed: Arc<Federation>, state: Arc<PeerState>, tasks: Tasks) -> PeerLink {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(config.link_timeout)
            .tcp_nodelay(true);
        match config.ca_file.as_deref().map(trust) {
            Some(Ok(certs)) => {
                for c in certs {
                    builder = builder.add_root_certificate(c);
                }
            }
            Some(Err(why)) => tracing::error!(peer = %config.name, reason = %why, "ca_file cannot be used"),
            None => {}
        }
        let client = builder.build().expect("an HTTP client builds");
        let file = PositionFile::new(&fed.log().config().dir, &format!("peer-{}", config.name));
        PeerLink {
            config,
            fed,
            state,
            client,
            file,
            at: None,
            stored: None,
            need_snapshot: false,
            tasks,
        }
    }

    fn label(&self) -> &str {
        &self.config.name
    }

    fn request(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.token {
            Some(t) => req.bearer_auth(t.expose()),
            None => req,
        }
    }

    fn set_error(&self, why: Option<String>) {
        *self.state.error.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Follows until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        match self.file.load() {
            Ok(at) => {
                self.at = at.clone();
                self.stored = at;
            }
            Err(e) => {
                tracing::warn!(peer = %self.label(), error = %e, "the stored place in the peer's log is damaged; subscribing by vector alone")
            }
        }
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        loop {
            let ended = tokio::select! {
                e = self.session(&stop) => e,
                _ = stop.cancelled() => Ended { why: String::new(), streamed: true },
            };
            self.state.connected.store(false, Ordering::Relaxed);
            self.fed
                .metrics
                .peer_connected
                .with_label_values(&[self.label()])
                .set(0);
            self.store().await;
            if stop.is_cancelled() {
                return;
            }
            let wait = if ended.streamed {
                backoff.reset();
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            tracing::warn!(peer = %self.label(), error = %ended.why, retry_in_ms = wait.as_millis() as u64, "federation link ended; reconnecting");
            self.set_error(Some(ended.why));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn store(&mut self) {
        if self.at == self.stored {
            return;
        }
        match self.file.save(self.at.clone()).await {
            Ok(()) => self.stored = self.at.clone(),
            Err(e) => tracing::error!(peer = %self.config.name, error = %e, "cannot store the place in the peer's log"),
        }
    }

    /// Takes and installs the peer's snapshot; the stream then goes on from its place.
    async fn snapshot(&mut self) -> Result<(), String> {
        let url = format!("{}/v1/federation/snapshot", self.config.url);
        let (resp, identity) = snapshot_response(self.request(self.client.get(&url)), &self.config.url).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("reading the snapshot: {}", without_url(&e)))?;
        let mut decoder = wire::Decoder::new();
        decoder.push(&bytes);
        let mut gossip: Option<Gossip> = None;
        let mut order: Vec<Arc<Keyspace>> = Vec::new();
        let mut entries = Vec::new();
        let mut ended = false;
        while let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
            match frame {
                Frame::Gossip(json) => {
                    gossip = Some(serde_json::from_slice(&json).map_err(|e| format!("the snapshot's vector: {e}"))?)
                }
                Frame::SnapshotHead { keyspaces, .. } => {
                    for (name, _) in keyspaces {
                        // A keyspace this node does not federate is not taken.
                        order.push(match self.fed.keyspaces.get(&name) {
                            Some(k) => k.clone(),
                            None => continue,
                        });
                    }
                }
                Frame::Entries { keyspace, entries: es } => {
                    let Some(ks) = order.get(keyspace) else { continue };
                    for e in es {
                        let key: Arc<str> = e.key.as_str().into();
                        entries.push((ks.clone(), key, e.into_entry()));
                    }
                }
                Frame::SnapshotEnd { .. } => ended = true,
                other => return Err(format!("unexpected frame in a snapshot: {other:?}")),
            }
        }
        let g = gossip.ok_or("the snapshot carries no vector")?;
        if !ended {
            return Err("the peer's snapshot ended early".into());
        }
        let n = self
            .fed
            .install_snapshot(entries, &g.vector)
            .await
            .map_err(|e| format!("installing the snapshot: {e}"))?;
        self.fed.learn(&g.table);
        self.fed.metrics.snapshots.with_label_values(&[self.label()]).inc();
        self.state.snapshots.fetch_add(1, Ordering::Relaxed);
        self.fed.needs_snapshot.store(false, Ordering::Relaxed);
        tracing::info!(peer = %self.label(), entries = n, offset = g.offset, "installed the peer's snapshot");
        self.at = Some(Position {
            identity,
            next: Offset(g.offset),
        });
        self.store().await;
        Ok(())
    }

    async fn session(&mut self, stop: &CancellationToken) -> Ended {
        let failed = |why: String| Ended { why, streamed: false };
        if self.need_snapshot || self.fed.needs_snapshot.load(Ordering::Relaxed) {
            if let Err(why) = self.snapshot().await {
                return failed(why);
            }
            self.need_snapshot = false;
        }
        let vector = self.fed.sequencer.vector();
        let sub = Subscribe {
            node: self.fed.node.clone(),
            vector: vector.clone(),
            resume: self.at.as_ref().map(|p| Resume {
                identity: p.identity.clone(),
                offset: p.next.0,
            }),
        };
        let url = format!("{}/v1/federation/stream", self.config.url);
        let req = self
            .request(self.client.post(&url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&sub).unwrap_or_default())
            .send();
        let resp = match tokio::time::timeout(self.config.link_timeout, req).await {
            Err(_) => {
                return failed(format!(
                    "the peer did not answer within link_timeout ({:?})",
                    self.config.link_timeout
                ));
            }
            Ok(Err(e)) => return failed(format!("connecting to {}: {}", self.config.url, without_url(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let why = refusal(status, &body);
            if status.as_u16() == 401 {
                tracing::error!(peer = %self.label(), reason = %why, "the peer refused this node");
            }
            return failed(why);
        }
        let identity = resp
            .headers()
            .get(IDENTITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let connection: u64 = resp
            .headers()
            .get(CONNECTION_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        // Where the stream starts: the stored place if the peer took it, else its log's start
        // (the first picked frame says where the stream is).
        if self.at.as_ref().is_some_and(|p| p.identity != identity) {
            tracing::warn!(peer = %self.label(), "the peer's log was recreated; subscribing by vector alone");
            self.at = None;
        }
        self.state.connected.store(true, Ordering::Relaxed);
        self.fed
            .metrics
            .peer_connected
            .with_label_values(&[self.label()])
            .set(1);
        self.set_error(None);
        tracing::info!(peer = %self.label(), "following the peer's log");
        let why = self.stream(resp, identity, connection, vector, stop).await;
        Ended {
            why: why.unwrap_or_default(),
            streamed: true,
        }
    }

    /// Reads frames until the link fails or `stop`.
    async fn stream(
        &mut self,
        mut resp: reqwest::Response,
        identity: String,
        connection: u64,
        mut expect: Vector,
        stop: &CancellationToken,
    ) -> Option<String> {
        let mut decoder = wire::Decoder::new();
        let mut inflight: Inflight = FuturesOrdered::new();
        let mut last_frame = Instant::now();
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let link_timeout = self.config.link_timeout;
        // A gossip vector to check once what was received before it is durable here.
        let mut check: Option<Vector> = None;
        let result = loop {
            if inflight.is_empty()
                && let Some(v) = check.take()
            {
                let mine = self.fed.sequencer.vector();
                let missing = mine.behind(&v);
                if !missing.is_empty() {
                    self.need_snapshot = true;
                    break Some(format!(
                        "the peer's log lacks events this node needs (e.g. {:?}); taking its snapshot",
                        missing.first()
                    ));
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break None,
                Some(done) = inflight.next(), if !inflight.is_empty() => match done {
                    Ok(next) => self.durable(&identity, next),
                    Err(why) => break Some(why),
                },
                _ = tick.tick() => self.report(connection),
                _ = tokio::time::sleep_until(last_frame + link_timeout) => {
                    break Some(format!("no frame from the peer for {link_timeout:?}: the link looks dead"));
                }
                chunk = resp.chunk(), if inflight.len() < MAX_INFLIGHT => match chunk {
                    Ok(Some(bytes)) => {
                        last_frame = Instant::now();
                        decoder.push(&bytes);
                        let r = self.frames(&mut decoder, &mut expect, &mut inflight, &mut check).await;
                        if let Err(why) = r {
                            break Some(why);
                        }
                    }
                    Ok(None) => break Some("the peer ended the stream".into()),
                    Err(e) => break Some(format!("reading the stream: {}", without_url(&e))),
                },
            }
        };
        while let Some(done) = inflight.next().await {
            match done {
                Ok(next) => self.durable(&identity, next),
                Err(_) => break,
            }
        }
        result
    }

    async fn frames(
        &mut self,
        decoder: &mut wire::Decoder,
        expect: &mut Vector,
        inflight: &mut Inflight,
        check: &mut Option<Vector>,
    ) -> Result<(), String> {
        while let Some(frame) = decoder.next_frame().map_err(|e| format!("the peer's stream: {e}"))? {
            match frame {
                Frame::Picked { next, records } => {
                    for p in &records {
                        let Some(sa) = stamp_of(p) else {
                            return Err("the peer sent a record that is not a federated event".into());
                        };
                        let origin = std::str::from_utf8(sa.origin).map_err(|_| "an origin that is not UTF-8")?;
                        let last = expect.get(origin, sa.stamp.epoch);
                        if sa.stamp.seq > last + 1 {
                            self.need_snapshot = true;
                            return Err(format!(
                                "the peer's log lacks events of {origin} after {last} (next it has is {}); taking its snapshot",
                                sa.stamp.seq
                            ));
                        }
                        expect.raise(origin, sa.stamp.epoch, sa.stamp.seq);
                    }
                    let n = records.len() as u64;
                    self.state.received.fetch_add(n, Ordering::Relaxed);
                    self.fed.metrics.received.with_label_values(&[self.label()]).inc_by(n);
                    let next = next.0;
                    if records.is_empty() {
                        inflight.push_back(Box::pin(async move { Ok(next) }));
                        continue;
                    }
                    let pending = self
                        .fed
                        .log()
                        .enqueue(records.iter().map(|r| r.to_vec()).collect())
                        .await
                        .map_err(|e| format!("appending to this node's log: {e}"))?;
                    inflight.push_back(Box::pin(async move {
                        pending
                            .durable()
                            .await
                            .map_err(|e| format!("appending to this node's log: {e}"))?;
                        Ok(next)
                    }));
                }
                Frame::Gossip(json) => {
                    let g: Gossip = serde_json::from_slice(&json).map_err(|e| format!("the peer's gossip: {e}"))?;
                    *self.state.node.lock().unwrap_or_else(|p| p.into_inner()) = Some(g.node.clone());
                    self.fed.learn(&g.table);
                    // Everything the peer had applied below what it has sent is in what it sent
                    // (or already here): check once it is durable here.
                    if g.offset <= g.sent {
                        *check = Some(g.vector.clone());
                    }
                    // Nothing below `sent` is left to receive: once what came before is durable,
                    // that is this node's place.
                    let sent = g.sent;
                    inflight.push_back(Box::pin(async move { Ok(sent) }));
                    let lag = self.fed.sequencer.vector().missing(&g.vector);
                    self.state.lag_events.store(lag, Ordering::Relaxed);
                    self.fed
                        .metrics
                        .peer_lag_events
                        .with_label_values(&[self.label()])
                        .set(lag as i64);
                }
                Frame::Progress(_) => {}
                Frame::Failed(why) => return Err(format!("the peer ended the stream: {why}")),
                other => return Err(format!("unexpected frame in a federation stream: {other:?}")),
            }
        }
        Ok(())
    }

    fn durable(&mut self, identity: &str, next: u64) {
        self.at = Some(Position {
            identity: identity.to_string(),
            next: Offset(next),
        });
    }

    /// Reports the place and this node's table to the peer; stores the place.
    fn report(&mut self, connection: u64) {
        let Some(at) = self.at.clone() else { return };
        let report = Report {
            node: self.fed.node.clone(),
            connection,
            position: at.next.0,
            table: self.fed.table(),
        };
        let url = format!("{}/v1/federation/report", self.config.url);
        let req = self
            .request(self.client.post(url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&report).unwrap_or_default())
            .timeout(REPORT_EVERY * 4);
        self.tasks.spawn(async move {
            if let Err(e) = req.send().await {
                tracing::debug!(error = %without_url(&e), "reporting to the peer failed");
            }
        });
        if self.stored.as_ref() != Some(&at) {
            self.stored = Some(at.clone());
            let file = self.file.clone();
            self.tasks.spawn(async move {
                if let Err(e) = file.save(Some(at)).await {
                    tracing::error!(error = %e, "cannot store the place in a peer's log");
                }
            });
        }
    }
}
