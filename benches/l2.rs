//! The Redis tier (L2), on one 2-core machine: real Postgres, real `redis-server`, sidecars in
//! this process.
//!
//! - **L2-hit GET.** A keyspace with `ttl = "1ms"` (so every read misses L1 and is answered from
//!   L2) read over one keep-alive HTTP connection, beside a direct `GET` of the same records
//!   from the same client process over one Redis connection; interleaved rounds, all samples.
//! - **Write cost.** A write-through `PUT` on a node with the tier (acknowledged once the change
//!   is in Redis and announced) beside the same `PUT` on a node without it.
//! - **Cross-node staleness window.** `b` holds the key in L1; `a` writes it; the time from
//!   `a`'s acknowledgement until a read on `b` (polling back to back) returns the new value.
//! - **Postgres queries saved.** Eight sidecars warm the same keys at once (each reads all of
//!   them in its own order), with and without the tier; the loads Postgres answered
//!   (`cachesync_source_loads_total`, summed).
//! - **Memory in Redis.** Bytes per entry of the tier's records (20-byte version header + the
//!   document) beside a plain `SET` of the same JSON: `MEMORY USAGE` averaged, and
//!   `used_memory` growth per entry.
//!
//! Run: `cargo bench --bench l2`. Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use cachesync::config::Config;
use cachesync::server::Server;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use cachesync_testkit::redis::RedisServer;
use common::{Lat, RawHttp, get_request};

const KEYS: usize = 2_000;
const ROUNDS: usize = 5;
const PER_ROUND: usize = 2_000;
const WINDOWS: usize = 300;
const PODS: usize = 8;
const WARM_KEYS: usize = 500;
const MEMORY_ENTRIES: usize = 50_000;

fn main() {
    common::block_on(run());
}

fn config(db_url: &str, node: &str, redis: Option<&str>, ttl: &str) -> Config {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"{node}\"\n[postgres]\nurl = \"{db_url}\"\npool_size = 4\n\
         [[keyspace]]\nname = \"users\"\ntable = \"public.users\"\nkey = \"id\"\nwrite = \"through\"\nttl = \"{ttl}\"\n"
    );
    if let Some(url) = redis {
        text.push_str(&format!("l2 = true\n[redis]\nurl = \"{url}\"\n"));
    }
    Config::parse(&text).expect("bench config")
}

async fn start(config: Config) -> Server {
    let s = Server::start(config).await.expect("server starts");
    s.wait_ready(Duration::from_secs(30)).await.expect("ready");
    if let Some(t) = s.keyspace("users").and_then(|k| k.l2().cloned()) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !t.connected() {
            assert!(Instant::now() < deadline, "the invalidation channel connects");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    s
}

fn put_request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn run() {
    let pg = PgServer::start(PgOptions::default());
    let redis = RedisServer::start();
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    sql.batch_execute(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, plan text, created timestamptz);
         INSERT INTO users SELECT g, 'user-' || g, 'user' || g || '@example.com', 'pro', '2026-01-01'::timestamptz
         FROM generate_series(1, {KEYS}) g;"
    ))
    .await
    .expect("table");
    println!(
        "# Redis tier (L2) on this machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    l2_hits(&db.url, &redis).await;
    writes_and_staleness(&db.url, &redis).await;
    queries_saved(&db.url, &redis).await;
    memory(&redis).await;
}

