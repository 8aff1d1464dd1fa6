//! Shared by the benchmark programs: latency recording and reporting, and a minimal HTTP/1.1
//! keep-alive client (so the client's own overhead stays small and the same for every target).
#![allow(dead_code)]

pub mod freshness;
pub mod report;

/// A bench knob from the environment: `default` when `name` is unset, its value when it parses,
/// else a clear stop (a typo must not silently measure something else).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid {}", std::any::type_name::<T>())),
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A Postgres client tool (`psql`, `pg_recvlogical`) of the test server's installation, pointed at
/// database `db` on `pg` as the superuser.
pub fn pg_tool(name: &str, pg: &cachesync_testkit::postgres::PgServer, db: &str) -> std::process::Command {
    use cachesync_testkit::postgres::bindir;
    let bin = cachesync_testkit::find_program(name, "CACHESYNC_PG_BINDIR", &[bindir(), "/usr/bin".into()])
        .unwrap_or_else(|| panic!("{name} is not installed: run deploy/dev/install-deps.sh (postgresql-client)"));
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port.to_string(),
        "-U",
        "postgres",
        "-d",
        db,
    ]);
    cmd
}

/// A latency line: samples, p50 and p99 in ms, the label padded to `width`.
pub fn ms_row(label: &str, l: &Lat, width: usize) -> String {
    format!(
        "{label:<width$} n={:<6} p50={:>8.2}ms p99={:>8.2}ms",
        l.h.len(),
        l.p(0.5) / 1000.0,
        l.p(0.99) / 1000.0
    )
}

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs a benchmark's body on a multi-threaded tokio runtime.
pub fn block_on<F: std::future::Future>(body: F) -> F::Output {
    // As the binary starts (`cli::main`): a bench that runs the sidecar in this process
    // measures it with the binary's memory settings.
    cachesync::cli::without_huge_pages();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body)
}

