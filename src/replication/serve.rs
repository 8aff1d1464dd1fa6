//! The log server (`[replication] listen`): streams this node's commit log to followers, takes
//! their position reports, and gives bootstrapping followers a snapshot of the cache.
//!
//! | Route | What it does |
//! |---|---|
//! | `GET /v1/log?from=N&follower=NAME` | 200: a stream of [`wire`](super::wire) frames from offset `N`, forever; 401 wrong or missing token; 409 `identity_mismatch` (the `x-cachesync-log-identity` the follower sent is not this log's) or `ahead` (`N` is past this log's end); 410 `offset_out_of_range` (retention removed `N`) |
//! | `POST /v1/log/position?connection=ID&position=N` | the follower's durable position: holds retention, shows in `/v1/replication`; 404 when the stream is gone |
//! | `GET /v1/snapshot?keyspaces=a,b` | frames: a head with the position to follow from, the keyspaces' entries with their versions, an end; 404 unknown keyspace; 503 not ready |
//!
//! Every route needs `Authorization: Bearer <[replication] token_file>` when a token is set. A
//! refusal is logged with the follower's name and address, never with what it presented.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::config::ReplicationConfig;
use super::wire::{self, Progress, WireEntry};
use super::{
    CONNECTION_HEADER, EPOCH_HEADER, FollowerState, IDENTITY_HEADER, LOG_START_HEADER, ReplicationMetrics,
    ReplicationStatus, Reports,
};
use crate::cdc::applier::Applied;
use crate::commitlog::{CommitLog, LogError, Offset, Tail};
use crate::keyspace::freshness::Freshness;
use crate::keyspace::{Entries, Keyspace};
use crate::lifecycle::Tasks;

/// Most records in one frame.
const BATCH_RECORDS: usize = 4096;
/// About this many payload bytes in one frame.
const BATCH_BYTES: usize = 1024 * 1024;
/// Snapshot entries per frame.
const SNAPSHOT_CHUNK: usize = 512;

/// What the log server's handlers share.
pub struct LogServer {
    pub config: ReplicationConfig,
    pub log: CommitLog,
    pub status: Arc<ReplicationStatus>,
    pub metrics: Arc<ReplicationMetrics>,
    /// The keyspaces a snapshot may name (this node's CDC keyspaces).
    pub keyspaces: BTreeMap<String, Arc<Keyspace>>,
    /// This node's applier and freshness, when it has CDC: what progress frames report.
    pub applied: Option<Applied>,
    pub freshness: Option<Arc<Freshness>>,
    pub stop: CancellationToken,
    pub next_id: AtomicU64,
}

/// The peer of a connection, put on each of its requests.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

pub(crate) fn refuse(status: StatusCode, code: &str, detail: String) -> Response {
    let body = serde_json::json!({ "error": code, "detail": detail }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl LogServer {
    /// Where the log stands now, for a progress frame. The watermark is read before the applied
    /// offset: everything committed before it is in the log below that offset.
    fn progress(&self) -> Progress {
        let as_of = self.freshness.as_ref().map_or(0, |f| f.as_of_unix_ms());
        let end = self.log.end();
        let covered = match &self.applied {
            Some(a) => *a.borrow(),
            None => end,
        };
        let (instance, reloads) = self.freshness.as_ref().map_or((0, 0), |f| f.epoch());
        Progress {
            start: self.log.start(),
            end,
            covered: covered.min(end),
            as_of_unix_ms: if self.freshness.is_some() { as_of } else { 0 },
            instance,
            reloads,
        }
    }
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one connection's requests until it closes or `stop`.
async fn serve_connection<I>(io: I, app: Router, stop: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    crate::lifecycle::drive_connection(conn, &stop, "replication").await;
}

/// Serves the log server's routes, and `more` beside them (federation's), on `listener` until
/// `stop` (at most `max` connections; streams end on `stop`). Every route needs the token.
pub async fn serve(
    listener: TcpListener,
    server: Arc<LogServer>,
    more: Router,
    tls: Option<TlsAcceptor>,
    tasks: Tasks,
) {
    let app = router(server.clone(), more);
    let slots = Arc::new(Semaphore::new(server.config.max_followers.saturating_mul(2)));
    let stop = server.stop.clone();
    loop {
        let Some((stream, peer)) = crate::lifecycle::accept(&listener, &stop, "replication").await else {
            return;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            server.metrics.refusals.with_label_values(&["too_many"]).inc();
            tracing::warn!(%peer, "replication: too many connections; refusing one");
            continue;
        };
        let app = app.clone().layer(axum::Extension(Peer(peer)));
        let stop = stop.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let _slot = slot;
            match tls {
                None => serve_connection(stream, app, stop).await,
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(tls, app, stop).await,
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "replication: a TLS handshake failed"),
                    Err(_) => tracing::warn!(%peer, "replication: a TLS handshake did not finish in time"),
                },
            }
        });
    }
}

