//! Commit-log throughput against the disk's own limit, measured in the same run.
//!
//! For 100-byte and 1 KiB events with `fsync = "always"`, at 1, 8 and 64 concurrent appenders:
//! records/s, MB/s and append latency (p50/p99/p999), and how many records each fdatasync
//! carried (group commit). Beside each: a raw loop of `write` + `fdatasync` of batches of the same
//! size into a preallocated, zero-filled file in the same directory (positional writes, so no
//! sync has to journal a new file size — the fastest the disk allows for that batch size; an
//! appending loop is slower, see `writer.rs`), and the ratio. Then tail-read throughput: a
//! `Tail` reading everything back.
//!
//! Each case runs `ROUNDS` times (default 3), the log and the raw loop in alternating order; the
//! table gives medians over rounds, and each round's ratio in parentheses (this disk's fsync
//! time swings from run to run).
//!
//! Run: `cargo bench --bench commitlog` (uses a directory under the system temp dir; set
//! CACHESYNC_BENCH_DIR to measure another disk). Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachesync::commitlog::{CommitLog, LogConfig, Offset};
use cachesync::event::{ChangeEvent, Source};
use common::Lat;
use prometheus::Registry;

const RUN_FOR: Duration = Duration::from_secs(3);

fn main() {
    common::block_on(run());
}

