//! The consistency checker: drives random writes — direct SQL, write-through and write-behind —
//! on a few hundred keys through two sidecars while readers read, injects faults, and reports
//! what a user of the cache would see go wrong.
//!
//! Setup: its own throwaway Postgres; one table `kv (id, ver, …)` of `KEYS` rows; two real
//! `cachesync` processes (`s1`, `s2`), each with keyspace `kv` (write-through, CDC, read-through)
//! and `kvb` (write-behind, CDC) over that table, `[cdc] max_staleness = 50ms`. Keys
//! 1..=100 are written with SQL, 101..=200 through `kv` (on either node), 201..=300 through
//! `kvb` (keys 201..=250 on `s1`, 251..=300 on `s2`, so each key has one writing node). Every
//! write sets `ver` to the key's next version and is recorded with the moment it was
//! acknowledged; a write whose answer was lost (a killed sidecar) is recorded as unknown.
//!
//! Faults (with `--faults`, one every `FAULT_EVERY`, in turn): SIGKILL of `s2` and a restart on
//! the same log directory; a Postgres restart (1 s down); a column added, then renamed, then
//! dropped; `s1`'s replication slot dropped.
//!
//! Reported:
//! - **stale reads**: a read that started at `t` returned version `v` of a key although a newer
//!   version had been acknowledged before `t - 100 ms` — as a fraction of all reads. A
//!   write-behind write is in the database only once flushed, so a node that did not take it is
//!   held to when it reached Postgres instead (the flush's commit timestamp, with
//!   `track_commit_timestamp = on`, read by a watcher every few ms). Reads that started while
//!   Postgres itself was down are counted apart.
//! - **regressions**: a reader (pinned to one node) saw a key's version go down.
//! - **read-your-writes misses**: right after a write was acknowledged by a node, a read of the
//!   key on that node returned an older version.
//! - **lost writes**: a key whose final version in Postgres is below its last acknowledged one.
//! - **stale after quiescence**: keys whose value on some node differs from Postgres 1 s after
//!   the writes stop.
//!
//! With `--l2`, both keyspaces also sit behind a shared `redis-server` (`l2 = true`), and the
//! faults include Redis killed and restarted empty.
//!
//! Run: `cargo bench --bench consistency -- [--faults] [--l2] [--seconds N] [--max-staleness D]`
//! (defaults: no faults, 60 s, 50ms). A loose `--max-staleness 5s` shows the checker catching
//! what the contract prevents. Nothing here asserts; it prints its figures.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachesync_testkit::postgres::{PgOptions, PgServer};
use cachesync_testkit::sidecar::Sidecar;
use cachesync_testkit::temp_dir;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEYS: i64 = 300;
const READERS_PER_NODE: usize = 3;
const FRESH: Duration = Duration::from_millis(100);
const FAULT_EVERY: Duration = Duration::from_secs(12);
/// Pause between one writer's writes.
const WRITE_GAP: Duration = Duration::from_millis(4);

fn main() {
    common::block_on(run());
}

/// Which path writes a key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path_ {
    Sql,
    Through,
    Behind,
}

fn path_of(key: i64) -> Path_ {
    match key {
        1..=100 => Path_::Sql,
        101..=200 => Path_::Through,
        _ => Path_::Behind,
    }
}

/// The keyspace a key is read through (write-behind keys through their own keyspace, so the
/// writing node's pending writes are seen).
fn keyspace_of(key: i64) -> &'static str {
    if path_of(key) == Path_::Behind { "kvb" } else { "kv" }
}

/// Everything recorded during the run.
#[derive(Default)]
struct Record {
    /// Per key: (version, acknowledged at), in version order.
    acks: HashMap<i64, Vec<(i64, Instant)>>,
    /// Per key: versions whose outcome is unknown.
    unknown: HashMap<i64, Vec<i64>>,
    /// Windows in which Postgres was down.
    pg_down: Vec<(Instant, Instant)>,
    /// Write-behind keys: (version, committed no earlier than) as first seen in Postgres.
    in_db: HashMap<i64, Vec<(i64, Instant)>>,
    ryw_checks: u64,
    ryw_misses: u64,
    faults: Vec<String>,
}

