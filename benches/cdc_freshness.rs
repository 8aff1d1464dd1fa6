//! CDC freshness and warm-up, against Postgres's own tools measured in the same run.
//!
//! 1. Freshness: UPDATEs are committed at a fixed rate (1k/s, 5k/s) by writer connections; for a
//!    sample of them, the time from the commit returning to a GET of the key returning the new
//!    value (polled every 50µs over a keep-alive connection). Beside it, `pg_recvlogical`
//!    (test_decoding) follows the same database on its own slot: the time from the same commits
//!    to its output line arriving — the floor any logical-decoding consumer pays. Prints p50 and
//!    p99 of both and the difference.
//! 2. The highest update rate the pipeline sustains: rates are raised until the p99 freshness
//!    passes 250ms or the writers cannot reach the rate.
//! 3. Warm-up: a fresh slot's snapshot load of 1M rows into a keyspace, rows/s, beside
//!    `psql -c "\copy (SELECT …) TO /dev/null"` of the same table: medians of `WARM_RUNS`
//!    (default 3) interleaved pairs, and the sidecar's CPU time per row (it runs in this process).
//!
//! Run: `cargo bench --bench cdc_freshness` (starts its own throwaway Postgres; the commit log
//! uses fsync = always in a temp dir). Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use cachesync::config::Config;
use cachesync::server::Server;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use cachesync_testkit::{cpu_seconds, temp_dir};
use common::Lat;
use common::freshness::{run_rate, start_recvlogical};

const KEYS: i64 = 10_000;
const RUN_FOR: Duration = Duration::from_secs(5);

fn main() {
    common::block_on(run());
}

fn row(label: &str, l: &Lat) -> String {
    common::ms_row(label, l, 36)
}

async fn run() {
    if let Ok(f) = std::env::var("CACHESYNC_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .try_init();
    }
    println!("cachesync cdc_freshness: Postgres (fsync off) and cachesync on one 2-core machine");
    let pg = PgServer::start(PgOptions::default());
    // CACHESYNC_BENCH_ONLY=freshness|warmup runs one section.
    let only = std::env::var("CACHESYNC_BENCH_ONLY").unwrap_or_default();
    if only != "warmup" {
        freshness(&pg).await;
    }
    if only != "freshness" {
        warmup(&pg).await;
    }
}

async fn freshness(pg: &PgServer) {
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    sql.batch_execute(&format!("CREATE TABLE bench (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO bench SELECT g, 0 FROM generate_series(0, {}) g;", KEYS - 1))
        .await
        .expect("schema");
    let log_dir = temp_dir("bench-cdc-log", None);
    // CACHESYNC_BENCH_FSYNC=never|10ms compares the log's durability policies; the default is
    // the production default.
    let fsync = std::env::var("CACHESYNC_BENCH_FSYNC").unwrap_or_else(|_| "always".into());
    println!("commit log fsync = {fsync}");
    let config = Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{}\"\n[log]\ndir = \"{}\"\nfsync = \"{}\"\n[cdc]\nslot = \"bench_cachesync\"\nheartbeat = \"0s\"\n\
         [[keyspace]]\nname = \"bench\"\ntable = \"bench\"\nkey = \"id\"\ncdc = \"update\"\nread_through = false\nmax_entries = 1000000\nttl = \"1h\"\n",
        db.url,
        log_dir.display(),
        fsync
    ))
    .expect("config");
    let server = Server::start(config).await.expect("start");
    server.wait_ready(Duration::from_secs(60)).await.expect("ready");
    let addr = server.local_addr();
    let recv = start_recvlogical(pg, &db.name);
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("\n== freshness: commit → served (cachesync GET) vs commit → received (pg_recvlogical) ==");
    let mut seq = 1_000_000_000i64;
    let mut report = common::report::Report::new(
        "cdc_freshness",
        "commit → served (cachesync GET) vs commit → line read (pg_recvlogical)",
        "µs",
    );
    for rate in [1000.0, 5000.0] {
        let (ours, theirs, achieved) = run_rate(&db.url, &[addr], &recv, rate, seq, KEYS, RUN_FOR).await;
        let ours = &ours[0];
        seq += 100_000_000;
        let at = format!("{rate:.0}/s");
        report.add_latency("cachesync", &at, ours);
        report.add_latency("pg_recvlogical", &at, &theirs);
        println!("-- {rate:.0} updates/s target, {achieved:.0}/s achieved");
        println!("{}", row("cachesync: commit → GET serves it", ours));
        println!("{}", row("pg_recvlogical: commit → line read", &theirs));
        println!(
            "{:<36} p50 {:+.2}ms   p99 {:+.2}ms",
            "difference (cachesync − floor)",
            (ours.p(0.5) - theirs.p(0.5)) / 1000.0,
            (ours.p(0.99) - theirs.p(0.99)) / 1000.0
        );
    }

    report.write();

    println!("\n== highest sustained update rate (p99 freshness under 250ms, writers reach 90% of the rate) ==");
    let mut best = 0.0;
    for rate in [2_000.0, 5_000.0, 7_500.0, 10_000.0, 15_000.0, 20_000.0] {
        let (ours, _, achieved) = run_rate(&db.url, &[addr], &recv, rate, seq, KEYS, RUN_FOR).await;
        let ours = &ours[0];
        seq += 100_000_000;
        let ok = ours.p(0.99) < 250_000.0 && achieved >= 0.9 * rate;
        println!(
            "{rate:>8.0}/s target {achieved:>8.0}/s achieved   p50 {:>7.2}ms p99 {:>8.2}ms   {}",
            ours.p(0.5) / 1000.0,
            ours.p(0.99) / 1000.0,
            if ok { "sustained" } else { "not sustained" }
        );
        if !ok {
            break;
        }
        best = achieved;
    }
    println!("highest sustained: {best:.0} updates/s (Postgres, writers, cachesync and pollers share the 2 cores)");
    server.shutdown().await;
}

