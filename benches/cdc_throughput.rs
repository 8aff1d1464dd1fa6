//! CDC throughput under large transactions, beside `pg_recvlogical` in the same run.
//!
//! A table of 100,000 rows; each round commits 10 transactions that each UPDATE 10,000 rows,
//! back to back. Two consumers follow the database on slots of their own at the same time:
//! - the `cachesync` binary (a child process, CDC keyspace on the table, commit log with
//!   fsync = always): done when `cachesync_cdc_applied_events_total` has grown by 100,000 —
//!   every change captured, made durable in the log and applied to the cache;
//! - `pg_recvlogical` (test_decoding, writing to a pipe this program reads): done when it has
//!   printed 100,000 UPDATE lines.
//!
//! Per round: events/s of each (from the first commit to done) and CPU seconds per 100k events
//! (user + system of each process, from `/proc/<pid>/stat`: measured from outside). Prints the
//! medians and the ratios, and writes `target/bench-results/cdc_throughput{,_cpu}.{csv,png}`.
//!
//! Run: `cargo bench --bench cdc_throughput` (`ROUNDS=n`, default 5). Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cachesync_testkit::postgres::{PgOptions, PgServer};
use cachesync_testkit::sidecar::Sidecar;
use cachesync_testkit::{cpu_seconds, temp_dir};

const ROWS: i64 = 100_000;
const TXN_ROWS: i64 = 10_000;
const DEADLINE: Duration = Duration::from_secs(120);

fn main() {
    common::block_on(run());
}

/// `pg_recvlogical` on its own slot, counting the UPDATE lines it prints.
struct Recv {
    child: std::process::Child,
    updates: Arc<AtomicU64>,
}

