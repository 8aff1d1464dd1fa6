//! The local HTTP API (axum): the key-value routes, the admin routes and the shared state they
//! read. Handlers are thin: parse, call the keyspace's pipeline (`patterns::Pipeline`), map the
//! answer; every error goes through [`error::ApiError`].
//!
//! | Route | What it does |
//! |---|---|
//! | `GET /v1/kv/{keyspace}/{key}` | read (L1, then read-through); headers `X-Cache`, `ETag`, `Age` |
//! | `PUT /v1/kv/{keyspace}/{key}` | write (write-through, or in-memory) |
//! | `DELETE /v1/kv/{keyspace}/{key}` | delete |
//! | `POST /v1/kv/{keyspace}/_mget` | read many: `{"keys": [...]}` |
//! | `POST /v1/kv/{keyspace}/_mput` | write many: `{"items": [{"key", "value", "if_match"?}]}`, one answer per item |
//! | `POST /v1/kv/{keyspace}/_mdelete` | delete many: `{"keys": [...]}`, one answer per item |
//! | `GET /v1/keyspaces` | every keyspace's settings and live stats |
//! | `GET /v1/deadletters` | write-behind writes Postgres rejected |
//! | `POST /v1/deadletters/{id}/requeue` | put one back in the queue as a new write |
//! | `DELETE /v1/deadletters/{id}` | drop one |
//! | `GET /v1/replication` | this node's role, log identity and end, followers, upstreams |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | the process is up |
//! | `GET /readyz` | every keyspace can serve (503 with reasons otherwise) |

pub mod admin;
pub mod config;
pub mod error;
pub mod fast;
pub mod kv;
pub mod listener;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use self::config::ServerConfig;
use crate::keyspace::Keyspace;
use crate::metrics::Metrics;
use crate::patterns::Pipeline;
use crate::source::postgres::PgPool;
use error::ApiError;

/// What every handler can see.
pub struct AppState {
    /// Each keyspace's pipeline, by keyspace name.
    pub pipelines: BTreeMap<String, Pipeline>,
    pub server: ServerConfig,
    pub metrics: Arc<Metrics>,
    pub pool: Option<Arc<PgPool>>,
    pub log: Option<crate::commitlog::CommitLog>,
    pub write_behind: Option<Arc<crate::patterns::write_behind::WriteBehind>>,
    /// This node's place in the replicated log (`GET /v1/replication`).
    pub replication: Arc<crate::replication::ReplicationStatus>,
    pub replication_metrics: Arc<crate::replication::ReplicationMetrics>,
    /// This node's federation, when a keyspace federates (`/v1/replication`, dead letters).
    pub federation: Option<Arc<crate::federation::Federation>>,
    /// The hot path's metric series, resolved once (see [`HotMetrics`]).
    pub hot: HotMetrics,
}

/// The series the key routes' commonest answers record, looked up once at start instead of by
/// label values on every request (a hash of the labels and a shared lock each time): per
/// keyspace, a read's 200, a write's 200 / 202 and a delete's 204 / 202; per operation, the
/// duration histogram.
pub struct HotMetrics {
    /// `cachesync_http_requests_total{keyspace, op, status}` of [`HOT_ANSWERS`], by keyspace.
    counts: BTreeMap<String, Vec<prometheus::IntCounter>>,
    /// `cachesync_http_request_duration_seconds{op}` of the operations of [`HOT_ANSWERS`].
    seconds: Vec<prometheus::Histogram>,
}

/// The `(op, status)` pairs [`HotMetrics`] holds.
const HOT_ANSWERS: [(&str, u16); 5] = [
    ("get", 200),
    ("put", 200),
    ("put", 202),
    ("delete", 204),
    ("delete", 202),
];

/// The operations of [`HOT_ANSWERS`], in the order of [`HotMetrics`]'s histograms.
const HOT_OPS: [&str; 3] = ["get", "put", "delete"];

