//! `[cdc]`: how changes are captured from Postgres — publication, slot, heartbeats and the
//! readiness grace.

use std::time::Duration;

use serde::Serialize;

use crate::section::{Section, humantime_serde_shim};

/// Default name of the publication cachesync creates and follows.
pub const DEFAULT_PUBLICATION: &str = "cachesync";

/// Default interval of heartbeat messages that keep an idle database's slot moving.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

/// How far behind the database a CDC keyspace's reads may be (the freshness contract).
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(1);

/// How often each CDC table's columns are compared with the catalog, so a schema change is seen
/// even before the table's next change arrives.
pub const DEFAULT_SCHEMA_CHECK: Duration = Duration::from_secs(1);

/// How long the stream may be down before CDC keyspaces stop reporting ready.
pub const DEFAULT_READY_GRACE: Duration = Duration::from_secs(5);

/// Where a node's CDC keyspaces get their changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CdcSource {
    /// A replication slot of this node's own (a single sidecar, or the hub).
    Postgres,
    /// The log of this node's `[[upstream]]` (an edge): no slot, no WAL decoding here.
    Upstream,
}

/// `[cdc]`: how changes are captured.
#[derive(Debug, Clone, Serialize)]
pub struct CdcConfig {
    /// Where the changes come from.
    pub source: CdcSource,
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
    /// The freshness contract: a read reflects every change committed in Postgres at least this
    /// long ago, or is reloaded (read-through keyspaces) or reported (`X-Cache-Lag-Ms`).
    #[serde(with = "humantime_serde_shim")]
    pub max_staleness: Duration,
    /// Interval of the catalog check of each CDC table; none disables it (schema changes are
    /// then seen with the table's next change).
    #[serde(with = "humantime_serde_shim::option")]
    pub schema_check: Option<Duration>,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            source: CdcSource::Postgres,
            slot: None,
            publication: DEFAULT_PUBLICATION.into(),
            create_publication: true,
            heartbeat: Some(DEFAULT_HEARTBEAT),
            ready_grace: DEFAULT_READY_GRACE,
            max_staleness: DEFAULT_MAX_STALENESS,
            schema_check: Some(DEFAULT_SCHEMA_CHECK),
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

pub(crate) fn read_cdc(mut s: Section<'_, '_>) -> CdcConfig {
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
    let heartbeat = s.duration_or_off("heartbeat", d.heartbeat);
    let max_staleness = s.duration("max_staleness").unwrap_or(d.max_staleness);
    if max_staleness < std::time::Duration::from_millis(20) {
        s.problem_at(
            "max_staleness",
            "must be at least 20ms (the bound is kept by probing Postgres a quarter of it apart)",
        );
    }
    let schema_check = s.duration_or_off("schema_check", d.schema_check);
    let source = match s.get::<String>("source").as_deref() {
        None | Some("postgres") => CdcSource::Postgres,
        Some("upstream") => CdcSource::Upstream,
        Some(other) => {
            s.problem_at(
                "source",
                format!("{other:?} is not a change source; use \"postgres\" (a slot of this node's own) or \"upstream\" (follow [[upstream]])"),
            );
            CdcSource::Postgres
        }
    };
    let c = CdcConfig {
        source,
        slot,
        publication,
        create_publication: s.get("create_publication").unwrap_or(d.create_publication),
        heartbeat,
        ready_grace: s.duration("ready_grace").unwrap_or(d.ready_grace),
        max_staleness,
        schema_check,
    };
    s.finish();
    c
}
