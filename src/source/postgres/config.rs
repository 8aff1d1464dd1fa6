//! `[postgres]`: the connection to the source database. The URL is a [`Secret`]: kept out of
//! `Debug` and serialized output, logs and errors.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::section::{Section, humantime_serde_shim};

/// Postgres connections in the pool.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// Time allowed to open one Postgres connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a request waits for a pooled connection before answering 503.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Server-side `statement_timeout` for the sidecar's own statements.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[postgres]`: connection to the source database.
#[derive(Clone, Serialize)]
pub struct PostgresConfig {
    /// libpq-style URL or key/value string. Env: `CACHESYNC_POSTGRES_URL`. Never logged.
    pub url: Secret,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Time allowed to open one connection.
    #[serde(with = "humantime_serde_shim")]
    pub connect_timeout: Duration,
    /// Time a request waits for a free pooled connection before it answers 503.
    #[serde(with = "humantime_serde_shim")]
    pub acquire_timeout: Duration,
    /// `statement_timeout` set on every pooled session.
    #[serde(with = "humantime_serde_shim")]
    pub statement_timeout: Duration,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// A value that must never reach a log line or an error message (a connection string may hold a
/// password). `Display`/`Debug`/`Serialize` print a redacted form.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The real value, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Reads `[postgres]`. `url` may be left out here when `CACHESYNC_POSTGRES_URL` supplies it; the
/// whole-config check reports it missing only if neither does.
pub(crate) fn read_postgres(mut s: Section<'_, '_>) -> Option<PostgresConfig> {
    let url: Option<String> = s.get("url");
    let config = PostgresConfig {
        url: Secret::new(url.unwrap_or_default()),
        pool_size: s.get("pool_size").unwrap_or(DEFAULT_POOL_SIZE),
        connect_timeout: s.duration("connect_timeout").unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        acquire_timeout: s.duration("acquire_timeout").unwrap_or(DEFAULT_ACQUIRE_TIMEOUT),
        statement_timeout: s.duration("statement_timeout").unwrap_or(DEFAULT_STATEMENT_TIMEOUT),
    };
    if config.pool_size == 0 {
        s.problem_at("pool_size", "must be at least 1");
    }
    s.finish();
    Some(config)
}