async fn warmup(pg: &PgServer) {
    // `WARM_ROWS` (default 1M) sizes the table, e.g. smaller to count instructions per row.
    let total: i64 = common::env_or("WARM_ROWS", 1_000_000);
    println!("\n== warm-up from a consistent snapshot: {total} rows ==");
    let big = pg.create_database().await;
    let bsql = pg.connect(&big.name).await;
    bsql.batch_execute(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, age int, created timestamptz NOT NULL DEFAULT '2024-01-01');
         INSERT INTO users (id, name, email, age) SELECT g, 'user ' || g, 'u' || g || '@example.com', g % 90 FROM generate_series(1, {total}) g;"
    ))
    .await
    .expect("load rows");
    bsql.batch_execute("VACUUM ANALYZE users").await.expect("vacuum");
    // Interleaved: a copy, then a warm start, `WARM_RUNS` times (default 3); medians, since
    // this machine's wall times swing by a third between runs.
    let runs = common::env_or("WARM_RUNS", 3usize).max(1);
    let (mut copies, mut warms, mut cpus) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let t = Instant::now();
        let st = common::pg_tool("psql", pg, &big.name)
            .args([
                "-c",
                "\\copy (SELECT id, name, email, age, created FROM users) TO /dev/null",
            ])
            .status()
            .expect("psql");
        assert!(st.success());
        copies.push(t.elapsed().as_secs_f64());

        let dir = temp_dir("bench-warm-log", None);
        let config = Config::parse(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{}\"\n[log]\ndir = \"{}\"\n[cdc]\nslot = \"bench_warm_{i}\"\nheartbeat = \"0s\"\n\
             [[keyspace]]\nname = \"users\"\ntable = \"users\"\nkey = \"id\"\ncdc = \"update\"\nmax_entries = 2000000\nttl = \"1h\"\n",
            big.url,
            dir.display()
        ))
        .expect("config");
        // The sidecar runs in this process: its CPU is this process's.
        let cpu = cpu_seconds(std::process::id());
        let t = Instant::now();
        let s = Server::start(config).await.expect("start");
        s.wait_ready(Duration::from_secs(300)).await.expect("warm");
        warms.push(t.elapsed().as_secs_f64());
        cpus.push(cpu_seconds(std::process::id()) - cpu);
        s.shutdown().await;
        let _ = bsql
            .execute("SELECT pg_drop_replication_slot($1)", &[&format!("bench_warm_{i}")])
            .await;
    }
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
    println!("psql \\copy seconds per run: {}", fmt(&copies));
    println!("cachesync warm start seconds per run: {}", fmt(&warms));
    let (warm, copy) = (common::median(warms), common::median(copies));
    let cpu_per_row = common::median(cpus) / total as f64 * 1e6;
    println!(
        "{:<44} {:>7.2}s  {:>10.0} rows/s  ({cpu_per_row:.2} CPU µs per row)",
        "cachesync warm start (slot + COPY + cache)",
        warm,
        total as f64 / warm
    );
    println!(
        "{:<44} {:>7.2}s  {:>10.0} rows/s",
        "psql \\copy (SELECT …) TO /dev/null",
        copy,
        total as f64 / copy
    );
    println!(
        "{:<44} {:>7.2}x  (rows/s {:.2}x; medians of {runs} interleaved runs)",
        "ratio (cachesync time / psql time)",
        warm / copy,
        copy / warm
    );
    let mut report = common::report::Report::new(
        "warm_start",
        "warm start, rows/s (medians): cachesync vs psql \\copy TO",
        "rows/s",
    );
    report.add("cachesync warm start", &format!("{total} rows"), total as f64 / warm);
    report.add("psql \\copy", &format!("{total} rows"), total as f64 / copy);
    report.write();
}
