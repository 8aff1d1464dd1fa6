//! GET latency over HTTP, against the physical floor measured in the same run.
//!
//! 1. GET hits (in-memory keyspace) over keep-alive HTTP/1.1 with 1 and 16 connections, beside a
//!    plain TCP echo of a message the size of the request on the same loopback, same runtime;
//!    then the same hits on the two L1 stores side by side (the compact store, which in-memory
//!    keyspaces use by default, and the cache store), interleaved in three rounds.
//! 2. Read-through misses (every GET names a key not yet cached, so each one loads a row from
//!    Postgres) beside a direct prepared primary-key SELECT from the same process.
//!
//! Run: `cargo bench --bench http_latency` (starts its own throwaway Postgres). Prints p50, p99,
//! p999 and the ratios; nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use cachesync::config::Config;
use cachesync::server::Server;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use common::{Lat, echo_load, echo_server, get_request, http_load, ratio_line};

const HIT_REQUESTS: usize = 40_000;

/// A request path for connection `c`, request `i`.
type Path = fn(usize, usize) -> String;
const MISS_ROWS: usize = 10_000;

fn main() {
    common::block_on(run());
}

async fn run() {
    println!(
        "cachesync http_latency: server and client in one process, loopback, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let pg = PgServer::start(PgOptions::default());
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    sql.batch_execute(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, age int);
         INSERT INTO users SELECT g, 'user ' || g, 'u' || g || '@example.com', g % 90 FROM generate_series(1, {}) g;
         ANALYZE users;",
        MISS_ROWS * 3
    ))
    .await
    .expect("load rows");
    let config = Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{}\"\npool_size = 16\n\
         [[keyspace]]\nname = \"mem\"\n\
         [[keyspace]]\nname = \"memcache\"\nstore = \"cache\"\n\
         [[keyspace]]\nname = \"users\"\ntable = \"users\"\nkey = \"id\"\nmax_entries = 1000000\n",
        db.url
    ))
    .expect("config");
    let server = Server::start(config).await.expect("start");
    server
        .wait_ready(std::time::Duration::from_secs(30))
        .await
        .expect("ready");
    let addr = server.local_addr();
    let http = reqwest::Client::new();
    for ks in ["mem", "memcache"] {
        for i in 0..64 {
            let r = http
                .put(format!("http://{addr}/v1/kv/{ks}/k{i}"))
                .body(r#"{"id":1,"name":"ada","email":"ada@example.com","age":36}"#)
                .send()
                .await
                .expect("put");
            assert!(r.status().is_success());
        }
    }
    let echo = echo_server().await;
    let req_size = get_request("/v1/kv/mem/k1").len();

    println!("\n== GET hit vs TCP echo ({req_size}-byte messages) ==");
    let mut report =
        common::report::Report::new("http_get_hit", "GET hit latency vs a TCP echo of the same size", "µs");
    for conns in [1usize, 16] {
        let per = HIT_REQUESTS / conns;
        // Warm up both paths, then measure.
        http_load(addr, conns, 2_000 / conns, 200, |c, i| {
            format!("/v1/kv/mem/k{}", (c * 7 + i) % 64)
        })
        .await;
        echo_load(echo, conns, 2_000 / conns, req_size).await;
        let hit = http_load(addr, conns, per, 200, |c, i| {
            format!("/v1/kv/mem/k{}", (c * 7 + i) % 64)
        })
        .await;
        let floor = echo_load(echo, conns, per, req_size).await;
        println!("{}", hit.line(&format!("GET hit, {conns} conn")));
        println!("{}", floor.line(&format!("TCP echo, {conns} conn")));
        report.add_latency("cachesync GET hit", &format!("{conns} conn"), &hit);
        report.add_latency("TCP echo", &format!("{conns} conn"), &floor);
        println!(
            "{}",
            ratio_line(&format!("ratio GET hit / echo, {conns} conn"), &hit, &floor)
        );
    }

    report.write();

    println!("\n== GET hit: compact store (the in-memory default) vs cache store, 3 interleaved rounds ==");
    for conns in [1usize, 16] {
        let per = HIT_REQUESTS / conns;
        let (mut compact, mut cache) = (Lat::new(), Lat::new());
        for _ in 0..3 {
            let stores: [(Path, &mut Lat); 2] = [
                (|c, i| format!("/v1/kv/mem/k{}", (c * 7 + i) % 64), &mut compact),
                (|c, i| format!("/v1/kv/memcache/k{}", (c * 7 + i) % 64), &mut cache),
            ];
            for (path, into) in stores {
                let round = http_load(addr, conns, per, 200, path).await;
                // Rounds run one after another: their times add up.
                let elapsed = into.elapsed + round.elapsed;
                into.merge(&round);
                into.elapsed = elapsed;
            }
        }
        println!("{}", compact.line(&format!("compact store, {conns} conn")));
        println!("{}", cache.line(&format!("cache store, {conns} conn")));
        println!(
            "{}   req/s {:>5.2}x",
            ratio_line(&format!("ratio compact / cache, {conns} conn"), &compact, &cache),
            cache.elapsed.as_secs_f64() / compact.elapsed.as_secs_f64()
        );
    }

    println!("\n== read-through miss vs direct SELECT by primary key (1 connection) ==");
    let stmt = sql
        .prepare("SELECT id, name, email, age FROM users WHERE id = $1")
        .await
        .expect("prepare");
    let mut direct = Lat::new();
    let started = Instant::now();
    for i in 0..MISS_ROWS {
        let id = (2 * MISS_ROWS + i + 1) as i64;
        let t = Instant::now();
        let row = sql.query_one(&stmt, &[&id]).await.expect("select");
        direct.record(t.elapsed());
        assert_eq!(row.get::<_, i64>(0), id);
    }
    direct.elapsed = started.elapsed();
    // Each GET names a key for the first time, so each one is a read-through load.
    let miss = http_load(addr, 1, MISS_ROWS, 200, |_, i| format!("/v1/kv/users/{}", i + 1)).await;
    let hits_after = http_load(addr, 1, MISS_ROWS, 200, |_, i| format!("/v1/kv/users/{}", i + 1)).await;
    println!("{}", miss.line("GET miss (read-through load)"));
    println!("{}", direct.line("direct prepared SELECT by id"));
    println!("{}", ratio_line("ratio miss / direct SELECT", &miss, &direct));
    println!("{}", hits_after.line("same keys again (now hits)"));
    println!("{}", ratio_line("ratio hit / direct SELECT", &hits_after, &direct));
    let mut report = common::report::Report::new(
        "http_get_miss",
        "GET miss (read-through load) vs a direct prepared SELECT",
        "µs",
    );
    report.add_latency("cachesync GET miss", "1 conn", &miss);
    report.add_latency("direct SELECT", "1 conn", &direct);
    report.add_latency("cachesync GET hit after", "1 conn", &hits_after);
    report.write();
    server.shutdown().await;
}
