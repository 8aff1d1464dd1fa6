//! The configuration: one TOML file plus `CACHESYNC_*` environment overrides, read into plain
//! data structs whose defaults are named constants.
//!
//! Reading goes through [`Section`], which records every problem (unknown field with its
//! line, bad duration, missing key column, ...) so `cachesync check` reports them all at once. With
//! no file at all, [`Config::embedded_default`] gives a pure in-memory cache with one keyspace
//! named `default`, so the sidecar runs with no servers. Connection strings are kept out of
//! `Debug`/`Serialize` output (see [`Secret`]).

use std::path::Path;

use serde::Serialize;
use toml::de::DeTable;

pub use crate::section::Problem;
use crate::section::{Ctx, Section};

use crate::api::config::{ServerConfig, default_allowed_hosts, read_server};
use crate::cdc::config::CdcSource;
use crate::cdc::config::{CdcConfig, read_cdc};
use crate::commitlog::config::read_log;
use crate::federation::config::{FederationConfig, read_federation, read_peer};
use crate::keyspace::config::{CdcMode, DEFAULT_KEYSPACE, KeyspaceConfig, WriteMode, read_keyspace};
use crate::l2::config::{RedisConfig, read_redis};
use crate::patterns::write_behind::config::{WriteBehindConfig, read_write_behind};
use crate::replication::config::{ReplicationConfig, UpstreamConfig, read_replication, read_upstream};
use crate::resp::config::{RespConfig, read_resp};
use crate::source::postgres::config::{
    DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT, PostgresConfig,
    Secret, read_postgres,
};

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
    /// This node's log server, for followers; absent when off.
    pub replication: Option<ReplicationConfig>,
    /// Logs this node follows.
    pub upstreams: Vec<UpstreamConfig>,
    /// Event federation settings (used when a keyspace has `federate = true`).
    pub federation: FederationConfig,
    /// Nodes whose logs this node follows by version vector (federation).
    pub peers: Vec<UpstreamConfig>,
    /// The shared L2 tier on Redis, for keyspaces with `l2 = true`.
    pub redis: Option<RedisConfig>,
    /// The Redis-protocol front; on by default (on loopback) only in the embedded default.
    pub resp: Option<RespConfig>,
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

/// Turns the RESP front on at this address (or moves it).
pub const ENV_RESP_LISTEN: &str = "CACHESYNC_RESP_LISTEN";

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
            replication: None,
            upstreams: Vec::new(),
            federation: FederationConfig::default(),
            peers: Vec::new(),
            redis: None,
            resp: Some(RespConfig::default()),
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
    let replication = root.table("replication").map(read_replication);
    let upstreams = root.tables("upstream").into_iter().filter_map(read_upstream).collect();
    let federation = root.table("federation").map(read_federation).unwrap_or_default();
    let peers = root.tables("peer").into_iter().filter_map(read_peer).collect();
    let redis = root.table("redis").and_then(read_redis);
    let resp = root.table("resp").map(read_resp);
    root.finish();
    Config {
        server,
        postgres: postgres.flatten(),
        keyspaces,
        log,
        cdc,
        write_behind,
        replication,
        upstreams,
        federation,
        peers,
        redis,
        resp,
    }
}

