//! Write-behind throughput against Postgres's own, measured in the same run on the same
//! (durable, fsync on) Postgres.
//!
//! 1. Acknowledged writes/s: N keep-alive HTTP clients PUT new rows to a `write = "behind"`
//!    keyspace (each 202 means durable in the commit log, fsync = always) for a few seconds, at
//!    1, 16 and 64 writers — beside N connections doing single-row autocommit upserts of the
//!    same rows (`INSERT … ON CONFLICT (id) DO UPDATE`, what a PUT is; each commit durable in
//!    Postgres), the baseline issue 18 names, and plain `INSERT`s (the baseline of earlier runs).
//!    The flusher drains to Postgres meanwhile. `WB_ACK_ROUNDS` rounds per writer count (default
//!    3), cachesync and the baselines in alternating order; each round's ratios and their
//!    medians are printed. At 1 writer each round also measures the disk's floor for an
//!    acknowledgement: a server thread that only reads a request, writes it into a
//!    preallocated, synced file and `fdatasync`s it before answering, to one blocking client
//!    over loopback TCP — what any durable acknowledgement costs on this machine, so the
//!    ratios can be read against what the disk leaves room for.
//! 2. Drain rows/s: a backlog of rows is accepted while the table is locked against writes, then
//!    released; the time until every row is in Postgres — beside `psql \copy` of the same rows
//!    from a CSV file into an identical table. `WB_DRAIN_RUNS` runs (default 3), the two sides
//!    in alternating order, fresh ids each run; medians and each run's ratio are printed.
//!
//! Run: `cargo bench --bench write_behind`. `CACHESYNC_BENCH_ONLY=drain` runs the drain alone, `=acks` the acknowledged writes alone;
//! `WB_DRAIN_ROWS` sets the drain's rows (default 100,000; fewer under a profiler).
//! `WB_EXTRA` appends TOML to the keyspace's section (`\n` for newlines), e.g.
//! `WB_EXTRA='[write_behind]\nbatch_rows = 5000'`; `WB_LOG` adds to the `[log]` section, e.g.
//! `WB_LOG='fsync = "never"'` to see the path without its disk sync; `WB_WRITERS=1` runs only
//! the given writer counts (comma-separated). Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cachesync::config::Config;
use cachesync::patterns::write_behind::WriteBehind;
use cachesync::server::Server;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use cachesync_testkit::temp_dir;
use common::{Lat, RawHttp};

const RUN_FOR: Duration = Duration::from_secs(4);
/// Each run's ratio, as printed beside a median.
fn listed(ratios: &[f64]) -> String {
    ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ")
}

/// Rows of the drain; `WB_DRAIN_ROWS` overrides (e.g. fewer under a profiler).
fn drain_rows() -> u64 {
    common::env_or("WB_DRAIN_ROWS", 100_000)
}

/// Drain runs, each beside a `\copy` (interleaved, medians reported); `WB_DRAIN_RUNS` overrides.
fn drain_runs() -> u64 {
    common::env_or("WB_DRAIN_RUNS", 3u64).max(1)
}

/// Rounds per writer count of the acknowledged writes, each running cachesync and the baselines
/// (which side first alternates); medians reported. `WB_ACK_ROUNDS` overrides.
fn ack_rounds() -> usize {
    common::env_or("WB_ACK_ROUNDS", 3usize).max(1)
}

/// The upserts (with Postgres's WAL syncs meanwhile), then the `INSERT`s, of one round.
async fn baselines(
    url: &str,
    upsert: &str,
    insert: &str,
    writers: usize,
    upsert_ids: &Arc<AtomicU64>,
    insert_ids: &Arc<AtomicU64>,
) -> (Lat, Fsyncs, Lat) {
    let wal = wal_syncs(url).await;
    let upserts = sql_writes(url, upsert, writers, upsert_ids.clone()).await;
    let wal = wal_syncs(url).await.since(wal);
    let inserts = sql_writes(url, insert, writers, insert_ids.clone()).await;
    (upserts, wal, inserts)
}

/// Writer counts of the acknowledged-writes rows; `WB_WRITERS` overrides (e.g. `1` under a
/// profiler).
fn writer_counts() -> Vec<usize> {
    std::env::var("WB_WRITERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64])
}

fn main() {
    common::block_on(run());
}

/// This process's resident memory, MB.
fn rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
        / 1_000_000
}

