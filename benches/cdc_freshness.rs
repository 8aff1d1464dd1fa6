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
//!    `psql -c "\copy (SELECT …) TO /dev/null"` of the same table.
//!
//! Run: `cargo bench --bench cdc_freshness` (starts its own throwaway Postgres; the commit log
//! uses fsync = always in a temp dir). Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachesync::config::Config;
use cachesync::server::Server;
use cachesync_testkit::postgres::{PgOptions, PgServer, bindir};
use cachesync_testkit::{find_program, temp_dir};
use common::{BlockingHttp, Lat, get_request};

const KEYS: i64 = 10_000;
const RUN_FOR: Duration = Duration::from_secs(5);
const WRITERS: usize = 8;
/// Updates sampled for freshness per second, whatever the rate.
const SAMPLES_PER_SECOND: f64 = 200.0;
const SNAPSHOT_ROWS: i64 = 1_000_000;

fn main() {
    common::block_on(run());
}

struct Recv {
    /// Arrival instant of each sampled value's line.
    arrivals: Arc<Mutex<HashMap<i64, Instant>>>,
    sampled: Arc<Mutex<std::collections::HashSet<i64>>>,
    _child: std::process::Child,
}

/// Starts pg_recvlogical on its own slot, noting when each sampled value's line arrives.
fn start_recvlogical(pg: &PgServer, db: &str) -> Recv {
    let bin = find_program("pg_recvlogical", "CACHESYNC_PG_BINDIR", &[bindir(), "/usr/bin".into()])
        .expect("pg_recvlogical (postgresql-client) is installed");
    let mut child = Command::new(bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .args([
            "--slot",
            "bench_recvlogical",
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
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pg_recvlogical");
    let stdout = child.stdout.take().expect("stdout");
    let arrivals: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let sampled: Arc<Mutex<std::collections::HashSet<i64>>> = Arc::default();
    let (a, s) = (arrivals.clone(), sampled.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let arrived = Instant::now();
            // table public.bench: UPDATE: id[integer]:42 v[bigint]:1234
            let Some(v) = line
                .split("v[bigint]:")
                .nth(1)
                .and_then(|t| t.trim().parse::<i64>().ok())
            else {
                continue;
            };
            if s.lock().unwrap().remove(&v) {
                a.lock().unwrap().insert(v, arrived);
            }
        }
    });
    Recv {
        arrivals,
        sampled,
        _child: child,
    }
}

/// A sampled update: its value, key and commit instant.
type Sample = (i64, i64, Instant);

/// Polls a sample's key until GET returns its value (or a newer one); returns the latency.
fn poll(http: &mut BlockingHttp, (v, id, committed): Sample) -> Option<Duration> {
    let req = get_request(&format!("/v1/kv/bench/{id}"));
    loop {
        let (status, body) = http.fetch(&req);
        let seen = (status == 200)
            .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
            .flatten()
            .and_then(|j| j["v"].as_i64())
            .unwrap_or(-1);
        if seen >= v {
            return Some(committed.elapsed());
        }
        if committed.elapsed() > Duration::from_secs(30) {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Persistent poller connections.
const POLLERS: usize = 16;

/// One run at `rate` updates/s: returns (cachesync freshness, pg_recvlogical freshness,
/// achieved rate).
async fn run_rate(url: &str, addr: std::net::SocketAddr, recv: &Recv, rate: f64, seq_base: i64) -> (Lat, Lat, f64) {
    let sample_every = ((rate / SAMPLES_PER_SECOND).round() as i64).max(1);
    let commits: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let ours = Arc::new(Mutex::new(Lat::new()));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Sample>();
    let rx = Arc::new(Mutex::new(rx));
    let mut pollers = Vec::new();
    for _ in 0..POLLERS {
        let (rx, ours) = (rx.clone(), ours.clone());
        pollers.push(std::thread::spawn(move || {
            let mut http = BlockingHttp::connect(addr);
            loop {
                let next = rx.lock().unwrap().blocking_recv();
                let Some(sample) = next else { return };
                if let Some(d) = poll(&mut http, sample) {
                    ours.lock().unwrap().record(d);
                }
            }
        }));
    }
    let started = Instant::now();
    let total = (rate * RUN_FOR.as_secs_f64()) as i64;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, commits, sampled, tx) = (url.to_string(), commits.clone(), recv.sampled.clone(), tx.clone());
        writers.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("writer connects");
            tokio::spawn(conn);
            let stmt = client
                .prepare("UPDATE bench SET v = $1 WHERE id = $2")
                .await
                .expect("prepare");
            let mut i = w as i64;
            while i < total {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let v = seq_base + i;
                let id = v % KEYS;
                let sample = v % sample_every == 0;
                if sample {
                    sampled.lock().unwrap().insert(v);
                }
                client.execute(&stmt, &[&v, &(id as i32)]).await.expect("update");
                let committed = Instant::now();
                if sample {
                    commits.lock().unwrap().insert(v, committed);
                    let _ = tx.send((v, id, committed));
                }
                i += WRITERS as i64;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64().max(RUN_FOR.as_secs_f64());
    drop(tx);
    tokio::task::spawn_blocking(move || {
        for p in pollers {
            let _ = p.join();
        }
    })
    .await
    .expect("pollers");
    // Give pg_recvlogical a moment to print the last lines, then join arrivals with commits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut theirs = Lat::new();
    let arrivals = std::mem::take(&mut *recv.arrivals.lock().unwrap());
    let commits = commits.lock().unwrap();
    for (v, arrived) in arrivals {
        if let Some(c) = commits.get(&v) {
            theirs.record(arrived.saturating_duration_since(*c));
        }
    }
    let ours = std::mem::replace(&mut *ours.lock().unwrap(), Lat::new());
    (ours, theirs, achieved)
}

fn row(label: &str, l: &Lat) -> String {
    format!(
        "{label:<36} n={:<6} p50={:>8.2}ms p99={:>8.2}ms",
        l.h.len(),
        l.p(0.5) / 1000.0,
        l.p(0.99) / 1000.0
    )
}

async fn run() {
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
    for rate in [1000.0, 5000.0] {
        let (ours, theirs, achieved) = run_rate(&db.url, addr, &recv, rate, seq).await;
        seq += 100_000_000;
        println!("-- {rate:.0} updates/s target, {achieved:.0}/s achieved");
        println!("{}", row("cachesync: commit → GET serves it", &ours));
        println!("{}", row("pg_recvlogical: commit → line read", &theirs));
        println!(
            "{:<36} p50 {:+.2}ms   p99 {:+.2}ms",
            "difference (cachesync − floor)",
            (ours.p(0.5) - theirs.p(0.5)) / 1000.0,
            (ours.p(0.99) - theirs.p(0.99)) / 1000.0
        );
    }

    println!("\n== highest sustained update rate (p99 freshness under 250ms, writers reach 90% of the rate) ==");
    let mut best = 0.0;
    for rate in [2_000.0, 5_000.0, 7_500.0, 10_000.0, 15_000.0, 20_000.0] {
        let (ours, _, achieved) = run_rate(&db.url, addr, &recv, rate, seq).await;
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
    println!("\n== warm-up from a consistent snapshot: {SNAPSHOT_ROWS} rows ==");
    let big = pg.create_database().await;
    let bsql = pg.connect(&big.name).await;
    bsql.batch_execute(&format!(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, age int, created timestamptz NOT NULL DEFAULT '2024-01-01');
         INSERT INTO users (id, name, email, age) SELECT g, 'user ' || g, 'u' || g || '@example.com', g % 90 FROM generate_series(1, {SNAPSHOT_ROWS}) g;"
    ))
    .await
    .expect("load rows");
    bsql.batch_execute("VACUUM ANALYZE users").await.expect("vacuum");
    let psql = find_program("psql", "CACHESYNC_PG_BINDIR", &[bindir(), "/usr/bin".into()]).expect("psql is installed");
    let mut copy_best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        let st = Command::new(&psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                &big.name,
                "-c",
                "\\copy (SELECT id, name, email, age, created FROM users) TO /dev/null",
            ])
            .status()
            .expect("psql");
        assert!(st.success());
        copy_best = copy_best.min(t.elapsed().as_secs_f64());
    }
    let mut warm_best = f64::MAX;
    for i in 0..2 {
        let dir = temp_dir("bench-warm-log", None);
        let config = Config::parse(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{}\"\n[log]\ndir = \"{}\"\n[cdc]\nslot = \"bench_warm_{i}\"\nheartbeat = \"0s\"\n\
             [[keyspace]]\nname = \"users\"\ntable = \"users\"\nkey = \"id\"\ncdc = \"update\"\nmax_entries = 2000000\nttl = \"1h\"\n",
            big.url,
            dir.display()
        ))
        .expect("config");
        let t = Instant::now();
        let s = Server::start(config).await.expect("start");
        s.wait_ready(Duration::from_secs(300)).await.expect("warm");
        warm_best = warm_best.min(t.elapsed().as_secs_f64());
        s.shutdown().await;
        let _ = bsql
            .execute("SELECT pg_drop_replication_slot($1)", &[&format!("bench_warm_{i}")])
            .await;
    }
    println!(
        "{:<44} {:>7.2}s  {:>10.0} rows/s",
        "cachesync warm start (slot + COPY + cache)",
        warm_best,
        SNAPSHOT_ROWS as f64 / warm_best
    );
    println!(
        "{:<44} {:>7.2}s  {:>10.0} rows/s",
        "psql \\copy (SELECT …) TO /dev/null",
        copy_best,
        SNAPSHOT_ROWS as f64 / copy_best
    );
    println!(
        "{:<44} {:>7.2}x",
        "ratio (cachesync time / psql time)",
        warm_best / copy_best
    );
}
