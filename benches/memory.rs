//! Memory per cached entry, beside `redis-server` holding the same keys and values (issue 19).
//!
//! **Side by side.** Three servers run as their own processes in the same run: `redis-server`
//! (no persistence), and the release `cachesync` twice — one in-memory keyspace with the cache
//! store (moka, the default) and one with `store = "compact"` — each sized to hold every entry,
//! RESP on a free port. Each is filled over RESP with the same N keys (16 bytes,
//! `key:000000000000`) and values (deterministic bytes), in pipelined batches; then the growth of
//! its resident set (`VmRSS`) is divided by N, less the key and value bytes: the overhead per
//! entry. For Redis its own `used_memory` growth is shown too, and for cachesync the weighed
//! size it reports (`cachesync_cache_weighted_size_bytes`), whose growth per entry should match
//! its RSS growth (that is what a `max_bytes` bound counts). Two value sizes (~100 B and 1 KiB).
//!
//! **Where the bytes go.** Then the same N entries are built in this process (with the
//! sidecar's allocator, mimalloc), one layer at a time, each layer in a fresh child process so
//! freed memory is not reused: the key and value as two plain allocations (the allocator's own
//! rounding), then as the cache store's `Arc<str>` key and `Arc<Entry>` (the entry struct), then
//! inside the cache store (moka's bookkeeping), and the compact store.
//!
//! Run: `cargo bench --bench memory` (`ENTRIES=n` to change N, default 1,000,000). Nothing here
//! asserts a size.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachesync::cache::{Capacity, Entry, L1, StoreKind};
use cachesync::lsn::Lsn;
use cachesync_testkit::redis::RedisServer;
use cachesync_testkit::rss_bytes;
use cachesync_testkit::sidecar::Sidecar;
use common::{BlockingHttp, get_request};

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY_LEN: usize = 16;
const BATCH: usize = 1_000;
const SIZES: [usize; 2] = [100, 1024];

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

/// The sidecar's weighed size of keyspace `default`, from its metrics.
fn weighted(sidecar: &Sidecar) -> u64 {
    let (status, body) = BlockingHttp::connect(sidecar.addr).fetch(&get_request("/metrics"));
    assert_eq!(status, 200, "GET /metrics");
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with("cachesync_cache_weighted_size_bytes{") && l.contains("keyspace=\"default\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("cachesync_cache_weighted_size_bytes for keyspace default") as u64
}

struct Measured {
    rss: f64,
    weighed: f64,
    fill: Duration,
}

/// One sidecar with the given store, filled with N entries.
async fn sidecar_run(store: &str, n: usize, size: usize) -> Measured {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[keyspace]]\nname = \"default\"\nstore = \"{store}\"\nmax_entries = {}\nttl = \"24h\"\n[resp]\nlisten = \"127.0.0.1:0\"\n",
        n * 2
    );
    let sidecar = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), Some(&config));
    let port = sidecar.resp.expect("RESP is on").port();
    let (r0, w0) = (rss_bytes(sidecar.pid()), weighted(&sidecar));
    let took = fill(port, n, size).await;
    // Let the cache store's pending bookkeeping settle before reading the size.
    assert_eq!(dbsize(port).await, n as u64, "cachesync ({store}) holds every entry");
    let (r1, w1) = (rss_bytes(sidecar.pid()), weighted(&sidecar));
    Measured {
        rss: overhead(r1.saturating_sub(r0), n, size),
        weighed: overhead(w1.saturating_sub(w0), n, size),
        fill: took,
    }
}

/// Builds N entries of one layer in this process and prints the RSS growth per entry beyond
/// key + value (run in a child process: see `main`).
fn layer(name: &str, n: usize, size: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keys: Vec<String> = (0..n).map(key).collect();
    let values: Vec<Vec<u8>> = (0..n).map(|i| value(i, size)).collect();
    let me = std::process::id();
    let before = rss_bytes(me);
    let held: Box<dyn std::any::Any> = match name {
        "plain" => Box::new(
            keys.iter()
                .zip(&values)
                .map(|(k, v)| (k.clone().into_boxed_str(), v.clone().into_boxed_slice()))
                .collect::<Vec<_>>(),
        ),
        "entry" => Box::new(
            keys.iter()
                .zip(&values)
                .map(|(k, v)| {
                    let k: Arc<str> = k.as_str().into();
                    (k, Arc::new(Entry::new(Some(Bytes::from(v.clone())), Lsn(0), 1)))
                })
                .collect::<Vec<_>>(),
        ),
        "cache" | "compact" => {
            let kind = if name == "cache" {
                StoreKind::Cache
            } else {
                StoreKind::Compact
            };
            let l1 = L1::with_store(
                kind,
                Capacity::Entries(2 * n as u64),
                Duration::from_secs(86_400),
                Duration::from_secs(5),
            );
            rt.block_on(async {
                for (k, v) in keys.iter().zip(&values) {
                    l1.put(k.as_str().into(), Entry::new(Some(Bytes::from(v.clone())), Lsn(0), 1))
                        .await;
                }
                l1.sync().await;
            });
            Box::new(l1)
        }
        other => panic!("unknown layer {other}"),
    };
    let grown = rss_bytes(me).saturating_sub(before);
    // The key and value sources are still held, so only the layer's own allocations count;
    // the "plain" and "entry" layers' outer Vec (24–32 B per entry) is subtracted.
    let outer = match name {
        "plain" => 32,
        "entry" => 24,
        _ => 0,
    };
    println!("{:.0}", overhead(grown, n, size) - outer as f64);
    drop(held);
}

