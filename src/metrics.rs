//! Prometheus metrics, one registry per running server (so tests can run several in one
//! process). Names follow `cachesync_<subsystem>_<name>_<unit>[_total]`; labels are bounded:
//! keyspace names come from the configuration, `op`, `status`, `tier` and `result` from small
//! fixed sets. A key or a peer address is never a label.
//!
//! Gauges that mirror state owned elsewhere (entries, pool connections) are refreshed when
//! `/metrics` is scraped.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 50µs to 10s: cache hits live at the bottom, Postgres round trips in the
/// middle, outages at the top.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Label for requests naming a keyspace that does not exist (keeps the label set bounded).
pub const UNKNOWN_KEYSPACE: &str = "_unknown";

/// Every metric the server exports.
pub struct Metrics {
    pub registry: Registry,
    /// `cachesync_http_requests_total{keyspace,op,status}`
    pub http_requests: IntCounterVec,
    /// `cachesync_http_request_duration_seconds{op}`
    pub http_duration: HistogramVec,
    /// `cachesync_cache_hits_total{keyspace,tier}`
    pub cache_hits: IntCounterVec,
    /// `cachesync_cache_misses_total{keyspace}`
    pub cache_misses: IntCounterVec,
    /// `cachesync_cache_entries{keyspace}`
    pub cache_entries: IntGaugeVec,
    /// `cachesync_cache_weighted_size_bytes{keyspace}`
    pub cache_weighted_bytes: IntGaugeVec,
    /// `cachesync_cache_fills_skipped_total{keyspace}`: loads not installed because the key
    /// changed while they ran.
    pub fills_skipped: IntCounterVec,
    /// `cachesync_source_loads_total{keyspace,result}` with result `found|absent|error`
    pub loads: IntCounterVec,
    /// `cachesync_source_load_duration_seconds{keyspace}`
    pub load_duration: HistogramVec,
    /// `cachesync_source_writes_total{keyspace,op,result}` with result `ok|error`
    pub writes: IntCounterVec,
    /// `cachesync_source_write_duration_seconds{keyspace,op}`
    pub write_duration: HistogramVec,
    /// `cachesync_postgres_pool_connections{state}` with state `idle|in_use`
    pub pool_connections: IntGaugeVec,
    /// `cachesync_postgres_pool_max_connections`
    pub pool_max: IntGauge,
    /// `cachesync_postgres_pool_waiting_requests`
    pub pool_waiting: IntGauge,
    /// `cachesync_keyspace_ready{keyspace}`: 1 once the keyspace is bound to its table.
    pub keyspace_ready: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(c.clone())).expect("metric is registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(g.clone())).expect("metric is registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
        .expect("metric definition is valid");
    r.register(Box::new(h.clone())).expect("metric is registered once");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let pool_max = IntGauge::new(
            "cachesync_postgres_pool_max_connections",
            "Most connections the Postgres pool opens.",
        )
        .expect("valid");
        r.register(Box::new(pool_max.clone())).expect("registered once");
        let pool_waiting = IntGauge::new(
            "cachesync_postgres_pool_waiting_requests",
            "Requests waiting for a pooled Postgres connection.",
        )
        .expect("valid");
        r.register(Box::new(pool_waiting.clone())).expect("registered once");
        Metrics {
            http_requests: counter(
                &r,
                "cachesync_http_requests_total",
                "HTTP requests by keyspace, operation and status.",
                &["keyspace", "op", "status"],
            ),
            http_duration: histogram(
                &r,
                "cachesync_http_request_duration_seconds",
                "HTTP request latency by operation.",
                &["op"],
            ),
            cache_hits: counter(
                &r,
                "cachesync_cache_hits_total",
                "Reads answered from the cache, by tier.",
                &["keyspace", "tier"],
            ),
            cache_misses: counter(
                &r,
                "cachesync_cache_misses_total",
                "Reads the cache could not answer.",
                &["keyspace"],
            ),
            cache_entries: gauge(&r, "cachesync_cache_entries", "Entries held in L1.", &["keyspace"]),
            cache_weighted_bytes: gauge(
                &r,
                "cachesync_cache_weighted_size_bytes",
                "Weighed size of L1 entries (key + value + overhead).",
                &["keyspace"],
            ),
            fills_skipped: counter(
                &r,
                "cachesync_cache_fills_skipped_total",
                "Loads not installed because the key changed while they ran.",
                &["keyspace"],
            ),
            loads: counter(
                &r,
                "cachesync_source_loads_total",
                "Row loads from Postgres by result.",
                &["keyspace", "result"],
            ),
            load_duration: histogram(
                &r,
                "cachesync_source_load_duration_seconds",
                "Row load latency.",
                &["keyspace"],
            ),
            writes: counter(
                &r,
                "cachesync_source_writes_total",
                "Writes to Postgres by operation and result.",
                &["keyspace", "op", "result"],
            ),
            write_duration: histogram(
                &r,
                "cachesync_source_write_duration_seconds",
                "Write latency.",
                &["keyspace", "op"],
            ),
            pool_connections: gauge(
                &r,
                "cachesync_postgres_pool_connections",
                "Pooled Postgres connections by state.",
                &["state"],
            ),
            keyspace_ready: gauge(
                &r,
                "cachesync_keyspace_ready",
                "1 when the keyspace is bound to its table and serving.",
                &["keyspace"],
            ),
            pool_max,
            pool_waiting,
            registry: r,
        }
    }

    /// The registry in Prometheus's text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on a malformed family, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