fn base_dir() -> std::path::PathBuf {
    std::env::var_os("CACHESYNC_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir)
}

/// An encoded event whose payload is about `size` bytes.
fn payload(size: usize) -> Vec<u8> {
    let mut e = ChangeEvent::put("users", "123456", Bytes::new()).from_origin("bench", 1 << 40, Source::Api);
    let overhead = e.encode().len();
    e.value = Some(Bytes::from(vec![b'x'; size.saturating_sub(overhead)]));
    e.encode()
}

/// (sum, count) of the group-commit histogram.
fn groups(registry: &Registry) -> (f64, u64) {
    registry
        .gather()
        .iter()
        .find(|m| m.name() == "cachesync_log_group_commit_records")
        .map(|m| {
            let h = m.get_metric()[0].get_histogram();
            (h.get_sample_sum(), h.get_sample_count())
        })
        .unwrap_or((0.0, 0))
}

async fn run() {
    println!(
        "cachesync commitlog bench: fsync=always, directory {}, {} cores",
        base_dir().display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for size in [100usize, 1024] {
        let mut report = common::report::Report::new(
            &format!("commitlog_{size}b"),
            &format!("{size}-byte records appended per second, fsync = always"),
            "records/s",
        );
        let p = payload(size);
        let frame = p.len() + cachesync::commitlog::record::HEADER_LEN;
        println!("\n== {size}-byte events ({frame} bytes framed) ==");
        println!(
            "{:<10} {:>11} {:>8} {:>9} {:>9} {:>9} {:>10} | {:>14} {:>8} | {:>7}",
            "appenders",
            "records/s",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "p999 µs",
            "rec/fsync",
            "raw records/s",
            "raw MB/s",
            "ratio"
        );
        for appenders in [1usize, 8, 64] {
            let mut rounds = Vec::new();
            for round in 0..rounds_wanted() {
                // Odd rounds run the raw loop first, at the batch size the round before reached.
                let raw_first = (round % 2 == 1)
                    .then(|| rounds.last().map(|r: &Round| r.per_sync.round().max(1.0) as usize))
                    .flatten();
                let last = round + 1 == rounds_wanted();
                rounds.push(round_of(size, appenders, &p, frame, raw_first, last).await);
            }
            let med = |f: &dyn Fn(&Round) -> f64| {
                let mut v: Vec<f64> = rounds.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (rate, raw_rate) = (med(&|r| r.rate), med(&|r| r.raw_rate));
            println!(
                "{:<10} {:>11.0} {:>8.2} {:>9.1} {:>9.1} {:>9.1} {:>10.1} | {:>14.0} {:>8.2} | {:>6.2}x  ({})",
                appenders,
                rate,
                rate * frame as f64 / 1e6,
                med(&|r| r.lat.p(0.5)),
                med(&|r| r.lat.p(0.99)),
                med(&|r| r.lat.p(0.999)),
                med(&|r| r.per_sync),
                raw_rate,
                raw_rate * frame as f64 / 1e6,
                med(&|r| r.rate / r.raw_rate),
                rounds
                    .iter()
                    .map(|r| format!("{:.2}", r.rate / r.raw_rate))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let at = format!("{appenders} appenders");
            report.add("cachesync log", &at, rate);
            report.add("preallocated write + fdatasync loop", &at, raw_rate);
        }
        report.write();
    }
}

/// Rounds per case (`ROUNDS`, default 3): each runs the log and the raw loop at the batch size
/// the log's group commits reached, in alternating order; the table gives medians over rounds
/// and each round's ratio.
fn rounds_wanted() -> usize {
    common::env_or("ROUNDS", 3usize).max(1)
}

/// One round of a case: the log's figures and the raw loop's beside them.
struct Round {
    rate: f64,
    lat: Lat,
    per_sync: f64,
    raw_rate: f64,
}

/// `appenders` tasks appending `p` for RUN_FOR to a fresh log, and the raw loop: after the log
/// at the batch size its group commits reached, or before it at `raw_first`'s (so the order
/// alternates between rounds). With `read_back` (the last round of 64 appenders), a tail reads
/// everything back too.
async fn round_of(
    size: usize,
    appenders: usize,
    p: &[u8],
    frame: usize,
    raw_first: Option<usize>,
    read_back: bool,
) -> Round {
    let dir = base_dir().join(format!("cachesync-bench-log-{}-{size}-{appenders}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let raw_before = raw_first.map(|batch| {
        std::fs::create_dir_all(&dir).expect("bench dir");
        raw_loop(&dir, frame, batch)
    });
    let registry = Registry::new();
    let (log, _) = CommitLog::open(LogConfig::new(&dir), &registry).await.expect("open");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..appenders {
        let (log, p) = (log.clone(), p.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut lat = Lat::new();
            while started.elapsed() < RUN_FOR {
                let t = Instant::now();
                log.append(vec![p.clone()]).await.expect("append");
                lat.record(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Lat::new();
    for t in tasks {
        lat.merge(&t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    let records = log.end().0;
    let (sum, count) = groups(&registry);
    let per_sync = if count == 0 { 1.0 } else { sum / count as f64 };
    let rate = records as f64 / elapsed.as_secs_f64();
    // The disk's limit for this batch size: sequential write + fdatasync, same directory.
    let raw_rate = raw_before.unwrap_or_else(|| raw_loop(&dir, frame, per_sync.round().max(1.0) as usize));
    if read_back && appenders == 64 {
        tail_read(&log, records, frame).await;
    }
    log.close().await.expect("close");
    let _ = std::fs::remove_dir_all(&dir);
    Round {
        rate,
        lat,
        per_sync,
        raw_rate,
    }
}

/// Bytes of the raw loop's preallocated file; the loop wraps around inside it.
const RAW_FILE_BYTES: usize = 32 * 1024 * 1024;

/// Records/s of `write(batch × frame bytes) + fdatasync` in a loop for RUN_FOR, into a
/// file zero-filled and synced beforehand (positional writes that wrap around inside it).
fn raw_loop(dir: &std::path::Path, frame: usize, batch: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let path = dir.join("raw-baseline.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("raw file");
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..RAW_FILE_BYTES / zeros.len() {
        f.write_all(&zeros).expect("zero-fill");
    }
    f.sync_all().expect("fsync the preallocated file");
    let buf = vec![0xABu8; frame * batch];
    let slots = (RAW_FILE_BYTES / buf.len()).max(1) as u64;
    let started = Instant::now();
    let mut batches = 0u64;
    while started.elapsed() < RUN_FOR {
        f.write_all_at(&buf, (batches % slots) * buf.len() as u64)
            .expect("write");
        f.sync_data().expect("fdatasync");
        batches += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    (batches * batch as u64) as f64 / secs
}

async fn tail_read(log: &CommitLog, records: u64, frame: usize) {
    let mut tail = log.tail(Offset(0));
    let started = Instant::now();
    let mut n = 0u64;
    while n < records {
        n += tail.next(4096, 8 << 20).await.expect("read").len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "           tail read of those {records} records: {:.0} records/s, {:.1} MB/s (page cache warm)",
        n as f64 / secs,
        n as f64 * frame as f64 / secs / 1e6
    );
}