impl HotMetrics {
    pub fn new<'a>(metrics: &Metrics, keyspaces: impl Iterator<Item = &'a String>) -> HotMetrics {
        HotMetrics {
            counts: keyspaces
                .map(|ks| {
                    let series = HOT_ANSWERS
                        .iter()
                        .map(|(op, status)| {
                            metrics
                                .http_requests
                                .with_label_values(&[ks.as_str(), op, &status.to_string()])
                        })
                        .collect();
                    (ks.clone(), series)
                })
                .collect(),
            seconds: HOT_OPS
                .iter()
                .map(|op| metrics.http_duration.with_label_values(&[op]))
                .collect(),
        }
    }

    /// The counter of keyspace `ks`'s `op` answered `status`, and `op`'s duration histogram,
    /// when both are held.
    pub fn of(&self, ks: &str, op: &str, status: u16) -> Option<(&prometheus::IntCounter, &prometheus::Histogram)> {
        let i = HOT_ANSWERS.iter().position(|&(o, s)| o == op && s == status)?;
        let j = HOT_OPS.iter().position(|&o| o == op)?;
        Some((self.counts.get(ks)?.get(i)?, self.seconds.get(j)?))
    }
}

impl AppState {
    /// The keyspace's pipeline by name, or a 404 naming the configured ones.
    pub fn pipeline(&self, name: &str) -> Result<&Pipeline, ApiError> {
        self.pipelines.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.pipelines.keys().map(String::as_str).collect();
            ApiError::unknown_keyspace(name, &known)
        })
    }

    /// Every keyspace, in name order.
    pub fn keyspaces(&self) -> impl Iterator<Item = &Arc<Keyspace>> {
        self.pipelines.values().map(Pipeline::keyspace)
    }
}

/// Refuses requests whose `Host` is not on `[server] allowed_hosts` (421): with no credential on
/// loopback, a page on another site that points its own name at 127.0.0.1 (DNS rebinding) must
/// not reach the API. A request with no `Host` (HTTP/1.0 tools) is let through: browsers always
/// send one.
async fn check_host(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match refuse_host(&st, req.headers()) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

/// [`check_host`]'s answer, if it refuses.
fn refuse_host(st: &AppState, headers: &HeaderMap) -> Option<Response> {
    let host = headers.get(header::HOST)?;
    if host.to_str().is_ok_and(|h| st.server.host_allowed(h)) {
        return None;
    }
    Some(
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_host",
            "this sidecar does not answer for that Host; add it to [server] allowed_hosts if it is yours",
        )
        .into_response(),
    )
}

