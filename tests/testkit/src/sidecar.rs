//! The real `cachesync` binary as a child process, for black-box tests: start it with a config,
//! learn its address from the line it prints, signal it (SIGTERM, SIGKILL), and read its log.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::temp_dir;

/// A running `cachesync serve`.
pub struct Sidecar {
    child: Child,
    pub addr: SocketAddr,
    /// Where its RESP front listens, when it is on.
    pub resp: Option<SocketAddr>,
    pub dir: PathBuf,
}

impl Sidecar {
    /// Starts `bin serve --config <config>` (the config should listen on `127.0.0.1:0`) and waits
    /// for it to print its address. `None` config runs the embedded default, with `listen`
    /// overridden through the environment.
    pub fn spawn(bin: &Path, config: Option<&str>) -> Sidecar {
        Sidecar::spawn_with_env(bin, config, &[])
    }

    /// [`Sidecar::spawn`] with extra environment variables (e.g. a `LD_PRELOAD`ed fake clock).
    pub fn spawn_with_env(bin: &Path, config: Option<&str>, env: &[(&str, &str)]) -> Sidecar {
        let dir = temp_dir("sidecar", None);
        let path = config.map(|text| {
            let path = dir.join("cachesync.toml");
            std::fs::write(&path, text).expect("write config");
            path
        });
        Sidecar::start(bin, dir, path.as_deref(), env)
    }

    /// Starts `bin serve --config <path>` with a config file that is already in place (as a pod
    /// mounts it), with extra environment variables.
    pub fn spawn_file(bin: &Path, config: &Path, env: &[(&str, &str)]) -> Sidecar {
        Sidecar::start(bin, temp_dir("sidecar", None), Some(config), env)
    }

    fn start(bin: &Path, dir: PathBuf, config: Option<&Path>, env: &[(&str, &str)]) -> Sidecar {
        let mut cmd = Command::new(bin);
        cmd.envs(env.iter().copied());
        cmd.arg("serve");
        match config {
            Some(path) => {
                cmd.arg("--config").arg(path);
            }
            None => {
                cmd.env("CACHESYNC_LISTEN", "127.0.0.1:0");
                if !env.iter().any(|(k, _)| *k == "CACHESYNC_RESP_LISTEN") {
                    // The embedded default's RESP front, on a free port (never a fixed 6380).
                    cmd.env("CACHESYNC_RESP_LISTEN", "127.0.0.1:0");
                }
            }
        }
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("create log");
        cmd.stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null())
            .env("CACHESYNC_LOG", "info,cachesync=debug");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut resp = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("cachesync RESP listening on redis://") {
                    resp = addr.trim().parse::<SocketAddr>().ok();
                }
                if let Some(addr) = line.strip_prefix("cachesync listening on http://") {
                    let _ = tx.send((addr.trim().to_string(), resp));
                }
            }
        });
        let (addr, resp) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((a, resp)) => (a.parse().expect("a socket address"), resp),
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                panic!("cachesync did not report its address within 30s; its log:\n{log}");
            }
        };
        Sidecar { child, addr, resp, dir }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `INT`).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process has logged to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
