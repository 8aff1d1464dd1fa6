//! Throwaway Postgres servers for tests and benchmarks.
//!
//! `initdb` runs once per process into a template directory; every server after that starts
//! from a copy of it, which takes milliseconds instead of seconds. As root, the directories
//! belong to the `postgres` user and the server runs as that user (`initdb` refuses to run as
//! root). Servers listen on a free loopback port with `wal_level=logical`, enough WAL senders and
//! slots for many tests at once, and `pg_stat_statements` loaded so tests can count queries on
//! the server side.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::{Tied, find_program, free_port, is_root, temp_dir, unique, user_ids, wait_for_log};

const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, postgres) were not found. Install them with \
`apt-get install -y postgresql-15` (Debian 12; any version >= 14 works) or run deploy/dev/install-deps.sh, \
or point CACHESYNC_PG_BINDIR at the directory holding initdb and postgres.";

/// How long a server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a server; tests use the defaults, benchmarks may ask for durable ones.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// `fsync=on` (benchmarks that compare against Postgres's own durability) or off (tests).
    pub durable: bool,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
}

/// The directory holding `initdb` and `postgres`, or a panic that says how to install them.
pub fn bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        std::cmp::Reverse(
            d.parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    let initdb = find_program("initdb", "CACHESYNC_PG_BINDIR", &dirs).unwrap_or_else(|| panic!("{INSTALL_HINT}"));
    let dir = initdb.parent().expect("a program lives in a directory").to_path_buf();
    if !dir.join("postgres").is_file() {
        panic!("{INSTALL_HINT} (found {} but no postgres beside it)", initdb.display());
    }
    dir
}

fn owner() -> Option<(u32, u32)> {
    if is_root() {
        Some(user_ids("postgres").unwrap_or_else(|| {
            panic!("running as root, Postgres must run as the `postgres` user, which does not exist; {INSTALL_HINT}")
        }))
    } else {
        None
    }
}

/// Runs a command as `owner`, panicking with its output if it fails.
fn run_as(program: &Path, args: &[&str], owner: Option<(u32, u32)>, what: &str) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", program.display()));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The template data directory, made by `initdb` once per process.
fn template() -> &'static PathBuf {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let bin = bindir();
        let owner = owner();
        let base = temp_dir("pg-template", owner);
        let data = base.join("data");
        let data_s = data.to_string_lossy().into_owned();
        run_as(
            &bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
            owner,
            "initdb",
        );
        // Removed when the process exits, like the servers.
        std::mem::forget(Tied::cleanup(&base, None, owner).expect("spawn cleanup guardian"));
        data
    })
}

/// One running (or stopped) Postgres server.
pub struct PgServer {
    pub port: u16,
    base: PathBuf,
    options: PgOptions,
    owner: Option<(u32, u32)>,
    /// Dropped first: stops the server.
    process: Mutex<Option<Tied>>,
    starts: Mutex<u32>,
    /// Dropped last (or at process exit): removes the directory once the server is gone.
    _cleanup: Tied,
}

impl PgServer {
    /// Starts a new server of its own (for tests that stop and start it).
    pub fn start(options: PgOptions) -> Arc<PgServer> {
        let owner = owner();
        let base = temp_dir("pg", owner);
        let data = base.join("data");
        let mut args = vec!["-a".to_string()];
        args.push(template().to_string_lossy().into_owned());
        args.push(data.to_string_lossy().into_owned());
        let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
        run_as(Path::new("cp"), &args_ref, owner, "copy the template data directory");
        let cleanup = Tied::cleanup(&base, Some(&data.join("postmaster.pid")), owner).expect("spawn cleanup guardian");
        let server = Arc::new(PgServer {
            port: free_port(),
            _cleanup: cleanup,
            base,
            options,
            owner,
            process: Mutex::new(None),
            starts: Mutex::new(0),
        });
        server.resume();
        server
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    /// Starts the server process (again, after [`stop`](Self::stop)); returns once it accepts
    /// connections.
    pub fn resume(&self) {
        let mut process = self.process.lock().unwrap_or_else(|p| p.into_inner());
        if process.is_some() {
            return;
        }
        let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        *starts += 1;
        let log = self.base.join(format!("postgres-{}.log", *starts));
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), self.port.to_string()),
            (
                "unix_socket_directories".into(),
                self.base.to_string_lossy().into_owned(),
            ),
            ("wal_level".into(), "logical".into()),
            ("max_wal_senders".into(), "64".into()),
            ("max_replication_slots".into(), "64".into()),
            ("max_connections".into(), "400".into()),
            ("shared_buffers".into(), "128MB".into()),
            ("shared_preload_libraries".into(), "pg_stat_statements".into()),
            ("pg_stat_statements.track_utility".into(), "off".into()),
            ("logging_collector".into(), "off".into()),
        ];
        if !self.options.durable {
            settings.push(("fsync".into(), "off".into()));
            settings.push(("full_page_writes".into(), "off".into()));
        }
        settings.extend(self.options.settings.iter().cloned());
        let mut args = vec!["-D".to_string(), self.data().to_string_lossy().into_owned()];
        for (k, v) in settings {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
        // Immediate shutdown (SIGQUIT): a fast shutdown waits for logical walsenders, and a
        // Postgres 15 walsender at shutdown can spin until `wal_sender_timeout` (60s) before it
        // lets the checkpointer finish. For the sidecar an immediate stop is an outage like any
        // crash, which is what the outage tests want anyway.
        let tied = Tied::spawn(&bindir().join("postgres"), &args, &log, "QUIT", self.owner).expect("spawn postgres");
        wait_for_log(
            &log,
            "database system is ready to accept connections",
            START_TIMEOUT,
            "postgres",
        );
        *process = Some(tied);
    }

    /// Stops the server (immediate shutdown: crash-like, recovered on the next start) and waits
    /// for it to exit. Its data stays.
    pub fn stop(&self) {
        let tied = self.process.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut t) = tied {
            t.stop();
        }
    }

    pub fn is_running(&self) -> bool {
        self.process.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// A URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh, empty database for one test.
    pub async fn create_database(&self) -> TestDb {
        let name = format!("t_{}_{}", std::process::id(), unique());
        let admin = self.connect("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("CREATE DATABASE");
        TestDb {
            url: self.url(&name),
            name,
        }
    }

    /// An ordinary connection to `database` (its driver task runs in the background).
    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to test postgres on port {}: {e}", self.port));
        tokio::spawn(conn);
        client
    }
}

/// The server shared by every test in this binary, started on first use.
pub fn shared() -> Arc<PgServer> {
    static SHARED: OnceLock<Arc<PgServer>> = OnceLock::new();
    SHARED.get_or_init(|| PgServer::start(PgOptions::default())).clone()
}

/// One test's database.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}
