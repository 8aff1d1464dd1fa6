//! The configuration: one TOML file plus `CACHESYNC_*` environment overrides, read into plain
//! data structs whose defaults are named constants.
//!
//! Reading goes through [`reader::Section`], which records every problem (unknown field with its
//! line, bad duration, missing key column, ...) so `cachesync check` reports them all at once. With
//! no file at all, [`Config::embedded_default`] gives a pure in-memory cache with one keyspace
//! named `default`, so the sidecar runs with no servers. Connection strings are kept out of
//! `Debug`/`Serialize` output (see [`Secret`]).

pub mod reader;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use toml::de::DeTable;

pub use reader::Problem;
use reader::{Ctx, Section};

/// Where the HTTP API listens when nothing else is configured: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// How long shutdown waits for in-flight work before giving up.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Longest accepted key, in bytes (after URL decoding).
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Largest accepted request body.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Most keys one `_mget` may ask for.
pub const DEFAULT_MAX_MGET_KEYS: usize = 1000;
/// Postgres connections in the pool.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Time allowed to open one Postgres connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a request waits for a pooled connection before answering 503.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side `statement_timeout` for the sidecar's own statements.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Entry lifetime when a keyspace sets none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// How long "row not found" is remembered.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Entry bound when a keyspace sets neither `max_entries` nor `max_bytes`.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// Refresh-ahead factor when none is configured: off.
pub const DEFAULT_REFRESH_AHEAD: f64 = 0.0;
/// Background refreshes one keyspace runs at once when none is configured.
pub const DEFAULT_REFRESH_CONCURRENCY: usize = 4;
/// Name of the keyspace of the embedded default configuration.
pub const DEFAULT_KEYSPACE: &str = "default";
/// Schema assumed for a table named without one.
pub const DEFAULT_SCHEMA: &str = "public";

/// The whole configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The local HTTP API.
    pub server: ServerConfig,
    /// The database behind sourced keyspaces; absent for a pure in-memory cache.
    pub postgres: Option<PostgresConfig>,
    /// The named caches.
    pub keyspaces: Vec<KeyspaceConfig>,
    /// The local durable change log; absent when nothing needs one.
    pub log: Option<crate::commitlog::LogConfig>,
    /// Postgres logical replication, for keyspaces with `cdc` on.
    pub cdc: CdcConfig,
    /// The flusher of `write = "behind"` keyspaces.
    pub write_behind: WriteBehindConfig,
}

/// `[write_behind]`: how acknowledged writes reach Postgres.
#[derive(Debug, Clone, Serialize)]
pub struct WriteBehindConfig {
    /// Most rows per flush transaction (after coalescing).
    pub batch_rows: usize,
    /// How long the flusher waits to fill a batch once it has a first write.
    #[serde(with = "humantime_serde_shim")]
    pub batch_delay: Duration,
    /// Unflushed writes above which new writes get 503 with `Retry-After`.
    pub max_backlog_records: u64,
    /// Unflushed bytes above which new writes get 503 with `Retry-After`.
    pub max_backlog_bytes: u64,
    /// First wait after a failed flush (Postgres unreachable); doubles up to `retry_max`.
    #[serde(with = "humantime_serde_shim")]
    pub retry_initial: Duration,
    /// Longest wait between flush retries.
    #[serde(with = "humantime_serde_shim")]
    pub retry_max: Duration,
}

/// Rows per flush transaction when none is configured.
pub const DEFAULT_BATCH_ROWS: usize = 1000;
/// Wait to fill a flush batch when none is configured.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(5);
/// Unflushed writes accepted before writes get 503.
pub const DEFAULT_MAX_BACKLOG_RECORDS: u64 = 1_000_000;
/// Unflushed bytes accepted before writes get 503.
pub const DEFAULT_MAX_BACKLOG_BYTES: u64 = 512 * 1024 * 1024;
/// First wait after a failed flush.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between flush retries.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(10);

