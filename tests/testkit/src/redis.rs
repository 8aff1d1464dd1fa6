//! A throwaway `redis-server` for tests: free loopback port, no persistence, its own directory.
//! One server is shared per test binary; each test takes its own key prefix.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{Tied, find_program, free_port, temp_dir, unique, wait_for_log};

const INSTALL_HINT: &str = "redis-server was not found. Install it with `apt-get install -y redis-server` \
(Debian/Ubuntu) or run deploy/dev/install-deps.sh, or point CACHESYNC_REDIS_SERVER at the binary.";

/// One running Redis server.
pub struct RedisServer {
    pub port: u16,
    _process: Tied,
    _cleanup: Tied,
}

impl RedisServer {
    /// Starts a server of its own.
    pub fn start() -> Arc<RedisServer> {
        let bin = find_program(
            "redis-server",
            "CACHESYNC_REDIS_SERVER",
            &[PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")],
        )
        .unwrap_or_else(|| panic!("{INSTALL_HINT}"));
        let dir = temp_dir("redis", None);
        let port = free_port();
        let log = dir.join("redis.log");
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.to_string_lossy(),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cleanup = Tied::cleanup(&dir, None, None).expect("spawn cleanup guardian");
        let process = Tied::spawn(&bin, &args, &log, "TERM", None).expect("spawn redis-server");
        wait_for_log(
            &log,
            "Ready to accept connections",
            Duration::from_secs(30),
            "redis-server",
        );
        Arc::new(RedisServer {
            port,
            _process: process,
            _cleanup: cleanup,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A key prefix no other test in this process uses.
    pub fn key_prefix(&self) -> String {
        format!("t{}:{}:", std::process::id(), unique())
    }
}

/// The server shared by every test in this binary, started on first use.
pub fn shared() -> Arc<RedisServer> {
    static SHARED: OnceLock<Arc<RedisServer>> = OnceLock::new();
    SHARED.get_or_init(RedisServer::start).clone()
}
