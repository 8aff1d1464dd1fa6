//! Event federation between three real `cachesync` processes ("regions") over real sockets, each
//! link through its own fault link so one node can be partitioned: rings and full meshes under
//! concurrent writes of the same keys, deletes, SIGKILL and restart, a 10 s partition, a clock
//! 10 s ahead (a real fake clock: libfaketime), and writes that land in the home's Postgres.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cachesync::event::ChangeEvent;
use cachesync_testkit::faultlink::FaultLink;
use cachesync_testkit::sidecar::Sidecar;
use cachesync_testkit::{eventually, free_port, temp_dir};
use serde_json::{Value, json};

use crate::common::{Db, Http, init_logging, until};

/// How long convergence may take after writes stop (a loaded 2-core machine, debug build).
const CONVERGE: Duration = Duration::from_secs(60);
const KEYS: usize = 100;

const NAMES: [&str; 3] = ["a", "b", "c"];

/// A region: one node, its log and its log server's port.
struct Region {
    name: &'static str,
    log: PathBuf,
    port: u16,
    sidecar: Option<Sidecar>,
    http: Option<Http>,
    env: Vec<(String, String)>,
    keyspaces: String,
    extra: String,
}

/// Three regions and a fault link per directed link (`(follower, followed)`).
struct World {
    regions: Vec<Region>,
    links: HashMap<(usize, usize), FaultLink>,
    /// Who follows whom.
    follows: Vec<(usize, usize)>,
    /// More `[log]` settings for every node.
    log_extra: String,
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cachesync"))
}

/// Every node follows the one before it: a → b → c → a.
fn ring() -> Vec<(usize, usize)> {
    vec![(1, 0), (2, 1), (0, 2)]
}

/// Every node follows both others.
fn mesh() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                v.push((i, j));
            }
        }
    }
    v
}

const MEMORY: &str = "[[keyspace]]\nname = \"kv\"\nfederate = true\n";

impl World {
    async fn new(follows: Vec<(usize, usize)>, keyspaces: &str) -> World {
        init_logging();
        let regions: Vec<Region> = NAMES
            .iter()
            .map(|n| Region {
                name: n,
                log: temp_dir(&format!("fedlog-{n}"), None),
                port: free_port(),
                sidecar: None,
                http: None,
                env: Vec::new(),
                keyspaces: keyspaces.to_string(),
                extra: String::new(),
            })
            .collect();
        let mut links = HashMap::new();
        for &(f, up) in &follows {
            let target = format!("127.0.0.1:{}", regions[up].port).parse().expect("address");
            links.insert((f, up), FaultLink::start(target).await);
        }
        World {
            regions,
            links,
            follows,
            log_extra: String::new(),
        }
    }