fn put_request(id: u64) -> Vec<u8> {
    let body = format!(
        r#"{{"name": "user {id}", "email": "u{id}@example.com", "v": {}}}"#,
        id % 1000
    );
    format!(
        "PUT /v1/kv/users/{id} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `writers` HTTP clients PUT new rows for RUN_FOR; ids come from `next`.
async fn http_writes(addr: std::net::SocketAddr, writers: usize, next: Arc<AtomicU64>) -> Lat {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut http = RawHttp::connect(addr).await;
            let mut lat = Lat::new();
            while started.elapsed() < RUN_FOR {
                let req = put_request(next.fetch_add(1, Ordering::Relaxed));
                let t = Instant::now();
                let (status, _) = http.roundtrip(&req).await;
                lat.record(t.elapsed());
                assert_eq!(status, 202);
            }
            lat
        }));
    }
    let mut all = Lat::new();
    for t in tasks {
        all.merge(&t.await.expect("writer"));
    }
    all.elapsed = started.elapsed();
    all
}

/// `writers` connections run `sql` (`$1..$4` = id, name, email, v) for RUN_FOR, autocommit.
async fn sql_writes(url: &str, sql: &str, writers: usize, next: Arc<AtomicU64>) -> Lat {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (url, next, sql) = (url.to_string(), next.clone(), sql.to_string());
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let stmt = client.prepare(&sql).await.expect("prepare");
            let mut lat = Lat::new();
            while started.elapsed() < RUN_FOR {
                let id = next.fetch_add(1, Ordering::Relaxed) as i64;
                let t = Instant::now();
                client
                    .execute(
                        &stmt,
                        &[
                            &id,
                            &format!("user {id}"),
                            &format!("u{id}@example.com"),
                            &((id % 1000) as i32),
                        ],
                    )
                    .await
                    .expect("write");
                lat.record(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Lat::new();
    for t in tasks {
        all.merge(&t.await.expect("writer"));
    }
    all.elapsed = started.elapsed();
    all
}

/// The disk's floor for a durable acknowledgement over loopback TCP, measured on plain threads
/// for `RUN_FOR`: a server that reads one length-prefixed request, writes it by position into a
/// file preallocated with written, synced zeros (as the log's segments are), `fdatasync`s and
/// answers two bytes; one blocking client sends the bench's own `PUT`s. Nothing else runs in
/// it — no HTTP, no runtime, no validation — so it is the least any acknowledgement can cost.
fn sync_floor() -> Lat {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    const FILE: u64 = 64 << 20;
    let dir = temp_dir("bench-wb-floor", None);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("floor"))
        .expect("floor file");
    file.write_all_at(&vec![0u8; FILE as usize], 0).expect("preallocate");
    file.sync_all().expect("sync the preallocation");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_nodelay(true).expect("nodelay");
        let (mut at, mut buf) = (0u64, Vec::new());
        loop {
            let mut len = [0u8; 4];
            if conn.read_exact(&mut len).is_err() {
                break;
            }
            buf.resize(u32::from_le_bytes(len) as usize, 0);
            conn.read_exact(&mut buf).expect("request");
            if at + buf.len() as u64 > FILE {
                at = 0;
            }
            file.write_all_at(&buf, at).expect("write");
            file.sync_data().expect("fdatasync");
            at += buf.len() as u64;
            conn.write_all(b"ok").expect("answer");
        }
    });
    let mut client = std::net::TcpStream::connect(addr).expect("connect");
    client.set_nodelay(true).expect("nodelay");
    let (mut lat, started, mut id) = (Lat::new(), Instant::now(), 1u64 << 40);
    let mut frame = Vec::new();
    while started.elapsed() < RUN_FOR {
        let req = put_request(id);
        id += 1;
        frame.clear();
        frame.extend_from_slice(&(req.len() as u32).to_le_bytes());
        frame.extend_from_slice(&req);
        let t = Instant::now();
        client.write_all(&frame).expect("send");
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).expect("answer");
        lat.record(t.elapsed());
    }
    lat.elapsed = started.elapsed();
    drop(client);
    server.join().expect("floor server");
    let _ = std::fs::remove_dir_all(&dir);
    lat
}

fn rate(l: &Lat) -> f64 {
    l.h.len() as f64 / l.elapsed.as_secs_f64()
}

/// A count of fsyncs and their total seconds.
#[derive(Clone, Copy)]
struct Fsyncs {
    count: f64,
    seconds: f64,
}

impl Fsyncs {
    fn since(self, before: Fsyncs) -> Fsyncs {
        Fsyncs {
            count: self.count - before.count,
            seconds: self.seconds - before.seconds,
        }
    }

    fn mean_us(&self) -> f64 {
        self.seconds / self.count.max(1.0) * 1e6
    }
}