/// With `[server] token_file`, refuses requests without `Authorization: Bearer <token>` (401
/// `unauthorized`), except the probes `/healthz` and `/readyz`, which orchestrators call without
/// credentials. The comparison takes the same time wherever the tokens differ; neither token
/// appears in the answer or the logs.
async fn check_token(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match refuse_token(&st, req.uri().path(), req.headers()) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

/// [`check_token`]'s answer, if it refuses.
fn refuse_token(st: &AppState, path: &str, headers: &HeaderMap) -> Option<Response> {
    let token = st.server.token.as_ref()?;
    if matches!(path, "/healthz" | "/readyz") {
        return None;
    }
    let refused = crate::credential::check_bearer(headers, token).err()?;
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        match refused {
            crate::credential::Refused::Wrong => "the bearer token does not match [server] token_file",
            crate::credential::Refused::Missing => {
                "this API needs Authorization: Bearer <the token in [server] token_file>"
            }
        },
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    Some(resp)
}

/// What [`Api::call`] returns: an answer already made, or one still being made.
pub type ApiCall = futures::future::Either<std::future::Ready<Response>, futures::future::BoxFuture<'static, Response>>;

/// The API as the listener serves it: the router, and a direct path for its hottest route.
///
/// `GET /v1/kv/{keyspace}/{key}` goes straight to [`kv::get`] after the same two checks the
/// router's layers make (Host, then token), skipping the router's matching, its two middleware
/// layers and their boxed services — on a cache hit those were a measurable share of the
/// request's CPU (see `benches/http_cpu.rs`). A read served from memory is answered in place
/// ([`kv::get_now`]: the same answer and metrics, no boxed future); one that may wait runs
/// [`kv::get`]. The handler, and so every answer, is the one the router would have called;
/// every other request goes through the router.
#[derive(Clone)]
pub struct Api {
    router: Router,
    state: Arc<AppState>,
}

impl Api {
    pub fn new(state: Arc<AppState>) -> Api {
        Api {
            router: router(state.clone()),
            state,
        }
    }

    /// Answers `req`. A key read served from memory is answered in place (no task state, no
    /// allocation for the call, no count taken on the shared state); anything that may wait
    /// runs as a boxed future. Key reads and key writes go straight to their handler after the
    /// router's two checks (`Host`, token), the same ones in the same order, without the router's
    /// matching and middleware stack (README "Measured": a write's user CPU).
    pub fn call<B>(&mut self, req: axum::http::Request<B>) -> ApiCall
    where
        B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        use axum::http::Method;
        use futures::future::Either;
        use tower_service::Service;
        let method = req.method().clone();
        let key_route = (method == Method::GET || method == Method::PUT || method == Method::DELETE)
            && is_key_path(req.uri().path());
        if key_route {
            // The route the router would give it, past the same two checks in the same order.
            let (parts, body) = req.into_parts();
            let st = &self.state;
            if let Some(refused) =
                refuse_host(st, &parts.headers).or_else(|| refuse_token(st, parts.uri.path(), &parts.headers))
            {
                return Either::Left(std::future::ready(refused));
            }
            if method == Method::GET {
                if let Some(answered) = kv::get_now(st, &parts.uri, &parts.headers) {
                    return Either::Left(std::future::ready(answered));
                }
                return Either::Right(Box::pin(kv::get(State(st.clone()), parts.uri, parts.headers)));
            }
            let st = State(st.clone());
            return Either::Right(if method == Method::PUT {
                Box::pin(kv::put(st, parts.uri, parts.headers, axum::body::Body::new(body)))
            } else {
                Box::pin(kv::delete(st, parts.uri, parts.headers))
            });
        }
        // The router is always ready (`poll_ready` is a no-op for it).
        let fut = self.router.call(req.map(axum::body::Body::new));
        Either::Right(Box::pin(async move {
            match fut.await {
                Ok(resp) => resp,
                Err(never) => match never {},
            }
        }))
    }
}

/// Whether `path` is one the router sends to `kv::get` for a GET (and to `kv::put` /
/// `kv::delete` for a PUT / DELETE): `/v1/kv/{keyspace}/{*key}` with both parts non-empty, and
/// not one of the many-key routes (a GET, PUT or DELETE of those is a 405).
fn is_key_path(path: &str) -> bool {
    let Some((ks, key)) = path.strip_prefix("/v1/kv/").and_then(|rest| rest.split_once('/')) else {
        return false;
    };
    !ks.is_empty() && !key.is_empty() && !matches!(key, "_mget" | "_mput" | "_mdelete")
}

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    let host_check = axum::middleware::from_fn_with_state(state.clone(), check_host);
    let token_check = axum::middleware::from_fn_with_state(state.clone(), check_token);
    Router::new()
        .route("/v1/kv/{keyspace}/_mget", post(kv::mget))
        .route("/v1/kv/{keyspace}/_mput", post(kv::mput))
        .route("/v1/kv/{keyspace}/_mdelete", post(kv::mdelete))
        .route("/v1/kv/{keyspace}/{*key}", get(kv::get).put(kv::put).delete(kv::delete))
        .route("/v1/keyspaces", get(admin::keyspaces))
        .route("/v1/deadletters", get(admin::deadletters))
        .route("/v1/deadletters/{id}", axum::routing::delete(admin::drop_deadletter))
        .route("/v1/deadletters/{id}/requeue", post(admin::requeue_deadletter))
        .route("/v1/replication", get(admin::replication))
        .route("/metrics", get(admin::metrics))
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such route; see the README's HTTP API section",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .layer(token_check)
        .layer(host_check)
        .with_state(state)
}