impl Default for WriteBehindConfig {
    fn default() -> Self {
        WriteBehindConfig {
            batch_rows: DEFAULT_BATCH_ROWS,
            batch_delay: DEFAULT_BATCH_DELAY,
            max_backlog_records: DEFAULT_MAX_BACKLOG_RECORDS,
            max_backlog_bytes: DEFAULT_MAX_BACKLOG_BYTES,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }
}

fn read_write_behind(mut s: Section<'_, '_>) -> WriteBehindConfig {
    let d = WriteBehindConfig::default();
    let c = WriteBehindConfig {
        batch_rows: s.get("batch_rows").unwrap_or(d.batch_rows),
        batch_delay: s.duration("batch_delay").unwrap_or(d.batch_delay),
        max_backlog_records: s.get("max_backlog_records").unwrap_or(d.max_backlog_records),
        max_backlog_bytes: s.byte_size("max_backlog_bytes").unwrap_or(d.max_backlog_bytes),
        retry_initial: s.duration("retry_initial").unwrap_or(d.retry_initial),
        retry_max: s.duration("retry_max").unwrap_or(d.retry_max),
    };
    if c.batch_rows == 0 {
        s.problem_at("batch_rows", "must be at least 1");
    }
    if c.retry_initial.is_zero() || c.retry_max < c.retry_initial {
        s.problem_at("retry_max", "retry_initial must be positive and at most retry_max");
    }
    s.finish();
    c
}

/// Default name of the publication cachesync creates and follows.
pub const DEFAULT_PUBLICATION: &str = "cachesync";
/// Default interval of heartbeat messages that keep an idle database's slot moving.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// How long the stream may be down before CDC keyspaces stop reporting ready.
pub const DEFAULT_READY_GRACE: Duration = Duration::from_secs(5);

/// `[cdc]`: how changes are captured.
#[derive(Debug, Clone, Serialize)]
pub struct CdcConfig {
    /// Replication slot name (lower-case letters, digits, `_`). Default: `cachesync_<node_id>`.
    pub slot: Option<String>,
    /// Publication to follow.
    pub publication: String,
    /// Create the publication for the CDC keyspaces' tables when it does not exist, and add
    /// missing tables to it. Off: the publication must exist and include them.
    pub create_publication: bool,
    /// Interval of `pg_logical_emit_message` heartbeats; none disables them.
    #[serde(with = "humantime_serde_shim::option")]
    pub heartbeat: Option<Duration>,
    /// How long the stream may be down before CDC keyspaces stop reporting ready.
    #[serde(with = "humantime_serde_shim")]
    pub ready_grace: Duration,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            slot: None,
            publication: DEFAULT_PUBLICATION.into(),
            create_publication: true,
            heartbeat: Some(DEFAULT_HEARTBEAT),
            ready_grace: DEFAULT_READY_GRACE,
        }
    }
}

impl CdcConfig {
    /// The slot name in effect.
    pub fn slot_name(&self, node_id: &str) -> String {
        self.slot.clone().unwrap_or_else(|| {
            let n: String = node_id
                .to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let mut name = format!("cachesync_{n}");
            name.truncate(63);
            name
        })
    }
}

fn read_cdc(mut s: Section<'_, '_>) -> CdcConfig {
    let d = CdcConfig::default();
    let slot: Option<String> = s.get("slot");
    if let Some(name) = &slot
        && (name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
    {
        s.problem_at("slot", "a slot name is 1 to 63 lower-case letters, digits and `_`");
    }
    let publication: String = s.get("publication").unwrap_or(d.publication);
    if publication.is_empty() {
        s.problem_at("publication", "must not be empty");
    }
    let heartbeat = match s.duration("heartbeat") {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None if s.span_of("heartbeat").is_some() => None,
        None => d.heartbeat,
    };
    let c = CdcConfig {
        slot,
        publication,
        create_publication: s.get("create_publication").unwrap_or(d.create_publication),
        heartbeat,
        ready_grace: s.duration("ready_grace").unwrap_or(d.ready_grace),
    };
    s.finish();
    c
}

/// `[server]`: the local HTTP API.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address to listen on. Loopback by default: the API has no authentication and is meant for
    /// the service in the same pod or host. Env: `CACHESYNC_LISTEN`.
    pub listen: SocketAddr,
    /// Time allowed on SIGTERM/SIGINT for in-flight requests to finish.
    #[serde(with = "humantime_serde_shim")]
    pub shutdown_grace: Duration,
    /// Longest key accepted, in bytes after URL decoding; longer keys get 400.
    pub max_key_bytes: usize,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body_bytes: u64,
    /// Most keys one `_mget` may ask for.
    pub max_mget_keys: usize,
    /// This node's id: the origin of the events it produces and part of its default slot name.
    /// Default: the host name.
    pub node_id: String,
}

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

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableRef {
    pub schema: String,
    pub name: String,
}

impl TableRef {
    /// Parses `table`, `schema.table`, or either part in double quotes (`"My Schema"."T"`).
    pub fn parse(text: &str) -> Result<TableRef, String> {
        let parts = split_qualified(text)?;
        match parts.as_slice() {
            [name] => Ok(TableRef {
                schema: DEFAULT_SCHEMA.into(),
                name: name.clone(),
            }),
            [schema, name] => Ok(TableRef {
                schema: schema.clone(),
                name: name.clone(),
            }),
            _ => Err(format!(
                "invalid table name {text:?}; write it as \"table\" or \"schema.table\""
            )),
        }
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

fn split_qualified(text: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("unterminated quote in {text:?}")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!("empty name part in {text:?}"));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => return Err(format!("unexpected {c:?} in {text:?}")),
        }
    }
}

/// One output field: a table column, possibly under another name in the JSON document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnMapping {
    /// Column in the table.
    pub column: String,
    /// Field name in the JSON document.
    pub field: String,
}