fn apply_env(config: &mut Config, env: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<Problem>) {
    if let Some(listen) = env(ENV_LISTEN) {
        match listen.parse() {
            Ok(a) => {
                // An allow-list left at its default follows the address.
                if config.server.allowed_hosts == default_allowed_hosts(config.server.listen) {
                    config.server.allowed_hosts = default_allowed_hosts(a);
                }
                config.server.listen = a;
            }
            Err(e) => problems.push(Problem {
                line: None,
                path: ENV_LISTEN.into(),
                message: format!("invalid address {listen:?} ({e})"),
            }),
        }
    }
    if let Some(listen) = env(ENV_RESP_LISTEN) {
        match listen.parse() {
            Ok(a) => config.resp.get_or_insert_with(RespConfig::default).listen = a,
            Err(e) => problems.push(Problem {
                line: None,
                path: ENV_RESP_LISTEN.into(),
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
    // After the environment: CACHESYNC_LISTEN can move the listener off loopback.
    if let Some(message) = crate::api::config::needs_credential(config.server.listen, config.server.token.as_ref()) {
        problems.push(Problem {
            line: None,
            path: "server.listen".into(),
            message,
        });
    }
    if let Some(r) = &config.resp {
        if let Some(message) = crate::resp::config::needs_credential(r.listen, r.password.as_ref()) {
            problems.push(Problem {
                line: None,
                path: "resp.listen".into(),
                message,
            });
        }
        if let Some(d) = &r.default_keyspace
            && config.keyspace(d).is_none()
        {
            problems.push(Problem {
                line: None,
                path: "resp.default_keyspace".into(),
                message: format!("names no keyspace: `{d}` is not among the [[keyspace]] sections"),
            });
        }
    }
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
    if config.postgres.as_ref().is_some_and(|pg| pg.url.expose().is_empty()) {
        problems.push(Problem {
            line: None,
            path: "postgres.url".into(),
            message: format!("missing: set `url` in [postgres] or the {ENV_POSTGRES_URL} environment variable"),
        });
    } else if let Some(pg) = &config.postgres
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
    if config.replication.is_some() && config.log.is_none() {
        problems.push(Problem {
            line: None,
            path: "log".into(),
            message: "[replication] serves the commit log: add a [log] section with `dir`".into(),
        });
    }
    let mut upstream_names = std::collections::HashSet::new();
    for u in &config.upstreams {
        if !upstream_names.insert(u.name.as_str()) {
            problems.push(Problem {
                line: None,
                path: format!("upstream[{}]", u.name),
                message: format!(
                    "upstream name `{}` is used twice; give each [[upstream]] its own `name`",
                    u.name
                ),
            });
        }
    }
    match (config.cdc.source, config.upstreams.len()) {
        (CdcSource::Upstream, 0) => problems.push(Problem {
            line: None,
            path: "cdc.source".into(),
            message: "source = \"upstream\" needs an [[upstream]] whose log to follow".into(),
        }),
        (CdcSource::Upstream, 1) if !config.keyspaces.iter().any(|k| k.cdc != CdcMode::Off) => problems.push(Problem {
            line: None,
            path: "cdc.source".into(),
            message: "source = \"upstream\" feeds CDC keyspaces, and no keyspace has `cdc` on".into(),
        }),
        (CdcSource::Upstream, 1) | (CdcSource::Postgres, 0) => {}
        (CdcSource::Upstream, _) => problems.push(Problem {
            line: None,
            path: "upstream".into(),
            message: "an edge follows one [[upstream]]; several (federation) are not supported by this build".into(),
        }),
        (CdcSource::Postgres, _) => problems.push(Problem {
            line: None,
            path: "upstream".into(),
            message:
                "[[upstream]] feeds the CDC keyspaces: set [cdc] source = \"upstream\" (this node then holds no slot)"
                    .into(),
        }),
    }
    problems.extend(validate_federation(config));
    problems.extend(validate_l2(config));
    if config.keyspaces.is_empty() {
        problems.push(Problem {
            line: None,
            path: "keyspace".into(),
            message: "no [[keyspace]] is configured; add at least one".into(),
        });
    }
    problems
}

/// The Redis tier's cross-section rules.
fn validate_l2(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    for k in config.keyspaces.iter().filter(|k| k.l2) {
        if config.redis.is_none() {
            problems.push(Problem {
                line: None,
                path: format!("keyspace[{}].l2", k.name),
                message: format!(
                    "keyspace `{}` uses the Redis tier: add a [redis] section with `url` (or `cluster`)",
                    k.name
                ),
            });
        }
    }
    if let (Some(r), Some(pg)) = (&config.redis, &config.postgres)
        && r.tombstone_ttl <= pg.statement_timeout
    {
        problems.push(Problem {
            line: None,
            path: "redis.tombstone_ttl".into(),
            message: format!(
                "must be longer than [postgres] statement_timeout ({:?}): a load that read a row before its delete could otherwise put it back in Redis after the tombstone is gone",
                pg.statement_timeout
            ),
        });
    }
    problems
}

/// Federation's cross-section rules.
fn validate_federation(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |path: &str, message: String| {
        problems.push(Problem {
            line: None,
            path: path.into(),
            message,
        })
    };
    let federated: Vec<&KeyspaceConfig> = config.keyspaces.iter().filter(|k| k.federate).collect();
    if !config.peers.is_empty() && federated.is_empty() {
        problem(
            "peer",
            "[[peer]] follows another node's federated keyspaces, and no keyspace has federate = true".into(),
        );
    }
    if federated.is_empty() {
        return problems;
    }
    if config.log.is_none() {
        problem(
            "log",
            "federated keyspaces need the commit log: add a [log] section with `dir` (every federated change is durable there first)".into(),
        );
    }
    if config.replication.is_none() {
        problem(
            "replication",
            "federated keyspaces are served to peers by the log server: add a [replication] section".into(),
        );
    }
    if config.server.node_id.len() >= 0x80 {
        problem("server.node_id", "a federating node's id is at most 127 bytes".into());
    }
    let mut names = std::collections::HashSet::new();
    for p in &config.peers {
        if !names.insert(p.name.as_str()) {
            problem(
                &format!("peer[{}]", p.name),
                format!(
                    "peer name `{}` is used twice; give each [[peer]] its own `name`",
                    p.name
                ),
            );
        }
    }
    for k in federated {
        let at_home = k.home.as_deref().is_none_or(|h| h == config.server.node_id);
        if k.table.is_some() && !at_home {
            problem(
                &format!("keyspace[{}].home", k.name),
                format!(
                    "keyspace `{}` has a table here but its home is `{}`: only the home reads its Postgres; elsewhere declare it without a table",
                    k.name,
                    k.home.as_deref().unwrap_or_default()
                ),
            );
        }
        if k.table.is_some() && k.cdc == CdcMode::Off {
            problem(
                &format!("keyspace[{}].cdc", k.name),
                format!(
                    "keyspace `{}` federates a table: its changes travel as CDC events, so set cdc = \"update\"",
                    k.name
                ),
            );
        }
        if k.table.is_some() && k.write == WriteMode::Through {
            problem(
                &format!("keyspace[{}].write", k.name),
                format!(
                    "keyspace `{}` federates a table: use write = \"behind\" (or \"none\"); its CDC carries every stored row to the other regions",
                    k.name
                ),
            );
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Capacity;
    use crate::keyspace::config::{DEFAULT_REFRESH_CONCURRENCY, TableRef};
    use std::time::Duration;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn the_resp_front_is_on_in_the_embedded_default_and_checked_in_files() {
        let embedded = Config::from_parts(None, "test", &|_| None).unwrap();
        assert_eq!(embedded.resp.unwrap().listen.to_string(), "127.0.0.1:6380");
        let file = Config::parse("[[keyspace]]\nname = \"m\"\n").unwrap();
        assert!(file.resp.is_none(), "a config file turns it on with [resp]");
        let env = |k: &str| (k == ENV_RESP_LISTEN).then(|| "127.0.0.1:0".to_string());
        let moved = Config::from_parts(Some("[[keyspace]]\nname = \"m\"\n"), "t", &env).unwrap();
        assert_eq!(moved.resp.unwrap().listen.port(), 0, "the env var turns it on");
        let p = problems(
            "[[keyspace]]\nname = \"m\"\n[resp]\nlisten = \"0.0.0.0:6380\"\ndefault_keyspace = \"nope\"\nmax_bulk_bytes = \"1MiB\"\nmax_query_bytes = \"1KiB\"\nmax_clients = 0\nbogus = 1\n",
        );
        for (path, needle) in [
            ("resp.listen", "password_file"),
            ("resp.default_keyspace", "names no keyspace"),
            ("resp.max_query_bytes", "at least max_bulk_bytes"),
            ("resp.max_clients", "at least 1"),
            ("resp.bogus", ""),
        ] {
            assert!(
                p.iter().any(|x| x.path == path && x.message.contains(needle)),
                "{path}: {p:?}"
            );
        }
    }

    #[test]
    fn federation_is_checked_across_sections() {
        let joined = |text: &str| {
            problems(text)
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let p = joined("[[keyspace]]\nname = \"s\"\nfederate = true\n");
        assert!(p.contains("need the commit log"), "{p}");
        assert!(p.contains("add a [replication] section"), "{p}");
        let p = joined("[[peer]]\nurl = \"http://x:1\"\n[[keyspace]]\nname = \"s\"\n");
        assert!(p.contains("no keyspace has federate = true"), "{p}");
        let p = joined("[[keyspace]]\nname = \"s\"\nhome = \"us\"\n");
        assert!(p.contains("set federate = true"), "{p}");
        let base = "[server]\nnode_id = \"eu\"\n[log]\ndir = \"/tmp/x\"\n[replication]\n[postgres]\nurl = \"postgres://a@h/d\"\n";
        let p = joined(&format!(
            "{base}[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\ncdc = \"update\"\nfederate = true\nhome = \"us\"\n"
        ));
        assert!(p.contains("its home is `us`"), "{p}");
        let p = joined(&format!(
            "{base}[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\nfederate = true\n"
        ));
        assert!(p.contains("set cdc = \"update\""), "{p}");
        let p = joined(&format!(
            "{base}[[keyspace]]\nname = \"v\"\nwrite = \"behind\"\nfederate = true\n"
        ));
        assert!(p.contains("writing to a source needs `table`"), "{p}");
        let ok = format!(
            "{base}[[peer]]\nname = \"us\"\nurl = \"http://us:7071\"\n[[keyspace]]\nname = \"v\"\nwrite = \"behind\"\nfederate = true\nhome = \"us\"\n"
        );
        assert_eq!(joined(&ok), "");
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
    fn the_env_var_supplies_a_url_the_postgres_section_leaves_out() {
        let text = "[postgres]\npool_size = 4\n[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\n";
        let env = |k: &str| (k == ENV_POSTGRES_URL).then(|| "postgres://u@127.0.0.1/db".to_string());
        let c = Config::from_parts(Some(text), "test", &env).expect("the env var fills in the url");
        let pg = c.postgres.as_ref().unwrap();
        assert_eq!((pg.url.expose(), pg.pool_size), ("postgres://u@127.0.0.1/db", 4));
        // Without it, the one problem names both ways to give it.
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].path == "postgres.url" && p[0].message.contains(ENV_POSTGRES_URL),
            "{p:#?}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let c = Config::parse(GOOD).unwrap();
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn redis_tier_settings_and_their_problems() {
        let base = "[postgres]\nurl = \"postgres://x@127.0.0.1/db\"\n";
        let ks = "[[keyspace]]\nname = \"u\"\ntable = \"users\"\nkey = \"id\"\nl2 = true\nl2_ttl = \"2m\"\n";
        let c = Config::parse(&format!(
            "{base}{ks}[redis]\nurl = \"redis://:hunter2@127.0.0.1:6379/0\"\nmax_invalidation_delay = \"250ms\"\n"
        ))
        .unwrap();
        let r = c.redis.as_ref().unwrap();
        assert_eq!(r.max_invalidation_delay, std::time::Duration::from_millis(250));
        assert!(c.keyspaces[0].l2);
        assert_eq!(c.keyspaces[0].l2_ttl, std::time::Duration::from_secs(120));
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("hunter2"), "the Redis password never prints: {shown}");
        let cluster = Config::parse(&format!(
            "{base}{ks}[redis]\ncluster = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n"
        ))
        .unwrap();
        assert!(matches!(&cluster.redis.unwrap().target, crate::l2::config::RedisTarget::Cluster(n) if n.len() == 2));

        let p = problems(&format!("{base}{ks}"));
        assert!(
            p.iter()
                .any(|p| p.path == "keyspace[u].l2" && p.message.contains("[redis]")),
            "{p:?}"
        );
        let p = problems("[[keyspace]]\nname = \"m\"\nl2 = true\n[redis]\nurl = \"redis://127.0.0.1\"\n");
        assert!(
            p.iter()
                .any(|p| p.path == "keyspace[m].l2" && p.message.contains("needs `table`")),
            "{p:?}"
        );
        let p = problems(&format!(
            "{base}{ks}[redis]\nurl = \"redis://127.0.0.1\"\ncluster = [\"redis://127.0.0.1:7000\"]\n"
        ));
        assert!(p.iter().any(|p| p.message.contains("not both")), "{p:?}");
        let p = problems(&format!(
            "{base}{ks}[redis]\nurl = \"http://:pw@127.0.0.1\"\ntimeout = \"0s\"\n"
        ));
        assert!(
            p.iter()
                .any(|p| p.path == "redis.url" && p.message.contains("redis://")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.path == "redis.timeout"), "{p:?}");
        assert!(
            !format!("{p:?}").contains("pw@"),
            "problems do not quote the URL: {p:?}"
        );
        let p = problems(&format!(
            "{base}{ks}[redis]\nurl = \"redis://127.0.0.1\"\ntombstone_ttl = \"10s\"\n"
        ));
        assert!(
            p.iter()
                .any(|p| p.path == "redis.tombstone_ttl" && p.message.contains("statement_timeout")),
            "{p:?}"
        );
        let p = problems(&format!("{base}{ks}[redis]\n"));
        assert!(p.iter().any(|p| p.message.contains("missing `url`")), "{p:?}");
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
    fn the_store_follows_what_a_keyspace_holds_unless_set() {
        use crate::cache::StoreKind;
        let pg = "[postgres]\nurl = \"postgres://x@127.0.0.1/db\"\n[log]\ndir = \"/tmp/l\"\n";
        let c = Config::parse(&format!(
            "{pg}[[keyspace]]\nname = \"mem\"\n[[keyspace]]\nname = \"warm\"\ntable = \"t\"\nkey = \"id\"\ncdc = \"update\"\n\
             [[keyspace]]\nname = \"read\"\ntable = \"t\"\nkey = \"id\"\n[[keyspace]]\nname = \"set\"\ntable = \"t\"\nkey = \"id\"\nstore = \"compact\"\n\
             [[keyspace]]\nname = \"mem2\"\nstore = \"cache\"\n\
             [[keyspace]]\nname = \"behind\"\ntable = \"t\"\nkey = \"id\"\nwrite = \"behind\"\n\
             [[keyspace]]\nname = \"through\"\ntable = \"t\"\nkey = \"id\"\nwrite = \"through\"\n"
        ))
        .unwrap();
        let stores: Vec<StoreKind> = c.keyspaces.iter().map(|k| k.store).collect();
        assert_eq!(
            stores,
            [
                StoreKind::Compact,
                StoreKind::Compact,
                StoreKind::Cache,
                StoreKind::Compact,
                StoreKind::Cache,
                StoreKind::Compact,
                StoreKind::Cache
            ],
            "in-memory, warm and write-behind keyspaces hold everything: compact; read-through ones cache"
        );
        assert_eq!(Config::embedded_default().keyspaces[0].store, StoreKind::Compact);
        let p = problems("[[keyspace]]\nname = \"m\"\nstore = \"tiny\"\n");
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].message.contains("unknown store \"tiny\""), "{p:#?}");
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
