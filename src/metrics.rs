//! Prometheus metrics, one registry per running server (so tests can run several in one
//! process). Names follow `cachesync_<subsystem>_<name>_<unit>[_total]`; labels are bounded:
//! keyspace names come from the configuration, `op`, `status`, `tier`, `result` and `state`
//! from small fixed sets. A key or a peer address is never a label.
//!
//! Gauges that mirror state owned elsewhere (entries, pool connections) are refreshed when
//! `/metrics` is scraped.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets from 50µs to 10s: cache hits live at the bottom, Postgres round trips in the
/// middle, outages at the top.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Label for requests naming a keyspace that does not exist (keeps the label set bounded).
pub const UNKNOWN_KEYSPACE: &str = "_unknown";

/// The stream states `cachesync_cdc_state` reports.
pub const CDC_STATES: &[&str] = &["starting", "snapshotting", "streaming", "reconnecting"];

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
    /// `cachesync_refresh_started_total{keyspace}`: background refreshes whose query began.
    pub refresh_started: IntCounterVec,
    /// `cachesync_refresh_completed_total{keyspace,result}` with result
    /// `succeeded|failed|superseded` (a write or change of the key won, or made it moot).
    pub refresh_completed: IntCounterVec,
    /// `cachesync_refresh_duration_seconds{keyspace}`
    pub refresh_duration: HistogramVec,
    /// `cachesync_refresh_in_flight{keyspace}`: refreshes running (at most the concurrency limit).
    pub refresh_in_flight: IntGaugeVec,
    /// `cachesync_refresh_queued{keyspace}`: refreshes waiting for a slot.
    pub refresh_queued: IntGaugeVec,
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
    /// `cachesync_keyspace_ready{keyspace}`: 1 once the keyspace can serve.
    pub keyspace_ready: IntGaugeVec,
    /// `cachesync_cdc_events_total{keyspace,op}`: change events captured and made durable.
    pub cdc_events: IntCounterVec,
    /// `cachesync_cdc_applied_events_total{keyspace,op}`: change events applied to the cache.
    pub cdc_applied: IntCounterVec,
    /// `cachesync_cdc_apply_lag_seconds`: commit in Postgres → applied to the cache.
    pub cdc_apply_lag: Histogram,
    /// `cachesync_cdc_transactions_total`
    pub cdc_transactions: IntCounter,
    /// `cachesync_cdc_slot_lag_bytes`: server WAL end minus the position confirmed to it.
    pub cdc_slot_lag: IntGauge,
    /// `cachesync_cdc_confirmed_lsn`
    pub cdc_confirmed_lsn: IntGauge,
    /// `cachesync_cdc_state{state}`: 1 for the stream's current state.
    pub cdc_state: IntGaugeVec,
    /// `cachesync_cdc_snapshot_rows_total{keyspace}`: rows loaded from consistent snapshots.
    pub cdc_snapshot_rows: IntCounterVec,
    /// `cachesync_cdc_snapshots_total`: warm loads started (first start, restarts, lost slots).
    pub cdc_snapshots: IntCounter,
    /// `cachesync_cdc_slot_recreations_total`: slots found missing or invalidated and recreated.
    pub cdc_slot_recreations: IntCounter,
    /// `cachesync_cdc_applied_offset`: log offset the applier has reached.
    pub cdc_applied_offset: IntGauge,
    /// `cachesync_cdc_echoes_total`: transactions recognised as this or a peer's write-behind flush.
    pub cdc_echoes: IntCounter,
    /// `cachesync_stale_reads_total{keyspace,outcome}`: reads outside the freshness contract,
    /// `reloaded` from Postgres or `served` with `X-Cache-Lag-Ms`.
    pub stale_reads: IntCounterVec,
    /// `cachesync_cdc_behind_seconds`: how far behind the database the CDC keyspaces may be
    /// (time since the last probe the stream and the applier passed); -1 while unknown.
    pub cdc_behind: Gauge,
    /// `cachesync_cdc_schema_changes_total{keyspace,action}`: table changes seen, by what was
    /// done (`rebound`, `reloaded`, `unfit`).
    pub cdc_schema_changes: IntCounterVec,
    /// `cachesync_cdc_slot_conflicts_total{kind}`: the slot found held by another live process
    /// with this node id (`held`), or advanced past this node's position (`advanced`).
    pub cdc_slot_conflicts: IntCounterVec,
    /// `cachesync_cdc_session_close_timeouts_total`: replication sessions that did not end within
    /// the close timeout.
    pub cdc_close_timeouts: IntCounter,
    /// `cachesync_writebehind_accepted_total{keyspace,op}`: writes acknowledged (202).
    pub wb_accepted: IntCounterVec,
    /// `cachesync_writebehind_rejected_total`: writes refused (503) because the backlog was full.
    pub wb_rejected: IntCounter,
    /// `cachesync_writebehind_backlog_records`: acknowledged writes not yet in Postgres.
    pub wb_backlog_records: IntGauge,
    /// `cachesync_writebehind_backlog_bytes`
    pub wb_backlog_bytes: IntGauge,
    /// `cachesync_writebehind_oldest_unflushed_seconds`: age of the oldest write not yet flushed.
    pub wb_oldest_age: Gauge,
    /// `cachesync_writebehind_flushed_rows_total{keyspace}`: coalesced rows written to Postgres.
    pub wb_flushed: IntCounterVec,
    /// `cachesync_writebehind_rows_as_written_total{keyspace}`: flushed rows installed from
    /// what was written, with no row sent back by Postgres.
    pub wb_as_written: IntCounterVec,
    /// `cachesync_writebehind_insert_first_total{keyspace,result}`: sets of flushed rows tried
    /// as a plain `COPY` into the table first; `result` is `inserted` (every key was new) or
    /// `conflict` (a key existed: the upsert ran after).
    pub wb_insert_first: IntCounterVec,
    /// `cachesync_writebehind_flush_batch_rows`: rows per flush transaction.
    pub wb_batch_rows: Histogram,
    /// `cachesync_writebehind_flush_duration_seconds`
    pub wb_flush_seconds: Histogram,
    /// `cachesync_writebehind_flush_failures_total{reason}` with reason `unavailable|rejected`.
    pub wb_flush_failures: IntCounterVec,
    /// `cachesync_writebehind_deadletters`: writes set aside, waiting for an operator.
    pub wb_deadletters: IntGauge,
    /// `cachesync_writebehind_deadlettered_total`
    pub wb_deadlettered: IntCounter,
}

