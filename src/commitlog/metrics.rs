//! The commit log's Prometheus metrics (`cachesync_log_*`): appends, group commits, fsync time,
//! disk use, segments and cursor positions.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

/// The log's metrics.
#[derive(Clone)]
pub struct LogMetrics {
    pub appended_records: IntCounter,
    pub appended_bytes: IntCounter,
    pub group_records: Histogram,
    pub led_groups: IntCounter,
    pub fsync_seconds: Histogram,
    pub disk_bytes: IntGauge,
    pub segments: IntGauge,
    pub start_offset: IntGauge,
    pub end_offset: IntGauge,
    pub cursor_lag: IntGaugeVec,
}

impl LogMetrics {
    /// Registers the log's metrics in `registry`.
    pub fn new(registry: &Registry) -> LogMetrics {
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            let _ = r.register(Box::new(m.clone()));
            m
        }
        let gauge = |n: &str, h: &str| reg(registry, IntGauge::new(n, h).expect("valid metric"));
        LogMetrics {
            appended_records: reg(
                registry,
                IntCounter::new(
                    "cachesync_log_appended_records_total",
                    "Records appended to the commit log.",
                )
                .expect("valid"),
            ),
            appended_bytes: reg(
                registry,
                IntCounter::new(
                    "cachesync_log_appended_bytes_total",
                    "Record bytes (with framing) appended.",
                )
                .expect("valid"),
            ),
            group_records: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cachesync_log_group_commit_records",
                        "Records per group commit (one write + one sync).",
                    )
                    .buckets(prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid")),
                )
                .expect("valid"),
            ),
            led_groups: reg(
                registry,
                IntCounter::new(
                    "cachesync_log_led_groups_total",
                    "Group commits written by an appender that found the log idle, on its own thread (the rest are written by the writer thread).",
                )
                .expect("valid"),
            ),
            fsync_seconds: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cachesync_log_fsync_duration_seconds",
                        "Duration of fdatasync on the active segment.",
                    )
                    .buckets(crate::metrics::LATENCY_BUCKETS.to_vec()),
                )
                .expect("valid"),
            ),
            disk_bytes: gauge("cachesync_log_disk_bytes", "Bytes of segment and index files."),
            segments: gauge("cachesync_log_segments", "Segment files in the log."),
            start_offset: gauge("cachesync_log_start_offset", "First offset still in the log."),
            end_offset: gauge(
                "cachesync_log_end_offset",
                "Offset the next record will get (durable end).",
            ),
            cursor_lag: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "cachesync_log_cursor_lag_records",
                        "Records between a cursor and the end of the log.",
                    ),
                    &["cursor"],
                )
                .expect("valid"),
            ),
        }
    }
}
