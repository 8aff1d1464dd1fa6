//! Throwaway Redis for tests: a `redis-server` on a free loopback port with no persistence and
//! its own directory, and a real 3-master Redis Cluster (`--cluster-enabled yes` ×3, joined by
//! `redis-cli --cluster create`). Both can be stopped (SIGKILL, like a crash), restarted on
//! the same ports (empty: nothing is persisted), and flushed (`redis-cli FLUSHALL`).
//! One standalone server is shared per test binary; each test takes its own key prefix.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{Tied, find_program, free_port, temp_dir, unique, wait_for_log};

const INSTALL_HINT: &str = "redis-server was not found. Install it with `apt-get install -y redis-server redis-tools` \
(Debian/Ubuntu) or run deploy/dev/install-deps.sh, or point CACHESYNC_REDIS_SERVER at the binary.";

const CLI_HINT: &str = "redis-cli was not found. Install it with `apt-get install -y redis-tools` \
(Debian/Ubuntu) or run deploy/dev/install-deps.sh, or point CACHESYNC_REDIS_CLI at the binary.";

fn server_bin() -> PathBuf {
    find_program(
        "redis-server",
        "CACHESYNC_REDIS_SERVER",
        &[PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")],
    )
    .unwrap_or_else(|| panic!("{INSTALL_HINT}"))
}

/// The `redis-cli` binary (tests use it as a real client tool).
pub fn cli_bin() -> PathBuf {
    find_program(
        "redis-cli",
        "CACHESYNC_REDIS_CLI",
        &[PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")],
    )
    .unwrap_or_else(|| panic!("{CLI_HINT}"))
}

/// Runs `redis-cli -p port args…` and returns its output (panics if it fails).
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(cli_bin())
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(
        out.status.success(),
        "redis-cli -p {port} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One running (or stopped) Redis server.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    process: Mutex<Option<Tied>>,
    _cleanup: Tied,
}

impl RedisServer {
    /// Starts a server of its own.
    pub fn start() -> Arc<RedisServer> {
        Arc::new(Self::start_with(free_port(), &[]))
    }

    fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let dir = temp_dir("redis", None);
        let cleanup = Tied::cleanup(&dir, None, None).expect("spawn cleanup guardian");
        let s = RedisServer {
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            process: Mutex::new(None),
            _cleanup: cleanup,
        };
        s.launch();
        s
    }

    fn launch(&self) {
        let log = self.dir.join(format!("redis-{}.log", unique()));
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.to_string_lossy(),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        let process = Tied::spawn(&server_bin(), &args, &log, "KILL", None).expect("spawn redis-server");
        wait_for_log(
            &log,
            "Ready to accept connections",
            Duration::from_secs(30),
            "redis-server",
        );
        *self.process.lock().unwrap_or_else(|p| p.into_inner()) = Some(process);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A key prefix no other test in this process uses.
    pub fn key_prefix(&self) -> String {
        format!("t{}:{}:", std::process::id(), unique())
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for its port to be free.
    pub fn stop(&self) {
        if let Some(mut p) = self.process.lock().unwrap_or_else(|p| p.into_inner()).take() {
            p.stop();
        }
        wait_port_free(self.port);
    }

    /// Starts it again on the same port: empty, as nothing is persisted.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }

    /// `FLUSHALL`, through `redis-cli`.
    pub fn flush(&self) {
        cli(self.port, &["FLUSHALL"]);
    }

    /// Runs `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// One field of `INFO <section>` (`process_id`, `used_memory`…), as a number.
    pub fn info_number(&self, section: &str, field: &str) -> u64 {
        let info = self.cli(&["info", section]);
        info.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO {section} has no numeric {field}: {info}"))
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.info_number("server", "process_id") as u32
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn wait_port_free(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "port {port} stayed taken after redis-server stopped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server shared by every test in this binary, started on first use.
pub fn shared() -> Arc<RedisServer> {
    static SHARED: OnceLock<Arc<RedisServer>> = OnceLock::new();
    SHARED.get_or_init(RedisServer::start).clone()
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let p = free_port();
        if TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// A real Redis Cluster of three masters (no replicas) on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_cluster_port();
                RedisServer::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let out = Command::new(cli_bin())
            .args(&args)
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("All 16384 slots covered"),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = RedisCluster { nodes };
        c.wait_ok();
        c
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &self.nodes {
            loop {
                let info = cli(n.port, &["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not become ok: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `redis://` URLs of the nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Kills every node.
    pub fn stop(&self) {
        for n in &self.nodes {
            n.stop();
        }
    }

    /// Restarts every node on its port (each keeps its slots from nodes.conf; data is gone).
    pub fn restart(&self) {
        self.stop();
        for n in &self.nodes {
            n.launch();
        }
        self.wait_ok();
    }

    /// `FLUSHALL` on every master.
    pub fn flush(&self) {
        for n in &self.nodes {
            n.flush();
        }
    }

    /// Moves every slot of the node holding `key` (and the keys in them) to another node, with
    /// `redis-cli --cluster reshard`, and waits for the cluster to settle.
    pub fn move_all_slots_of(&self, key: &str) {
        let from = self.node_of(key);
        let to = self.nodes.iter().find(|n| n.port != from.port).expect("another node");
        let id = |n: &RedisServer| cli(n.port, &["CLUSTER", "MYID"]).trim().to_string();
        let out = Command::new(cli_bin())
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", from.port),
                "--cluster-from",
                &id(from),
                "--cluster-to",
                &id(to),
                "--cluster-slots",
                "16384",
                "--cluster-yes",
            ])
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(self.node_of(key).port, from.port, "the key's slot moved");
        self.wait_ok();
    }

    /// The node holding `key`'s slot.
    pub fn node_of(&self, key: &str) -> &RedisServer {
        let slot = cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key]);
        let slot: u16 = slot.trim().parse().expect("a slot number");
        // Each node's own line of CLUSTER NODES lists the slot ranges it serves.
        self.nodes
            .iter()
            .find(|n| {
                let myself = cli(n.port, &["CLUSTER", "MYID"]);
                let nodes = cli(n.port, &["CLUSTER", "NODES"]);
                nodes.lines().any(|l| {
                    l.starts_with(myself.trim())
                        && l.split_whitespace().skip(8).any(|r| match r.split_once('-') {
                            Some((a, b)) => {
                                a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
                            }
                            None => r.parse::<u16>().is_ok_and(|s| s == slot),
                        })
                })
            })
            .expect("some node serves every slot")
    }
}