async fn fsyncs(addr: std::net::SocketAddr) -> Fsyncs {
    Fsyncs {
        count: common::metric_sum(addr, "cachesync_log_fsync_duration_seconds_count").await,
        seconds: common::metric_sum(addr, "cachesync_log_fsync_duration_seconds_sum").await,
    }
}

/// Postgres's WAL syncs so far (`pg_stat_wal`, timed with `track_wal_io_timing`).
async fn wal_syncs(url: &str) -> Fsyncs {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT wal_sync::float8, wal_sync_time::float8 FROM pg_stat_wal", &[])
        .await
        .expect("pg_stat_wal");
    Fsyncs {
        count: row.get(0),
        seconds: row.get::<_, f64>(1) / 1000.0,
    }
}

/// Returns once the flusher has every accepted write in Postgres. The backlog counter itself,
/// read in process every millisecond: polling `/metrics` every 20 ms cost the sidecar a page
/// render per poll and rounded each drain's end up by half a poll on average (~10 ms of a
/// ~300 ms drain).
async fn flushed(wb: &WriteBehind) {
    while wb.backlog.records.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn backlog(addr: std::net::SocketAddr) -> u64 {
    common::metrics_text(addr)
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix("cachesync_writebehind_backlog_records ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0) as u64
}

async fn run() {
    if let Ok(f) = std::env::var("CACHESYNC_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .try_init();
    }
    println!(
        "cachesync write_behind bench: durable Postgres (fsync on), commit log fsync = always, one 2-core machine"
    );
    let pg = PgServer::start(PgOptions {
        durable: true,
        // pg_stat_wal's sync time, printed beside the log's own fsync time.
        settings: vec![("track_wal_io_timing".into(), "on".into())],
    });
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    let schema = "(id bigint PRIMARY KEY, name text NOT NULL, email text, v int NOT NULL)";
    sql.batch_execute(&format!(
        "CREATE TABLE users {schema}; CREATE TABLE direct {schema}; CREATE TABLE upserted {schema}; \
         CREATE TABLE copied {schema};"
    ))
    .await
    .expect("schema");
    let log_dir = temp_dir("bench-wb-log", None);
    let config = Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{}\"\n[log]\ndir = \"{}\"\n{}\n\
         [[keyspace]]\nname = \"users\"\ntable = \"users\"\nkey = \"id\"\nwrite = \"behind\"\nmax_entries = 2000000\n{}",
        db.url,
        log_dir.display(),
        std::env::var("WB_LOG").unwrap_or_default().replace("\\n", "\n"),
        std::env::var("WB_EXTRA").unwrap_or_default().replace("\\n", "\n")
    ))
    .expect("config");
    let server = Server::start(config).await.expect("start");
    server.wait_ready(Duration::from_secs(30)).await.expect("ready");
    let addr = server.local_addr();

    // CACHESYNC_BENCH_ONLY=drain skips the first section, =acks the second.
    let only = std::env::var("CACHESYNC_BENCH_ONLY").unwrap_or_default();
    let wb = server.state().write_behind.clone().expect("a write-behind keyspace");
    if only != "drain" {
        writes(addr, &wb, &db.url).await;
    }
    if only != "acks" {
        drain(addr, &wb, &pg, &db.name).await;
    }
    server.shutdown().await;
}

