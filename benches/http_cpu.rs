//! GET hits over HTTP against nginx returning the same body, measured by the tool both are
//! measured with: `wrk`, keep-alive HTTP/1.1, 1 connection (`-t1 -c1`) and 16 (`-t2 -c16`).
//!
//! Both servers run as their own processes beside each other in the same run: the release
//! `cachesync` binary with no config (the embedded in-memory default), holding one 100-byte JSON
//! value, and `nginx` (one process, no access log) answering the same path with the same body
//! and content type. Each case runs in interleaved pairs (the order alternates per round); the
//! report gives the medians over rounds of the server's CPU time per request read from `/proc`
//! (the steady figure on a shared 2-core machine, where wrk takes a core of its own), requests/s,
//! and wrk's p50 and p99, then the ratios cachesync / nginx.
//!
//! Run: `cargo bench --bench http_cpu` (`ROUNDS=n`, default 7; `SECONDS=n` per run, default 3).
//! Needs `nginx` and `wrk` (`deploy/dev/install-deps.sh`). Nothing here asserts a time.
//! Figures: `target/bench-results/http_cpu{,_latency}.{csv,png}`.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cachesync_testkit::sidecar::Sidecar;
use cachesync_testkit::{cpu_seconds, find_program, free_port, temp_dir};
use common::report::Report;

const PATH: &str = "/v1/kv/default/bench";

/// One wrk run's figures plus the server's CPU.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: f64,
}

fn program(name: &str, env: &str) -> PathBuf {
    find_program(
        name,
        env,
        &[
            PathBuf::from("/usr/sbin"),
            PathBuf::from("/usr/bin"),
            PathBuf::from("/usr/local/bin"),
        ],
    )
    .unwrap_or_else(|| panic!("{name} was not found: apt-get install -y {name} (or deploy/dev/install-deps.sh)"))
}

/// nginx in the foreground, one process, answering every path with `body`.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    fn start(body: &str) -> Nginx {
        let dir = temp_dir("bench-nginx", None);
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 60s;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{ default_type application/json; return 200 '{body}'; }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let child = Command::new(program("nginx", "CACHESYNC_NGINX"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr}; see {d}/error.log"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, addr }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs wrk once against `addr` and reads its summary.
fn wrk(tool: &Path, addr: SocketAddr, pid: u32, threads: usize, conns: usize, seconds: u64) -> Run {
    let before = cpu_seconds(pid);
    let out = Command::new(tool)
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{seconds}s"),
        ])
        .arg("--latency")
        .arg(format!("http://{addr}{PATH}"))
        .output()
        .expect("run wrk");
    let cpu = cpu_seconds(pid) - before;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("Non-2xx"), "the server answered errors: {text}");
    // "  123456 requests in 3.00s, 28.12MB read"
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n.trim().parse().ok()))
        .flatten()
        .unwrap_or_else(|| panic!("no request count in wrk's output: {text}"));
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:").map(|v| v.trim().parse().ok()))
        .flatten()
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output: {text}"));
    // "     50%  102.00us" under "Latency Distribution"
    let pct = |p: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| duration_us(v.trim())))
            .unwrap_or_else(|| panic!("no {p} latency in wrk's output: {text}"))
    };
    Run {
        rps,
        p50_us: pct("50%"),
        p99_us: pct("99%"),
        cpu_us_per_req: cpu * 1e6 / requests,
    }
}

/// wrk's durations: "102.00us", "1.25ms", "2.00s".
fn duration_us(v: &str) -> f64 {
    let (n, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        panic!("unknown wrk duration {v:?}")
    };
    n.parse::<f64>().expect("wrk duration") * scale
}

fn medians(runs: &[Run]) -> Run {
    Run {
        rps: common::median(runs.iter().map(|r| r.rps).collect()),
        p50_us: common::median(runs.iter().map(|r| r.p50_us).collect()),
        p99_us: common::median(runs.iter().map(|r| r.p99_us).collect()),
        cpu_us_per_req: common::median(runs.iter().map(|r| r.cpu_us_per_req).collect()),
    }
}