impl ColumnMapping {
    /// Parses `"column"` or `"column as field"` (the `as` is case-insensitive).
    pub fn parse(text: &str) -> Result<ColumnMapping, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            [col] => Ok(ColumnMapping {
                column: (*col).into(),
                field: (*col).into(),
            }),
            [col, kw, field] if kw.eq_ignore_ascii_case("as") => Ok(ColumnMapping {
                column: (*col).into(),
                field: (*field).into(),
            }),
            _ => Err(format!(
                "invalid column mapping {text:?}; write \"column\" or \"column as field\""
            )),
        }
    }
}

/// How the keyspace bounds its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    /// At most this many entries.
    Entries(u64),
    /// At most this many weighed bytes (key + value + a fixed per-entry overhead).
    Bytes(u64),
}

/// What a `PUT`/`DELETE` on the keyspace does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Writes are refused (405) on a sourced keyspace; an in-memory keyspace stores them.
    None,
    /// Postgres first, then the cache holds what Postgres stored.
    Through,
    /// Durable in the local commit log, acknowledged (202), flushed to Postgres in batches.
    Behind,
}

impl WriteMode {
    /// The value as the config file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteMode::None => "none",
            WriteMode::Through => "through",
            WriteMode::Behind => "behind",
        }
    }
}

/// `[[keyspace]]`: one named cache and its rules.
#[derive(Debug, Clone, Serialize)]
pub struct KeyspaceConfig {
    /// Name used in URLs and metric labels: letters, digits, `_` and `-`.
    pub name: String,
    /// The table behind the keyspace; `None` makes a pure in-memory keyspace.
    pub table: Option<TableRef>,
    /// Key column or columns, in the order a composite key lists them in the URL.
    pub key: Vec<String>,
    /// Output columns and their JSON names; `None` means every column under its own name.
    pub columns: Option<Vec<ColumnMapping>>,
    /// Entry lifetime.
    #[serde(with = "humantime_serde_shim")]
    pub ttl: Duration,
    /// Memory bound.
    pub capacity: Capacity,
    /// How long "row not found" is remembered; zero disables negative caching.
    #[serde(with = "humantime_serde_shim")]
    pub negative_ttl: Duration,
    /// Load misses from the table.
    pub read_through: bool,
    /// What writes do.
    pub write: WriteMode,
    /// Change data capture from Postgres logical replication.
    pub cdc: CdcMode,
    /// With CDC: load the whole table from a consistent snapshot when the sidecar starts or its
    /// slot is (re)created, so the keyspace is complete before it serves.
    pub warm: bool,
    /// Refresh-ahead factor in `[0, 1)`: a read of an entry older than `factor × ttl` schedules a
    /// background reload; 0 turns refresh-ahead off.
    pub refresh_ahead: f64,
    /// Most background refreshes of this keyspace running at once.
    pub refresh_concurrency: usize,
}

/// What a keyspace does with the changes CDC delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CdcMode {
    Off,
    /// Put the new row, delete deleted rows.
    Update,
    /// Drop the entry; the next read loads it.
    Invalidate,
}

impl KeyspaceConfig {
    /// An in-memory keyspace with the defaults.
    pub fn in_memory(name: &str) -> KeyspaceConfig {
        KeyspaceConfig {
            name: name.into(),
            table: None,
            key: Vec::new(),
            columns: None,
            ttl: DEFAULT_TTL,
            capacity: Capacity::Entries(DEFAULT_MAX_ENTRIES),
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            read_through: false,
            write: WriteMode::None,
            cdc: CdcMode::Off,
            warm: false,
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
            refresh_concurrency: DEFAULT_REFRESH_CONCURRENCY,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("DEFAULT_LISTEN is a valid address"),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_mget_keys: DEFAULT_MAX_MGET_KEYS,
            node_id: default_node_id(),
        }
    }
}

/// The host name (from `/etc/hostname` or `HOSTNAME`), made safe for a slot name; `cachesync`
/// when there is none.
pub fn default_node_id() -> String {
    let raw = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let id: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if id.is_empty() { "cachesync".into() } else { id }
}

/// Everything wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{} problem(s) in {origin}:\n  {}", problems.len(), problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid { origin: String, problems: Vec<Problem> },
}

/// Environment variables read as overrides.
pub const ENV_LISTEN: &str = "CACHESYNC_LISTEN";
pub const ENV_POSTGRES_URL: &str = "CACHESYNC_POSTGRES_URL";

impl Config {
    /// The configuration used when no file is given: an in-memory keyspace named `default`.
    pub fn embedded_default() -> Config {
        Config {
            server: ServerConfig::default(),
            postgres: None,
            keyspaces: vec![KeyspaceConfig::in_memory(DEFAULT_KEYSPACE)],
            log: None,
            cdc: CdcConfig::default(),
            write_behind: WriteBehindConfig::default(),
        }
    }

