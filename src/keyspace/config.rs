//! `[[keyspace]]`: one named cache — its table and key, how a row becomes an entry, its limits
//! and its patterns. Read here, used by `keyspace` and the patterns.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::cache::{Capacity, StoreKind};
use crate::section::{Section, humantime_serde_shim};

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
    /// Which structure holds the entries: a bounded cache, or the compact store for keyspaces
    /// that hold everything they are given (the default for in-memory and warm keyspaces).
    pub store: StoreKind,
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
    /// Event federation: this keyspace's changes travel to and from the `[[peer]]` nodes.
    pub federate: bool,
    /// For a federated keyspace whose data lives in one region's Postgres: the node id of that
    /// region's node (the one with the table and CDC). Elsewhere the keyspace is a read-only
    /// view of it — or, with `write = "behind"`, takes writes that land in the home's Postgres.
    pub home: Option<String>,
    /// The shared L2 tier (`[redis]`): misses look there before Postgres, loads and changes
    /// are written there, and changes are announced to the other nodes.
    pub l2: bool,
    /// How long a document stays in L2.
    #[serde(with = "humantime_serde_shim")]
    pub l2_ttl: Duration,
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
            store: StoreKind::Compact,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            read_through: false,
            write: WriteMode::None,
            cdc: CdcMode::Off,
            warm: false,
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
            refresh_concurrency: DEFAULT_REFRESH_CONCURRENCY,
            federate: false,
            home: None,
            l2: false,
            l2_ttl: crate::l2::config::DEFAULT_L2_TTL,
        }
    }
}

/// `key = "id"` or `key = ["tenant_id", "id"]`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum KeySpec {
    One(String),
    Many(Vec<String>),
}

pub(crate) fn read_keyspace(mut s: Section<'_, '_>) -> Option<KeyspaceConfig> {
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
    let store = match s.get::<String>("store").as_deref() {
        None => None,
        Some("cache") => Some(StoreKind::Cache),
        Some("compact") => Some(StoreKind::Compact),
        Some(other) => {
            s.problem_at(
                "store",
                format!("unknown store {other:?}; expected \"cache\" (bounded, frequency-aware) or \"compact\" (one allocation per entry, for keyspaces that hold everything)"),
            );
            None
        }
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
    let federate = s.get::<bool>("federate").unwrap_or(false);
    let home = s.get::<String>("home");
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
        let lands_at_home = write == WriteMode::Behind && federate && home.is_some();
        if write != WriteMode::None && !lands_at_home {
            s.problem_at(
                "write",
                "writing to a source needs `table`; an in-memory keyspace stores writes in memory only (or, federated with a `home`, write = \"behind\" lands writes in the home's Postgres)",
            );
        }
    }
    let l2 = s.get::<bool>("l2").unwrap_or(false);
    let l2_ttl = s.duration("l2_ttl").unwrap_or(crate::l2::config::DEFAULT_L2_TTL);
    if l2 && !has_table {
        s.problem_at(
            "l2",
            "the Redis tier shares what a table's loads and changes produce: it needs `table` (an in-memory keyspace's data lives in each node; federate it instead)",
        );
    }
    if l2_ttl < Duration::from_secs(1) {
        s.problem_at("l2_ttl", "must be at least 1s");
    }
    if home.is_some() && !federate {
        s.problem_at(
            "home",
            "`home` names where a federated keyspace's data lives; set federate = true",
        );
    }
    if let Some(h) = &home
        && (h.is_empty() || h.len() >= 0x80)
    {
        s.problem_at("home", "must be a node id (1 to 127 bytes)");
    }
    if refresh_ahead > 0.0 && (!has_table || read_through == Some(false)) {
        s.problem_at(
            "refresh_ahead",
            "refresh-ahead reloads entries from the table: it needs `table` and read_through",
        );
    }
    let warm = warm.unwrap_or(cdc != CdcMode::Off);
    // A keyspace that holds everything it is given — in-memory data, or a whole table kept by
    // CDC — is compact by default; so is a write-behind one, which installs every row it
    // flushes: recency eviction keeps what was just written (a frequency-aware cache would
    // turn a new key's row away when full), at a fifth of the bytes per entry. One that
    // caches the read part of a table is a cache.
    let store = store.unwrap_or(if !has_table || warm || write == WriteMode::Behind {
        StoreKind::Compact
    } else {
        StoreKind::Cache
    });
    s.finish();
    Some(KeyspaceConfig {
        name: name?,
        table,
        key,
        columns,
        ttl,
        capacity,
        store,
        negative_ttl,
        read_through: read_through.unwrap_or(has_table),
        write,
        cdc,
        warm,
        refresh_ahead,
        refresh_concurrency,
        federate,
        home,
        l2,
        l2_ttl,
    })
}
