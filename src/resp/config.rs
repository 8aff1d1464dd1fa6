//! `[resp]`: the Redis-protocol front — where it listens, its password, which keyspace takes
//! keys that name none, and the connection and request bounds (Redis's own names in
//! parentheses). The password is a [`Secret`]: never logged or printed.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::section::{Section, humantime_serde_shim};
use crate::source::postgres::config::Secret;

/// Where the RESP front listens when nothing else is configured: loopback, one port above
/// Redis's.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6380";
/// Keys whose prefix names no keyspace go to this keyspace (the embedded default's).
pub const DEFAULT_KEYSPACE: &str = crate::keyspace::config::DEFAULT_KEYSPACE;
/// Most connections open at once (`maxclients`).
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Longest inline command line (Redis: 64 KiB, `PROTO_INLINE_MAX_SIZE`).
pub const DEFAULT_MAX_INLINE_BYTES: usize = 64 * 1024;
/// Largest bulk string in a request (`proto-max-bulk-len`; Redis: 512 MiB, smaller here since
/// every value is held in memory).
pub const DEFAULT_MAX_BULK_BYTES: u64 = 64 * 1024 * 1024;
/// Most arguments in one command (Redis's bound before authentication: 1 Mi).
pub const DEFAULT_MAX_MULTIBULK_LEN: u64 = 1024 * 1024;
/// Most bytes of requests a connection may have buffered and not yet executed
/// (`client-query-buffer-limit`; Redis: 1 GiB).
pub const DEFAULT_MAX_QUERY_BYTES: u64 = 256 * 1024 * 1024;
/// Most keys remembered for default-mode client tracking (`tracking-table-max-keys`); past
/// it, the oldest keys are invalidated for their clients and forgotten.
pub const DEFAULT_TRACKING_MAX_KEYS: usize = 1_000_000;

/// `[resp]`: the Redis-protocol listener.
#[derive(Debug, Clone, Serialize)]
pub struct RespConfig {
    /// Address to listen on. Loopback by default; any other address needs `password_file`.
    /// Env: `CACHESYNC_RESP_LISTEN`.
    pub listen: SocketAddr,
    /// A file holding the password clients give with `AUTH <password>` (or `AUTH default
    /// <password>`, or `HELLO 3 AUTH default <password>`): at least 16 characters. Required
    /// when `listen` is not loopback.
    pub password_file: Option<std::path::PathBuf>,
    /// The password read from `password_file` (never printed).
    #[serde(skip)]
    pub password: Option<Secret>,
    /// The keyspace that takes a key whose part before the first `:` names no keyspace (the
    /// whole key). Default: `default` when such a keyspace exists; else such keys are refused.
    pub default_keyspace: Option<String>,
    /// Most connections open at once; more are answered `-ERR max number of clients reached`.
    pub max_clients: usize,
    /// A connection with no command for this long is closed; `"0s"` (the default, as Redis's
    /// `timeout 0`) never closes an idle client.
    #[serde(with = "humantime_serde_shim::option")]
    pub idle_timeout: Option<Duration>,
    /// Longest inline command (a line that does not start with `*`).
    pub max_inline_bytes: usize,
    /// Largest bulk string in a request.
    pub max_bulk_bytes: u64,
    /// Most arguments in one command.
    pub max_multibulk_len: u64,
    /// Most request bytes one connection may have buffered.
    pub max_query_bytes: u64,
    /// Most keys tracked for default-mode `CLIENT TRACKING`.
    pub tracking_max_keys: usize,
}

impl Default for RespConfig {
    fn default() -> Self {
        RespConfig {
            listen: DEFAULT_LISTEN.parse().expect("DEFAULT_LISTEN is a valid address"),
            password_file: None,
            password: None,
            default_keyspace: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            idle_timeout: None,
            max_inline_bytes: DEFAULT_MAX_INLINE_BYTES,
            max_bulk_bytes: DEFAULT_MAX_BULK_BYTES,
            max_multibulk_len: DEFAULT_MAX_MULTIBULK_LEN,
            max_query_bytes: DEFAULT_MAX_QUERY_BYTES,
            tracking_max_keys: DEFAULT_TRACKING_MAX_KEYS,
        }
    }
}

/// The problem with a RESP listener on `listen` without a password, if any.
pub fn needs_credential(listen: SocketAddr, password: Option<&Secret>) -> Option<String> {
    crate::credential::needs_credential(listen, password, "RESP listener", "[resp] password_file")
        .map(|m| m.replace("Authorization: Bearer <token>", "AUTH <password>"))
}

pub(crate) fn read_resp(mut s: Section<'_, '_>) -> RespConfig {
    let d = RespConfig::default();
    let listen = match s.get::<String>("listen") {
        Some(text) => text.parse().unwrap_or_else(|e| {
            s.problem_at(
                "listen",
                format!("invalid address {text:?} ({e}); write it like \"127.0.0.1:6380\""),
            );
            d.listen
        }),
        None => d.listen,
    };
    let password_file: Option<std::path::PathBuf> = s.get::<String>("password_file").map(Into::into);
    let password = password_file
        .as_ref()
        .and_then(|path| match crate::credential::read_token(path) {
            Ok(t) => Some(t),
            Err(why) => {
                s.problem_at("password_file", why);
                None
            }
        });
    let c = RespConfig {
        listen,
        password_file,
        password,
        default_keyspace: s.get("default_keyspace"),
        max_clients: s.get("max_clients").unwrap_or(d.max_clients),
        idle_timeout: s.duration_or_off("idle_timeout", None),
        max_inline_bytes: s
            .byte_size("max_inline_bytes")
            .map_or(d.max_inline_bytes, |n| n as usize),
        max_bulk_bytes: s.byte_size("max_bulk_bytes").unwrap_or(d.max_bulk_bytes),
        max_multibulk_len: s.get("max_multibulk_len").unwrap_or(d.max_multibulk_len),
        max_query_bytes: s.byte_size("max_query_bytes").unwrap_or(d.max_query_bytes),
        tracking_max_keys: s.get("tracking_max_keys").unwrap_or(d.tracking_max_keys),
    };
    for (name, zero) in [
        ("max_clients", c.max_clients == 0),
        ("max_inline_bytes", c.max_inline_bytes == 0),
        ("max_bulk_bytes", c.max_bulk_bytes == 0),
        ("max_multibulk_len", c.max_multibulk_len == 0),
        ("tracking_max_keys", c.tracking_max_keys == 0),
    ] {
        if zero {
            s.problem_at(name, "must be at least 1");
        }
    }
    if c.max_query_bytes < c.max_bulk_bytes {
        s.problem_at(
            "max_query_bytes",
            "must be at least max_bulk_bytes (a request holding one largest value must fit)",
        );
    }
    s.finish();
    c
}
