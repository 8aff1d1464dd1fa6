//! Commit → served measurements shared by the CDC and replication benchmarks: writers commit
//! UPDATEs of `bench (id int, v bigint)` at a fixed rate; pollers GET sampled keys until they
//! serve the new value; `pg_recvlogical` on its own slot gives the floor any logical-decoding
//! consumer pays.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachesync_testkit::postgres::PgServer;

use super::{BlockingHttp, Lat, get_request};

/// Writer connections.
pub const WRITERS: usize = 8;
/// Updates sampled per second, whatever the rate.
pub const SAMPLES_PER_SECOND: f64 = 200.0;
/// Persistent poller connections per target.
pub const POLLERS: usize = 16;

pub struct Recv {
    /// Arrival instant of each sampled value's line.
    arrivals: Arc<Mutex<HashMap<i64, Instant>>>,
    sampled: Arc<Mutex<std::collections::HashSet<i64>>>,
    _child: std::process::Child,
}

/// Starts pg_recvlogical on its own slot, noting when each sampled value's line arrives.
pub fn start_recvlogical(pg: &PgServer, db: &str) -> Recv {
    let mut child = super::recvlogical(pg, db, "bench_recvlogical");
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
pub type Sample = (i64, i64, Instant);

/// Polls a sample's key until GET returns its value (or a newer one); returns the latency.
pub fn poll(http: &mut BlockingHttp, (v, id, committed): Sample) -> Option<Duration> {
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

/// One run at `rate` updates/s of `bench (id, v)` over `keys` keys for `run_for`: for a sample
/// of the updates, the time from the commit to a GET of the key serving the new value on each of
/// `targets`, and to `recv`'s line. Returns (per target, pg_recvlogical, achieved rate).
pub async fn run_rate(
    url: &str,
    targets: &[std::net::SocketAddr],
    recv: &Recv,
    rate: f64,
    seq_base: i64,
    keys: i64,
    run_for: Duration,
) -> (Vec<Lat>, Lat, f64) {
    let sample_every = ((rate / SAMPLES_PER_SECOND).round() as i64).max(1);
    let commits: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let mut senders = Vec::new();
    let mut pollers = Vec::new();
    let mut results = Vec::new();
    for &addr in targets {
        let ours = Arc::new(Mutex::new(Lat::new()));
        results.push(ours.clone());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Sample>();
        senders.push(tx);
        let rx = Arc::new(Mutex::new(rx));
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
    }
    let started = Instant::now();
    let total = (rate * run_for.as_secs_f64()) as i64;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, commits, sampled, senders) =
            (url.to_string(), commits.clone(), recv.sampled.clone(), senders.clone());
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
                let id = v % keys;
                let sample = v % sample_every == 0;
                if sample {
                    sampled.lock().unwrap().insert(v);
                }
                client.execute(&stmt, &[&v, &(id as i32)]).await.expect("update");
                let committed = Instant::now();
                if sample {
                    commits.lock().unwrap().insert(v, committed);
                    for tx in &senders {
                        let _ = tx.send((v, id, committed));
                    }
                }
                i += WRITERS as i64;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64().max(run_for.as_secs_f64());
    drop(senders);
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
    let ours = results
        .iter()
        .map(|r| std::mem::replace(&mut *r.lock().unwrap(), Lat::new()))
        .collect();
    (ours, theirs, achieved)
}