/// Every read an L2 hit, beside direct GETs of the same records.
async fn l2_hits(db_url: &str, redis: &RedisServer) {
    redis.flush();
    let s = start(config(db_url, "hits", Some(&redis.url()), "1ms")).await;
    let addr = s.local_addr();
    let mut http = RawHttp::connect(addr).await;
    for k in 1..=KEYS {
        let (status, _) = http.roundtrip(&get_request(&format!("/v1/kv/users/{k}"))).await;
        assert_eq!(status, 200);
    }
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    // Fills reach Redis off the read path: wait until every key is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.expect("DBSIZE");
        if n >= KEYS {
            break;
        }
        assert!(Instant::now() < deadline, "fills reach Redis ({n} keys)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let l2_before = common::metric_sum(addr, "cachesync_cache_hits_total{keyspace=\"users\",tier=\"l2\"}").await;
    let mut sidecar = Lat::new();
    let mut direct = Lat::new();
    let (mut t_side, mut t_direct) = (Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        let started = Instant::now();
        for i in 0..PER_ROUND {
            let k = 1 + (i * 7 + round) % KEYS;
            let req = get_request(&format!("/v1/kv/users/{k}"));
            let t = Instant::now();
            let (status, _) = http.roundtrip(&req).await;
            sidecar.record(t.elapsed());
            assert_eq!(status, 200);
        }
        t_side += started.elapsed();
        let started = Instant::now();
        for i in 0..PER_ROUND {
            let k = 1 + (i * 7 + round) % KEYS;
            let key = format!("cachesync:users:{k}");
            let t = Instant::now();
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.expect("GET");
            direct.record(t.elapsed());
            assert!(v.is_some());
        }
        t_direct += started.elapsed();
    }
    sidecar.elapsed = t_side;
    direct.elapsed = t_direct;
    let hits = common::metric_sum(addr, "cachesync_cache_hits_total{keyspace=\"users\",tier=\"l2\"}").await - l2_before;
    println!(
        "\n## L2-hit GET, 1 connection ({} reads each, {ROUNDS} interleaved rounds; {hits} counted as L2 hits)",
        ROUNDS * PER_ROUND
    );
    println!("{}", sidecar.line("sidecar GET (L1 miss, L2 hit) over HTTP"));
    println!("{}", direct.line("direct Redis GET of the same record"));
    println!("{}", common::ratio_line("sidecar / direct", &sidecar, &direct));
    let mut report = common::report::Report::new(
        "l2_read",
        "L1 miss served from the Redis tier vs a direct Redis GET",
        "µs",
    );
    report.add_latency("sidecar GET (L2 hit)", "1 conn", &sidecar);
    report.add_latency("direct Redis GET", "1 conn", &direct);
    report.write();
    s.shutdown().await;
}

/// Write latency with and without the tier, and the cross-node staleness window.
async fn writes_and_staleness(db_url: &str, redis: &RedisServer) {
    let a = start(config(db_url, "a", Some(&redis.url()), "5m")).await;
    let b = start(config(db_url, "b", Some(&redis.url()), "5m")).await;
    let plain = start(config(db_url, "plain", None, "5m")).await;
    let mut ha = RawHttp::connect(a.local_addr()).await;
    let mut hb = RawHttp::connect(b.local_addr()).await;
    let mut hp = RawHttp::connect(plain.local_addr()).await;
    let mut with_l2 = Lat::new();
    let mut without = Lat::new();
    let mut window = Lat::new();
    let mut polls = 0u64;
    for i in 0..WINDOWS {
        let k = 1 + i % 50;
        let path = format!("/v1/kv/users/{k}");
        let (status, _) = hb.roundtrip(&get_request(&path)).await;
        assert_eq!(status, 200);
        let name = format!("w{i}");
        let body = format!(r#"{{"id":{k},"name":"{name}"}}"#);
        let t = Instant::now();
        let (status, _) = ha.roundtrip(&put_request(&path, &body)).await;
        let acked = Instant::now();
        with_l2.record(acked - t);
        assert_eq!(status, 200);
        loop {
            polls += 1;
            let (_, got) = hb.fetch(&get_request(&path)).await;
            if String::from_utf8_lossy(&got).contains(&format!("\"{name}\"")) {
                window.record(acked.elapsed());
                break;
            }
            assert!(acked.elapsed() < Duration::from_secs(10), "b never saw {name}");
        }
        let t = Instant::now();
        let (status, _) = hp
            .roundtrip(&put_request(
                &format!("/v1/kv/users/{}", 1000 + k),
                &body.replace(&format!("\"id\":{k}"), &format!("\"id\":{}", 1000 + k)),
            ))
            .await;
        without.record(t.elapsed());
        assert_eq!(status, 200);
    }
    println!("\n## Write-through PUT, 1 connection ({WINDOWS} each, interleaved)");
    println!("{}", with_l2.line("PUT with the tier (acked once announced)"));
    println!("{}", without.line("PUT without the tier"));
    println!("{}", common::ratio_line("with / without", &with_l2, &without));
    let mut report = common::report::Report::new("l2_write", "write-through PUT with and without the Redis tier", "µs");
    report.add_latency("PUT with the tier", "1 conn", &with_l2);
    report.add_latency("PUT without", "1 conn", &without);
    report.write();
    println!("\n## Cross-node staleness window: a's ack → b returns the write ({WINDOWS} writes, {polls} polls of b)");
    println!("{}", window.line("ack on a → new value read on b"));
    for s in [a, b, plain] {
        s.shutdown().await;
    }
}

/// Eight sidecars warming the same keys at once, with and without the tier.
async fn queries_saved(db_url: &str, redis: &RedisServer) {
    println!("\n## Postgres loads, {PODS} sidecars each reading the same {WARM_KEYS} keys at once");
    for (with, same_order) in [(false, false), (true, false), (false, true), (true, true)] {
        redis.flush();
        let mut pods = Vec::new();
        for p in 0..PODS {
            let url = redis.url();
            pods.push(start(config(db_url, &format!("pod{p}"), with.then_some(url.as_str()), "5m")).await);
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (p, pod) in pods.iter().enumerate() {
            let addr = pod.local_addr();
            tasks.push(tokio::spawn(async move {
                let mut http = RawHttp::connect(addr).await;
                for i in 0..WARM_KEYS {
                    // A different order per pod (a permutation: 7 is prime to 500), or all
                    // pods the same (a stampede: every pod misses each key at the same moment).
                    let k = if same_order {
                        1 + i
                    } else {
                        1 + (i * 7 + p * 61) % WARM_KEYS
                    };
                    let (status, _) = http.roundtrip(&get_request(&format!("/v1/kv/users/{k}"))).await;
                    assert_eq!(status, 200);
                }
            }));
        }
        for t in tasks {
            t.await.expect("warm task");
        }
        let took = started.elapsed();
        let (mut loads, mut l2_hits) = (0.0, 0.0);
        for pod in &pods {
            loads += common::metric_sum(pod.local_addr(), "cachesync_source_loads_total").await;
            l2_hits += common::metric_sum(
                pod.local_addr(),
                "cachesync_cache_hits_total{keyspace=\"users\",tier=\"l2\"}",
            )
            .await;
        }
        let reads = (PODS * WARM_KEYS) as f64;
        println!(
            "{:<16} {:<18} reads={reads:<6} postgres loads={loads:<6} l2 hits={l2_hits:<6} loads/read={:.3}  ({:.0} ms)",
            if with { "with the tier" } else { "without the tier" },
            if same_order { "same order" } else { "own order each" },
            loads / reads,
            took.as_secs_f64() * 1000.0
        );
        for pod in pods {
            pod.shutdown().await;
        }
    }
}

/// Bytes per entry in Redis: the tier's records beside plain JSON of the same documents, each
/// set in a database of its own (so neither pays for the other's table growth).
async fn memory(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut c = client.get_multiplexed_async_connection().await.expect("connect");
    // The records the runs above left (every key was loaded or written at least once).
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cachesync:users:*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    let mut records = Vec::new();
    for k in &keys {
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(k).query_async(&mut c).await.expect("GET");
        if let Some(v) = v.filter(|v| v.first() == Some(&b'V')) {
            records.push((k.clone(), v));
        }
    }
    // Enough entries that the table's growth steps even out: the documents cycled under
    // distinct keys of the same shape.
    let records: Vec<(String, Vec<u8>)> = (0..MEMORY_ENTRIES)
        .map(|i| {
            (
                format!("cachesync:users:{}", 100_000 + i),
                records[i % records.len()].1.clone(),
            )
        })
        .collect();
    let n = records.len();
    let doc = |r: &[u8]| {
        cachesync::l2::record::Record::decode(r)
            .and_then(|r| r.value)
            .map(|v| v.to_vec())
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    // The first set written pays for allocator and table warm-up: a discarded pass goes first.
    for (label, db, header) in [
        ("warm-up", 3, false),
        ("plain SET of the JSON", 1, false),
        ("cachesync L2 record", 2, true),
    ] {
        let client = redis::Client::open(format!("{}{db}", redis.url())).expect("url");
        let mut c = client.get_multiplexed_async_connection().await.expect("connect");
        let before = redis.info_number("memory", "used_memory") as f64;
        let mut usage = 0.0;
        for chunk in records.chunks(1000) {
            let mut pipe = redis::pipe();
            for (key, r) in chunk {
                let value = if header { r.clone() } else { doc(r) };
                pipe.cmd("SET").arg(key).arg(value).ignore();
                pipe.cmd("MEMORY").arg("USAGE").arg(key);
            }
            let u: Vec<Option<u64>> = pipe.query_async(&mut c).await.expect("SET + MEMORY USAGE");
            usage += u.into_iter().map(|u| u.unwrap_or(0) as f64).sum::<f64>();
        }
        let after = redis.info_number("memory", "used_memory") as f64;
        if label != "warm-up" {
            rows.push((label, usage / n as f64, (after - before) / n as f64));
        }
    }
    let doc_len = records.iter().map(|(_, r)| doc(r).len()).sum::<usize>() as f64 / n as f64;
    let key_len = records.iter().map(|(k, _)| k.len()).sum::<usize>() as f64 / n as f64;
    println!(
        "\n## Memory in Redis per entry ({n} documents of {doc_len:.0} bytes on average, keys of {key_len:.0} bytes)"
    );
    for (label, usage, growth) in &rows {
        println!("{label:<26} MEMORY USAGE={usage:>6.1} B   used_memory growth={growth:>6.1} B");
    }
    println!(
        "{:<26} MEMORY USAGE {:>5.2}x   used_memory growth {:>5.2}x",
        "record / plain",
        rows[1].1 / rows[0].1,
        rows[1].2 / rows[0].2
    );
}