    /// Reads the file (or the embedded default when `path` is `None`) and applies the process
    /// environment's overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env = |k: &str| std::env::var(k).ok();
        match path {
            None => Config::from_parts(None, "the embedded default", &env),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Config::from_parts(Some(&text), &p.display().to_string(), &env)
            }
        }
    }

    /// Parses TOML text with no environment overrides (tests, examples).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_parts(Some(text), "config", &|_| None)
    }

    /// Parses `text` (or starts from the embedded default) and applies overrides from `env`.
    pub fn from_parts(
        text: Option<&str>,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            origin: origin.to_string(),
            problems,
        };
        let (mut config, problems) = match text {
            None => (Config::embedded_default(), Vec::new()),
            Some(text) => {
                let doc = DeTable::parse(text).map_err(|e| {
                    let ctx = Ctx::new(text);
                    let line = e.span().map(|s| ctx.line_of(s.start));
                    invalid(vec![Problem {
                        line,
                        path: "toml".into(),
                        message: e.message().to_string(),
                    }])
                })?;
                let ctx = Ctx::new(text);
                let root = Section::new(&ctx, doc.get_ref(), "", doc.span());
                let config = read_config(root);
                (config, ctx.into_problems())
            }
        };
        let mut problems = problems;
        apply_env(&mut config, env, &mut problems);
        problems.extend(validate(&config));
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid(problems))
        }
    }

    pub fn keyspace(&self, name: &str) -> Option<&KeyspaceConfig> {
        self.keyspaces.iter().find(|k| k.name == name)
    }
}

fn read_config(mut root: Section<'_, '_>) -> Config {
    let server = root.table("server").map(read_server).unwrap_or_default();
    let postgres = root.table("postgres").map(read_postgres);
    let keyspaces = root.tables("keyspace").into_iter().filter_map(read_keyspace).collect();
    let log = root.table("log").and_then(read_log);
    let cdc = root.table("cdc").map(read_cdc).unwrap_or_default();
    let write_behind = root.table("write_behind").map(read_write_behind).unwrap_or_default();
    root.finish();
    Config {
        server,
        postgres: postgres.flatten(),
        keyspaces,
        log,
        cdc,
        write_behind,
    }
}

fn read_log(mut s: Section<'_, '_>) -> Option<crate::commitlog::LogConfig> {
    use crate::commitlog::{FsyncPolicy, LogConfig, MAX_SEGMENT_BYTES};
    let dir: Option<String> = s.required("dir");
    let mut c = LogConfig::new(dir.clone().unwrap_or_default());
    if let Some(text) = s.get::<String>("fsync") {
        match FsyncPolicy::parse(&text) {
            Ok(p) => c.fsync = p,
            Err(e) => s.problem_at("fsync", e),
        }
    }
    if let Some(n) = s.byte_size("segment_bytes") {
        if !(4096..=MAX_SEGMENT_BYTES).contains(&n) {
            s.problem_at(
                "segment_bytes",
                format!("must be between 4KiB and {}MiB", MAX_SEGMENT_BYTES >> 20),
            );
        }
        c.segment_bytes = n;
    }
    if let Some(n) = s.byte_size("index_interval_bytes") {
        if n == 0 {
            s.problem_at("index_interval_bytes", "must be greater than zero");
        }
        c.index_interval_bytes = n;
    }
    c.retention_bytes = s.byte_size("retention_bytes");
    c.retention_age = s.duration("retention_age");
    if let Some(d) = s.duration("retention_check") {
        if d.is_zero() {
            s.problem_at("retention_check", "must be greater than zero");
        }
        c.retention_check = d;
    }
    if let Some(n) = s.byte_size("max_queued_bytes") {
        if n == 0 {
            s.problem_at("max_queued_bytes", "must be greater than zero");
        }
        c.max_queued_bytes = n;
    }
    if let Some(n) = s.get::<usize>("max_queued_appends") {
        if n == 0 {
            s.problem_at("max_queued_appends", "must be at least 1");
        }
        c.max_queued_appends = n;
    }
    s.finish();
    dir.map(|_| c)
}

fn read_server(mut s: Section<'_, '_>) -> ServerConfig {
    let d = ServerConfig::default();
    let listen = match s.get::<String>("listen") {
        Some(text) => match text.parse() {
            Ok(a) => a,
            Err(e) => {
                s.problem_at(
                    "listen",
                    format!("invalid address {text:?} ({e}); write it like \"127.0.0.1:7070\""),
                );
                d.listen
            }
        },
        None => d.listen,
    };
    let config = ServerConfig {
        listen,
        shutdown_grace: s.duration("shutdown_grace").unwrap_or(d.shutdown_grace),
        max_key_bytes: s.get("max_key_bytes").unwrap_or(d.max_key_bytes),
        max_body_bytes: s.byte_size("max_body_bytes").unwrap_or(d.max_body_bytes),
        max_mget_keys: s.get("max_mget_keys").unwrap_or(d.max_mget_keys),
        node_id: s.get("node_id").unwrap_or(d.node_id),
    };
    if config.node_id.is_empty()
        || !config
            .node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        s.problem_at("node_id", "use letters, digits, `_` and `-`");
    }
    if config.max_key_bytes == 0 {
        s.problem_at("max_key_bytes", "must be at least 1");
    }
    if config.max_mget_keys == 0 {
        s.problem_at("max_mget_keys", "must be at least 1");
    }
    s.finish();
    config
}