fn router(server: Arc<LogServer>, more: Router) -> Router {
    let auth = axum::middleware::from_fn_with_state(server.clone(), check_token);
    Router::new()
        .route("/v1/log", get(stream_log))
        .route("/v1/log/position", post(report_position))
        .route("/v1/snapshot", get(snapshot))
        .with_state(server)
        .merge(more)
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no_route", "no such replication route".into()) })
        .layer(auth)
}

/// The bearer token check (constant time; nothing presented is ever echoed or logged).
async fn check_token(State(server): State<Arc<LogServer>>, req: Request, next: Next) -> Response {
    let Some(token) = &server.config.token else {
        return next.run(req).await;
    };
    let refused = match crate::credential::check_bearer(req.headers(), token) {
        Ok(()) => return next.run(req).await,
        Err(r) => r,
    };
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.to_string())
        .unwrap_or_default();
    let follower = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("follower=")))
        .unwrap_or("?")
        .to_string();
    server.metrics.refusals.with_label_values(&["unauthorized"]).inc();
    let why = match refused {
        crate::credential::Refused::Wrong => "the follower's token does not match [replication] token_file",
        crate::credential::Refused::Missing => "the follower presented no token; [replication] token_file is set",
    };
    tracing::warn!(%peer, follower = %follower, reason = why, "replication: refused a follower");
    let mut resp = refuse(StatusCode::UNAUTHORIZED, "unauthorized", why.into());
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

#[derive(serde::Deserialize)]
struct StreamQuery {
    from: u64,
    #[serde(default)]
    follower: String,
}

/// Removes a follower from the status when its stream ends, however it ends.
struct Registered {
    server: Arc<LogServer>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut f = self.server.status.followers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gone) = f.remove(&self.id) {
            tracing::info!(follower = %gone.name, "replication: a follower's stream ended");
        }
        self.server.metrics.followers.set(f.len() as i64);
    }
}

