//! Admin routes: keyspace listing with live stats, Prometheus metrics, liveness and readiness.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;

/// `GET /v1/keyspaces`: each keyspace's settings and live stats.
pub async fn keyspaces(State(st): State<Arc<AppState>>) -> Json<Value> {
    let mut out = Vec::new();
    for p in st.pipelines.values() {
        let ks = p.keyspace();
        let stats = ks.stats().await;
        let m = &ks.m;
        out.push(json!({
            "name": ks.name(),
            "settings": ks.config,
            "ready": ks.readiness().is_ok(),
            "not_ready_reason": ks.readiness().err(),
            "stats": {
                "entries": stats.entries,
                "weighted_size_bytes": stats.weighted_size_bytes,
                "hits": m.hits_l1.get(),
                "hits_l2": m.hits_l2.get(),
                "misses": m.misses.get(),
                "loads_found": m.loads_found.get(),
                "loads_absent": m.loads_absent.get(),
                "load_errors": m.loads_error.get(),
                "fills_skipped": m.fills_skipped.get(),
                "loads_in_flight": stats.loads_in_flight,
                "pending_writes": stats.pending_writes,
                "refreshes_pending": p.refreshes_pending(),
            },
            "l2": ks.l2().map(|t| json!({
                "channel_connected": t.connected(),
                "channel_lag_ms": t.channel_lag().as_millis() as u64,
            })),
        }));
    }
    Json(json!({ "keyspaces": out }))
}

/// `GET /v1/replication`: this node's role, log, followers and upstreams.
pub async fn replication(State(st): State<Arc<AppState>>) -> Response {
    let mut report = st.replication.report();
    report["federation"] = st.federation.as_ref().map_or(serde_json::Value::Null, |f| f.report());
    axum::Json(report).into_response()
}

/// `GET /metrics`: refreshes the mirrored gauges, then renders the registry.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = &st.metrics;
    for ks in st.keyspaces() {
        let stats = ks.stats().await;
        m.cache_entries
            .with_label_values(&[ks.name()])
            .set(stats.entries as i64);
        m.cache_weighted_bytes
            .with_label_values(&[ks.name()])
            .set(stats.weighted_size_bytes as i64);
        m.keyspace_ready
            .with_label_values(&[ks.name()])
            .set(ks.readiness().is_ok() as i64);
    }
    if let Some(pool) = &st.pool {
        let s = pool.status();
        m.pool_max.set(s.max_size as i64);
        m.pool_connections.with_label_values(&["idle"]).set(s.available as i64);
        m.pool_connections
            .with_label_values(&["in_use"])
            .set(s.size.saturating_sub(s.available) as i64);
        m.pool_waiting.set(s.waiting as i64);
    }
    if let Some(log) = &st.log {
        log.refresh_metrics();
    }
    st.replication.refresh_metrics(&st.replication_metrics);
    if let Some(wb) = &st.write_behind {
        wb.refresh_metrics();
    }
    let mut resp = m.encode().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `GET /healthz`: the process is up and serving HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when every keyspace can serve, else 503 naming each one that cannot and why.
pub async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let not_ready: serde_json::Map<String, Value> = st
        .keyspaces()
        .filter_map(|ks| ks.readiness().err().map(|r| (ks.name().to_string(), Value::String(r))))
        .collect();
    if not_ready.is_empty() {
        Json(json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "not_ready": not_ready })),
        )
            .into_response()
    }
}

fn write_behind(st: &AppState) -> Result<&Arc<crate::patterns::write_behind::WriteBehind>, ApiError> {
    st.write_behind.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_write_behind",
            "no keyspace has write = \"behind\", so there are no dead letters",
        )
    })
}

/// `GET /v1/deadletters`: writes Postgres rejected, oldest first.
/// With federation, also the writes taken here that another region's home rejected
/// (`elsewhere`: each with the home's node id and its dead letter).
pub async fn deadletters(State(st): State<Arc<AppState>>) -> Response {
    let elsewhere = st.federation.as_ref().map(|f| f.rejected());
    match (write_behind(&st), elsewhere) {
        (Ok(wb), elsewhere) => {
            Json(json!({ "deadletters": wb.deadletters.list(), "elsewhere": elsewhere.unwrap_or_default() }))
                .into_response()
        }
        (Err(_), Some(elsewhere)) => Json(json!({ "deadletters": [], "elsewhere": elsewhere })).into_response(),
        (Err(e), None) => e.into_response(),
    }
}

fn letter_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("{raw:?} is not a dead letter id (a number)")))
}

/// `POST /v1/deadletters/{id}/requeue`: the write goes back in the queue as a new write (202).
pub async fn requeue_deadletter(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let result = async {
        let wb = write_behind(&st)?;
        let id = letter_id(&id)?;
        match wb.requeue(id).await? {
            Some(a) => Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "requeued": id, "version": a.version.to_string(), "offset": a.offset.0 })),
            )
                .into_response()),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no dead letter {id}"),
            )),
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /v1/deadletters/{id}`: forgets a rejected write (204).
pub async fn drop_deadletter(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let result = async {
        let wb = write_behind(&st)?;
        let id = letter_id(&id)?;
        match wb.deadletters.remove(id) {
            Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
            Ok(false) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no dead letter {id}"),
            )),
            Err(e) => Err(e.into()),
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