fn read_postgres(mut s: Section<'_, '_>) -> Option<PostgresConfig> {
    let url: Option<String> = s.required("url");
    let config = PostgresConfig {
        url: Secret::new(url.clone().unwrap_or_default()),
        pool_size: s.get("pool_size").unwrap_or(DEFAULT_POOL_SIZE),
        connect_timeout: s.duration("connect_timeout").unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        acquire_timeout: s.duration("acquire_timeout").unwrap_or(DEFAULT_ACQUIRE_TIMEOUT),
        statement_timeout: s.duration("statement_timeout").unwrap_or(DEFAULT_STATEMENT_TIMEOUT),
    };
    if config.pool_size == 0 {
        s.problem_at("pool_size", "must be at least 1");
    }
    s.finish();
    url.map(|_| config)
}

/// `key = "id"` or `key = ["tenant_id", "id"]`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum KeySpec {
    One(String),
    Many(Vec<String>),
}

fn read_keyspace(mut s: Section<'_, '_>) -> Option<KeyspaceConfig> {
    let name: Option<String> = s.required("name");
    if let Some(n) = &name {
        s.set_path(format!("keyspace[{n}]"));
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') || n.starts_with('_') {
            s.problem_at(
                "name",
                format!("invalid keyspace name {n:?}: use letters, digits, `_` and `-`, not starting with `_`"),
            );
        }
    }
    let table = s.get::<String>("table").and_then(|t| match TableRef::parse(&t) {
        Ok(t) => Some(t),
        Err(e) => {
            s.problem_at("table", e);
            None
        }
    });
    let has_table = s.span_of("table").is_some();
    let key = match s.get::<KeySpec>("key") {
        Some(KeySpec::One(k)) => vec![k],
        Some(KeySpec::Many(ks)) => ks,
        None => Vec::new(),
    };
    let columns = s.get::<Vec<String>>("columns").map(|cols| {
        cols.iter()
            .filter_map(|c| match ColumnMapping::parse(c) {
                Ok(m) => Some(m),
                Err(e) => {
                    s.problem_at("columns", e);
                    None
                }
            })
            .collect::<Vec<_>>()
    });
    let ttl = s.duration("ttl").unwrap_or(DEFAULT_TTL);
    let negative_ttl = s.duration("negative_ttl").unwrap_or(DEFAULT_NEGATIVE_TTL);
    let max_entries: Option<u64> = s.get("max_entries");
    let max_bytes = s.byte_size("max_bytes");
    let capacity = match (max_entries, max_bytes) {
        (Some(_), Some(_)) => {
            s.problem_at("max_bytes", "set either max_entries or max_bytes, not both");
            Capacity::Entries(DEFAULT_MAX_ENTRIES)
        }
        (Some(n), None) => Capacity::Entries(n),
        (None, Some(b)) => Capacity::Bytes(b),
        (None, None) => Capacity::Entries(DEFAULT_MAX_ENTRIES),
    };
    let read_through = s.get::<bool>("read_through");
    let cdc = match s.get::<String>("cdc").as_deref() {
        None | Some("off") => CdcMode::Off,
        Some("update") => CdcMode::Update,
        Some("invalidate") => CdcMode::Invalidate,
        Some(other) => {
            s.problem_at(
                "cdc",
                format!("unknown CDC mode {other:?}; expected \"off\", \"update\" or \"invalidate\""),
            );
            CdcMode::Off
        }
    };
    let refresh_ahead = s.get::<f64>("refresh_ahead").unwrap_or(DEFAULT_REFRESH_AHEAD);
    if !(0.0..1.0).contains(&refresh_ahead) {
        s.problem_at(
            "refresh_ahead",
            format!("must be at least 0 (off) and below 1 (a fraction of ttl), not {refresh_ahead}"),
        );
    }
    let refresh_concurrency = s
        .get::<usize>("refresh_concurrency")
        .unwrap_or(DEFAULT_REFRESH_CONCURRENCY);
    if refresh_concurrency == 0 {
        s.problem_at("refresh_concurrency", "must be at least 1");
    }
    let warm = s.get::<bool>("warm");
    if warm == Some(true) && cdc == CdcMode::Off {
        s.problem_at(
            "warm",
            "warm loading comes with CDC; set cdc = \"update\" or \"invalidate\"",
        );
    }
    if !has_table && cdc != CdcMode::Off {
        s.problem_at("cdc", "CDC needs `table`; an in-memory keyspace has no source");
    }
    let write = match s.get::<String>("write").as_deref() {
        None | Some("none") => WriteMode::None,
        Some("through") => WriteMode::Through,
        Some("behind") => WriteMode::Behind,
        Some(other) => {
            s.problem_at(
                "write",
                format!("unknown write mode {other:?}; expected \"none\", \"through\" or \"behind\""),
            );
            WriteMode::None
        }
    };

    if ttl.is_zero() {
        s.problem_at("ttl", "must be greater than zero");
    }
    if matches!(capacity, Capacity::Entries(0) | Capacity::Bytes(0)) {
        s.problem("the capacity (max_entries or max_bytes) must be greater than zero");
    }
    if has_table {
        if key.is_empty() && s.span_of("key").is_none() {
            s.problem("missing required field `key` (the table's key column or columns)");
        }
        if key.iter().any(|k| k.is_empty()) {
            s.problem_at("key", "key column names must not be empty");
        }
        let mut seen = std::collections::HashSet::new();
        for k in &key {
            if !seen.insert(k) {
                s.problem_at("key", format!("key column `{k}` is listed twice"));
            }
        }
        if let Some(cols) = &columns {
            for k in &key {
                if !cols.iter().any(|c| &c.column == k) {
                    s.problem_at(
                        "columns",
                        format!("key column `{k}` is missing from `columns`; the key must be part of the entry"),
                    );
                }
            }
            let mut fields = std::collections::HashSet::new();
            let mut cols_seen = std::collections::HashSet::new();
            for c in cols {
                if !fields.insert(&c.field) {
                    s.problem_at("columns", format!("field name `{}` is used twice", c.field));
                }
                if !cols_seen.insert(&c.column) {
                    s.problem_at("columns", format!("column `{}` is listed twice", c.column));
                }
            }
            if cols.is_empty() {
                s.problem_at(
                    "columns",
                    "must list at least one column (or be left out for all columns)",
                );
            }
        }
    } else {
        for field in ["key", "columns"] {
            if s.span_of(field).is_some() {
                s.problem_at(
                    field,
                    format!("`{field}` needs `table`; an in-memory keyspace has no columns"),
                );
            }
        }
        if read_through == Some(true) {
            s.problem_at(
                "read_through",
                "read-through needs `table`; an in-memory keyspace has no source to load from",
            );
        }
        if write != WriteMode::None {
            s.problem_at(
                "write",
                "writing to a source needs `table`; an in-memory keyspace stores writes in memory only",
            );
        }
    }
    if refresh_ahead > 0.0 && (!has_table || read_through == Some(false)) {
        s.problem_at(
            "refresh_ahead",
            "refresh-ahead reloads entries from the table: it needs `table` and read_through",
        );
    }
    s.finish();
    Some(KeyspaceConfig {
        name: name?,
        table,
        key,
        columns,
        ttl,
        capacity,
        negative_ttl,
        read_through: read_through.unwrap_or(has_table),
        write,
        cdc,
        warm: warm.unwrap_or(cdc != CdcMode::Off),
        refresh_ahead,
        refresh_concurrency,
    })
}

