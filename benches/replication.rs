//! The replicated log: one hub on a Postgres slot, edges following its log.
//!
//! In this order (freshness first, while the nodes are quiet):
//!
//! - Freshness: UPDATEs committed at 1k/s and 10k/s; for a sample, commit → a GET on the hub
//!   serves it, commit → a GET on the edge serves it, and commit → `pg_recvlogical` (its own
//!   slot, the floor any logical-decoding consumer pays) prints it. p50 and p99 of each, and the
//!   edge's cost over the hub.
//! - Shipping: events appended to the hub's log (fsync = always, batches of 1000) while an edge
//!   follows it (appending to its own log, fsync = always): the hub's append rate, and the rate
//!   at which the edge has them durable — the time from the first append to the edge's place
//!   reaching the hub's end. Three runs; the ratio (shipped / appended) is printed per run and as
//!   the median.
//! - WAL senders and slots Postgres runs for 1 hub + 8 edges.
//!
//! Run: `cargo bench --bench replication` (starts its own throwaway Postgres; logs in temp dirs).
//! Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachesync::config::Config;
use cachesync::event::{ChangeEvent, Source};
use cachesync::server::Server;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use cachesync_testkit::temp_dir;
use common::Lat;
use common::freshness::{run_rate, start_recvlogical};

const KEYS: i64 = 10_000;
const SHIP_EVENTS: usize = 200_000;
const SHIP_BATCH: usize = 1000;
const SHIP_RUNS: usize = 3;
const RUN_FOR: Duration = Duration::from_secs(5);
const EDGES: usize = 8;

fn main() {
    common::block_on(run());
}

const KEYSPACE: &str = "[[keyspace]]\nname = \"bench\"\ntable = \"bench\"\nkey = \"id\"\ncdc = \"update\"\nread_through = false\nmax_entries = 1000000\nttl = \"1h\"\n";

fn hub_config(url: &str) -> Config {
    Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"hub\"\n[postgres]\nurl = \"{url}\"\n[log]\ndir = \"{}\"\n\
         [cdc]\nslot = \"bench_hub\"\nheartbeat = \"0s\"\n[replication]\nlisten = \"127.0.0.1:0\"\n{KEYSPACE}",
        temp_dir("bench-hub-log", None).display()
    ))
    .expect("hub config")
}

fn edge_config(url: &str, name: &str, upstream: std::net::SocketAddr) -> Config {
    Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"{name}\"\n[postgres]\nurl = \"{url}\"\npool_size = 2\n[log]\ndir = \"{}\"\n\
         [cdc]\nsource = \"upstream\"\n[[upstream]]\nname = \"hub\"\nurl = \"http://{upstream}\"\n{KEYSPACE}",
        temp_dir("bench-edge-log", None).display()
    ))
    .expect("edge config")
}

async fn started(config: Config) -> Server {
    let s = Server::start(config).await.expect("start");
    s.wait_ready(Duration::from_secs(120)).await.expect("ready");
    s
}

fn row(label: &str, l: &Lat) -> String {
    common::ms_row(label, l, 40)
}