impl Recv {
    fn start(pg: &PgServer, db: &str) -> Recv {
        let mut child = common::recvlogical(pg, db, "bench_throughput_recv");
        let stdout = child.stdout.take().expect("stdout");
        let updates = Arc::new(AtomicU64::new(0));
        let counter = updates.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("table public.items: UPDATE") {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Recv { child, updates }
    }
}

impl Drop for Recv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn applied(addr: std::net::SocketAddr) -> u64 {
    common::metric_sum(addr, "cachesync_cdc_applied_events_total").await as u64
}

/// Waits until `done()` reaches `target`; returns when it did.
async fn until<F, Fut>(what: &str, target: u64, mut done: F) -> Instant
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if done().await >= target {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not reach {target} events in {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Both consumers' counts once neither has moved for 200 ms (the probes have passed).
async fn quiet(addr: std::net::SocketAddr, recv: &Recv) -> (u64, u64) {
    let mut last = (applied(addr).await, recv.updates.load(Ordering::Relaxed));
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (applied(addr).await, recv.updates.load(Ordering::Relaxed));
        if now == last {
            return now;
        }
        last = now;
    }
}

struct Round {
    ours_rate: f64,
    theirs_rate: f64,
    ours_cpu: f64,
    theirs_cpu: f64,
}

async fn run() {
    let rounds: usize = common::env_or("ROUNDS", 5);
    println!(
        "cachesync cdc_throughput: {ROWS} row changes per round in transactions of {TXN_ROWS}, {rounds} rounds; Postgres fsync off, commit log fsync = always"
    );
    let pg = PgServer::start(PgOptions::default());
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    sql.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, v bigint NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g, 0 FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .expect("schema");
    let log_dir = temp_dir("bench-cdc-tp-log", None);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{}\"\n[log]\ndir = \"{}\"\n[cdc]\nslot = \"bench_throughput\"\nheartbeat = \"0s\"\n\
         [[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\nread_through = false\nmax_entries = 1000000\nttl = \"1h\"\n",
        db.url,
        log_dir.display()
    );
    let sidecar = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), Some(&config));
    let addr = sidecar.addr;
    common::wait_ready(addr).await;
    let recv = Recv::start(&pg, &db.name);
    // Both are following once a probe update reaches them (pg_recvlogical creates its slot
    // after it starts: updates before that are not in its stream, so probe until one is).
    until("pg_recvlogical", 1, || async {
        sql.batch_execute("UPDATE items SET v = v WHERE id = 1")
            .await
            .expect("probe");
        tokio::time::sleep(Duration::from_millis(50)).await;
        recv.updates.load(Ordering::Relaxed)
    })
    .await;
    until("cachesync", 1, || applied(addr)).await;

    println!(
        "\n{:<7} {:>14} {:>14} {:>8} | {:>16} {:>16} {:>8}",
        "round", "cachesync ev/s", "recvlog ev/s", "ratio", "cachesync CPU s", "recvlog CPU s", "ratio"
    );
    println!(
        "{:<7} {:>14} {:>14} {:>8} | {:>16} {:>16} {:>8}",
        "", "", "", "", "per 100k ev", "per 100k ev", ""
    );
    let mut results = Vec::new();
    for round in 1..=rounds {
        let (ours0, theirs0) = quiet(addr, &recv).await;
        let (cpu_ours0, cpu_theirs0) = (cpu_seconds(sidecar.pid()), cpu_seconds(recv.child.id()));
        let started = Instant::now();
        for first in (0..ROWS).step_by(TXN_ROWS as usize) {
            sql.execute(
                "UPDATE items SET v = v + 1 WHERE id > $1 AND id <= $2",
                &[&first, &(first + TXN_ROWS)],
            )
            .await
            .expect("update");
        }
        let target = ROWS as u64;
        let ours_done = until("cachesync", ours0 + target, || applied(addr));
        let theirs_done = until("pg_recvlogical", theirs0 + target, || async {
            recv.updates.load(Ordering::Relaxed)
        });
        let (ours_at, theirs_at) = tokio::join!(ours_done, theirs_done);
        let (cpu_ours, cpu_theirs) = (
            cpu_seconds(sidecar.pid()) - cpu_ours0,
            cpu_seconds(recv.child.id()) - cpu_theirs0,
        );
        let r = Round {
            ours_rate: target as f64 / (ours_at - started).as_secs_f64(),
            theirs_rate: target as f64 / (theirs_at - started).as_secs_f64(),
            ours_cpu: cpu_ours * 100_000.0 / target as f64,
            theirs_cpu: cpu_theirs * 100_000.0 / target as f64,
        };
        println!(
            "{:<7} {:>14.0} {:>14.0} {:>7.2}x | {:>16.2} {:>16.2} {:>7.2}x",
            round,
            r.ours_rate,
            r.theirs_rate,
            r.ours_rate / r.theirs_rate,
            r.ours_cpu,
            r.theirs_cpu,
            r.ours_cpu / r.theirs_cpu.max(0.01)
        );
        results.push(r);
    }
    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = results.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (or, tr, oc, tc) = (
        median(&|r| r.ours_rate),
        median(&|r| r.theirs_rate),
        median(&|r| r.ours_cpu),
        median(&|r| r.theirs_cpu),
    );
    println!(
        "{:<7} {:>14.0} {:>14.0} {:>7.2}x | {:>16.2} {:>16.2} {:>7.2}x",
        "median",
        or,
        tr,
        or / tr,
        oc,
        tc,
        oc / tc.max(0.01)
    );
    // Each round, then the medians, of one figure for both consumers.
    let figure = |name: &str, title: &str, unit: &str, of: &dyn Fn(&Round) -> (f64, f64), median: (f64, f64)| {
        let mut report = common::report::Report::new(name, title, unit);
        let rounds = results
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("round {}", i + 1), of(r)));
        for (at, (ours, theirs)) in rounds.chain(std::iter::once(("median".to_string(), median))) {
            report.add("cachesync", &at, ours);
            report.add("pg_recvlogical", &at, theirs);
        }
        report.write();
    };
    figure(
        "cdc_throughput",
        "change events applied per second",
        "events/s",
        &|r| (r.ours_rate, r.theirs_rate),
        (or, tr),
    );
    figure(
        "cdc_throughput_cpu",
        "CPU seconds per 100k change events (user + system)",
        "CPU s",
        &|r| (r.ours_cpu, r.theirs_cpu),
        (oc, tc),
    );
    drop(recv);
    drop(sidecar);
}
