//! Admin routes: keyspace listing with live stats, Prometheus metrics, liveness and readiness.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;

/// `GET /v1/keyspaces`: each keyspace's settings and live stats.
pub async fn keyspaces(State(st): State<Arc<AppState>>) -> Json<Value> {
    let mut out = Vec::new();
    for ks in st.keyspaces.values() {
        ks.l1.sync().await;
        let m = &ks.m;
        out.push(json!({
            "name": ks.name(),
            "settings": ks.config,
            "ready": ks.readiness().is_ok(),
            "not_ready_reason": ks.readiness().err(),
            "stats": {
                "entries": ks.l1.entry_count(),
                "weighted_size_bytes": ks.l1.weighted_size(),
                "hits": m.hits_l1.get(),
                "misses": m.misses.get(),
                "loads_found": m.loads_found.get(),
                "loads_absent": m.loads_absent.get(),
                "load_errors": m.loads_error.get(),
                "fills_skipped": m.fills_skipped.get(),
                "loads_in_flight": ks.flights.len(),
            },
        }));
    }
    Json(json!({ "keyspaces": out }))
}

/// `GET /metrics`: refreshes the mirrored gauges, then renders the registry.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = &st.metrics;
    for ks in st.keyspaces.values() {
        ks.l1.sync().await;
        m.cache_entries
            .with_label_values(&[ks.name()])
            .set(ks.l1.entry_count() as i64);
        m.cache_weighted_bytes
            .with_label_values(&[ks.name()])
            .set(ks.l1.weighted_size() as i64);
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
        .keyspaces
        .values()
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