/// One read's result.
struct ReadResult {
    /// The node the reader is pinned to.
    node: usize,
    key: i64,
    ver: i64,
    started: Instant,
    reported: bool,
}

/// A keep-alive HTTP/1.1 connection that reconnects after errors.
struct Conn {
    addr: Arc<Mutex<String>>,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: Arc<Mutex<String>>) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Sends a request; (status, has X-Cache-Lag-Ms, body).
    async fn send(&mut self, method: &str, path: &str, body: &str) -> Option<(u16, bool, Vec<u8>)> {
        match tokio::time::timeout(Duration::from_secs(3), self.try_send(method, path, body)).await {
            Ok(Some(r)) => Some(r),
            _ => {
                self.stream = None;
                None
            }
        }
    }

    async fn try_send(&mut self, method: &str, path: &str, body: &str) -> Option<(u16, bool, Vec<u8>)> {
        if self.stream.is_none() {
            let addr = self.addr.lock().unwrap().clone();
            let s = TcpStream::connect(&addr).await.ok()?;
            s.set_nodelay(true).ok()?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.ok()?;
        self.buf.clear();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).ok()?.to_ascii_lowercase();
                let status: u16 = head.get(9..12)?.parse().ok()?;
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().ok()))
                    .flatten()
                    .unwrap_or(0);
                let lag = head.contains("\r\nx-cache-lag-ms:");
                while self.buf.len() < end + 4 + len {
                    self.read_more().await?;
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                if head.contains("connection: close") {
                    self.stream = None;
                }
                return Some((status, lag, body));
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Option<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.as_mut()?.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Some(())
    }
}

fn ver_of(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(body).ok()?["ver"].as_i64()
}

fn config(pg: &PgServer, db: &str, node: &str, log: &Path, max_staleness: &str, redis: Option<&str>) -> String {
    let (l2, section) = match redis {
        Some(url) => (
            "l2 = true\n",
            format!("[redis]\nurl = \"{url}\"\nmax_invalidation_delay = \"100ms\"\nreconcile_every = \"2s\"\n"),
        ),
        None => ("", String::new()),
    };
    format!(
        r#"[server]
listen = "127.0.0.1:0"
node_id = "{node}"
shutdown_grace = "10s"
[postgres]
url = "{url}"
acquire_timeout = "2s"
connect_timeout = "2s"
[log]
dir = "{log}"
[cdc]
slot = "check_{node}"
heartbeat = "0s"
ready_grace = "2s"
max_staleness = "{max_staleness}"
schema_check = "500ms"
[write_behind]
batch_delay = "2ms"
retry_initial = "50ms"
retry_max = "500ms"
[[keyspace]]
name = "kv"
table = "kv"
key = "id"
columns = ["id", "ver"]
write = "through"
cdc = "update"
max_entries = 10000
{l2}[[keyspace]]
name = "kvb"
table = "kv"
key = "id"
columns = ["id", "ver"]
write = "behind"
cdc = "update"
max_entries = 10000
{l2}{section}"#,
        url = pg.url(db),
        log = log.display()
    )
}

async fn wait_ready(addr: &Arc<Mutex<String>>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut c = Conn::new(addr.clone());
    while Instant::now() < deadline {
        if let Some((200, _, _)) = c.send("GET", "/readyz", "").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("a sidecar did not become ready within 120s");
}

struct Node {
    name: &'static str,
    addr: Arc<Mutex<String>>,
    sidecar: Mutex<Option<Sidecar>>,
    config: String,
}

impl Node {
    fn start(name: &'static str, config: String) -> Node {
        let s = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), Some(&config));
        Node {
            name,
            addr: Arc::new(Mutex::new(s.addr.to_string())),
            sidecar: Mutex::new(Some(s)),
            config,
        }
    }

    fn sigkill_and_restart(&self) {
        if let Some(mut s) = self.sidecar.lock().unwrap().take() {
            s.kill();
        }
        let s = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), Some(&self.config));
        *self.addr.lock().unwrap() = s.addr.to_string();
        *self.sidecar.lock().unwrap() = Some(s);
    }
}