fn apply_env(config: &mut Config, env: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<Problem>) {
    if let Some(listen) = env(ENV_LISTEN) {
        match listen.parse() {
            Ok(a) => config.server.listen = a,
            Err(e) => problems.push(Problem {
                line: None,
                path: ENV_LISTEN.into(),
                message: format!("invalid address {listen:?} ({e})"),
            }),
        }
    }
    if let Some(url) = env(ENV_POSTGRES_URL) {
        match &mut config.postgres {
            Some(pg) => pg.url = Secret::new(url),
            None => {
                config.postgres = Some(PostgresConfig {
                    url: Secret::new(url),
                    pool_size: DEFAULT_POOL_SIZE,
                    connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                    acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
                    statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
                })
            }
        }
    }
}

/// Checks that span sections (after overrides); each problem is reported, none stops the others.
fn validate(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut names = std::collections::HashSet::new();
    for ks in &config.keyspaces {
        if !names.insert(ks.name.as_str()) {
            problems.push(Problem {
                line: None,
                path: format!("keyspace[{}]", ks.name),
                message: format!("keyspace name `{}` is used twice", ks.name),
            });
        }
        if ks.table.is_some() && config.postgres.is_none() {
            problems.push(Problem {
                line: None,
                path: format!("keyspace[{}].table", ks.name),
                message: format!(
                    "keyspace `{}` has a table but there is no [postgres] section (or {ENV_POSTGRES_URL})",
                    ks.name
                ),
            });
        }
    }
    if let Some(pg) = &config.postgres
        && let Err(e) = pg.url.expose().parse::<tokio_postgres::Config>()
    {
        // The parser's message can quote the input; keep only its kind.
        let kind = e.to_string();
        let kind = if kind.contains(pg.url.expose()) {
            "unparseable connection string".to_string()
        } else {
            kind
        };
        problems.push(Problem {
            line: None,
            path: "postgres.url".into(),
            message: format!("invalid connection string: {kind}"),
        });
    }
    if config.keyspaces.iter().any(|k| k.write == WriteMode::Behind) && config.log.is_none() {
        problems.push(Problem {
            line: None,
            path: "log".into(),
            message: "write = \"behind\" needs the commit log: add a [log] section with `dir` (writes are durable there before they are acknowledged)".into(),
        });
    }
    if config.keyspaces.iter().any(|k| k.cdc != CdcMode::Off) && config.log.is_none() {
        problems.push(Problem {
            line: None,
            path: "log".into(),
            message: "CDC keyspaces need the commit log: add a [log] section with `dir` (changes are made durable there before Postgres is told they are safe)".into(),
        });
    }
    if config.keyspaces.is_empty() {
        problems.push(Problem {
            line: None,
            path: "keyspace".into(),
            message: "no [[keyspace]] is configured; add at least one".into(),
        });
    }
    problems
}