async fn writes(addr: std::net::SocketAddr, wb: &WriteBehind, url: &str) {
    println!("\n== acknowledged writes vs single-row autocommit upserts (and INSERTs) ==");
    println!(
        "{:<9} {:>10} {:>8} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>6} | {:>10} {:>8} | {:>6}",
        "writers",
        "202/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "upsert/s",
        "p50 µs",
        "p99 µs",
        "ratio",
        "INSERT/s",
        "p50 µs",
        "ratio"
    );
    let ids = Arc::new(AtomicU64::new(1));
    let (upsert_ids, insert_ids) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(1)));
    let upsert = "INSERT INTO upserted (id, name, email, v) VALUES ($1, $2, $3, $4) \
                  ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, v = EXCLUDED.v";
    let insert = "INSERT INTO direct (id, name, email, v) VALUES ($1, $2, $3, $4)";
    let mut report = common::report::Report::new(
        "write_behind_acks",
        "acknowledged writes/s: cachesync 202s vs Postgres autocommit upserts and INSERTs",
        "writes/s",
    );
    let rounds = ack_rounds();
    for writers in writer_counts() {
        let (mut ours_rates, mut upsert_rates, mut insert_rates) = (Vec::new(), Vec::new(), Vec::new());
        let (mut vs_upsert, mut vs_insert) = (Vec::new(), Vec::new());
        let mut floor_rates = Vec::new();
        for round in 0..rounds {
            // Which side goes first alternates, so a drift of the machine's speed within a
            // round favours neither.
            let early = if round % 2 == 1 {
                Some(baselines(url, upsert, insert, writers, &upsert_ids, &insert_ids).await)
            } else {
                None
            };
            let (syncs, flusher_wal) = (fsyncs(addr).await, wal_syncs(url).await);
            let ours = http_writes(addr, writers, ids.clone()).await;
            let syncs = fsyncs(addr).await.since(syncs);
            // The flusher's own commits, on the same disk while the writers wait.
            let flusher_wal = wal_syncs(url).await.since(flusher_wal);
            // Let the flusher catch up so the baselines do not compete with a drain.
            flushed(wb).await;
            let (upserts, wal, inserts) = match early {
                Some(base) => base,
                None => baselines(url, upsert, insert, writers, &upsert_ids, &insert_ids).await,
            };
            if writers == 1 {
                let floor = tokio::task::spawn_blocking(sync_floor).await.expect("floor");
                println!(
                    "          floor (recv, pwrite into a preallocated file, fdatasync, send): {:.0}/s, p50 {:.1} µs; \
                     {:.2}x of the upserts, cachesync at {:.2}x of it",
                    rate(&floor),
                    floor.p(0.5),
                    rate(&floor) / rate(&upserts),
                    rate(&ours) / rate(&floor)
                );
                floor_rates.push(rate(&floor));
            }
            println!(
                "{:<9} {:>10.0} {:>8.1} {:>8.1} {:>8.1} | {:>10.0} {:>8.1} {:>8.1} | {:>5.2}x | {:>10.0} {:>8.1} | {:>5.2}x",
                format!("{writers} r{}", round + 1),
                rate(&ours),
                ours.p(0.5),
                ours.p(0.99),
                ours.p(0.999),
                rate(&upserts),
                upserts.p(0.5),
                upserts.p(0.99),
                rate(&ours) / rate(&upserts),
                rate(&inserts),
                inserts.p(0.5),
                rate(&ours) / rate(&inserts)
            );
            println!(
                "          log: {:.0} fsyncs/s, mean fsync {:.1} µs, {:.1} writes per fsync",
                syncs.count / ours.elapsed.as_secs_f64(),
                syncs.mean_us(),
                ours.h.len() as f64 / syncs.count.max(1.0)
            );
            println!(
                "          flusher's Postgres WAL meanwhile: {:.0} syncs/s, mean sync {:.1} µs",
                flusher_wal.count / ours.elapsed.as_secs_f64(),
                flusher_wal.mean_us()
            );
            println!(
                "          Postgres WAL during the upserts: {:.0} syncs/s, mean sync {:.1} µs, {:.1} commits per sync",
                wal.count / upserts.elapsed.as_secs_f64(),
                wal.mean_us(),
                upserts.h.len() as f64 / wal.count.max(1.0)
            );
            ours_rates.push(rate(&ours));
            upsert_rates.push(rate(&upserts));
            insert_rates.push(rate(&inserts));
            vs_upsert.push(rate(&ours) / rate(&upserts));
            vs_insert.push(rate(&ours) / rate(&inserts));
        }
        println!(
            "{writers} writers, medians of {rounds} rounds: {:.0} 202/s, {:.0} upserts/s, {:.0} INSERTs/s; \
             ratio to upserts {:.2}x (rounds {}), to INSERTs {:.2}x (rounds {})",
            common::median(ours_rates.clone()),
            common::median(upsert_rates.clone()),
            common::median(insert_rates.clone()),
            common::median(vs_upsert.clone()),
            listed(&vs_upsert),
            common::median(vs_insert.clone()),
            listed(&vs_insert)
        );
        let at = format!("{writers} writers");
        if !floor_rates.is_empty() {
            println!(
                "{writers} writer, medians of {rounds} rounds: the disk's floor {:.0} acknowledgements/s",
                common::median(floor_rates.clone())
            );
            report.add("write + fdatasync floor", &at, common::median(floor_rates));
        }
        report.add("cachesync 202", &at, common::median(ours_rates));
        report.add("Postgres upsert", &at, common::median(upsert_rates));
        report.add("Postgres INSERT", &at, common::median(insert_rates));
    }
    report.write();
}