async fn run() {
    let args: Vec<String> = std::env::args().collect();
    let faults = args.iter().any(|a| a == "--faults");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seconds: u64 = value("--seconds").and_then(|s| s.parse().ok()).unwrap_or(60);
    let max_staleness = value("--max-staleness").unwrap_or_else(|| "50ms".into());
    // `--l2`: both keyspaces also behind a shared Redis tier (and, with faults, Redis restarts).
    let redis = args
        .iter()
        .any(|a| a == "--l2")
        .then(cachesync_testkit::redis::RedisServer::start);
    let redis_url = redis.as_ref().map(|r| r.url());
    // Commit timestamps tell when a write-behind flush really committed.
    let pg = PgServer::start(PgOptions {
        settings: vec![("track_commit_timestamp".into(), "on".into())],
        ..PgOptions::default()
    });
    let db = pg.create_database().await;
    let sql = pg.connect(&db.name).await;
    sql.batch_execute(&format!(
        "CREATE TABLE kv (id int PRIMARY KEY, ver bigint NOT NULL, pad text NOT NULL DEFAULT 'x'); \
         INSERT INTO kv SELECT g, 0 FROM generate_series(1, {KEYS}) g;"
    ))
    .await
    .unwrap();
    let nodes: Arc<Vec<Node>> = Arc::new(vec![
        Node::start(
            "s1",
            config(
                &pg,
                &db.name,
                "s1",
                &temp_dir("check-s1", None),
                &max_staleness,
                redis_url.as_deref(),
            ),
        ),
        Node::start(
            "s2",
            config(
                &pg,
                &db.name,
                "s2",
                &temp_dir("check-s2", None),
                &max_staleness,
                redis_url.as_deref(),
            ),
        ),
    ]);
    for n in nodes.iter() {
        wait_ready(&n.addr).await;
    }
    println!(
        "consistency check: {KEYS} keys, 2 sidecars, {} readers, {seconds}s, faults {}, max_staleness {max_staleness}, redis tier {}",
        2 * READERS_PER_NODE,
        if faults { "on" } else { "off" },
        if redis.is_some() { "on" } else { "off" }
    );
    let record = Arc::new(Mutex::new(Record::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let versions: Arc<Vec<AtomicU64>> = Arc::new((0..=KEYS).map(|_| AtomicU64::new(0)).collect());

    // Writers: one per path (and one per write-behind node), each owning its keys' versions.
    let mut writers = Vec::new();
    for (path, range, nodes_of) in [
        (Path_::Sql, 1..=100, vec![]),
        (Path_::Through, 101..=200, vec![0, 1]),
        (Path_::Behind, 201..=250, vec![0]),
        (Path_::Behind, 251..=300, vec![1]),
    ] {
        let (record, stop, versions, nodes, url) = (
            record.clone(),
            stop.clone(),
            versions.clone(),
            nodes.clone(),
            pg.url(&db.name),
        );
        writers.push(tokio::spawn(async move {
            let mut conns: Vec<Conn> = nodes_of.iter().map(|&i| Conn::new(nodes[i].addr.clone())).collect();
            let mut client = None;
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut turn = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(WRITE_GAP).await;
                let key: i64 = rng.random_range(range.clone());
                let ver = versions[key as usize].load(Ordering::Relaxed) as i64 + 1;
                let acked = match path {
                    Path_::Sql => {
                        if client.is_none() {
                            if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                                tokio::spawn(conn);
                                client = Some(c);
                            } else {
                                continue;
                            }
                        }
                        let c = client.as_ref().unwrap();
                        match c
                            .execute("UPDATE kv SET ver = $2 WHERE id = $1", &[&(key as i32), &ver])
                            .await
                        {
                            Ok(_) => Some(None),
                            Err(e) => {
                                if c.is_closed() {
                                    client = None;
                                }
                                // A failed commit's outcome is unknown only if the connection broke.
                                if e.as_db_error().is_none() { None } else { continue }
                            }
                        }
                    }
                    Path_::Through | Path_::Behind => {
                        turn += 1;
                        let i = turn % conns.len();
                        let ks = keyspace_of(key);
                        let r = conns[i]
                            .send("PUT", &format!("/v1/kv/{ks}/{key}"), &format!("{{\"ver\": {ver}}}"))
                            .await;
                        match r {
                            Some((200 | 202, _, _)) => Some(Some(i)),
                            // Refused before anything happened (not ready, unavailable).
                            Some((400..=599, _, _)) if path == Path_::Behind => continue,
                            // A write-through answer of 503 may follow a commit whose answer was
                            // lost; any other failure: unknown.
                            _ => None,
                        }
                    }
                };
                versions[key as usize].store(ver as u64, Ordering::Relaxed);
                match acked {
                    Some(node) => {
                        let at = Instant::now();
                        record.lock().unwrap().acks.entry(key).or_default().push((ver, at));
                        // Read-your-writes on the node that took the write.
                        if let Some(i) = node {
                            let ks = keyspace_of(key);
                            if let Some((200, _, body)) = conns[i].send("GET", &format!("/v1/kv/{ks}/{key}"), "").await
                            {
                                let mut r = record.lock().unwrap();
                                r.ryw_checks += 1;
                                if ver_of(&body).is_some_and(|v| v < ver) {
                                    r.ryw_misses += 1;
                                }
                            }
                        }
                    }
                    None => record.lock().unwrap().unknown.entry(key).or_default().push(ver),
                }
            }
        }));
    }

    // Write-behind writes reach Postgres later than their 202: watch the table to learn when
    // each version got there (its commit timestamp, on this machine's clock).
    let watcher = {
        let (record, stop, url) = (record.clone(), stop.clone(), pg.url(&db.name));
        tokio::spawn(async move {
            let mut client = None;
            let (base_sys, base) = (std::time::SystemTime::now(), Instant::now());
            let base_epoch = base_sys.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            client = Some(c);
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let q = "SELECT id, ver, coalesce(extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8, 0) FROM kv WHERE id > 200";
                match client.as_ref().unwrap().query(q, &[]).await {
                    Ok(rows) => {
                        let mut r = record.lock().unwrap();
                        for row in rows {
                            let (key, ver, at) =
                                (row.get::<_, i32>(0) as i64, row.get::<_, i64>(1), row.get::<_, f64>(2));
                            let committed = if at - base_epoch >= 0.0 {
                                base + Duration::from_secs_f64(at - base_epoch)
                            } else {
                                base
                            };
                            let seen = r.in_db.entry(key).or_default();
                            if seen.last().is_none_or(|&(v, _)| v < ver) {
                                seen.push((ver, committed));
                            }
                        }
                    }
                    Err(_) => client = None,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Readers, pinned to a node each.
    let mut readers = Vec::new();
    for n in 0..2 {
        for _ in 0..READERS_PER_NODE {
            let (stop, addr) = (stop.clone(), nodes[n].addr.clone());
            readers.push(tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let mut rng = rand::rngs::StdRng::from_os_rng();
                let mut out: Vec<ReadResult> = Vec::with_capacity(1 << 20);
                while !stop.load(Ordering::Relaxed) {
                    let key: i64 = rng.random_range(1..=KEYS);
                    let started = Instant::now();
                    match conn
                        .send("GET", &format!("/v1/kv/{}/{key}", keyspace_of(key)), "")
                        .await
                    {
                        Some((200, reported, body)) => {
                            if let Some(ver) = ver_of(&body) {
                                out.push(ReadResult {
                                    node: n,
                                    key,
                                    ver,
                                    started,
                                    reported,
                                });
                            }
                        }
                        Some(_) => {}
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                out
            }));
        }
    }

    // Faults.
    let started = Instant::now();
    let mut fault_no = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(if faults { FAULT_EVERY } else { Duration::from_secs(1) }).await;
        if !faults || started.elapsed() >= Duration::from_secs(seconds) {
            continue;
        }
        let kinds = if redis.is_some() { 7 } else { 6 };
        let name = match fault_no % kinds {
            6 => {
                let r = redis.clone().expect("redis");
                tokio::task::spawn_blocking(move || r.restart()).await.unwrap();
                "Redis killed and restarted empty".to_string()
            }
            0 => {
                let n = nodes.clone();
                tokio::task::spawn_blocking(move || n[1].sigkill_and_restart())
                    .await
                    .unwrap();
                wait_ready(&nodes[1].addr).await;
                "SIGKILL and restart of s2".to_string()
            }
            1 => {
                let down = Instant::now();
                let p = pg.clone();
                tokio::task::spawn_blocking(move || {
                    p.stop();
                    std::thread::sleep(Duration::from_secs(1));
                    p.resume();
                })
                .await
                .unwrap();
                record.lock().unwrap().pg_down.push((down, Instant::now()));
                "Postgres restart (1s down)".to_string()
            }
            2 => {
                ddl(&pg, &db.name, "ALTER TABLE kv ADD COLUMN extra int NOT NULL DEFAULT 7").await;
                "column added".into()
            }
            3 => {
                ddl(&pg, &db.name, "ALTER TABLE kv RENAME COLUMN extra TO extra2").await;
                "column renamed".into()
            }
            4 => {
                ddl(&pg, &db.name, "ALTER TABLE kv DROP COLUMN extra2").await;
                "column dropped".into()
            }
            _ => {
                ddl(
                    &pg,
                    &db.name,
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'check_s1' AND active_pid IS NOT NULL; \
                     SELECT pg_drop_replication_slot('check_s1') FROM pg_replication_slots WHERE slot_name = 'check_s1' AND active_pid IS NULL",
                )
                .await;
                "slot of s1 dropped".into()
            }
        };
        fault_no += 1;
        println!("  t={:>5.1}s fault: {name}", started.elapsed().as_secs_f64());
        record.lock().unwrap().faults.push(name);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    watcher.await.unwrap();
    let stopped = Instant::now();
    let mut reads: Vec<ReadResult> = Vec::new();
    let mut per_reader = Vec::new();
    for r in readers {
        let out = r.await.unwrap();
        per_reader.push(out.len());
        reads.extend(out);
    }
    // Quiescence: 1 s after the writes stopped, every node must agree with Postgres.
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(stopped.elapsed())).await;
    let client = pg.connect(&db.name).await;
    let rows = client.query("SELECT id, ver FROM kv ORDER BY id", &[]).await.unwrap();
    let db_ver: HashMap<i64, i64> = rows
        .iter()
        .map(|r| (r.get::<_, i32>(0) as i64, r.get::<_, i64>(1)))
        .collect();
    let mut stale_after = 0;
    for n in nodes.iter() {
        let mut c = Conn::new(n.addr.clone());
        for key in 1..=KEYS {
            let got = c
                .send("GET", &format!("/v1/kv/{}/{key}", keyspace_of(key)), "")
                .await
                .and_then(|(_, _, b)| ver_of(&b));
            if got != db_ver.get(&key).copied() {
                stale_after += 1;
                if stale_after <= 5 {
                    println!(
                        "  stale after quiescence: {} key {key}: {got:?} vs {:?}",
                        n.name,
                        db_ver.get(&key)
                    );
                }
            }
        }
    }
    let record = std::mem::take(&mut *record.lock().unwrap());
    // Lost: the final version is below the last acknowledged one.
    let mut lost = 0;
    for (key, acks) in &record.acks {
        if let Some(&(last, _)) = acks.last()
            && db_ver.get(key).copied().unwrap_or(-1) < last
        {
            lost += 1;
        }
    }
    // Staleness of each read against the acknowledged history.
    let in_pg_down = |t: Instant| record.pg_down.iter().any(|&(a, b)| t >= a && t <= b);
    let (mut counted, mut stale, mut reported, mut during_down, mut stale_during_down) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut stale_down_unreported = 0u64;
    let mut examples = Vec::new();
    for r in &reads {
        // What the read is held to: the acknowledged history — except for a write-behind key
        // read on the node that did not take its writes, which can only see them once they
        // are in Postgres.
        let other_node = path_of(r.key) == Path_::Behind && (r.key <= 250) != (r.node == 0);
        let history = if other_node { &record.in_db } else { &record.acks };
        let acks = history.get(&r.key).map(Vec::as_slice).unwrap_or(&[]);
        let is_stale = acks.iter().any(|&(v, at)| v > r.ver && at + FRESH < r.started);
        if in_pg_down(r.started) {
            during_down += 1;
            stale_during_down += is_stale as u64;
            stale_down_unreported += (is_stale && !r.reported) as u64;
            continue;
        }
        counted += 1;
        reported += r.reported as u64;
        if is_stale {
            stale += 1;
            if examples.len() < 5 {
                examples.push(format!(
                    "key {} read {} at t={:.3}s",
                    r.key,
                    r.ver,
                    (r.started - started).as_secs_f64()
                ));
            }
        }
    }
    // Regressions: per reader (one node each), a key's version going down.
    let mut regressions = 0;
    let mut offset = 0;
    for n in &per_reader {
        let mut last: HashMap<i64, i64> = HashMap::new();
        for r in &reads[offset..offset + n] {
            let prev = last.entry(r.key).or_insert(r.ver);
            if r.ver < *prev {
                regressions += 1;
            }
            *prev = (*prev).max(r.ver);
        }
        offset += n;
    }
    let writes: usize = record.acks.values().map(Vec::len).sum();
    let unknown: usize = record.unknown.values().map(Vec::len).sum();
    println!("faults injected:            {}", record.faults.len());
    println!("writes acknowledged:        {writes} (outcome unknown: {unknown})");
    println!(
        "reads:                      {} counted, {during_down} while Postgres was down ({stale_during_down} of them stale, {stale_down_unreported} of those without X-Cache-Lag-Ms)",
        counted
    );
    println!(
        "fresh within 100 ms:        {:.5}% ({stale} stale; {reported} served with X-Cache-Lag-Ms)",
        100.0 * (counted - stale) as f64 / counted.max(1) as f64
    );
    for e in &examples {
        println!("  stale: {e}");
    }
    println!("version regressions:        {regressions}");
    println!(
        "read-your-writes misses:    {} of {} checks",
        record.ryw_misses, record.ryw_checks
    );
    println!("acknowledged writes lost:   {lost}");
    println!("keys stale 1 s after stop:  {stale_after} (of {} key reads)", 2 * KEYS);
    println!(
        "read rate:                  {:.0} reads/s; the contract's cost: {} reads reloaded from Postgres, {} served with their lag",
        reads.len() as f64 / (stopped - started).as_secs_f64(),
        stale_metric(&nodes, "reloaded").await,
        stale_metric(&nodes, "served").await
    );
    for n in nodes.iter() {
        if let Some(mut s) = n.sidecar.lock().unwrap().take() {
            s.signal("TERM");
            let _ = s.wait_timeout(Duration::from_secs(20));
        }
    }
}

/// `cachesync_stale_reads_total{outcome}` summed over the nodes (since their last start).
async fn stale_metric(nodes: &[Node], outcome: &str) -> f64 {
    let mut total = 0.0;
    for n in nodes {
        let mut c = Conn::new(n.addr.clone());
        if let Some((200, _, body)) = c.send("GET", "/metrics", "").await {
            let needle = format!("outcome=\"{outcome}\"");
            total += String::from_utf8_lossy(&body)
                .lines()
                .filter(|l| l.starts_with("cachesync_stale_reads_total") && l.contains(&needle))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    total
}

async fn ddl(pg: &PgServer, db: &str, sql: &str) {
    for _ in 0..50 {
        let c = pg.connect(db).await;
        if c.batch_execute(sql).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("  (fault statement failed: {sql})");
}