/// Serializes durations as human strings ("5m") in `/v1/keyspaces` and `check` output.
pub(crate) mod humantime_serde_shim {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:7171"
[postgres]
url = "postgres://app:s3cret@127.0.0.1:5432/app"
[[keyspace]]
name = "users"
table = "public.users"
key = "id"
columns = ["id", "name", "email_address as email"]
ttl = "5m"
max_entries = 100000
negative_ttl = "5s"
read_through = true
write = "through"
[[keyspace]]
name = "orders"
table = "orders"
key = ["tenant_id", "id"]
max_bytes = "64MiB"
"#;

    #[test]
    fn parses_the_documented_shape() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.server.listen.port(), 7171);
        let users = c.keyspace("users").unwrap();
        assert_eq!(users.key, vec!["id"]);
        assert_eq!(users.columns.as_ref().unwrap()[2].field, "email");
        assert_eq!(users.columns.as_ref().unwrap()[2].column, "email_address");
        assert_eq!(users.write, WriteMode::Through);
        assert_eq!(users.ttl, Duration::from_secs(300));
        let orders = c.keyspace("orders").unwrap();
        assert_eq!(orders.table.as_ref().unwrap().schema, "public");
        assert_eq!(orders.key, vec!["tenant_id", "id"]);
        assert_eq!(orders.capacity, Capacity::Bytes(64 << 20));
        assert!(
            orders.read_through,
            "read_through defaults to on for a sourced keyspace"
        );
    }

    #[test]
    fn reports_every_problem_at_once_with_lines() {
        let text = r#"
[server]
listen = "127.0.0.1:7070"
colour = "blue"
[postgres]
url = "postgres://x@127.0.0.1/app"
[[keyspace]]
name = "users"
table = "users"
key = "id"
columns = ["name"]
ttl = "5 fortnights"
write = "sideways"
"#;
        let p = problems(text);
        let text_of = |needle: &str| {
            p.iter()
                .find(|p| p.message.contains(needle))
                .unwrap_or_else(|| panic!("no problem mentions {needle:?}: {p:#?}"))
        };
        let unknown = text_of("unknown field `colour`");
        assert_eq!(unknown.line, Some(4));
        assert!(
            unknown.message.contains("listen"),
            "names the known fields: {}",
            unknown.message
        );
        assert_eq!(text_of("invalid duration").line, Some(12));
        assert_eq!(text_of("key column `id` is missing").line, Some(11));
        assert_eq!(text_of("unknown write mode").line, Some(13));
        assert_eq!(p.len(), 4, "{p:#?}");
    }

    #[test]
    fn in_memory_keyspace_rejects_source_settings() {
        let p = problems("[[keyspace]]\nname = \"m\"\nread_through = true\nkey = \"id\"\n");
        assert_eq!(p.len(), 2, "{p:#?}");
    }

    #[test]
    fn env_overrides_listen_and_url() {
        let env = |k: &str| match k {
            ENV_LISTEN => Some("127.0.0.1:9999".to_string()),
            ENV_POSTGRES_URL => Some("postgres://u:pw@127.0.0.1/db".to_string()),
            _ => None,
        };
        let c = Config::from_parts(None, "test", &env).unwrap();
        assert_eq!(c.server.listen.port(), 9999);
        assert_eq!(
            c.postgres.as_ref().unwrap().url.expose(),
            "postgres://u:pw@127.0.0.1/db"
        );
        assert_eq!(c.keyspaces[0].name, DEFAULT_KEYSPACE);
    }

    #[test]
    fn secrets_never_print() {
        let c = Config::parse(GOOD).unwrap();
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn duplicate_keyspaces_and_missing_postgres() {
        let p = problems("[[keyspace]]\nname = \"a\"\ntable = \"t\"\nkey = \"id\"\n[[keyspace]]\nname = \"a\"\n");
        assert!(p.iter().any(|p| p.message.contains("used twice")), "{p:#?}");
        assert!(p.iter().any(|p| p.message.contains("no [postgres]")), "{p:#?}");
    }

    #[test]
    fn log_section() {
        let c = Config::parse("[log]\ndir = \"/tmp/x\"\nfsync = \"10ms\"\nsegment_bytes = \"64MiB\"\nretention_age = \"7days\"\n[[keyspace]]\nname = \"m\"\n").unwrap();
        let log = c.log.unwrap();
        assert_eq!(
            log.fsync,
            crate::commitlog::FsyncPolicy::Interval(Duration::from_millis(10))
        );
        assert_eq!(log.segment_bytes, 64 << 20);
        assert_eq!(log.retention_age, Some(Duration::from_secs(7 * 86400)));
        let p = problems("[log]\nfsync = \"sometimes\"\nsegment_bytes = 10\n[[keyspace]]\nname = \"m\"\n");
        assert_eq!(p.len(), 3, "{p:#?}");
    }

    #[test]
    fn cdc_settings() {
        let c = Config::parse("[server]\nnode_id = \"Pod-7\"\n[postgres]\nurl = \"postgres://x@127.0.0.1/db\"\n[log]\ndir = \"/tmp/l\"\n[cdc]\nheartbeat = \"0s\"\n[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\ncdc = \"update\"\n").unwrap();
        assert_eq!(c.keyspaces[0].cdc, CdcMode::Update);
        assert!(c.keyspaces[0].warm, "warm defaults on with CDC");
        assert_eq!(c.cdc.heartbeat, None);
        assert_eq!(c.cdc.slot_name(&c.server.node_id), "cachesync_pod_7");
        let p = problems(
            "[postgres]\nurl = \"postgres://x@127.0.0.1/db\"\n[cdc]\nslot = \"Bad-Slot\"\n[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\ncdc = \"sometimes\"\n[[keyspace]]\nname = \"m\"\ncdc = \"update\"\n",
        );
        assert!(p.iter().any(|p| p.message.contains("unknown CDC mode")), "{p:#?}");
        assert!(p.iter().any(|p| p.message.contains("slot name")), "{p:#?}");
        assert!(p.iter().any(|p| p.message.contains("CDC needs `table`")), "{p:#?}");
    }

    #[test]
    fn refresh_ahead_settings() {
        let pg = "[postgres]\nurl = \"postgres://x@127.0.0.1/db\"\n";
        let c = Config::parse(&format!(
            "{pg}[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\nrefresh_ahead = 0.75\nrefresh_concurrency = 2\n[[keyspace]]\nname = \"v\"\ntable = \"users\"\nkey = \"id\"\nrefresh_ahead = 0\n"
        ))
        .unwrap();
        assert_eq!(c.keyspaces[0].refresh_ahead, 0.75);
        assert_eq!(c.keyspaces[0].refresh_concurrency, 2);
        assert_eq!(c.keyspaces[1].refresh_ahead, 0.0, "an integer 0 reads as off");
        assert_eq!(c.keyspaces[1].refresh_concurrency, DEFAULT_REFRESH_CONCURRENCY);
        let p = problems(&format!(
            "{pg}[[keyspace]]\nname = \"a\"\ntable = \"t\"\nkey = \"id\"\nrefresh_ahead = 1.0\nrefresh_concurrency = 0\n\
             [[keyspace]]\nname = \"b\"\ntable = \"t\"\nkey = \"id\"\nread_through = false\nrefresh_ahead = 0.5\n\
             [[keyspace]]\nname = \"m\"\nrefresh_ahead = -0.5\n"
        ));
        assert!(
            p.iter()
                .any(|p| p.path.ends_with("refresh_ahead") && p.message.contains("below 1")),
            "{p:#?}"
        );
        assert!(p.iter().any(|p| p.path.ends_with("refresh_concurrency")), "{p:#?}");
        assert!(
            p.iter()
                .any(|p| p.path == "keyspace[b].refresh_ahead" && p.message.contains("read_through")),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|p| p.path == "keyspace[m].refresh_ahead" && p.message.contains("at least 0")),
            "{p:#?}"
        );
    }

    #[test]
    fn cdc_needs_the_log() {
        let p = problems(
            "[postgres]\nurl = \"postgres://x@127.0.0.1/db\"\n[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\ncdc = \"update\"\n",
        );
        assert!(p.iter().any(|p| p.message.contains("need the commit log")), "{p:#?}");
    }

    #[test]
    fn table_names() {
        assert_eq!(
            TableRef::parse("\"My Schema\".\"T\"\"x\"").unwrap(),
            TableRef {
                schema: "My Schema".into(),
                name: "T\"x".into()
            }
        );
        assert!(TableRef::parse("a.b.c").is_err());
        assert!(TableRef::parse("a.").is_err());
    }
}
