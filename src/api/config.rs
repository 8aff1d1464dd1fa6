//! `[server]`: the local HTTP API's address and limits, the shutdown grace period and the node's
//! id — the `[server]` section is the HTTP API's, so it lives here; `server` reads the rest.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::section::{Section, humantime_serde_shim};

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

pub(crate) fn read_server(mut s: Section<'_, '_>) -> ServerConfig {
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