    fn config(&self, i: usize) -> String {
        let r = &self.regions[i];
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"{}\"\nshutdown_grace = \"5s\"\n\
             [log]\ndir = \"{}\"\n{}[replication]\nlisten = \"127.0.0.1:{}\"\nheartbeat = \"50ms\"\n\
             [federation]\ncheckpoint_every = \"200ms\"\ntombstone_hold = \"1s\"\n{}\n{}\n",
            r.name,
            r.log.display(),
            self.log_extra,
            r.port,
            r.extra,
            r.keyspaces,
        );
        for &(f, up) in &self.follows {
            if f == i {
                text.push_str(&format!(
                    "[[peer]]\nname = \"{}\"\nurl = \"http://{}\"\nlink_timeout = \"1s\"\n",
                    self.regions[up].name,
                    self.links[&(f, up)].addr()
                ));
            }
        }
        text
    }

    fn start(&mut self, i: usize) {
        let text = self.config(i);
        let env: Vec<(&str, &str)> = self.regions[i]
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let s = Sidecar::spawn_with_env(bin(), Some(&text), &env);
        self.regions[i].http = Some(Http::new(s.addr));
        self.regions[i].sidecar = Some(s);
    }

    async fn start_all(&mut self) {
        for i in 0..3 {
            self.start(i);
        }
        for i in 0..3 {
            until(self.http(i), "/readyz", "the node is ready", |r| r.status == 200).await;
        }
        for i in 0..3 {
            self.wait_linked(i).await;
        }
    }

    /// Waits until every link of node `i` streams.
    async fn wait_linked(&self, i: usize) {
        eventually(CONVERGE, "the node's links stream", || async {
            let r = self.federation(i).await;
            let peers = r["peers"].as_array().cloned().unwrap_or_default();
            if peers.iter().all(|p| p["connected"] == json!(true)) {
                Ok(())
            } else {
                Err(peers)
            }
        })
        .await;
    }

    fn http(&self, i: usize) -> &Http {
        self.regions[i].http.as_ref().expect("the node runs")
    }

    async fn federation(&self, i: usize) -> Value {
        self.http(i).get("/v1/replication").await.json()["federation"].clone()
    }

    /// Cuts node `i` off from the others (every link it follows or is followed by), or heals.
    fn partition(&self, i: usize, on: bool) {
        for (&(f, up), link) in &self.links {
            if f == i || up == i {
                link.blackhole(on);
                if on {
                    link.cut();
                }
            }
        }
    }

    /// Stops node `i` (SIGTERM, then wait; SIGKILL if it does not end) so its log can be read
    /// or it can be started again.
    fn stop(&mut self, i: usize) {
        if let Some(mut s) = self.regions[i].sidecar.take() {
            s.signal("TERM");
            if s.wait_timeout(Duration::from_secs(20)).is_none() {
                s.kill();
            }
        }
    }

    /// Stops every node.
    fn stop_all(&mut self) {
        for i in 0..self.regions.len() {
            self.stop(i);
        }
    }

    /// Writes `ns` in turn at a and b, each value naming its writer and number.
    async fn write_at_a_and_b(&self, ns: std::ops::Range<u64>) {
        for n in ns {
            let node = (n % 2) as usize;
            let r = self
                .http(node)
                .put(
                    &format!("/v1/kv/kv/k{}", n % KEYS as u64),
                    json!({"by": NAMES[node], "n": n}).to_string(),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }

    /// Every node answers every key alike, and their applied vectors are equal.
    async fn converged(&self, keys: &[String]) -> BTreeMap<String, Option<Value>> {
        eventually(CONVERGE, "every node holds the same state", || async {
            let mut vectors = Vec::new();
            for i in 0..3 {
                vectors.push(self.federation(i).await["applied"]["vector"].clone());
            }
            if vectors.iter().any(|v| *v != vectors[0]) {
                return Err(format!("vectors differ: {vectors:?}"));
            }
            let mut states = Vec::new();
            for i in 0..3 {
                states.push(state(self.http(i), keys).await);
            }
            for i in 1..3 {
                if states[i] != states[0] {
                    let diff: Vec<_> = keys
                        .iter()
                        .filter(|k| states[i][*k] != states[0][*k])
                        .take(3)
                        .map(|k| (k.clone(), states[0][k].clone(), states[i][k].clone()))
                        .collect();
                    return Err(format!("node {} differs from a: {diff:?}", NAMES[i]));
                }
            }
            Ok(states.swap_remove(0))
        })
        .await
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for r in &mut self.regions {
            if let Some(mut s) = r.sidecar.take() {
                s.kill();
            }
        }
    }
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("k{i}")).collect()
}

async fn state(http: &Http, keys: &[String]) -> BTreeMap<String, Option<Value>> {
    let mut out = BTreeMap::new();
    for k in keys {
        let r = http.get(&format!("/v1/kv/kv/{k}")).await;
        out.insert(
            k.clone(),
            match r.status.as_u16() {
                200 => Some(r.json()),
                404 => None,
                s => panic!("GET {k}: {s} {}", r.body),
            },
        );
    }
    out
}

/// Writes the shared keys at node `i` until `stop`, each value naming the node and a counter;
/// returns the acknowledged writes as (node, n). A write that fails while `tolerate` is set
/// (the node is being killed) is not acknowledged and not counted.
async fn writer(http: Http, node: &'static str, stop: Arc<AtomicBool>, tolerate: Arc<AtomicBool>) -> Vec<u64> {
    writer_from(http, node, 0, stop, tolerate).await
}

/// [`writer`], numbering its writes from `first + 1`.
async fn writer_from(
    http: Http,
    node: &'static str,
    first: u64,
    stop: Arc<AtomicBool>,
    tolerate: Arc<AtomicBool>,
) -> Vec<u64> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut acked = Vec::new();
    let mut n = first;
    let mut x: u64 = node.as_bytes()[0] as u64 * 7919;
    while !stop.load(Ordering::Relaxed) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let key = (x >> 33) as usize % KEYS;
        n += 1;
        let r = client
            .put(format!("{}/v1/kv/kv/k{key}", http.base))
            .body(json!({"by": node, "n": n}).to_string())
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => acked.push(n),
            _ if tolerate.load(Ordering::Relaxed) => {}
            Ok(r) => panic!("PUT at {node}: {} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => panic!("PUT at {node}: {e}"),
        }
    }
    acked
}

