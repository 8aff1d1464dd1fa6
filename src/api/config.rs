//! `[server]`: the local HTTP API's address and limits, the shutdown grace period and the node's
//! id — the `[server]` section is the HTTP API's, so it lives here; `server` reads the rest.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::section::{Section, humantime_serde_shim};
use crate::source::postgres::config::Secret;

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

/// Time a request's headers may take once its first byte arrived (slowloris bound).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a keep-alive connection may sit with no request before it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Open connections beyond which new ones are refused with 503.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// `Host` names a loopback listener answers (with any port): a browser page on another origin
/// that reaches the API through DNS rebinding carries its own name and is refused.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// `[server]`: the local HTTP API.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address to listen on. Loopback by default: the API is meant for the service in the same
    /// pod or host. Any other address needs `token_file`. Env: `CACHESYNC_LISTEN`.
    pub listen: SocketAddr,
    /// A file holding the API's bearer token: with it, every route but `/healthz` and `/readyz`
    /// needs `Authorization: Bearer <token>`. Required when `listen` is not loopback.
    pub token_file: Option<std::path::PathBuf>,
    /// The token read from `token_file` (never printed).
    #[serde(skip)]
    pub token: Option<Secret>,
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
    /// Once a request's first byte has arrived, its headers must be complete within this, or the
    /// client gets 408 and the connection is closed.
    #[serde(with = "humantime_serde_shim")]
    pub header_read_timeout: Duration,
    /// A connection with no request for this long is closed.
    #[serde(with = "humantime_serde_shim")]
    pub idle_timeout: Duration,
    /// Most connections open at once; more are answered 503 `too_many_connections`.
    pub max_connections: usize,
    /// `Host` header names (without port) requests may carry; others get 421 `misdirected_host`.
    /// Default: the loopback names when `listen` is a loopback address, plus its IP; `["*"]`
    /// (any) otherwise. `"*"` turns the check off.
    pub allowed_hosts: Vec<String>,
}

impl ServerConfig {
    /// Whether a request's `Host` (name and optional port) is one this listener answers.
    pub fn host_allowed(&self, host: &str) -> bool {
        // The name without its port, compared in place (this runs on every request).
        let (name, bracketed) = match host.strip_prefix('[') {
            // [v6]:port
            Some(rest) => (rest.find(']').map_or(rest, |end| &rest[..end]), true),
            None => (
                host.bytes()
                    .rposition(|b| b == b':')
                    .map_or(host, |colon| &host[..colon]),
                false,
            ),
        };
        self.allowed_hosts.iter().any(|a| {
            a == "*"
                || if bracketed {
                    a.strip_prefix('[')
                        .and_then(|a| a.strip_suffix(']'))
                        .is_some_and(|a| a.eq_ignore_ascii_case(name))
                } else {
                    a.eq_ignore_ascii_case(name)
                }
        })
    }
}

/// The default allow-list for `listen` (see [`ServerConfig::allowed_hosts`]).
pub fn default_allowed_hosts(listen: SocketAddr) -> Vec<String> {
    if !listen.ip().is_loopback() {
        return vec!["*".into()];
    }
    let mut hosts: Vec<String> = LOOPBACK_HOSTS.iter().map(|h| h.to_string()).collect();
    let ip = match listen.ip() {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    if !hosts.contains(&ip) {
        hosts.push(ip);
    }
    hosts
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("DEFAULT_LISTEN is a valid address"),
            token_file: None,
            token: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_mget_keys: DEFAULT_MAX_MGET_KEYS,
            node_id: default_node_id(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            allowed_hosts: default_allowed_hosts(DEFAULT_LISTEN.parse().expect("DEFAULT_LISTEN is a valid address")),
        }
    }
}

/// The problem with an API listener on `listen` without a credential, if any.
pub fn needs_credential(listen: SocketAddr, token: Option<&Secret>) -> Option<String> {
    crate::credential::needs_credential(listen, token, "listener", "[server] token_file")
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
    let token_file: Option<std::path::PathBuf> = s.get::<String>("token_file").map(Into::into);
    let token = match &token_file {
        None => None,
        Some(path) => match crate::credential::read_token(path) {
            Ok(t) => Some(t),
            Err(why) => {
                s.problem_at("token_file", why);
                None
            }
        },
    };
    let config = ServerConfig {
        listen,
        token_file,
        token,
        shutdown_grace: s.duration("shutdown_grace").unwrap_or(d.shutdown_grace),
        max_key_bytes: s.get("max_key_bytes").unwrap_or(d.max_key_bytes),
        max_body_bytes: s.byte_size("max_body_bytes").unwrap_or(d.max_body_bytes),
        max_mget_keys: s.get("max_mget_keys").unwrap_or(d.max_mget_keys),
        node_id: s.get("node_id").unwrap_or(d.node_id),
        header_read_timeout: s.duration("header_read_timeout").unwrap_or(d.header_read_timeout),
        idle_timeout: s.duration("idle_timeout").unwrap_or(d.idle_timeout),
        max_connections: s.get("max_connections").unwrap_or(d.max_connections),
        allowed_hosts: s.get("allowed_hosts").unwrap_or_else(|| default_allowed_hosts(listen)),
    };
    for (name, d) in [
        ("header_read_timeout", config.header_read_timeout),
        ("idle_timeout", config.idle_timeout),
    ] {
        if d.is_zero() {
            s.problem_at(name, "must be longer than zero");
        }
    }
    if config.max_connections == 0 {
        s.problem_at("max_connections", "must be at least 1");
    }
    if config.allowed_hosts.is_empty() {
        s.problem_at("allowed_hosts", "name at least one host, or \"*\" for any");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_allowed_by_its_name_without_the_port() {
        let c = ServerConfig {
            allowed_hosts: default_allowed_hosts("127.0.0.1:7070".parse().expect("addr")),
            ..ServerConfig::default()
        };
        for ok in ["localhost", "LOCALHOST:7070", "127.0.0.1:7070", "[::1]", "[::1]:7070"] {
            assert!(c.host_allowed(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:7070",
            "::1",
            "[::2]:7070",
            "[localhost]",
            "127.0.0.1.evil",
        ] {
            assert!(!c.host_allowed(refused), "{refused}");
        }
        let any = ServerConfig {
            allowed_hosts: vec!["*".into()],
            ..ServerConfig::default()
        };
        assert!(any.host_allowed("anything:1"));
    }
}
