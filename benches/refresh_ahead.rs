//! Refresh-ahead on versus off, in the same run, on the same table and workload.
//!
//! A hot set of keys with a short TTL is read by closed-loop keep-alive HTTP clients, each
//! picking keys uniformly at random. With refresh-ahead off, every TTL expiry of a key puts one
//! reader on Postgres; with `refresh_ahead = 0.5` the key is reloaded in the background when read
//! in the second half of its life. Printed per mode: GET p50/p99/p999/max, reads/s, the reads
//! that waited for a load (`X-Cache: miss`), Postgres loads in total and refreshes; then the
//! ratios on/off. The modes take turns (off, on, on, off) and each figure is over both of a mode's rounds.
//!
//! Run: `cargo bench --bench refresh_ahead` (starts its own throwaway Postgres);
//! `CACHESYNC_BENCH_FACTOR=0.8 cargo bench --bench refresh_ahead` measures another factor. A
//! factor f reloads each hot key about once per f × ttl, so Postgres sees about 1/f times the
//! loads of plain expiry. Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use cachesync::config::Config;
use cachesync::server::Server;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use common::{Lat, RawHttp, get_request};

const HOT_KEYS: usize = 1000;
const TTL: &str = "1s";
/// The refresh-ahead factor of the "on" keyspace; `CACHESYNC_BENCH_FACTOR` overrides it.
const DEFAULT_FACTOR: f64 = 0.5;
const READERS: usize = 8;
const ROUND: Duration = Duration::from_secs(8);

fn main() {
    common::block_on(run());
}

/// What one mode measured.
struct Outcome {
    lat: Lat,
    misses: u64,
    max_us: f64,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            lat: Lat::new(),
            misses: 0,
            max_us: 0.0,
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.lat.merge(&other.lat);
        self.misses += other.misses;
        self.max_us = self.max_us.max(other.max_us);
    }
}

/// READERS clients read random hot keys of `keyspace` for ROUND.
async fn readers(addr: std::net::SocketAddr, keyspace: &str) -> Outcome {
    let requests: Vec<Vec<u8>> = (1..=HOT_KEYS)
        .map(|k| get_request(&format!("/v1/kv/{keyspace}/{k}")))
        .collect();
    let requests = std::sync::Arc::new(requests);
    let started = Instant::now();
    let tasks: Vec<_> = (0..READERS)
        .map(|_| {
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut http = RawHttp::connect(addr).await;
                let mut out = Outcome::new();
                while started.elapsed() < ROUND {
                    let req = &requests[rand::random_range(0..HOT_KEYS)];
                    let t = Instant::now();
                    let (status, _) = http.roundtrip(req).await;
                    let took = t.elapsed();
                    assert_eq!(status, 200);
                    out.lat.record(took);
                    out.max_us = out.max_us.max(took.as_secs_f64() * 1e6);
                    if http.header("x-cache") == Some("miss") {
                        out.misses += 1;
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Outcome::new();
    for t in tasks {
        all.merge(t.await.expect("reader"));
    }
    all.lat.elapsed = started.elapsed();
    all
}

async fn run() {
    let factor: f64 = std::env::var("CACHESYNC_BENCH_FACTOR")
        .ok()
        .map(|f| f.parse().expect("CACHESYNC_BENCH_FACTOR must be a number in (0, 1)"))
        .unwrap_or(DEFAULT_FACTOR);
    println!(
        "cachesync refresh_ahead bench: {HOT_KEYS} hot keys, ttl {TTL}, {READERS} closed-loop readers, \
         {} s rounds off, on, on, off, one 2-core machine",
        ROUND.as_secs()
    );
    let pg = PgServer::start(PgOptions::default());
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    sql.batch_execute(&format!(
        "CREATE TABLE hot (id int PRIMARY KEY, name text NOT NULL, score numeric, tags text[]); \
         INSERT INTO hot SELECT g, 'name ' || g, g * 1.5, ARRAY['a', 'b'] FROM generate_series(1, {HOT_KEYS}) g;"
    ))
    .await
    .expect("schema");
    let config = Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{}\"\n\
         [[keyspace]]\nname = \"off\"\ntable = \"hot\"\nkey = \"id\"\nttl = \"{TTL}\"\n\
         [[keyspace]]\nname = \"on\"\ntable = \"hot\"\nkey = \"id\"\nttl = \"{TTL}\"\nrefresh_ahead = {factor}\n",
        db.url
    ))
    .expect("config");
    let server = Server::start(config).await.expect("start");
    server.wait_ready(Duration::from_secs(30)).await.expect("ready");
    let addr = server.local_addr();

    let mut results = [Outcome::new(), Outcome::new()];
    let mut elapsed = [Duration::ZERO; 2];
    for round in 0..4 {
        // off, on, on, off: a drift over the run (a warming Postgres, a growing heap) falls on
        // both modes alike.
        let (i, ks) = if round == 0 || round == 3 {
            (0, "off")
        } else {
            (1, "on")
        };
        // Every key cached before the round (not measured), as in a running service.
        let mut http = RawHttp::connect(addr).await;
        for k in 1..=HOT_KEYS {
            http.roundtrip(&get_request(&format!("/v1/kv/{ks}/{k}"))).await;
        }
        let r = readers(addr, ks).await;
        elapsed[i] += r.lat.elapsed;
        results[i].merge(r);
    }
    println!(
        "\n{:<16} {:>9} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "refresh-ahead",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "max µs",
        "reads/s",
        "misses",
        "PG loads",
        "refreshes",
        "failed"
    );
    for (i, ks) in ["off", "on"].iter().enumerate() {
        let r = &results[i];
        let loads = common::metric_sum(addr, &format!("cachesync_source_loads_total{{keyspace=\"{ks}\"")).await;
        let refreshes = common::metric_sum(addr, &format!("cachesync_refresh_started_total{{keyspace=\"{ks}\"")).await;
        let failed = common::metric_sum(
            addr,
            &format!("cachesync_refresh_completed_total{{keyspace=\"{ks}\",result=\"failed\""),
        )
        .await;
        println!(
            "{:<16} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>9.0} {:>10} {:>10} {:>10} {:>10}",
            if *ks == "on" {
                format!("on ({factor})")
            } else {
                "off".to_string()
            },
            r.lat.p(0.5),
            r.lat.p(0.99),
            r.lat.p(0.999),
            r.max_us,
            r.lat.h.len() as f64 / elapsed[i].as_secs_f64(),
            r.misses,
            loads as u64,
            refreshes as u64,
            failed as u64
        );
    }
    let (off, on) = (&results[0].lat, &results[1].lat);
    let mut report = common::report::Report::new(
        "refresh_ahead",
        "read latency of hot keys, refresh-ahead off and on",
        "µs",
    );
    report.add_latency("refresh-ahead off", "reads", off);
    report.add_latency(&format!("refresh-ahead on ({factor})"), "reads", on);
    report.write();
    println!(
        "{:<16} {:>9.2}x {:>8.2}x {:>8.2}x   (on / off)",
        "ratio",
        on.p(0.5) / off.p(0.5),
        on.p(0.99) / off.p(0.99),
        on.p(0.999) / off.p(0.999)
    );
    println!(
        "reader-visible loads in the measured rounds: off {} (about one per key per expiry), on {}",
        results[0].misses, results[1].misses
    );
    server.shutdown().await;
}