async fn stream_log(
    State(server): State<Arc<LogServer>>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    headers: axum::http::HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    let identity = server.log.identity().to_string();
    let asked = headers.get(IDENTITY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    let follower = if q.follower.is_empty() {
        peer.to_string()
    } else {
        q.follower.clone()
    };
    let refused = |reason: &str, status: StatusCode, detail: String| {
        server.metrics.refusals.with_label_values(&[reason]).inc();
        tracing::warn!(follower = %follower, %peer, %detail, "replication: refused a stream");
        let mut r = refuse(status, reason, detail);
        if let Ok(v) = HeaderValue::from_str(&identity) {
            r.headers_mut().insert(IDENTITY_HEADER, v);
        }
        r
    };
    if !asked.is_empty() && asked != identity {
        return refused(
            "identity",
            StatusCode::CONFLICT,
            format!(
                "this log's identity is {identity}, not {asked}: the log was recreated; bootstrap from /v1/snapshot"
            ),
        );
    }
    let (start, end) = (server.log.start(), server.log.end());
    if q.from > end.0 {
        return refused(
            "identity",
            StatusCode::CONFLICT,
            format!(
                "offset {} is past this log's end {end}: the log lost records the follower has; bootstrap from /v1/snapshot",
                q.from
            ),
        );
    }
    if q.from < start.0 {
        return refused(
            "out_of_range",
            StatusCode::GONE,
            format!(
                "offset {} is no longer in the log (it starts at {start}); retention removed it; bootstrap from /v1/snapshot",
                q.from
            ),
        );
    }
    let id = server.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let hold = server.log.hold(Offset(q.from));
    let state = Arc::new(FollowerState {
        id,
        name: follower.clone(),
        peer: Some(peer),
        connected_at: std::time::Instant::now(),
        sent: AtomicU64::new(q.from),
        reports: Reports::new(hold),
    });
    {
        let mut f = server.status.followers.lock().unwrap_or_else(|p| p.into_inner());
        f.insert(id, state.clone());
        server.metrics.followers.set(f.len() as i64);
    }
    tracing::info!(follower = %follower, %peer, from = q.from, "replication: a follower connected");
    let streamer = Streamer {
        tail: server.log.tail(Offset(q.from)),
        beat: tokio::time::interval(server.config.heartbeat),
        follower: state,
        _registered: Registered {
            server: server.clone(),
            id,
        },
        server,
        done: false,
    };
    frames_response(streamer, &identity, id)
}

/// A stream of frames that reads its next chunk only when the last was taken.
pub(crate) trait Frames: Send + 'static {
    /// The next chunk; `None` ends the response.
    fn next_chunk(&mut self) -> impl std::future::Future<Output = Option<Bytes>> + Send;
}

/// The response that streams `frames` (a log stream or a federation stream), naming this log's
/// identity and the connection id the follower reports under.
pub(crate) fn frames_response<F: Frames>(frames: F, identity: &str, connection: u64) -> Response {
    let body = Body::from_stream(futures::stream::unfold(frames, |mut s| async move {
        s.next_chunk().await.map(|b| (Ok::<_, std::convert::Infallible>(b), s))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-cachesync-frames"),
    );
    if let Ok(v) = HeaderValue::from_str(identity) {
        resp.headers_mut().insert(IDENTITY_HEADER, v);
    }
    resp.headers_mut()
        .insert(CONNECTION_HEADER, HeaderValue::from(connection));
    resp
}

/// One follower's stream: reads the next batch only when the last was taken.
struct Streamer {
    server: Arc<LogServer>,
    tail: Tail,
    beat: tokio::time::Interval,
    follower: Arc<FollowerState>,
    _registered: Registered,
    done: bool,
}

impl Frames for Streamer {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let timeout = self.server.config.follower_timeout.as_millis() as u64;
        let mut out = BytesMut::new();
        tokio::select! {
            biased;
            _ = self.server.stop.cancelled() => return None,
            r = self.tail.next(BATCH_RECORDS, BATCH_BYTES) => match r {
                Ok(records) => {
                    let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
                    wire::records(&mut out, &records);
                    wire::progress(&mut out, self.server.progress());
                    self.server.metrics.sent_records.inc_by(records.len() as u64);
                    self.server.metrics.sent_bytes.inc_by(bytes as u64);
                    self.follower.sent.store(self.tail.position().0, Ordering::Relaxed);
                    self.beat.reset();
                }
                Err(LogError::Closed) => return None,
                Err(e @ LogError::OffsetOutOfRange { .. }) => {
                    self.done = true;
                    wire::failed(&mut out, &format!("offset_out_of_range: {e}"));
                }
                Err(e) => {
                    tracing::error!(follower = %self.follower.name, error = %e, "replication: cannot read the log for a follower");
                    self.done = true;
                    wire::failed(&mut out, &format!("log: {e}"));
                }
            },
            _ = self.beat.tick() => {
                let silent = self.follower.reports.silent_ms();
                if silent > timeout {
                    tracing::warn!(follower = %self.follower.name, silent_ms = silent, "replication: a follower stopped reporting its position; closing its stream");
                    self.done = true;
                    wire::failed(&mut out, &format!("silent: no position report for {silent} ms"));
                } else {
                    wire::progress(&mut out, self.server.progress());
                }
            }
        }
        Some(out.freeze())
    }
}

#[derive(serde::Deserialize)]
struct PositionQuery {
    connection: u64,
    position: u64,
}

async fn report_position(State(server): State<Arc<LogServer>>, Query(q): Query<PositionQuery>) -> Response {
    let f = server
        .status
        .followers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&q.connection)
        .cloned();
    match f {
        Some(f) => {
            f.reports.reported(q.position, server.log.end());
            StatusCode::NO_CONTENT.into_response()
        }
        None => refuse(
            StatusCode::NOT_FOUND,
            "no_stream",
            format!("no stream with connection {}", q.connection),
        ),
    }
}