/// Starts `pg_recvlogical` on slot `slot` of `db` (created if missing), test_decoding output
/// piped to stdout, flushed at once.
pub fn recvlogical(pg: &cachesync_testkit::postgres::PgServer, db: &str, slot: &str) -> std::process::Child {
    pg_tool("pg_recvlogical", pg, db)
        .args([
            "--slot",
            slot,
            "--create-slot",
            "--if-not-exists",
            "--start",
            "-P",
            "test_decoding",
            "-f",
            "-",
            "-F",
            "0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pg_recvlogical (Debian: apt-get install postgresql-client-15)")
}

/// Waits (up to five minutes) until the server at `addr` answers `/readyz` with 200.
pub async fn wait_ready(addr: std::net::SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}/readyz")).await
            && r.status() == 200
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} was not ready within five minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server's `/metrics` text.
pub async fn metrics_text(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The sum of the server's samples whose line starts with `prefix` (a metric name, or a name
/// with the start of its labels).
pub async fn metric_sum(addr: std::net::SocketAddr, prefix: &str) -> f64 {
    metrics_text(addr)
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Latencies in nanoseconds.
pub struct Lat {
    pub h: Histogram<u64>,
    pub elapsed: Duration,
}

impl Lat {
    pub fn new() -> Lat {
        Lat {
            h: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
            elapsed: Duration::ZERO,
        }
    }

    pub fn record(&mut self, d: Duration) {
        let _ = self.h.record((d.as_nanos() as u64).max(1));
    }

    pub fn merge(&mut self, other: &Lat) {
        let _ = self.h.add(&other.h);
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    pub fn p(&self, q: f64) -> f64 {
        self.h.value_at_quantile(q) as f64 / 1000.0
    }

    /// One line: count, p50, p99, p999 in microseconds, and throughput.
    pub fn line(&self, label: &str) -> String {
        let rate = if self.elapsed.is_zero() {
            0.0
        } else {
            self.h.len() as f64 / self.elapsed.as_secs_f64()
        };
        format!(
            "{label:<44} n={:<7} p50={:>9.1}µs p99={:>9.1}µs p999={:>9.1}µs  {:>9.0} ops/s",
            self.h.len(),
            self.p(0.5),
            self.p(0.99),
            self.p(0.999),
            rate
        )
    }
}

/// `a / b` at p50, p99 and p999.
pub fn ratio_line(label: &str, a: &Lat, b: &Lat) -> String {
    format!(
        "{label:<44} p50 {:>5.2}x   p99 {:>5.2}x   p999 {:>5.2}x",
        a.p(0.5) / b.p(0.5),
        a.p(0.99) / b.p(0.99),
        a.p(0.999) / b.p(0.999)
    )
}

/// A keep-alive HTTP/1.1 connection that sends fixed requests and reads whole responses.
pub struct RawHttp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawHttp {
    pub async fn connect(addr: std::net::SocketAddr) -> RawHttp {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawHttp {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// Sends `request` and returns the status and the body.
    pub async fn fetch(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        let (status, len) = self.roundtrip(request).await;
        let start = self.buf.len() - len;
        (status, self.buf[start..].to_vec())
    }

    /// Sends `request` (a whole HTTP/1.1 request) and returns the status and body length.
    pub async fn roundtrip(&mut self, request: &[u8]) -> (u16, usize) {
        self.stream.write_all(request).await.expect("write");
        self.buf.clear();
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).expect("utf8 head");
                let status: u16 = head[9..12].parse().expect("status");
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    self.read_more().await;
                }
                return (status, len);
            }
            self.read_more().await;
        }
    }

    /// A header of the last response read, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let end = find(&self.buf, b"\r\n\r\n")?;
        std::str::from_utf8(&self.buf[..end]).ok()?.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    async fn read_more(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "server closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `GET path` as request bytes.
pub fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
}

/// `conns` keep-alive connections each sending `per_conn` GETs of `path(conn, i)`; all
/// latencies, with wall time. Every response must have status `expect`.
pub async fn http_load(
    addr: std::net::SocketAddr,
    conns: usize,
    per_conn: usize,
    expect: u16,
    path: fn(usize, usize) -> String,
) -> Lat {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut client = RawHttp::connect(addr).await;
            let mut lat = Lat::new();
            for i in 0..per_conn {
                let req = get_request(&path(c, i));
                let t = Instant::now();
                let (status, _) = client.roundtrip(&req).await;
                lat.record(t.elapsed());
                assert_eq!(status, expect, "unexpected status for {}", path(c, i));
            }
            lat
        }));
    }
    collect(tasks, started).await
}

/// A TCP echo server on a free loopback port (the physical floor of a request/response).
pub async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// `conns` connections each sending `per_conn` messages of `size` bytes and reading them back.
pub async fn echo_load(addr: std::net::SocketAddr, conns: usize, per_conn: usize, size: usize) -> Lat {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let msg = vec![b'x'; size];
            let mut back = vec![0u8; size];
            let mut lat = Lat::new();
            for _ in 0..per_conn {
                let t = Instant::now();
                s.write_all(&msg).await.expect("write");
                s.read_exact(&mut back).await.expect("read");
                lat.record(t.elapsed());
            }
            lat
        }));
    }
    collect(tasks, started).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Lat>>, started: Instant) -> Lat {
    let mut all = Lat::new();
    for t in tasks {
        all.merge(&t.await.expect("bench task"));
    }
    all.elapsed = started.elapsed();
    all
}

/// A blocking keep-alive HTTP/1.1 connection, for pollers on their own threads (where sleeps
/// of 100µs are real, unlike the tokio timer's 1ms granularity).
pub struct BlockingHttp {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl BlockingHttp {
    pub fn connect(addr: std::net::SocketAddr) -> BlockingHttp {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        BlockingHttp {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// Sends `request` and returns the status and the body.
    pub fn fetch(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        use std::io::{Read, Write};
        self.stream.write_all(request).expect("write");
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).expect("utf8 head");
                let status: u16 = head[9..12].parse().expect("status");
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut chunk).expect("read");
                    assert!(n > 0, "server closed the connection");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                return (status, self.buf[end + 4..end + 4 + len].to_vec());
            }
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat has a command") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