fn child_layer(name: &str, n: usize, size: usize) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["--layer", name, &n.to_string(), &size.to_string()])
        .output()
        .expect("run a layer");
    assert!(
        out.status.success(),
        "layer {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .and_then(|l| l.parse().ok())
        .expect("a layer prints its bytes per entry")
}

fn main() {
    // The binary's memory settings for the layers built in this process (`cli::main`).
    cachesync::cli::without_huge_pages();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--layer") {
        let n = args[i + 2].parse().expect("n");
        let size = args[i + 3].parse().expect("size");
        layer(&args[i + 1], n, size);
        return;
    }
    let n: usize = common::env_or("ENTRIES", 1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("{n} entries per run: {KEY_LEN}-byte keys; RSS growth per entry beyond key + value\n");
    println!(
        "{:>7} | {:>10} {:>12} | {:>10} {:>9} {:>7} | {:>10} {:>9} {:>7} | {:>8} {:>9}",
        "value",
        "redis RSS",
        "used_memory",
        "cache RSS",
        "weighed",
        "fill s",
        "compact",
        "weighed",
        "fill s",
        "cache ×",
        "compact ×"
    );
    let mut report =
        common::report::Report::new("memory", "resident bytes per entry beyond key + value", "bytes/entry");
    for size in SIZES {
        let (r_e, u_e, r_fill) = rt.block_on(async {
            let redis = RedisServer::start();
            let pid = redis.pid();
            let (r0, u0) = (rss_bytes(pid), redis.info_number("memory", "used_memory"));
            let took = fill(redis.port, n, size).await;
            let (r1, u1) = (rss_bytes(pid), redis.info_number("memory", "used_memory"));
            assert_eq!(dbsize(redis.port).await, n as u64, "redis holds every entry");
            redis.stop();
            (
                overhead(r1.saturating_sub(r0), n, size),
                overhead(u1.saturating_sub(u0), n, size),
                took,
            )
        });
        let cache = rt.block_on(sidecar_run("cache", n, size));
        let compact = rt.block_on(sidecar_run("compact", n, size));
        println!(
            "{:>5} B | {:>8.0} B {:>10.0} B | {:>8.0} B {:>7.0} B {:>7.2} | {:>8.0} B {:>7.0} B {:>7.2} | {:>8.2} {:>9.2}   (redis fill {:.2} s)",
            size,
            r_e,
            u_e,
            cache.rss,
            cache.weighed,
            cache.fill.as_secs_f64(),
            compact.rss,
            compact.weighed,
            compact.fill.as_secs_f64(),
            cache.rss / r_e,
            compact.rss / r_e,
            r_fill.as_secs_f64(),
        );
        let at = format!("{size} B values");
        report.add("redis-server", &at, r_e);
        report.add("cachesync cache store", &at, cache.rss);
        report.add("cachesync compact store", &at, compact.rss);
    }
    report.write();
    println!("\n× is cachesync's RSS overhead per entry over Redis's (below 1 favours cachesync).");
    println!("\nWhere the bytes go (this process, mimalloc; bytes per entry beyond key + value):");
    println!(
        "{:>7} | {:>12} {:>14} {:>12} {:>14}",
        "value", "plain allocs", "Arc + Entry", "cache store", "compact store"
    );
    for size in SIZES {
        let [plain, entry, cache, compact] = ["plain", "entry", "cache", "compact"].map(|l| child_layer(l, n, size));
        println!("{size:>5} B | {plain:>10.0} B {entry:>12.0} B {cache:>10.0} B {compact:>12.0} B");
    }
    println!(
        "\nsize_of::<Entry>() = {} B; a compact record's fixed part = {} B (+ {} B of table per entry)",
        std::mem::size_of::<Entry>(),
        cachesync::cache::compact::RECORD_FIXED_BYTES,
        cachesync::cache::compact::SLOT_BYTES
    );
}