async fn drain(addr: std::net::SocketAddr, wb: &WriteBehind, pg: &PgServer, db: &str) {
    let rows = drain_rows();
    let runs = drain_runs();
    println!("\n== drain: {rows} acknowledged rows into Postgres vs psql \\copy, {runs} interleaved runs ==");
    let (mut drains, mut copies) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // Fresh ids each run, into both tables alike; which side goes first alternates.
        let first_id = 10_000_000 + run * rows;
        let (drain, copy) = if run % 2 == 0 {
            let d = drain_once(addr, wb, pg, db, first_id, rows).await;
            (d, copy_once(pg, db, first_id, rows))
        } else {
            let c = copy_once(pg, db, first_id, rows);
            (drain_once(addr, wb, pg, db, first_id, rows).await, c)
        };
        println!(
            "run {:<3} drain {:>6.2}s {:>9.0} rows/s | \\copy {:>6.2}s {:>9.0} rows/s | {:>5.2}x",
            run + 1,
            drain,
            rows as f64 / drain,
            copy,
            rows as f64 / copy,
            copy / drain
        );
        drains.push(drain);
        copies.push(copy);
    }
    let ratios: Vec<f64> = copies.iter().zip(&drains).map(|(c, d)| c / d).collect();
    let (drain, copy) = (common::median(drains), common::median(copies));
    println!(
        "{:<40} {:>7.2}s {:>10.0} rows/s",
        "cachesync flusher drain (median)",
        drain,
        rows as f64 / drain
    );
    println!(
        "{:<40} {:>7.2}s {:>10.0} rows/s",
        "psql \\copy of the same rows (median)",
        copy,
        rows as f64 / copy
    );
    println!(
        "{:<40} {:>7.2}x (runs {})",
        "ratio (median of the runs' ratios)",
        common::median(ratios.clone()),
        listed(&ratios)
    );
    let mut report = common::report::Report::new(
        "write_behind_drain",
        "rows/s into Postgres: write-behind drain vs psql \\copy (medians)",
        "rows/s",
    );
    let at = format!("{}k rows", rows / 1000);
    report.add("cachesync drain", &at, rows as f64 / drain);
    report.add("psql \\copy", &at, rows as f64 / copy);
    report.write();
}

/// Accepts `rows` new rows while the table is locked against writes, then releases it: the
/// seconds until the flusher has them all in Postgres.
async fn drain_once(
    addr: std::net::SocketAddr,
    wb: &WriteBehind,
    pg: &PgServer,
    db: &str,
    first_id: u64,
    rows: u64,
) -> f64 {
    let sql = pg.connect(db).await;
    let locker = pg.connect(db).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE users IN EXCLUSIVE MODE;")
        .await
        .expect("lock");
    let before = backlog(addr).await;
    let next = Arc::new(AtomicU64::new(first_id));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut http = RawHttp::connect(addr).await;
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= first_id + rows {
                    return;
                }
                let (status, _) = http.roundtrip(&put_request(id)).await;
                assert_eq!(status, 202);
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    assert_eq!(backlog(addr).await, before + rows);
    let rss_before = rss_mb();
    let cpu_before = common::cpu_seconds(std::process::id());
    let t = Instant::now();
    locker.batch_execute("COMMIT").await.expect("unlock");
    flushed(wb).await;
    let drain = t.elapsed().as_secs_f64();
    // The sidecar's CPU over the drain (this process: the writers are done, only the backlog
    // poll runs beside it), at the clock tick's resolution.
    let cpu = common::cpu_seconds(std::process::id()) - cpu_before;
    // The window, on the clock `perf record -k CLOCK_MONOTONIC` stamps samples with (so a
    // profile of the whole run can be cut to the drain), and what the drain added to the process.
    println!(
        "drain window (CLOCK_MONOTONIC): {:?} .. {:?}; RSS {rss_before} -> {} MB; sidecar CPU {cpu:.2} s",
        t,
        Instant::now(),
        rss_mb()
    );
    let n: i64 = sql
        .query_one(
            "SELECT count(*) FROM users WHERE id >= $1 AND id < $2",
            &[&(first_id as i64), &((first_id + rows) as i64)],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n as u64, rows);
    drain
}

/// `psql \copy` of the same rows into an identical table: its seconds.
fn copy_once(pg: &PgServer, db: &str, first_id: u64, rows: u64) -> f64 {
    let csv = temp_dir("bench-wb-csv", None).join("rows.csv");
    let mut text = String::with_capacity(rows as usize * 48);
    for id in first_id..first_id + rows {
        text.push_str(&format!("{id},user {id},u{id}@example.com,{}\n", id % 1000));
    }
    std::fs::write(&csv, text).expect("csv");
    let t = Instant::now();
    let st = common::pg_tool("psql", pg, db)
        .args(["-q", "-c"])
        .arg(format!(
            "\\copy copied (id, name, email, v) FROM '{}' WITH (FORMAT csv)",
            csv.display()
        ))
        .status()
        .expect("psql");
    assert!(st.success());
    t.elapsed().as_secs_f64()
}
