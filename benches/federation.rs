//! Event federation between nodes on one 2-core machine (no Postgres: in-memory federated
//! keyspaces, each node with its own log, fsync = always, links over loopback HTTP).
//!
//! - Shipping: node `a` originates federated events (appended to its log in batches of 1000 —
//!   its sequencer numbers them as they are framed) while node `b` follows it. The events are
//!   of a keyspace neither node holds, so what is measured is the shipping (stream, admission,
//!   durable append), as in the replication bench; the lag runs below apply every event. Printed per run:
//!   `a`'s own append rate, and the rate at which `b` has them durable and admitted — the time
//!   from the first append until `b`'s vector holds `a`'s last event — with their ratio. Three
//!   runs and the medians.
//! - Lag through a chain of three (`a → b → c`: `b` follows `a`, `c` follows `b`): `a`
//!   originates events at a paced 10k events/s (a batch every 10 ms); per batch, the time from
//!   the start of its append at `a` until `a` itself has applied it (the baseline: a local
//!   durable append and apply), until `b` has, and until `c` has. p50/p99/p999 of each and the
//!   ratios against the baseline.
//!
//! Run: `cargo bench --bench federation`. Nothing here asserts a time.

#[path = "common/mod.rs"]
mod common;

/// The same allocator as the `cachesync` binary, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachesync::config::Config;
use cachesync::event::{ChangeEvent, Source};
use cachesync::federation::Federation;
use cachesync::server::Server;
use cachesync_testkit::{free_port, temp_dir};
use common::Lat;

const SHIP_EVENTS: usize = 200_000;
const SHIP_BATCH: usize = 1000;
const RUNS: usize = 3;
const RATE: f64 = 10_000.0;
const TICK: Duration = Duration::from_millis(10);
const LAG_FOR: Duration = Duration::from_secs(10);

fn main() {
    common::block_on(run());
}

/// A node's configuration: its log server on `port`, following `peers` (log server ports).
fn config(name: &str, port: u16, peers: &[(&str, u16)]) -> Config {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"{name}\"\n[log]\ndir = \"{}\"\n\
         [replication]\nlisten = \"127.0.0.1:{port}\"\n\
         [[keyspace]]\nname = \"kv\"\nfederate = true\nmax_entries = 2000000\n",
        temp_dir(&format!("bench-fed-{name}"), None).display()
    );
    for (peer, p) in peers {
        text.push_str(&format!(
            "[[peer]]\nname = \"{peer}\"\nurl = \"http://127.0.0.1:{p}\"\n"
        ));
    }
    Config::parse(&text).expect("config")
}

async fn started(config: Config) -> Server {
    let s = Server::start(config).await.expect("start");
    s.wait_ready(Duration::from_secs(60)).await.expect("ready");
    s
}

fn federation(s: &Server) -> Arc<Federation> {
    s.state().federation.clone().expect("the node federates")
}

/// The highest sequence of `a`'s events admitted (durable or about to be) at a node.
fn admitted(f: &Federation, epoch: u64) -> u64 {
    f.sequencer.vector().get("a", epoch)
}

/// The highest sequence of `a`'s events a node has applied.
fn applied(f: &Federation, epoch: u64) -> u64 {
    f.applied().vector.get("a", epoch)
}

/// Events originated at `a` in `keyspace` (`kv` is applied on every node; `ship` on none, so
/// shipping alone is measured, as in the replication bench).
fn batch(keyspace: &str, n: u64, size: usize, value: &Bytes) -> Vec<ChangeEvent> {
    (0..size)
        .map(|i| {
            ChangeEvent::put(keyspace, format!("k{}", (n as usize + i) % 100_000), value.clone())
                .from_origin("a", 1, Source::Api)
                .federated()
        })
        .collect()
}

