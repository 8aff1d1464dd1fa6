//! Test and benchmark support: throwaway Postgres and Redis servers on free loopback ports in
//! temporary directories, a handle on the real `cachesync` binary, and a loopback TCP proxy that
//! delays, cuts and blackholes links ([`faultlink`]). Integration tests and
//! benchmarks use it; the sidecar itself never does.
//!
//! Each server runs under a tiny shell *guardian* whose stdin is a pipe held by this process.
//! When the process exits — normally, by panic, or by SIGKILL — the pipe closes, the guardian
//! stops the server and removes its directory, so nothing outlives the test run. A shared server
//! is started once per test binary ([`postgres::shared`], [`redis::shared`]); each test gets its
//! own database or key prefix. A missing server binary is a test failure whose message says how
//! to install it — tests never skip.

pub mod faultlink;
pub mod postgres;
pub mod redis;
pub mod sidecar;

use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A number unique within this process (database names, key prefixes, directories).
pub fn unique() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// Ports [`free_port`] hands out: below Linux's ephemeral range (32768–60999), so no socket
/// bound to port 0 and no outgoing connection (a fault link, a database client) can take one
/// between the moment it is handed out and the moment its server binds it.
const PORTS: std::ops::Range<u16> = 15_000..32_000;

/// A loopback port that was free a moment ago and has not been handed out by this process.
pub fn free_port() -> u16 {
    let mut x = u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = PORTS.start + (x % u64::from(PORTS.end - PORTS.start)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
}

/// A fresh directory under the system temp dir, owned by `owner` when given.
///
/// Fresh means created here: the name carries the process id, a per-process number and the
/// clock, and a name that already exists is skipped. Process ids are reused (nextest runs
/// every test in a process of its own), and a directory left by an earlier process of the same
/// id once handed a test a commit log it had not written.
pub fn temp_dir(label: &str, owner: Option<(u32, u32)>) -> PathBuf {
    let dir = loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "cachesync-{label}-{}-{}-{nanos:09}",
            std::process::id(),
            unique()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create {}: {e}", dir.display()),
        }
    };
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("cannot chown {}: {e}", dir.display()));
    }
    dir
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// The uid and gid of a local user, read from /etc/passwd.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// The guardian: runs the command with stdin from /dev/null and output to `$LOG`, waits for its
/// own stdin to close, then signals the command, waits for it, and removes `$CLEANUP` if set.
const GUARDIAN: &str = r#"
"$@" </dev/null >>"$LOG" 2>&1 &
pid=$!
read -r _ignored
kill -s "$SIG" "$pid" 2>/dev/null
wait "$pid"
if [ -n "$CLEANUP" ]; then
  n=0
  while [ -n "$WAITFOR" ] && [ -e "$WAITFOR" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
  rm -rf "$CLEANUP"
fi
"#;

/// A server process tied to this process's lifetime.
pub struct Tied {
    guardian: Child,
    stdin: Option<ChildStdin>,
}

impl Tied {
    /// Starts `program args` under a guardian, as `user` (uid, gid) when given.
    pub fn spawn(
        program: &Path,
        args: &[String],
        log: &Path,
        signal: &str,
        user: Option<(u32, u32)>,
    ) -> io::Result<Tied> {
        Tied::spawn_with(program, args, log, signal, user, &[])
    }

    /// A guardian that runs nothing and, when this process exits, waits for `wait_for` to
    /// disappear (a server's pid file) and then removes `dir`.
    pub fn cleanup(dir: &Path, wait_for: Option<&Path>, user: Option<(u32, u32)>) -> io::Result<Tied> {
        let wait_for = wait_for.map(|p| p.as_os_str().to_owned()).unwrap_or_default();
        Tied::spawn_with(
            Path::new("true"),
            &[],
            Path::new("/dev/null"),
            "TERM",
            user,
            &[("CLEANUP", dir.as_os_str().to_owned()), ("WAITFOR", wait_for)],
        )
    }

    fn spawn_with(
        program: &Path,
        args: &[String],
        log: &Path,
        signal: &str,
        user: Option<(u32, u32)>,
        env: &[(&str, std::ffi::OsString)],
    ) -> io::Result<Tied> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(GUARDIAN)
            .arg("cachesync-guardian")
            .arg(program)
            .args(args);
        cmd.env("LOG", log)
            .env("SIG", signal)
            .env_remove("CLEANUP")
            .env_remove("WAITFOR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let mut guardian = cmd.spawn()?;
        let stdin = guardian.stdin.take();
        Ok(Tied { guardian, stdin })
    }

    /// Stops the server and waits for it (and its cleanup) to finish.
    pub fn stop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let _ = self.guardian.wait();
    }
}

impl Drop for Tied {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `log` contains `needle`, panicking with the log's tail after `timeout`.
pub fn wait_for_log(log: &Path, needle: &str, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        if Instant::now() > deadline {
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "{what} did not become ready within {timeout:?}; last log lines of {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Finds a program: an explicit environment override, then well-known directories, then PATH.
pub fn find_program(name: &str, env_override: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_override) {
        let p = PathBuf::from(p);
        let candidate = if p.is_dir() { p.join(name) } else { p };
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .chain(path_dirs.iter())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Polls `check` until it returns `Ok`, or fails after `timeout` with the last error seen.
/// Tests wait for conditions with this, never with fixed sleeps.
pub async fn eventually<T, E: std::fmt::Debug, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: not true within {timeout:?}; last seen: {e:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A process's resident set (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/<pid>/status")
        * 1024
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`. Linux reports
/// it in clock ticks of `USER_HZ`, which is 100 on every architecture's ABI.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')').expect("a command name in /proc/<pid>/stat") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}
