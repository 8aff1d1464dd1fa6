//! `[replication]` (this node serves its commit log to followers) and `[[upstream]]` (this node
//! follows another node's log), with their defaults and the readers of their sections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use super::tls::TlsFiles;
use crate::credential::read_token;
use crate::section::{Section, humantime_serde_shim};
use crate::source::postgres::config::Secret;

/// Where a log server listens when `[replication]` names no address.
pub const DEFAULT_REPLICATION_LISTEN: &str = "127.0.0.1:7071";
/// How often an idle stream tells its follower where the log and its freshness stand.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a connected follower may go without reporting its position before the server
/// closes its stream (and its hold on retention ends).
pub const DEFAULT_FOLLOWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most followers served at once.
pub const DEFAULT_MAX_FOLLOWERS: usize = 256;
/// How long a follower waits for any frame before it calls the link dead (a blackhole).
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(3);
/// Name of an `[[upstream]]` that names none.
pub const DEFAULT_UPSTREAM_NAME: &str = "upstream";

/// `[replication]`: this node's log server.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationConfig {
    /// Where followers connect (a port of its own). Loopback unless `token_file` is set.
    pub listen: SocketAddr,
    /// A file holding the token followers must present (`Authorization: Bearer`).
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` (never printed).
    #[serde(skip)]
    pub token: Option<Secret>,
    /// Interval of progress frames on an idle stream (the followers' freshness and liveness).
    #[serde(with = "humantime_serde_shim")]
    pub heartbeat: Duration,
    /// A follower silent this long (no position report) is disconnected and stops holding
    /// retention.
    #[serde(with = "humantime_serde_shim")]
    pub follower_timeout: Duration,
    /// Most followers connected at once.
    pub max_followers: usize,
    /// TLS: the server's certificate chain and private key (PEM files); none serves plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// `[[upstream]]`: a log this node follows.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamConfig {
    /// A name for logs, metrics and the cursor file (letters, digits, `_`, `-`).
    pub name: String,
    /// The upstream's log server, `http://host:port`.
    pub url: String,
    pub token_file: Option<PathBuf>,
    #[serde(skip)]
    pub token: Option<Secret>,
    /// For an `https://` url: a PEM file of the certificate(s) to trust (the hub's own, or the CA
    /// that signed it) besides the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// No frame for this long (the server sends one every heartbeat) and the link is dead.
    #[serde(with = "humantime_serde_shim")]
    pub link_timeout: Duration,
}

fn token_of(s: &Section<'_, '_>, file: &Option<PathBuf>) -> Option<Secret> {
    match file {
        None => None,
        Some(path) => match read_token(path) {
            Ok(t) => Some(t),
            Err(why) => {
                s.problem_at("token_file", why);
                None
            }
        },
    }
}

pub(crate) fn read_replication(mut s: Section<'_, '_>) -> ReplicationConfig {
    let listen = s
        .get::<String>("listen")
        .unwrap_or_else(|| DEFAULT_REPLICATION_LISTEN.into());
    let listen = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            s.problem_at(
                "listen",
                format!("invalid address {listen:?} ({e}); write it like \"127.0.0.1:7071\""),
            );
            DEFAULT_REPLICATION_LISTEN.parse().expect("valid default")
        }
    };
    let token_file: Option<PathBuf> = s.get::<String>("token_file").map(Into::into);
    let token = token_of(&s, &token_file);
    let c = ReplicationConfig {
        listen,
        token_file,
        token,
        heartbeat: s.duration("heartbeat").unwrap_or(DEFAULT_HEARTBEAT),
        follower_timeout: s.duration("follower_timeout").unwrap_or(DEFAULT_FOLLOWER_TIMEOUT),
        max_followers: s.get("max_followers").unwrap_or(DEFAULT_MAX_FOLLOWERS),
        tls: None,
    };
    let cert_file: Option<PathBuf> = s.get::<String>("tls_cert_file").map(Into::into);
    let key_file: Option<PathBuf> = s.get::<String>("tls_key_file").map(Into::into);
    let c = match (cert_file, key_file) {
        (None, None) => c,
        (Some(cert_file), Some(key_file)) => {
            let files = TlsFiles { cert_file, key_file };
            if let Err(why) = super::tls::tls_acceptor(&files) {
                s.problem_at("tls_cert_file", why);
            }
            ReplicationConfig { tls: Some(files), ..c }
        }
        _ => {
            s.problem_at("tls_cert_file", "TLS needs both tls_cert_file and tls_key_file");
            c
        }
    };
    if c.heartbeat < Duration::from_millis(10) {
        s.problem_at("heartbeat", "must be at least 10ms");
    }
    if c.follower_timeout <= c.heartbeat {
        s.problem_at("follower_timeout", "must be longer than heartbeat");
    }
    if c.max_followers == 0 {
        s.problem_at("max_followers", "must be at least 1");
    }
    if let Some(why) = needs_credential(c.listen, c.token.as_ref()) {
        s.problem_at("listen", why);
    }
    s.finish();
    c
}