#[derive(serde::Deserialize)]
struct SnapshotQuery {
    #[serde(default)]
    keyspaces: String,
}

/// The snapshot: the position first (what the applier had applied), then the entries — each as
/// new as that position or newer, so the tail from the position, applied through versioned
/// installs, brings a follower exactly to this node's state.
async fn snapshot(State(server): State<Arc<LogServer>>, Query(q): Query<SnapshotQuery>) -> Response {
    let names: Vec<&str> = q.keyspaces.split(',').filter(|s| !s.is_empty()).collect();
    let mut chosen = Vec::new();
    for name in &names {
        let Some(ks) = server.keyspaces.get(*name) else {
            let known: Vec<&String> = server.keyspaces.keys().collect();
            return refuse(
                StatusCode::NOT_FOUND,
                "unknown_keyspace",
                format!("this node follows no CDC keyspace {name:?} (it has {known:?})"),
            );
        };
        if let Err(why) = ks.readiness() {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("keyspace {name} is not ready: {why}"),
            );
        }
        chosen.push(ks.clone());
    }
    let (instance, reloads) = server.freshness.as_ref().map_or((0, 0), |f| f.epoch());
    let position = match &server.applied {
        Some(a) => *a.borrow(),
        None => server.log.end(),
    };
    let mut head = BytesMut::new();
    let mut parts: Vec<(Entries, bool)> = Vec::new();
    for ks in &chosen {
        parts.push(ks.entries());
    }
    let listed: Vec<(String, bool)> = chosen
        .iter()
        .zip(&parts)
        .map(|(k, (_, whole))| (k.name().to_string(), *whole))
        .collect();
    wire::snapshot_head(&mut head, position, &listed);
    let total: u64 = parts.iter().map(|(e, _)| e.len() as u64).sum();
    tracing::info!(position = %position, entries = total, keyspaces = ?names, "replication: serving a snapshot");
    let mut chunks: Vec<(usize, Entries)> = Vec::new();
    for (i, (entries, _)) in parts.into_iter().enumerate() {
        let mut it = entries.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push((i, it.by_ref().take(SNAPSHOT_CHUNK).collect()));
        }
    }
    let body = futures::stream::iter(
        std::iter::once(head.freeze())
            .chain(chunks.into_iter().map(|(i, entries)| {
                let wire_entries: Vec<WireEntry> = entries.iter().map(|(k, e)| WireEntry::of(k, e)).collect();
                let mut out = BytesMut::new();
                wire::entries(&mut out, i, &wire_entries);
                out.freeze()
            }))
            .chain(std::iter::once({
                let mut out = BytesMut::new();
                wire::snapshot_end(&mut out, total);
                out.freeze()
            }))
            .map(Ok::<_, std::convert::Infallible>),
    );
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-cachesync-frames"),
    );
    if let Ok(v) = HeaderValue::from_str(server.log.identity()) {
        resp.headers_mut().insert(IDENTITY_HEADER, v);
    }
    resp.headers_mut()
        .insert(LOG_START_HEADER, HeaderValue::from(server.log.start().0));
    if let Ok(v) = HeaderValue::from_str(&format!("{instance}.{reloads}")) {
        resp.headers_mut().insert(EPOCH_HEADER, v);
    }
    resp
}