/// How often each federated event, by (origin, epoch, sequence), is in a log.
type EventCounts = HashMap<(String, u64, u64), u32>;

/// The federated events in a stopped node's log: (origin, epoch, seq) → how many times, and the
/// (by, n) of every put.
fn events_in(log: &Path) -> (EventCounts, std::collections::HashSet<(String, u64)>) {
    let mut counts = HashMap::new();
    let mut writes = std::collections::HashSet::new();
    cachesync::commitlog::inspect::dump(log, None, None, |r| {
        let Ok(e) = ChangeEvent::decode(&r.payload) else { return };
        let Some(st) = e.stamp else { return };
        if cachesync::event::stamp_of(&r.payload).is_none() {
            return; // a snapshot's state record, not an event
        }
        *counts.entry((e.origin.clone(), st.epoch, st.seq)).or_insert(0) += 1;
        if let Some(v) = e.value.as_ref().and_then(|v| serde_json::from_slice::<Value>(v).ok())
            && let (Some(by), Some(n)) = (v["by"].as_str(), v["n"].as_u64())
        {
            writes.insert((by.to_string(), n));
        }
    })
    .expect("read the log");
    (counts, writes)
}

/// Runs writers at all three nodes for `secs` while `during` does its damage; returns what
/// each node acknowledged.
async fn write_for<F, Fut>(world: &World, secs: u64, tolerate: Arc<AtomicBool>, during: F) -> Vec<Vec<u64>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        tasks.push(tokio::spawn(writer(
            world.http(i).clone(),
            name,
            stop.clone(),
            tolerate.clone(),
        )));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    during().await;
    tokio::time::sleep_until(deadline).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("writer"));
    }
    acked
}

/// After writes stopped: every node converges, each log holds each event exactly once, and
/// every acknowledged write is in every log.
async fn check_converged_once_each(
    world: &mut World,
    acked: &[Vec<u64>],
) -> (BTreeMap<String, Option<Value>>, Vec<Value>) {
    let state = world.converged(&keys()).await;
    let mut reports = Vec::new();
    for i in 0..3 {
        reports.push(world.federation(i).await);
    }
    world.stop_all();
    let mut all: Option<std::collections::HashSet<(String, u64, u64)>> = None;
    for r in &world.regions {
        let (counts, writes) = events_in(&r.log);
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(3).collect();
        assert!(
            twice.is_empty(),
            "node {}'s log holds events more than once: {twice:?}",
            r.name
        );
        let ids: std::collections::HashSet<_> = counts.into_keys().collect();
        if let Some(a) = &all {
            assert_eq!(a.len(), ids.len(), "node {} holds a different set of events", r.name);
            assert!(a == &ids, "node {} holds a different set of events", r.name);
        }
        all = Some(ids);
        for (i, ns) in acked.iter().enumerate() {
            let lost: Vec<_> = ns
                .iter()
                .filter(|n| !writes.contains(&(NAMES[i].to_string(), **n)))
                .take(5)
                .collect();
            assert!(
                lost.is_empty(),
                "acknowledged writes of {} missing from {}'s log: {lost:?}",
                NAMES[i],
                r.name
            );
        }
    }
    let total: usize = acked.iter().map(Vec::len).sum();
    let events = all.expect("three logs").len();
    assert!(
        events >= total && total > 300,
        "{events} events for {total} acknowledged writes"
    );
    for r in &reports {
        eprintln!(
            "node {}: conflicts {} duplicates {} gaps {} tombstones {} (dropped {}); {events} events, {total} acknowledged",
            r["node"], r["conflicts"], r["duplicates"], r["gaps"], r["tombstones"], r["tombstones_dropped"]
        );
    }
    (state, reports)
}

