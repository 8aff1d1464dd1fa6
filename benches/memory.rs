//! Memory per cached entry, beside `redis-server` holding the same keys and values (issue 19's
//! first measurement; nothing here changes how entries are stored).
//!
//! Both servers run as their own processes, started in the same run: the release `cachesync`
//! with one in-memory keyspace sized to hold every entry (RESP on a free port), and
//! `redis-server` (no persistence). Each is filled over RESP with the same N keys (16 bytes,
//! `key:000000000000`) and values (deterministic bytes), in pipelined batches; then the growth
//! of its resident set (`VmRSS`) is divided by N, less the key and value bytes: the overhead per
//! entry. For Redis its own `used_memory` growth is shown too. Two value sizes (~100 B and
//! ~1 KiB).
//!
//! Run: `cargo bench --bench memory` (`ENTRIES=n` to change N, default 1,000,000). Nothing here
//! asserts a size.

use std::path::Path;
use std::time::{Duration, Instant};

use cachesync_testkit::redis::RedisServer;
use cachesync_testkit::sidecar::Sidecar;

const KEY_LEN: usize = 16;
const BATCH: usize = 1_000;

/// A process's resident set, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

fn key(i: usize) -> String {
    format!("key:{i:012}")
}

fn value(i: usize, size: usize) -> Vec<u8> {
    (0..size).map(|j| b'a' + ((i * 31 + j * 7) % 26) as u8).collect()
}

/// Writes N entries with pipelined SETs and returns how long it took.
async fn fill(port: u16, n: usize, size: usize) -> Duration {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let started = Instant::now();
    for start in (0..n).step_by(BATCH) {
        let mut pipe = redis::pipe();
        for i in start..(start + BATCH).min(n) {
            pipe.set(key(i), value(i, size)).ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("pipelined SETs");
    }
    started.elapsed()
}

async fn dbsize(port: u16) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    redis::cmd("DBSIZE").query_async(&mut conn).await.expect("DBSIZE")
}

/// Bytes per entry beyond key + value.
fn overhead(grown: u64, n: usize, size: usize) -> f64 {
    grown as f64 / n as f64 - (KEY_LEN + size) as f64
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::var("ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!("{n} entries per run: {KEY_LEN}-byte keys; RSS growth per entry beyond key + value\n");
    println!(
        "{:>7} | {:>12} {:>14} {:>9} | {:>12} {:>9} | {:>9} {:>10}",
        "value", "redis RSS/e", "used_memory/e", "fill s", "cs RSS/e", "fill s", "RSS ×", "vs used ×"
    );
    for size in [100usize, 1024] {
        let redis = RedisServer::start();
        let redis_pid = redis.pid();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[keyspace]]\nname = \"default\"\nmax_entries = {}\nttl = \"24h\"\n[resp]\nlisten = \"127.0.0.1:0\"\n",
            n * 2
        );
        let sidecar = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), Some(&config));
        let cs_port = sidecar.resp.expect("RESP is on").port();

        let (r0, u0) = (rss(redis_pid), redis.info_number("memory", "used_memory"));
        let r_fill = fill(redis.port, n, size).await;
        let (r1, u1) = (rss(redis_pid), redis.info_number("memory", "used_memory"));
        assert_eq!(dbsize(redis.port).await, n as u64, "redis holds every entry");

        let c0 = rss(sidecar.pid());
        let c_fill = fill(cs_port, n, size).await;
        // Let moka's pending bookkeeping settle before reading the size.
        let _ = dbsize(cs_port).await;
        let c1 = rss(sidecar.pid());
        assert_eq!(dbsize(cs_port).await, n as u64, "cachesync holds every entry");

        let (r_e, u_e, c_e) = (
            overhead(r1.saturating_sub(r0), n, size),
            overhead(u1.saturating_sub(u0), n, size),
            overhead(c1.saturating_sub(c0), n, size),
        );
        println!(
            "{:>5} B | {:>10.0} B {:>12.0} B {:>9.2} | {:>10.0} B {:>9.2} | {:>9.2} {:>10.2}",
            size,
            r_e,
            u_e,
            r_fill.as_secs_f64(),
            c_e,
            c_fill.as_secs_f64(),
            c_e / r_e,
            c_e / u_e,
        );
        redis.stop();
        drop(sidecar);
    }
    println!("\nRSS × and vs used × below 1 favour cachesync (its overhead per entry beside Redis's).");
}
