//! The serving side of federation, on the log server's port (`[replication] listen`, same
//! token):
//!
//! | Route | What it does |
//! |---|---|
//! | `POST /v1/federation/stream` | body `{node, vector, resume?: {identity, offset}}`: 200 and a stream of [`wire`] frames — *picked* records (the federated events after `vector`, never the subscriber's own), *progress* and *gossip* every heartbeat — from `resume.offset` when it is a place in this log, else from the log's start; 404 when this node does not federate |
//! | `POST /v1/federation/report` | body `{node, connection, position, table}`: the subscriber's place (holds retention for it) and what it knows of every node |
//! | `GET /v1/federation/snapshot?keyspaces=a,b` | a *gossip* frame `{vector, offset}` then the federated keyspaces' entries (tombstones too) with their versions and stamps; they hold every event in `vector`, and the stream goes on from `offset` |
//!
//! A subscriber finds holes itself: the events after its vector come in per-origin order, so a
//! sequence number past the next one it expects, or a gossip vector naming events it was never
//! sent, means this log lacks them (retention, or a snapshot this node took) — it then asks for
//! the snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Federation, Table, Vector};
use crate::commitlog::{CommitLog, LogError, Offset, Tail};
use crate::event::stamp_of;
use crate::replication::IDENTITY_HEADER;
use crate::replication::serve::{Frames, frames_response, refuse};
use crate::replication::wire::{self, WireEntry};
use crate::replication::{ReplicationMetrics, Reports};

const BATCH_RECORDS: usize = 4096;
const BATCH_BYTES: usize = 1024 * 1024;
const SNAPSHOT_CHUNK: usize = 512;

/// A subscription.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subscribe {
    pub node: String,
    pub vector: Vector,
    #[serde(default)]
    pub resume: Option<Resume>,
}

/// A place in a peer's log, tied to that log's identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resume {
    pub identity: String,
    pub offset: u64,
}

/// A subscriber's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub connection: u64,
    pub position: u64,
    pub table: Table,
}

/// What a gossip frame carries.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Gossip {
    /// The sender's node id and epoch.
    pub node: String,
    pub epoch: u64,
    pub table: Table,
    /// The sender's applied vector, exact at `offset` of its log.
    pub vector: Vector,
    pub offset: u64,
    /// Where the stream stands in the sender's log (everything below it that the subscriber
    /// needs has been sent). Zero in a snapshot.
    pub sent: u64,
}

/// What the federation routes share (served on the log server's port, behind its token check).
pub struct FedServer {
    pub fed: Arc<Federation>,
    pub log: CommitLog,
    /// Progress and gossip on an idle stream.
    pub heartbeat: Duration,
    /// A subscriber silent this long is cut off.
    pub follower_timeout: Duration,
    pub metrics: Arc<ReplicationMetrics>,
    pub stop: CancellationToken,
    pub next_id: AtomicU64,
    pub links: Links,
}

/// The federation routes, for the log server to serve beside its own.
pub fn router(server: Arc<FedServer>) -> Router {
    Router::new()
        .route("/v1/federation/stream", post(stream))
        .route("/v1/federation/report", post(report))
        .route("/v1/federation/snapshot", get(snapshot))
        .with_state(server)
}

fn gossip_of(fed: &Federation, sent: u64) -> Bytes {
    let a = fed.applied();
    let g = Gossip {
        node: fed.node.clone(),
        epoch: fed.epoch(),
        table: fed.table(),
        vector: a.vector,
        offset: a.offset.0,
        sent,
    };
    Bytes::from(serde_json::to_vec(&g).unwrap_or_default())
}

/// The subscribers connected now, by connection id.
pub type Links = std::sync::Mutex<std::collections::HashMap<u64, Arc<Reports>>>;

async fn stream(State(server): State<Arc<FedServer>>, body: Bytes) -> Response {
    let fed = server.fed.clone();
    let sub: Subscribe = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_request", format!("a subscription: {e}")),
    };
    let log = server.log.clone();
    let identity = log.identity().to_string();
    let (start, end) = (log.start(), log.end());
    let from = match &sub.resume {
        Some(r) if r.identity == identity && r.offset >= start.0 && r.offset <= end.0 => Offset(r.offset),
        _ => start,
    };
    let id = server.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let link = Arc::new(Reports::new(log.hold(from)));
    server
        .links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, link.clone());
    tracing::info!(peer = %sub.node, from = from.0, "federation: a peer subscribed");
    let s = Streamer {
        tail: log.tail(from),
        beat: tokio::time::interval(server.heartbeat),
        server: server.clone(),
        fed,
        sub,
        link,
        id,
        done: false,
    };
    frames_response(s, &identity, id)
}