async fn concurrent_writes_converge(follows: Vec<(usize, usize)>) {
    let mut world = World::new(follows, MEMORY).await;
    world.start_all().await;
    let acked = write_for(&world, 10, Arc::new(AtomicBool::new(false)), || async {}).await;
    // Deletes at two nodes: they stay deleted everywhere.
    for k in 0..10 {
        let r = world.http(k % 2).delete(&format!("/v1/kv/kv/k{k}")).await;
        assert!(r.status == 204 || r.status == 404, "{} {}", r.status, r.body);
    }
    let mesh = world.follows.len() == 6;
    let (state, reports) = check_converged_once_each(&mut world, &acked).await;
    let sum = |field: &str| reports.iter().map(|r| r[field].as_u64().unwrap_or(0)).sum::<u64>();
    // Concurrent writes of the same keys conflict, and the rule settles them.
    assert!(sum("conflicts") > 0, "{reports:?}");
    // In a mesh every event reaches each node by two paths: the second copy is kept out.
    if mesh {
        assert!(sum("duplicates") > 0, "{reports:?}");
    } else {
        assert_eq!(
            sum("duplicates"),
            0,
            "a ring never sends an event back to its origin: {reports:?}"
        );
    }
    for k in 0..10 {
        assert_eq!(state[&format!("k{k}")], None, "k{k} was deleted");
    }
    assert!(state.values().filter(|v| v.is_some()).count() >= 80, "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_three_converges_under_concurrent_writes_and_carries_each_event_once() {
    concurrent_writes_converge(ring()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mesh_of_three_converges_under_concurrent_writes_and_carries_each_event_once() {
    concurrent_writes_converge(mesh()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_write_restarts_and_converges_with_nothing_acknowledged_lost() {
    let mut world = World::new(ring(), MEMORY).await;
    world.start_all().await;
    let tolerate = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, name) in NAMES.iter().enumerate().take(2) {
        tasks.push(tokio::spawn(writer(
            world.http(i).clone(),
            name,
            stop.clone(),
            tolerate.clone(),
        )));
    }
    // c writes until it is killed; what it acknowledged before must survive.
    let c_stop = Arc::new(AtomicBool::new(false));
    let c_tolerate = Arc::new(AtomicBool::new(true));
    let c_task = tokio::spawn(writer(world.http(2).clone(), "c", c_stop.clone(), c_tolerate));
    eventually(CONVERGE, "c has taken writes", || async {
        let v = world.federation(2).await["vector"].clone();
        let own = v
            .as_array()
            .and_then(|a| a.iter().find(|i| i["node"] == "c"))
            .and_then(|i| i["seq"].as_u64())
            .unwrap_or(0);
        if own >= 200 { Ok(()) } else { Err(own) }
    })
    .await;
    world.regions[2].sidecar.as_mut().expect("c runs").kill();
    c_stop.store(true, Ordering::Relaxed);
    let c_acked = c_task.await.expect("c's writer");
    // Restarted on the same log while a and b keep writing.
    world.start(2);
    until(world.http(2), "/readyz", "c is ready again", |r| r.status == 200).await;
    world.wait_linked(2).await;
    // c's own writes from before the kill are served at once (rebuilt from its log).
    let c_last = *c_acked.last().expect("c acknowledged writes");
    let restarted = state(world.http(2), &keys()).await;
    assert!(
        restarted.values().flatten().count() >= KEYS / 2,
        "c serves its keys after the restart: {restarted:?}"
    );
    // The restarted c goes on writing (numbered apart from before the kill).
    let c_after = tokio::spawn(writer_from(
        world.http(2).clone(),
        "c",
        1_000_000,
        stop.clone(),
        Arc::new(AtomicBool::new(false)),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("writer"));
    }
    let mut c_all = c_acked;
    c_all.extend(c_after.await.expect("writer"));
    acked.push(c_all);
    let state = world.converged(&keys()).await;
    assert!(state.values().flatten().count() >= KEYS / 2);
    world.stop_all();
    for r in &world.regions {
        let (counts, writes) = events_in(&r.log);
        assert!(
            counts.values().all(|n| *n == 1),
            "{}'s log holds an event twice",
            r.name
        );
        for (i, ns) in acked.iter().enumerate() {
            let lost = ns
                .iter()
                .filter(|n| !writes.contains(&(NAMES[i].to_string(), **n)))
                .count();
            assert_eq!(lost, 0, "acknowledged writes of {} missing from {}", NAMES[i], r.name);
        }
    }
    assert!(c_last > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_partition_heals_with_no_acknowledged_write_lost() {
    let mut world = World::new(mesh(), MEMORY).await;
    world.start_all().await;
    let acked = write_for(&world, 14, Arc::new(AtomicBool::new(false)), || async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        world.partition(2, true);
        // c keeps serving and taking writes on its own side.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let r = world.federation(2).await;
        assert!(
            r["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["connected"] == json!(false))),
            "c is cut off: {r}"
        );
        world.partition(2, false);
    })
    .await;
    assert!(acked[2].len() > 100, "c took writes while partitioned");
    check_converged_once_each(&mut world, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_ten_seconds_ahead_cannot_pull_the_others_past_the_bound() {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or_else(|| panic!("libfaketime is missing: run deploy/dev/install-deps.sh (apt-get install libfaketime)"));
    let mut world = World::new(mesh(), MEMORY).await;
    world.regions[2].env = vec![
        ("LD_PRELOAD".into(), lib.into()),
        ("FAKETIME".into(), "+10s".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    world.start_all().await;
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64
    };
    let c_clock = world.federation(2).await["clock_ms"].as_u64().expect("c's clock");
    assert!(
        c_clock >= wall() + 9_000,
        "c's clock runs 10 s ahead ({c_clock} vs {})",
        wall()
    );
    for k in 0..20 {
        let r = world
            .http(2)
            .put(&format!("/v1/kv/kv/k{k}"), json!({"by": "c"}).to_string())
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for (i, name) in NAMES.iter().enumerate().take(2) {
        eventually(CONVERGE, "c's writes arrive and are counted as drift", || async {
            let f = world.federation(i).await;
            let got = world.http(i).get("/v1/kv/kv/k19").await;
            if f["drift_rejections"].as_u64().unwrap_or(0) > 0 && got.status == 200 {
                Ok(())
            } else {
                Err((f["drift_rejections"].clone(), got.status))
            }
        })
        .await;
        let before = wall();
        let clock = world.federation(i).await["clock_ms"].as_u64().expect("a clock");
        let after = wall();
        assert!(
            clock <= after + 500 + 100,
            "node {}'s clock {clock} was pulled past the 500 ms bound (wall {before}..{after})",
            name
        );
        let metrics = world.http(i).get("/metrics").await.body;
        assert!(
            crate::common::metric(&metrics, "cachesync_federation_drift_rejections_total") > 0.0,
            "drift rejections are counted"
        );
    }
    // A write at a after c's: the bound, not c's clock, sets its version; it still converges.
    let r = world.http(0).put("/v1/kv/kv/k0", json!({"by": "a"}).to_string()).await;
    assert_eq!(r.status, 200);
    world.converged(&keys()).await;
}

/// `write = "behind"` with a home: writes taken at two regions that are not the home land in the
/// home's Postgres; the home's CDC then carries the stored row to every region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_anywhere_land_in_the_homes_postgres_and_every_node_reads_the_stored_row() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, name text CHECK (char_length(name) < 20), note text DEFAULT 'stored')",
    )
    .await;
    db.exec("INSERT INTO items SELECT g, 'old ' || g, 'before' FROM generate_series(100, 149) g")
        .await;
    let home_ks = "[[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\nwrite = \"behind\"\nfederate = true\nhome = \"a\"\n".to_string();
    let view_ks = "[[keyspace]]\nname = \"items\"\nfederate = true\nhome = \"a\"\nwrite = \"behind\"\n\
                   [[keyspace]]\nname = \"view\"\nfederate = true\nhome = \"a\"\n";
    let mut world = World::new(mesh(), view_ks).await;
    let slot = format!("fed_{}", cachesync_testkit::unique());
    world.regions[0].keyspaces = format!("{home_ks}[[keyspace]]\nname = \"view\"\nfederate = true\n");
    world.regions[0].extra = format!(
        "[postgres]\nurl = \"{}\"\n[cdc]\nslot = \"{slot}\"\nheartbeat = \"0s\"\n[write_behind]\nbatch_delay = \"10ms\"\n",
        db.db.url
    );
    world.start_all().await;
    // The rows the home loaded at start reach every region (no event changed them).
    for i in 0..3 {
        until(
            world.http(i),
            "/v1/kv/items/149",
            "the home's table reaches every region",
            |r| r.status == 200 && r.json() == json!({"id": 149, "name": "old 149", "note": "before"}),
        )
        .await;
    }
    for (i, id) in [(1usize, 1), (2, 2)] {
        let r = world
            .http(i)
            .put(
                &format!("/v1/kv/items/{id}"),
                json!({"name": format!("from {}", NAMES[i])}).to_string(),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        // Read-your-writes where the write was taken.
        let got = world.http(i).get(&format!("/v1/kv/items/{id}")).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.json()["name"], json!(format!("from {}", NAMES[i])));
    }
    for id in [1, 2] {
        eventually(CONVERGE, "the writes reach the home's Postgres", || async {
            let n: i64 = db.scalar(&format!("SELECT count(*) FROM items WHERE id = {id}")).await;
            if n == 1 { Ok(()) } else { Err(n) }
        })
        .await;
    }
    // Every node reads the stored row, with the column only Postgres filled in.
    for i in 0..3 {
        for (id, by) in [(1, "b"), (2, "c")] {
            until(world.http(i), &format!("/v1/kv/items/{id}"), "the stored row", |r| {
                r.status == 200 && r.json() == json!({"id": id, "name": format!("from {by}"), "note": "stored"})
            })
            .await;
        }
    }
    // A conditional write cannot be checked away from the home: refused, nothing taken.
    let r = world
        .http(1)
        .send_with(
            world
                .http(1)
                .request(reqwest::Method::PUT, "/v1/kv/items/77")
                .header("if-match", "*")
                .body("{\"name\":\"x\"}"),
        )
        .await;
    assert_eq!(r.status, 428, "{}", r.body);
    assert_eq!(world.http(1).get("/v1/kv/items/77").await.status, 404);
    // A subscription that is not one gets a clear 400.
    let r = Http::at(format!("http://127.0.0.1:{}", world.regions[0].port))
        .post("/v1/federation/stream", "not json")
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.detail().contains("a subscription"), "{}", r.body);
    // A view without write = "behind" refuses writes, naming the home.
    let r = world.http(1).put("/v1/kv/view/x", "{}").await;
    assert_eq!(r.status, 405, "{}", r.body);
    assert!(r.detail().contains("home is node a"), "{}", r.body);
    // A write the home's Postgres rejects is a dead letter there and visible where it was taken;
    // the region that took it stops showing it.
    let long = "a name far too long for the check";
    let r = world
        .http(2)
        .put("/v1/kv/items/3", json!({"name": long}).to_string())
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let seen = until(world.http(2), "/v1/deadletters", "c sees the rejection", |r| {
        r.status == 200 && r.json()["elsewhere"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await
    .json();
    let letter = &seen["elsewhere"][0];
    assert_eq!(letter["home"], json!("a"));
    assert_eq!(letter["letter"]["key"], json!("3"));
    assert!(
        letter["letter"]["error"].as_str().unwrap_or("").contains("check"),
        "{letter}"
    );
    until(
        world.http(2),
        "/v1/kv/items/3",
        "c no longer shows the rejected write",
        |r| r.status == 404,
    )
    .await;
    let home_letters = world.http(0).get("/v1/deadletters").await.json();
    assert_eq!(
        home_letters["deadletters"].as_array().map(Vec::len),
        Some(1),
        "{home_letters}"
    );
    let n: i64 = db.scalar("SELECT count(*) FROM items WHERE id = 3").await;
    assert_eq!(n, 0);
    // A TRUNCATE at the home clears every region's view (what the home made before it).
    db.exec("TRUNCATE items").await;
    for i in 0..3 {
        for id in [1, 149] {
            until(
                world.http(i),
                &format!("/v1/kv/items/{id}"),
                "the truncate reaches every region",
                |r| r.status == 404,
            )
            .await;
        }
    }
    world.stop_all();
    let _ = db
        .scalar::<i64>(&format!("SELECT count(*) FROM pg_drop_replication_slot('{slot}')"))
        .await;
}

/// Tombstones are kept while a node has not passed them (here: partitioned), and dropped once
/// every node has; the key stays deleted everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_held_until_every_node_has_passed_them() {
    let mut world = World::new(mesh(), MEMORY).await;
    world.start_all().await;
    for k in 0..5 {
        let r = world
            .http(k % 3)
            .put(&format!("/v1/kv/kv/k{k}"), json!({"v": k}).to_string())
            .await;
        assert_eq!(r.status, 200);
    }
    world.converged(&keys()[..5]).await;
    world.partition(2, true);
    for k in 0..5 {
        let r = world.http(0).delete(&format!("/v1/kv/kv/k{k}")).await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
    eventually(CONVERGE, "b has the deletes", || async {
        let r = world.http(1).get("/v1/kv/kv/k4").await;
        if r.status == 404 { Ok(()) } else { Err(r.status) }
    })
    .await;
    // c has not passed them: a and b hold their tombstones well past tombstone_hold (1 s).
    for i in 0..2 {
        eventually(CONVERGE, "the tombstones are counted", || async {
            let t = world.federation(i).await["tombstones"].clone();
            if t == json!(5) { Ok(()) } else { Err(t) }
        })
        .await;
    }
    let held_since = tokio::time::Instant::now();
    while held_since.elapsed() < Duration::from_secs(3) {
        for (i, name) in NAMES.iter().enumerate().take(2) {
            let f = world.federation(i).await;
            assert_eq!(
                f["tombstones"],
                json!(5),
                "node {name} dropped a tombstone c has not passed"
            );
            assert_eq!(f["tombstones_dropped"], json!(0));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    world.partition(2, false);
    let state = world.converged(&keys()[..5]).await;
    assert!(state.values().all(Option::is_none), "deleted everywhere: {state:?}");
    for i in 0..3 {
        eventually(
            CONVERGE,
            "every node drops the tombstones once all passed them",
            || async {
                let f = world.federation(i).await;
                if f["tombstones"] == json!(0) && f["tombstones_dropped"] == json!(5) {
                    Ok(())
                } else {
                    Err((f["tombstones"].clone(), f["tombstones_dropped"].clone()))
                }
            },
        )
        .await;
    }
    let state = state_of(&world, &keys()[..5]).await;
    assert!(
        state.iter().all(|s| s.values().all(Option::is_none)),
        "still deleted: {state:?}"
    );
}

async fn state_of(world: &World, keys: &[String]) -> Vec<BTreeMap<String, Option<Value>>> {
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(state(world.http(i), keys).await);
    }
    out
}

/// A node that was away while its peers' retention removed what it missed gets a snapshot of
/// the federated keyspaces (values and tombstones, with their versions) and goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_past_its_peers_retention_catches_up_from_a_snapshot() {
    let mut world = World::new(mesh(), MEMORY).await;
    world.log_extra = "segment_bytes = \"64KiB\"\nretention_bytes = \"256KiB\"\nretention_check = \"100ms\"\n".into();
    world.start_all().await;
    // c goes away; a and b write well past their retention.
    world.stop(2);
    let filler = "x".repeat(2000);
    for n in 0..600u64 {
        let node = (n % 2) as usize;
        let r = world
            .http(node)
            .put(
                &format!("/v1/kv/kv/k{}", n % KEYS as u64),
                json!({"n": n, "pad": filler}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for k in 0..5 {
        let r = world.http(0).delete(&format!("/v1/kv/kv/k{k}")).await;
        assert_eq!(r.status, 204);
    }
    eventually(CONVERGE, "retention removed the start of a's log", || async {
        let r = world.http(0).get("/v1/replication").await.json();
        let start = r["log"]["start"].as_u64().unwrap_or(0);
        if start > 0 { Ok(()) } else { Err(r["log"].clone()) }
    })
    .await;
    world.start(2);
    until(world.http(2), "/readyz", "c is back", |r| r.status == 200).await;
    let state = world.converged(&keys()).await;
    for k in 0..5 {
        assert_eq!(
            state[&format!("k{k}")],
            None,
            "the snapshot carried the tombstone of k{k}"
        );
    }
    let f = world.federation(2).await;
    let snapshots: u64 = f["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["snapshots"].as_u64().unwrap_or(0))
        .sum();
    assert!(snapshots >= 1, "c caught up from a snapshot: {f}");
    // And goes on streaming after it.
    let r = world
        .http(0)
        .put("/v1/kv/kv/k99", json!({"after": true}).to_string())
        .await;
    assert_eq!(r.status, 200);
    until(world.http(2), "/v1/kv/kv/k99", "c streams after its snapshot", |r| {
        r.status == 200 && r.json() == json!({"after": true})
    })
    .await;
}

/// A chain a → b → c relays a's events through b; c then switches to follow a directly (its
/// vector says what it has, whoever it follows): nothing is lost and nothing is held twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_upstream_by_vector_neither_loses_nor_duplicates() {
    let mut world = World::new(vec![(1, 0), (2, 1)], MEMORY).await;
    world.start_all().await;
    world.write_at_a_and_b(0..100).await;
    eventually(CONVERGE, "c has a's events through b", || async {
        let v = world.federation(2).await["applied"]["vector"].clone();
        let a = world.federation(0).await["vector"].clone();
        let has = |v: &Value, node: &str| {
            v.as_array()
                .and_then(|x| x.iter().find(|i| i["node"] == node))
                .and_then(|i| i["seq"].as_u64())
                .unwrap_or(0)
        };
        if has(&v, "a") == has(&a, "a") && has(&v, "a") >= 50 {
            Ok(())
        } else {
            Err((v, a))
        }
    })
    .await;
    // c now follows a instead of b, while a and b keep writing.
    world.stop(2);
    world.follows = vec![(1, 0), (2, 0), (0, 1)];
    for (f, up) in [(2usize, 0usize), (0, 1)] {
        let target = format!("127.0.0.1:{}", world.regions[up].port)
            .parse()
            .expect("address");
        world.links.insert((f, up), FaultLink::start(target).await);
    }
    world.write_at_a_and_b(100..200).await;
    // a starts following b too (a second path to b's events for c): restart a with its new peer.
    world.stop(0);
    world.start(0);
    world.start(2);
    for i in [0, 2] {
        until(world.http(i), "/readyz", "the node is ready", |r| r.status == 200).await;
        world.wait_linked(i).await;
    }
    world.converged(&keys()).await;
    world.stop_all();
    let mut sets = Vec::new();
    for r in &world.regions {
        let (counts, writes) = events_in(&r.log);
        assert!(
            counts.values().all(|n| *n == 1),
            "{}'s log holds an event twice",
            r.name
        );
        let by_a = writes.iter().filter(|(by, _)| by == "a").count();
        let by_b = writes.iter().filter(|(by, _)| by == "b").count();
        assert_eq!((by_a, by_b), (100, 100), "{} holds every write", r.name);
        sets.push(counts.into_keys().collect::<std::collections::HashSet<_>>());
    }
    assert!(sets.iter().all(|s| *s == sets[0]), "every log holds the same events");
}

/// A home region that is also a hub: its pods' edges follow its log as before (its CDC events
/// carry federation stamps now, which an edge keeps as they are), while another region views
/// the same table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federating_home_is_still_a_hub_for_its_edges() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, name text)").await;
    db.exec("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 20) g")
        .await;
    let home_ks =
        "[[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\nfederate = true\n";
    let mut world = World::new(
        vec![(1, 0)],
        "[[keyspace]]\nname = \"items\"\nfederate = true\nhome = \"a\"\n",
    )
    .await;
    let slot = format!("fedhub_{}", cachesync_testkit::unique());
    world.regions[0].keyspaces = home_ks.to_string();
    world.regions[0].extra = format!(
        "[postgres]\nurl = \"{}\"\n[cdc]\nslot = \"{slot}\"\nheartbeat = \"0s\"\n",
        db.db.url
    );
    world.start(0);
    world.start(1);
    for i in 0..2 {
        until(world.http(i), "/readyz", "the node is ready", |r| r.status == 200).await;
    }
    let edge_log = temp_dir("fededge", None);
    let edge = Sidecar::spawn(
        bin(),
        Some(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"edge\"\n[postgres]\nurl = \"{}\"\n\
             [log]\ndir = \"{}\"\n[cdc]\nsource = \"upstream\"\nready_grace = \"1s\"\n\
             [[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:{}\"\nlink_timeout = \"1s\"\n\
             [[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\nread_through = false\n",
            db.db.url,
            edge_log.display(),
            world.regions[0].port
        )),
    );
    let edge_http = Http::new(edge.addr);
    until(&edge_http, "/readyz", "the edge is ready", |r| r.status == 200).await;
    db.exec("UPDATE items SET name = 'changed' WHERE id = 7").await;
    db.exec("DELETE FROM items WHERE id = 8").await;
    for http in [&edge_http, world.http(1)] {
        until(
            http,
            "/v1/kv/items/7",
            "the change reaches the edge and the view",
            |r| r.status == 200 && r.json() == json!({"id": 7, "name": "changed"}),
        )
        .await;
        until(http, "/v1/kv/items/8", "the delete too", |r| r.status == 404).await;
        until(http, "/v1/kv/items/20", "and the rows loaded at start", |r| {
            r.status == 200 && r.json() == json!({"id": 20, "name": "n20"})
        })
        .await;
    }
    drop(edge);
    world.stop_all();
    let _ = db
        .scalar::<i64>(&format!("SELECT count(*) FROM pg_drop_replication_slot('{slot}')"))
        .await;
}