async fn run() {
    println!("cachesync replication: Postgres, a hub and its edges on one 2-core machine");
    let pg = PgServer::start(PgOptions::default());
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    sql.batch_execute(&format!(
        "CREATE TABLE bench (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO bench SELECT g, 0 FROM generate_series(0, {}) g;",
        KEYS - 1
    ))
    .await
    .expect("schema");
    let hub = started(hub_config(&db.url)).await;
    let upstream = hub.replication_addr().expect("the hub serves its log");
    let edge = started(edge_config(&db.url, "edge0", upstream)).await;

    let recv = start_recvlogical(&pg, &db.name);
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("\n== freshness: commit → served on the hub, on an edge, and commit → pg_recvlogical line ==");
    let mut seq = 1_000_000_000i64;
    let mut report = common::report::Report::new(
        "replication",
        "commit → served: hub, edge, and pg_recvlogical (the floor)",
        "µs",
    );
    for rate in [1000.0, 10_000.0] {
        let targets = [hub.local_addr(), edge.local_addr()];
        let (ours, theirs, achieved) = run_rate(&db.url, &targets, &recv, rate, seq, KEYS, RUN_FOR).await;
        seq += 100_000_000;
        println!("-- {rate:.0} updates/s target, {achieved:.0}/s achieved");
        println!("{}", row("hub: commit → GET serves it", &ours[0]));
        println!("{}", row("edge: commit → GET serves it", &ours[1]));
        println!("{}", row("pg_recvlogical: commit → line read", &theirs));
        let at = format!("{rate:.0}/s");
        report.add_latency("hub", &at, &ours[0]);
        report.add_latency("edge", &at, &ours[1]);
        report.add_latency("pg_recvlogical", &at, &theirs);
        println!(
            "{:<40} p50 {:+.2}ms   p99 {:+.2}ms",
            "edge − hub (the hop)",
            (ours[1].p(0.5) - ours[0].p(0.5)) / 1000.0,
            (ours[1].p(0.99) - ours[0].p(0.99)) / 1000.0
        );
        println!(
            "{:<40} p50 {:+.2}ms   p99 {:+.2}ms",
            "edge − pg_recvlogical (the floor)",
            (ours[1].p(0.5) - theirs.p(0.5)) / 1000.0,
            (ours[1].p(0.99) - theirs.p(0.99)) / 1000.0
        );
    }
    drop(recv);
    report.write();

    shipping(&hub, &edge).await;

    println!("\n== WAL senders for 1 hub + {EDGES} edges ==");
    let mut more = Vec::new();
    for i in 1..EDGES {
        more.push(started(edge_config(&db.url, &format!("edge{i}"), upstream)).await);
    }
    let senders: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE s.database = current_database() AND s.slot_name <> 'bench_recvlogical'",
            &[],
        )
        .await
        .expect("senders")
        .get(0);
    let slots: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND slot_name <> 'bench_recvlogical'",
            &[],
        )
        .await
        .expect("slots")
        .get(0);
    println!(
        "WAL senders: {senders}   replication slots: {slots}   (a sidecar per pod with its own slot: {})",
        EDGES + 1
    );
    for s in more {
        s.shutdown().await;
    }
    edge.shutdown().await;
    hub.shutdown().await;
}

/// Appends events the nodes do not apply (keyspace `ship` is on neither), so what is measured
/// is the log and the link, not the cache.
async fn shipping(hub: &Server, edge: &Server) {
    println!(
        "\n== shipping: {SHIP_EVENTS} events appended to the hub's log (fsync always, batches of {SHIP_BATCH}) while an edge follows =="
    );
    let log = hub.state().log.clone().expect("the hub has a log");
    let value = Bytes::from(format!("{{\"id\":1,\"payload\":\"{}\"}}", "x".repeat(80)));
    let mut ratios = Vec::new();
    let mut appended = Vec::new();
    let mut shipped = Vec::new();
    for run in 0..SHIP_RUNS {
        let target = log.end().0 + SHIP_EVENTS as u64;
        let t0 = Instant::now();
        let mut n = 0u64;
        while (n as usize) < SHIP_EVENTS {
            let events: Vec<ChangeEvent> = (0..SHIP_BATCH)
                .map(|i| {
                    ChangeEvent::put("ship", format!("{}", (n as usize + i) % 50_000), value.clone()).from_origin(
                        "hub",
                        n + i as u64,
                        Source::Cdc,
                    )
                })
                .collect();
            log.append_events(&events).await.expect("append");
            n += SHIP_BATCH as u64;
        }
        let append_secs = t0.elapsed().as_secs_f64();
        loop {
            let at = edge.state().replication.upstreams[0]
                .next
                .load(std::sync::atomic::Ordering::Relaxed);
            if at >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ship_secs = t0.elapsed().as_secs_f64();
        let (a, s) = (SHIP_EVENTS as f64 / append_secs, SHIP_EVENTS as f64 / ship_secs);
        println!(
            "run {}: hub appended {a:>10.0} records/s   edge has them durable {s:>10.0} records/s   ratio {:.2}",
            run + 1,
            s / a
        );
        appended.push(a);
        shipped.push(s);
        ratios.push(s / a);
    }
    let worst = ratios.iter().cloned().fold(f64::MAX, f64::min);
    println!(
        "median: hub appends {:.0}/s, edge receives {:.0}/s, ratio {:.2} (worst run {worst:.2})",
        common::median(appended),
        common::median(shipped),
        common::median(ratios.clone())
    );
}