async fn run() {
    println!("cachesync federation: nodes on one 2-core machine, fsync = always, loopback links");
    let value =
        Bytes::from_static(br#"{"payload":"0123456789012345678901234567890123456789012345678901234567890123456789"}"#);

    // Shipping between two nodes.
    let (pa, pb) = (free_port(), free_port());
    let a = started(config("a", pa, &[])).await;
    let b = started(config("b", pb, &[("a", pa)])).await;
    let (fa, fb) = (federation(&a), federation(&b));
    let epoch = fa.epoch();
    let log = a.state().log.clone().expect("a log");
    println!(
        "\n== shipping: {SHIP_EVENTS} federated events originated at a (batches of {SHIP_BATCH}) while b follows a =="
    );
    let (mut appended, mut shipped) = (Vec::new(), Vec::new());
    for run in 1..=RUNS {
        let start = admitted(&fa, epoch);
        let t0 = Instant::now();
        let mut n = 0u64;
        while (n as usize) < SHIP_EVENTS {
            log.append_events(&batch("ship", n, SHIP_BATCH, &value))
                .await
                .expect("append");
            n += SHIP_BATCH as u64;
        }
        let append_secs = t0.elapsed().as_secs_f64();
        let target = start + SHIP_EVENTS as u64;
        while admitted(&fb, epoch) < target {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let ship_secs = t0.elapsed().as_secs_f64();
        let (ra, rs) = (SHIP_EVENTS as f64 / append_secs, SHIP_EVENTS as f64 / ship_secs);
        println!(
            "run {run}: a appends {ra:>10.0} events/s   b has them durable {rs:>10.0} events/s   ratio {:.2}",
            rs / ra
        );
        appended.push(ra);
        shipped.push(rs);
    }
    let ratios: Vec<f64> = appended.iter().zip(&shipped).map(|(a, s)| s / a).collect();
    println!(
        "median: a appends {:.0}/s, b receives {:.0}/s, ratio {:.2} (worst run {:.2})",
        common::median(appended),
        common::median(shipped),
        common::median(ratios.clone()),
        ratios.iter().copied().fold(f64::MAX, f64::min)
    );
    drop((a, b));

    // Lag through a chain of three at a paced rate.
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = started(config("a", pa, &[])).await;
    let b = started(config("b", pb, &[("a", pa)])).await;
    let c = started(config("c", pc, &[("b", pb)])).await;
    let (fa, fb, fc) = (federation(&a), federation(&b), federation(&c));
    let epoch = fa.epoch();
    let log = a.state().log.clone().expect("a log");
    // Let the links come up.
    log.append_events(&batch("kv", 0, 1, &value)).await.expect("append");
    let first = admitted(&fa, epoch);
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied(&fc, epoch) < first && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let per_tick = (RATE * TICK.as_secs_f64()).round() as usize;
    println!(
        "\n== lag through a chain a → b → c: {RATE:.0} events/s originated at a ({per_tick} every {TICK:?}) for {LAG_FOR:?} =="
    );
    // Batches sent: (a's last sequence in it, when its append started).
    let sent: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let watchers: Vec<_> = [fa.clone(), fb.clone(), fc.clone()]
        .into_iter()
        .map(|f| {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut lat = Lat::new();
                let mut rx = f.subscribe_applied();
                let mut next = 0usize;
                let t0 = Instant::now();
                loop {
                    let have = rx.borrow_and_update().vector.get("a", epoch);
                    let now = Instant::now();
                    {
                        let s = sent.lock().expect("lock");
                        while next < s.len() && s[next].0 <= have {
                            lat.record(now - s[next].1);
                            next += 1;
                        }
                        if next > 0 && next == s.len() && t0.elapsed() > LAG_FOR {
                            break;
                        }
                    }
                    if tokio::time::timeout(Duration::from_secs(30), rx.changed())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                lat.elapsed = t0.elapsed();
                lat
            })
        })
        .collect();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut events = 0usize;
    while t0.elapsed() < LAG_FOR {
        tick.tick().await;
        let began = Instant::now();
        let range = log
            .append_events(&batch("kv", n, per_tick, &value))
            .await
            .expect("append");
        n += per_tick as u64;
        events += range.end.0.saturating_sub(range.start.0) as usize;
        let last = admitted(&fa, epoch);
        sent.lock().expect("lock").push((last, began));
    }
    let achieved = events as f64 / t0.elapsed().as_secs_f64();
    // One more event wakes the watchers after the last batch.
    log.append_events(&batch("kv", n, 1, &value)).await.expect("append");
    let mut lats = Vec::new();
    for w in watchers {
        lats.push(w.await.expect("watcher"));
    }
    println!("achieved {achieved:.0} events/s at a");
    let labels = [
        "a: append → applied at a (baseline)",
        "b: append at a → applied at b",
        "c: append at a → applied at c",
    ];
    for (l, lat) in labels.iter().zip(&lats) {
        println!("{}", common::ms_row(l, lat, 44));
    }
    println!("{}", common::ratio_line("b / baseline", &lats[1], &lats[0]));
    println!("{}", common::ratio_line("c / baseline", &lats[2], &lats[0]));
    let mut report = common::report::Report::new(
        "federation",
        "append at a → applied (a: baseline; b, c: federated peers)",
        "µs",
    );
    for (series, lat) in ["a (baseline)", "b", "c"].iter().zip(&lats) {
        report.add_latency(series, "lag", lat);
    }
    report.write();
    println!(
        "duplicates kept out: a {} b {} c {}",
        fa.sequencer.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        fb.sequencer.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        fc.sequencer.duplicates.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop((a, b, c));
}