/// Registers a metric; definitions are static, so failure is a programming error. Every
/// subsystem's metrics register through these.
pub fn reg<T: Collector + Clone + 'static>(r: &Registry, m: Result<T, prometheus::Error>) -> T {
    let m = m.expect("metric definition is valid");
    r.register(Box::new(m.clone())).expect("metric is registered once");
    m
}

/// A registered counter family with `labels`.
pub fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(r, IntCounterVec::new(Opts::new(name, help), labels))
}

/// A registered gauge family with `labels`.
pub fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// A registered counter without labels.
pub fn counter1(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(r, IntCounter::new(name, help))
}

/// A registered gauge without labels.
pub fn gauge1(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help))
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    reg(
        r,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels),
    )
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
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
            refresh_started: counter(
                &r,
                "cachesync_refresh_started_total",
                "Background refreshes (refresh-ahead) whose reload began.",
                &["keyspace"],
            ),
            refresh_completed: counter(
                &r,
                "cachesync_refresh_completed_total",
                "Background refreshes by outcome: succeeded, failed, superseded.",
                &["keyspace", "result"],
            ),
            refresh_duration: histogram(
                &r,
                "cachesync_refresh_duration_seconds",
                "Background refresh latency (reload and install).",
                &["keyspace"],
            ),
            refresh_in_flight: gauge(
                &r,
                "cachesync_refresh_in_flight",
                "Background refreshes running.",
                &["keyspace"],
            ),
            refresh_queued: gauge(
                &r,
                "cachesync_refresh_queued",
                "Background refreshes waiting for one of the keyspace's refresh slots.",
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
            pool_max: reg(
                &r,
                IntGauge::new(
                    "cachesync_postgres_pool_max_connections",
                    "Most connections the Postgres pool opens.",
                ),
            ),
            pool_waiting: reg(
                &r,
                IntGauge::new(
                    "cachesync_postgres_pool_waiting_requests",
                    "Requests waiting for a pooled Postgres connection.",
                ),
            ),
            keyspace_ready: gauge(
                &r,
                "cachesync_keyspace_ready",
                "1 when the keyspace can serve.",
                &["keyspace"],
            ),
            cdc_events: counter(
                &r,
                "cachesync_cdc_events_total",
                "Change events captured from Postgres and made durable.",
                &["keyspace", "op"],
            ),
            cdc_applied: counter(
                &r,
                "cachesync_cdc_applied_events_total",
                "Change events applied to the cache.",
                &["keyspace", "op"],
            ),
            cdc_apply_lag: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cachesync_cdc_apply_lag_seconds",
                        "Time from commit in Postgres to the change applied in the cache.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                ),
            ),
            cdc_transactions: reg(
                &r,
                IntCounter::new(
                    "cachesync_cdc_transactions_total",
                    "Transactions received from the replication stream.",
                ),
            ),
            cdc_slot_lag: reg(
                &r,
                IntGauge::new(
                    "cachesync_cdc_slot_lag_bytes",
                    "Server WAL end minus the position confirmed to the slot.",
                ),
            ),
            cdc_confirmed_lsn: reg(
                &r,
                IntGauge::new(
                    "cachesync_cdc_confirmed_lsn",
                    "The WAL position last confirmed to Postgres.",
                ),
            ),
            cdc_state: gauge(
                &r,
                "cachesync_cdc_state",
                "1 for the replication stream's current state.",
                &["state"],
            ),
            cdc_snapshot_rows: counter(
                &r,
                "cachesync_cdc_snapshot_rows_total",
                "Rows loaded from consistent snapshots.",
                &["keyspace"],
            ),
            cdc_snapshots: reg(
                &r,
                IntCounter::new(
                    "cachesync_cdc_snapshots_total",
                    "Warm loads from a consistent snapshot.",
                ),
            ),
            cdc_slot_recreations: reg(
                &r,
                IntCounter::new(
                    "cachesync_cdc_slot_recreations_total",
                    "Replication slots found missing or invalidated and recreated.",
                ),
            ),
            cdc_applied_offset: reg(
                &r,
                IntGauge::new(
                    "cachesync_cdc_applied_offset",
                    "Commit log offset the CDC applier has reached.",
                ),
            ),
            cdc_echoes: reg(
                &r,
                IntCounter::new(
                    "cachesync_cdc_echoes_total",
                    "Transactions recognised as a write-behind flush (their changes echo acknowledged writes).",
                ),
            ),
            stale_reads: counter(
                &r,
                "cachesync_stale_reads_total",
                "Reads outside the freshness contract: reloaded from Postgres, or served with their lag reported.",
                &["keyspace", "outcome"],
            ),
            cdc_behind: reg(
                &r,
                Gauge::new(
                    "cachesync_cdc_behind_seconds",
                    "How far behind the database CDC keyspaces may be; -1 while unknown.",
                ),
            ),
            cdc_schema_changes: counter(
                &r,
                "cachesync_cdc_schema_changes_total",
                "Table changes seen by CDC, by what was done.",
                &["keyspace", "action"],
            ),
            cdc_slot_conflicts: counter(
                &r,
                "cachesync_cdc_slot_conflicts_total",
                "Replication slot held by another process with this node id, or advanced past this node.",
                &["kind"],
            ),
            cdc_close_timeouts: reg(
                &r,
                IntCounter::new(
                    "cachesync_cdc_session_close_timeouts_total",
                    "Replication sessions that did not end within the close timeout.",
                ),
            ),
            wb_accepted: counter(
                &r,
                "cachesync_writebehind_accepted_total",
                "Write-behind writes acknowledged (202).",
                &["keyspace", "op"],
            ),
            wb_rejected: reg(
                &r,
                IntCounter::new(
                    "cachesync_writebehind_rejected_total",
                    "Write-behind writes refused (503) because the backlog was full.",
                ),
            ),
            wb_backlog_records: reg(
                &r,
                IntGauge::new(
                    "cachesync_writebehind_backlog_records",
                    "Acknowledged writes not yet flushed to Postgres.",
                ),
            ),
            wb_backlog_bytes: reg(
                &r,
                IntGauge::new(
                    "cachesync_writebehind_backlog_bytes",
                    "Bytes of acknowledged writes not yet flushed.",
                ),
            ),
            wb_oldest_age: reg(
                &r,
                Gauge::new(
                    "cachesync_writebehind_oldest_unflushed_seconds",
                    "Age of the oldest acknowledged write not yet flushed.",
                ),
            ),
            wb_flushed: counter(
                &r,
                "cachesync_writebehind_flushed_rows_total",
                "Coalesced rows written to Postgres by the flusher.",
                &["keyspace"],
            ),
            wb_as_written: counter(
                &r,
                "cachesync_writebehind_rows_as_written_total",
                "Flushed rows installed in L1 as written: Postgres stores them exactly as given, so it was not asked to send them back.",
                &["keyspace"],
            ),
            wb_insert_first: counter(
                &r,
                "cachesync_writebehind_insert_first_total",
                "Sets of flushed rows tried as a plain COPY into the table first: inserted (every key was new), or conflict (a key existed, and the upsert ran after).",
                &["keyspace", "result"],
            ),
            wb_batch_rows: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("cachesync_writebehind_flush_batch_rows", "Rows per flush transaction.")
                        .buckets(prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid")),
                ),
            ),
            wb_flush_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cachesync_writebehind_flush_duration_seconds",
                        "Duration of a flush transaction.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                ),
            ),
            wb_flush_failures: counter(
                &r,
                "cachesync_writebehind_flush_failures_total",
                "Failed flush attempts by reason.",
                &["reason"],
            ),
            wb_deadletters: reg(
                &r,
                IntGauge::new(
                    "cachesync_writebehind_deadletters",
                    "Rejected writes set aside as dead letters.",
                ),
            ),
            wb_deadlettered: reg(
                &r,
                IntCounter::new(
                    "cachesync_writebehind_deadlettered_total",
                    "Writes set aside as dead letters.",
                ),
            ),
            registry: r,
        }
    }

    /// Marks `state` as the CDC stream's current state.
    pub fn set_cdc_state(&self, state: &str) {
        for s in CDC_STATES {
            self.cdc_state.with_label_values(&[s]).set((*s == state) as i64);
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