fn main() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let rounds = env("ROUNDS", 7) as usize;
    let seconds = env("SECONDS", 3);
    let tool = program("wrk", "CACHESYNC_WRK");
    // A 100-byte JSON value.
    let shape = |pad: &str| format!("{{\"name\":\"bench\",\"pad\":\"{pad}\"}}");
    let body = shape(&"x".repeat(100 - shape("").len()));
    assert_eq!(body.len(), 100);
    let sidecar = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), None);
    common::block_on(async {
        let mut http = common::RawHttp::connect(sidecar.addr).await;
        let put = format!(
            "PUT {PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, _) = http.roundtrip(put.as_bytes()).await;
        assert!((200..300).contains(&status), "PUT answered {status}");
        let (status, got) = http.fetch(&common::get_request(PATH)).await;
        assert_eq!((status, got), (200, body.clone().into_bytes()), "the value reads back");
    });
    let nginx = Nginx::start(&body);
    let targets = [
        ("nginx", nginx.addr, nginx.child.id()),
        ("cachesync", sidecar.addr, sidecar.pid()),
    ];
    println!(
        "wrk --latency, GET {PATH} (100-byte body), {seconds} s per run; medians of {rounds} interleaved pairs; cpu = server CPU per request\n"
    );
    println!(
        "{:<6} | {:>10} {:>8} {:>8} {:>7} | {:>10} {:>8} {:>8} {:>7} | {:>6} {:>6} {:>6} {:>6}",
        "conns",
        "nginx rps",
        "p50 µs",
        "p99 µs",
        "cpu µs",
        "cs rps",
        "p50 µs",
        "p99 µs",
        "cpu µs",
        "rps",
        "p50",
        "p99",
        "cpu"
    );
    let mut cpu_report = Report::new(
        "http_cpu",
        "GET hit: server CPU per request (wrk, medians)",
        "CPU µs per request",
    );
    let mut lat_report = Report::new("http_cpu_latency", "GET hit: wrk latency (medians)", "µs");
    for (threads, conns) in [(1usize, 1usize), (2, 16)] {
        // Warm both (connections, caches, the CPU's frequency).
        for (_, addr, pid) in targets {
            wrk(&tool, addr, pid, threads, conns, 1);
        }
        let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let (_, addr, pid) = targets[i];
                runs[i].push(wrk(&tool, addr, pid, threads, conns, seconds));
            }
        }
        let (n, c) = (medians(&runs[0]), medians(&runs[1]));
        println!(
            "{:<6} | {:>10.0} {:>8.0} {:>8.0} {:>7.2} | {:>10.0} {:>8.0} {:>8.0} {:>7.2} | {:>5.2}x {:>5.2}x {:>5.2}x {:>5.2}x",
            conns,
            n.rps,
            n.p50_us,
            n.p99_us,
            n.cpu_us_per_req,
            c.rps,
            c.p50_us,
            c.p99_us,
            c.cpu_us_per_req,
            c.rps / n.rps,
            c.p50_us / n.p50_us,
            c.p99_us / n.p99_us,
            c.cpu_us_per_req / n.cpu_us_per_req
        );
        let per_round: Vec<String> = runs[1]
            .iter()
            .zip(&runs[0])
            .map(|(c, n)| format!("{:.2}", c.cpu_us_per_req / n.cpu_us_per_req))
            .collect();
        println!("       cpu ratio per round: {}", per_round.join(" "));
        let at = format!("{conns} conn");
        for (name, r) in [("nginx", n), ("cachesync", c)] {
            cpu_report.add(name, &at, r.cpu_us_per_req);
            lat_report.add(name, &format!("{at} p50"), r.p50_us);
            lat_report.add(name, &format!("{at} p99"), r.p99_us);
        }
    }
    cpu_report.write();
    lat_report.write();
}