/// Why a log server on `listen` with this token may not start (`None`: it may).
pub fn needs_credential(listen: SocketAddr, token: Option<&Secret>) -> Option<String> {
    crate::credential::needs_credential(listen, token, "log server", "[replication] token_file")
}

pub(crate) fn read_upstream(mut s: Section<'_, '_>) -> Option<UpstreamConfig> {
    let name: String = s.get("name").unwrap_or_else(|| DEFAULT_UPSTREAM_NAME.into());
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        s.problem_at("name", "use letters, digits, `_` and `-`");
    }
    let Some(url) = s.get::<String>("url") else {
        s.problem_at("url", "missing: the upstream's log server, like \"http://hub:7071\"");
        s.finish();
        return None;
    };
    let url = url.trim_end_matches('/').to_string();
    let scheme_len = ["http://", "https://"]
        .iter()
        .find(|p| url.starts_with(*p))
        .map(|p| p.len());
    if scheme_len.is_none_or(|n| url.len() <= n) {
        s.problem_at(
            "url",
            format!("{url:?} is not an http:// or https:// address like \"http://hub:7071\""),
        );
    }
    let ca_file: Option<PathBuf> = s.get::<String>("ca_file").map(Into::into);
    if let Some(path) = &ca_file
        && let Err(why) = super::tls::trust(path)
    {
        s.problem_at("ca_file", why);
    }
    let token_file: Option<PathBuf> = s.get::<String>("token_file").map(Into::into);
    let token = token_of(&s, &token_file);
    let link_timeout = s.duration("link_timeout").unwrap_or(DEFAULT_LINK_TIMEOUT);
    if link_timeout < Duration::from_millis(50) {
        s.problem_at("link_timeout", "must be at least 50ms");
    }
    s.finish();
    Some(UpstreamConfig {
        name,
        url,
        token_file,
        token,
        ca_file,
        link_timeout,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems.iter().map(|p| p.to_string()).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_reachable_log_server_needs_a_token() {
        let text = "[replication]\nlisten = \"0.0.0.0:7071\"\n[[keyspace]]\nname = \"a\"\n";
        let p = problems(text);
        assert!(
            p.iter()
                .any(|p| p.contains("not a loopback address") && p.contains("token_file")),
            "{p:?}"
        );
        let ok = "[replication]\n[log]\ndir = \"/tmp/x\"\n[[keyspace]]\nname = \"a\"\n";
        assert!(problems(ok).is_empty(), "{:?}", problems(ok));
        let p = problems("[replication]\n[[keyspace]]\nname = \"a\"\n");
        assert!(
            p.iter().any(|p| p.contains("[replication] serves the commit log")),
            "{p:?}"
        );
    }

    #[test]
    fn an_upstream_needs_an_http_url() {
        let p = problems("[[upstream]]\nurl = \"hub:7071\"\n[[keyspace]]\nname = \"a\"\n");
        assert!(
            p.iter().any(|p| p.contains("is not an http:// or https:// address")),
            "{p:?}"
        );
        let p = problems("[[upstream]]\nname = \"hub\"\n[[keyspace]]\nname = \"a\"\n");
        assert!(p.iter().any(|p| p.contains("url") && p.contains("missing")), "{p:?}");
    }
}