struct Streamer {
    server: Arc<FedServer>,
    fed: Arc<Federation>,
    tail: Tail,
    beat: tokio::time::Interval,
    sub: Subscribe,
    link: Arc<Reports>,
    id: u64,
    done: bool,
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.server
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Streamer {
    /// Whether the subscriber needs this record: a federated event after its vector, not its own.
    fn wanted(&self, payload: &[u8]) -> bool {
        let Some(sa) = stamp_of(payload) else { return false };
        if sa.origin == self.sub.node.as_bytes() {
            return false;
        }
        let Ok(origin) = std::str::from_utf8(sa.origin) else {
            return false;
        };
        sa.stamp.seq > self.sub.vector.get(origin, sa.stamp.epoch)
    }
}

impl Frames for Streamer {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let timeout = self.server.follower_timeout.as_millis() as u64;
        let mut out = BytesMut::new();
        tokio::select! {
            biased;
            _ = self.server.stop.cancelled() => return None,
            r = self.tail.next(BATCH_RECORDS, BATCH_BYTES) => match r {
                Ok(records) => {
                    let picked: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).filter(|p| self.wanted(p)).collect();
                    let bytes: usize = picked.iter().map(|p| p.len()).sum();
                    self.server.metrics.sent_records.inc_by(picked.len() as u64);
                    self.server.metrics.sent_bytes.inc_by(bytes as u64);
                    wire::picked(&mut out, self.tail.position(), &picked);
                }
                Err(LogError::Closed) => return None,
                Err(e) => {
                    tracing::error!(peer = %self.sub.node, error = %e, "federation: cannot read the log for a peer");
                    self.done = true;
                    wire::failed(&mut out, &format!("log: {e}"));
                }
            },
            _ = self.beat.tick() => {
                let silent = self.link.silent_ms();
                if silent > timeout {
                    tracing::warn!(peer = %self.sub.node, silent_ms = silent, "federation: a peer stopped reporting; closing its stream");
                    self.done = true;
                    wire::failed(&mut out, &format!("silent: no report for {silent} ms"));
                } else {
                    let log = &self.server.log;
                    wire::progress(&mut out, wire::Progress { start: log.start(), end: log.end(), covered: log.end(), ..Default::default() });
                    wire::gossip(&mut out, &gossip_of(&self.fed, self.tail.position().0));
                }
            }
        }
        Some(out.freeze())
    }
}

async fn report(State(server): State<Arc<FedServer>>, body: Bytes) -> Response {
    let fed = server.fed.clone();
    let r: Report = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_request", format!("a report: {e}")),
    };
    fed.learn(&r.table);
    let link = server
        .links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&r.connection)
        .cloned();
    match link {
        Some(l) => {
            l.reported(r.position, server.log.end());
            StatusCode::NO_CONTENT.into_response()
        }
        None => refuse(
            StatusCode::NOT_FOUND,
            "no_stream",
            format!("no federation stream with connection {}", r.connection),
        ),
    }
}

#[derive(Deserialize)]
struct SnapshotQuery {
    #[serde(default)]
    keyspaces: String,
}

async fn snapshot(State(server): State<Arc<FedServer>>, Query(q): Query<SnapshotQuery>) -> Response {
    let fed = server.fed.clone();
    let names: Vec<String> = q
        .keyspaces
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let (applied, keyspaces) = match fed.snapshot(&names) {
        Ok(s) => s,
        Err(why) => return refuse(StatusCode::NOT_FOUND, "unknown_keyspace", why),
    };
    let (vector, offset) = (applied.vector, applied.offset.0);
    let g = Gossip {
        node: fed.node.clone(),
        epoch: fed.epoch(),
        table: fed.table(),
        vector,
        offset,
        sent: 0,
    };
    let mut out = BytesMut::new();
    wire::gossip(&mut out, &serde_json::to_vec(&g).unwrap_or_default());
    let heads: Vec<(String, bool)> = keyspaces.iter().map(|(n, _)| (n.clone(), true)).collect();
    wire::snapshot_head(&mut out, Offset(offset), &heads);
    let mut count = 0u64;
    for (i, (_, entries)) in keyspaces.iter().enumerate() {
        for chunk in entries.chunks(SNAPSHOT_CHUNK) {
            let wire_entries: Vec<WireEntry> = chunk.iter().map(|(k, e)| WireEntry::of(k, e)).collect();
            count += wire_entries.len() as u64;
            wire::entries(&mut out, i, &wire_entries);
        }
    }
    wire::snapshot_end(&mut out, count);
    let mut resp = Response::new(Body::from(out.freeze()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-cachesync-frames"),
    );
    if let Ok(v) = HeaderValue::from_str(server.log.identity()) {
        resp.headers_mut().insert(IDENTITY_HEADER, v);
    }
    resp
}
