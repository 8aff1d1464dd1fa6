//! The RESP front against a real `redis-server`, measured by the tool both are measured with:
//! `redis-benchmark`, GET and SET of 100-byte values over 100,000 random keys, 50 connections,
//! without pipelining (`-P 1`) and 16 commands deep (`-P 16`).
//!
//! Both servers run as their own processes beside each other in the same run: the release
//! `cachesync` binary with no config (the embedded in-memory default, RESP on a free port) and
//! `redis-server` (no persistence). Each case runs in interleaved rounds (the order alternates
//! per round) and reports the medians over rounds of requests/s, p50 and p99 as
//! redis-benchmark prints them (`--csv`), and the server's CPU time per request read from
//! `/proc` (steadier than tails on a shared 2-core machine, where the benchmark client takes a
//! core of its own), then the ratios cachesync / redis.
//!
//! Run: `cargo bench --bench resp` (`ROUNDS=n` to change the rounds). Nothing here asserts a time.
//! Figures: `target/bench-results/resp{,_cpu}.{csv,png}`.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cachesync_testkit::redis::RedisServer;
use cachesync_testkit::sidecar::Sidecar;

/// Keys the benchmark spreads over (`-r`), and the value size (`-d`).
const KEYSPACE: &str = "100000";
const VALUE: &str = "100";
const CLIENTS: &str = "50";

/// One run's figures, as redis-benchmark prints them, plus the server's CPU.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
}

fn redis_benchmark() -> PathBuf {
    cachesync_testkit::find_program(
        "redis-benchmark",
        "CACHESYNC_REDIS_BENCHMARK",
        &[PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")],
    )
    .expect("redis-benchmark was not found: apt-get install -y redis-tools (or deploy/dev/install-deps.sh)")
}

/// Runs redis-benchmark once against `port` and reads its CSV line.
fn bench(tool: &Path, port: u16, pid: u32, test: &str, pipeline: &str, requests: &str) -> Run {
    let before = common::cpu_seconds(pid);
    let out = Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", test, "-n", requests])
        .args(["-c", CLIENTS, "-P", pipeline, "-d", VALUE, "-r", KEYSPACE, "--csv"])
        .output()
        .expect("run redis-benchmark");
    let cpu = common::cpu_seconds(pid) - before;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "redis-benchmark failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("\"{}\"", test.to_uppercase())))
        .unwrap_or_else(|| panic!("no CSV line for {test}: {text}"));
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|v| v.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    let n: f64 = requests.parse().unwrap();
    Run {
        rps: f[0],
        p50_ms: f[3],
        p99_ms: f[5],
        cpu_us_per_req: cpu * 1e6 / n,
    }
}

fn medians(runs: &[Run]) -> Run {
    Run {
        rps: common::median(runs.iter().map(|r| r.rps).collect()),
        p50_ms: common::median(runs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: common::median(runs.iter().map(|r| r.p99_ms).collect()),
        cpu_us_per_req: common::median(runs.iter().map(|r| r.cpu_us_per_req).collect()),
    }
}

fn main() {
    let rounds: usize = common::env_or("ROUNDS", 5);
    let tool = redis_benchmark();
    let redis = RedisServer::start();
    let redis_pid = redis.pid();
    let sidecar = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), None);
    let cs_port = sidecar.resp.expect("the embedded default serves RESP").port();
    let targets = [("redis", redis.port, redis_pid), ("cachesync", cs_port, sidecar.pid())];
    // Fill both so GETs hit (every key of the range, written once over).
    for (_, port, pid) in targets {
        bench(&tool, port, pid, "set", "16", "400000");
    }
    println!(
        "redis-benchmark -c {CLIENTS} -d {VALUE} -r {KEYSPACE}; medians of {rounds} interleaved rounds; cpu = server CPU per request\n"
    );
    println!(
        "{:<10} {:>3} | {:>11} {:>8} {:>8} {:>8} | {:>11} {:>8} {:>8} {:>8} | {:>6} {:>6} {:>6} {:>6}",
        "case",
        "-P",
        "redis rps",
        "p50 ms",
        "p99 ms",
        "cpu µs",
        "cs rps",
        "p50 ms",
        "p99 ms",
        "cpu µs",
        "rps ×",
        "p50 ×",
        "p99 ×",
        "cpu ×"
    );
    let mut report = common::report::Report::new(
        "resp",
        "RESP requests/s (redis-benchmark, medians of interleaved rounds)",
        "requests/s",
    );
    let mut cpu = common::report::Report::new("resp_cpu", "server CPU µs per request", "CPU µs");
    for (test, pipeline, requests) in [
        ("get", "1", "100000"),
        ("set", "1", "100000"),
        ("get", "16", "1000000"),
        ("set", "16", "1000000"),
    ] {
        let (mut r, mut c) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let order: Vec<usize> = if round % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
            for i in order {
                let (_, port, pid) = targets[i];
                let run = bench(&tool, port, pid, test, pipeline, requests);
                if i == 0 { r.push(run) } else { c.push(run) }
            }
        }
        let (r, c) = (medians(&r), medians(&c));
        let at = format!("{} -P{pipeline}", test.to_uppercase());
        report.add("redis-server", &at, r.rps);
        report.add("cachesync", &at, c.rps);
        cpu.add("redis-server", &at, r.cpu_us_per_req);
        cpu.add("cachesync", &at, c.cpu_us_per_req);
        println!(
            "{:<10} {:>3} | {:>11.0} {:>8.3} {:>8.3} {:>8.2} | {:>11.0} {:>8.3} {:>8.3} {:>8.2} | {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            test.to_uppercase(),
            pipeline,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us_per_req,
            c.rps,
            c.p50_ms,
            c.p99_ms,
            c.cpu_us_per_req,
            c.rps / r.rps,
            c.p50_ms / r.p50_ms,
            c.p99_ms / r.p99_ms,
            c.cpu_us_per_req / r.cpu_us_per_req,
        );
    }
    println!("\nrps × above 1 and p50/p99/cpu × below 1 favour cachesync.");
    report.write();
    cpu.write();
}
