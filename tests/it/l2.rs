//! The Redis tier (L2) between two sidecars sharing one Redis, and again sharing a real 3-master
//! Redis Cluster: L2 hits across nodes (no second SELECT, counted by Postgres), the
//! invalidation bound (no read on B that starts later than A's acknowledgement plus
//! `max_invalidation_delay` returns the old value — with the channel's connections killed, with
//! Redis flushed, with Redis restarted empty), a slow fill racing a write, Redis killed under
//! load with zero client errors, and the compare-and-set script checked against the Rust order
//! on the real server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cachesync::cache::Snapshot;
use cachesync::l2::record::{Kind, Record};
use cachesync::lsn::Lsn;
use cachesync::server::Server;
use cachesync_testkit::eventually;
use cachesync_testkit::redis::{RedisCluster, RedisServer, cli};
use tokio::time::Instant;

use crate::common::{Db, Http, WAIT, metric, serve};

/// The bound the tests configure (`max_invalidation_delay`).
const BOUND: Duration = Duration::from_millis(300);

const USERS: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
INSERT INTO users SELECT g, 'v0' FROM generate_series(1, 20) g;";

/// The Redis a test runs against: a server or a cluster of its own (tests kill and flush it).
enum Redis {
    Server(Arc<RedisServer>),
    Cluster(Arc<RedisCluster>),
}

impl Redis {
    fn server() -> Redis {
        Redis::Server(RedisServer::start())
    }

    fn cluster() -> Redis {
        Redis::Cluster(Arc::new(RedisCluster::start()))
    }

    fn section(&self) -> String {
        let target = match self {
            Redis::Server(s) => format!("url = \"{}\"", s.url()),
            Redis::Cluster(c) => format!(
                "cluster = [{}]",
                c.urls()
                    .iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "[redis]\n{target}\ntimeout = \"200ms\"\nmax_invalidation_delay = \"{}ms\"\nreconcile_every = \"1s\"\n",
            BOUND.as_millis()
        )
    }

    fn ports(&self) -> Vec<u16> {
        match self {
            Redis::Server(s) => vec![s.port],
            Redis::Cluster(c) => c.nodes.iter().map(|n| n.port).collect(),
        }
    }

    fn stop(&self) {
        match self {
            Redis::Server(s) => s.stop(),
            Redis::Cluster(c) => c.stop(),
        }
    }

    fn restart(&self) {
        match self {
            Redis::Server(s) => s.restart(),
            Redis::Cluster(c) => c.restart(),
        }
    }

    fn flush(&self) {
        match self {
            Redis::Server(s) => s.flush(),
            Redis::Cluster(c) => c.flush(),
        }
    }

    /// Kills every connection reading an invalidation stream (`CLIENT KILL ID`, by `redis-cli`);
    /// returns how many.
    async fn kill_channels(&self) -> usize {
        // A channel shows `cmd=xread` while it waits for entries, which is nearly always; between
        // two reads it briefly runs other commands (an idle read checks the epoch). Wait until
        // both nodes' channels are seen reading at once, then kill them by id.
        let deadline = Instant::now() + WAIT;
        loop {
            let mut ids = Vec::new();
            for port in self.ports() {
                for line in cli(port, &["CLIENT", "LIST"]).lines() {
                    if line.contains("cmd=xread")
                        && let Some(id) = line.split_whitespace().find_map(|f| f.strip_prefix("id="))
                    {
                        ids.push((port, id.to_string()));
                    }
                }
            }
            if ids.len() >= 2 || Instant::now() >= deadline {
                for (port, id) in &ids {
                    cli(*port, &["CLIENT", "KILL", "ID", id]);
                }
                return ids.len();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Moves every slot of the node holding `key` to the next node, keys and all
    /// (`redis-cli --cluster reshard`).
    fn reshard(&self, key: &str) {
        let Redis::Cluster(c) = self else {
            panic!("reshard needs a cluster")
        };
        c.move_all_slots_of(key);
    }

    /// The raw record of `key` in L2.
    async fn record(&self, key: &str) -> Option<Record> {
        self.record_raw(key)
            .await
            .map(|b| Record::decode(&b).expect("a record cachesync wrote decodes"))
    }

    /// The bytes under `key`.
    async fn record_raw(&self, key: &str) -> Option<Vec<u8>> {
        match self {
            Redis::Server(s) => {
                let client = redis::Client::open(s.url()).expect("url");
                let mut c = client.get_multiplexed_async_connection().await.expect("connect");
                redis::cmd("GET").arg(key).query_async(&mut c).await.expect("GET")
            }
            Redis::Cluster(c) => {
                let client = redis::cluster::ClusterClient::new(c.urls()).expect("urls");
                let mut conn = client.get_async_connection().await.expect("connect");
                redis::cmd("GET").arg(key).query_async(&mut conn).await.expect("GET")
            }
        }
    }
}

/// Two sidecars, `a` and `b`, on one database and one Redis.
struct Pair {
    db: Db,
    a: Server,
    b: Server,
    ha: Http,
    hb: Http,
}

async fn pair(redis: &Redis) -> Pair {
    pair_with(redis, "").await
}

/// [`pair`], with more `[redis]` settings.
async fn pair_with(redis: &Redis, more: &str) -> Pair {
    let db = Db::new().await;
    db.exec(USERS).await;
    let keyspace = "[[keyspace]]\nname = \"users\"\ntable = \"public.users\"\nkey = \"id\"\nwrite = \"through\"\nttl = \"5m\"\nl2 = true\n";
    let text = |node: &str| {
        db.config_text(&format!("{keyspace}{}{more}", redis.section()))
            .replacen("[server]\n", &format!("[server]\nnode_id = \"{node}\"\n"), 1)
    };
    let (a, ha) = serve(cachesync::config::Config::parse(&text("a")).expect("valid")).await;
    let (b, hb) = serve(cachesync::config::Config::parse(&text("b")).expect("valid")).await;
    for s in [&a, &b] {
        let ks = s.keyspace("users").expect("keyspace").clone();
        eventually(WAIT, "the invalidation channel connects", || {
            let ks = ks.clone();
            async move {
                if ks.l2().expect("an L2 tier").connected() {
                    Ok(())
                } else {
                    Err("not yet")
                }
            }
        })
        .await;
    }
    Pair { db, a, b, ha, hb }
}

/// SELECTs of the users table, as Postgres counted them.
async fn selects(db: &Db) -> i64 {
    crate::read_through::selects_of(db, "users").await
}

async fn metrics(h: &Http) -> String {
    h.get("/metrics").await.body
}

async fn l2_hit_on_another_node(redis: Redis) {
    let p = pair(&redis).await;
    let first = p.ha.get("/v1/kv/users/1").await;
    assert_eq!(
        (first.status.as_u16(), first.header("x-cache")),
        (200, "miss"),
        "{}",
        first.body
    );
    // A's fill reaches Redis off the read's path.
    let rec = eventually(WAIT, "A's load is filled into L2", || async {
        redis.record("cachesync:users:1").await.ok_or("no record yet")
    })
    .await;
    assert_eq!(rec.kind, Kind::Value);
    assert!(rec.snapshot.is_some(), "a load's record carries its snapshot");
    assert_eq!(
        rec.value.as_deref(),
        Some(first.body.as_bytes()),
        "the document as served"
    );

    let before = selects(&p.db).await;
    let on_b = p.hb.get("/v1/kv/users/1").await;
    assert_eq!(on_b.header("x-cache"), "hit-l2");
    assert_eq!(on_b.body, first.body);
    assert_eq!(
        on_b.header("etag"),
        first.header("etag"),
        "the same document everywhere"
    );
    assert_eq!(
        p.hb.get("/v1/kv/users/1").await.header("x-cache"),
        "hit",
        "then an L1 hit"
    );
    assert_eq!(selects(&p.db).await, before, "no second SELECT for what A loaded");
    let m = metrics(&p.hb).await;
    assert_eq!(
        metric(&m, "cachesync_cache_hits_total{keyspace=\"users\",tier=\"l2\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "cachesync_cache_hits_total{keyspace=\"users\",tier=\"l1\"}"),
        1.0
    );
    let listed = p.hb.get("/v1/keyspaces").await.json();
    let users = &listed["keyspaces"][0];
    assert_eq!(users["stats"]["hits_l2"], 1, "{users}");
    assert_eq!(users["l2"]["channel_connected"], true, "{users}");

    // A key nobody loaded is an L2 miss on B: Postgres answers, and L2 has it afterwards.
    assert_eq!(p.hb.get("/v1/kv/users/2").await.header("x-cache"), "miss");
    assert_eq!(selects(&p.db).await, before + 1);
    drop(p);
}

#[tokio::test]
async fn a_key_loaded_by_one_node_is_an_l2_hit_on_another() {
    l2_hit_on_another_node(Redis::server()).await;
}

#[tokio::test]
async fn a_key_loaded_by_one_node_is_an_l2_hit_on_another_in_a_cluster() {
    l2_hit_on_another_node(Redis::cluster()).await;
}

/// What disrupts the tier in the middle of a bound check.
#[derive(Clone, Copy, Debug)]
enum Disruption {
    None,
    /// `CLIENT KILL` of every invalidation channel's connection.
    KillChannels,
    /// `FLUSHALL`.
    Flush,
    /// Redis killed, a few writes made while it is down, then restarted empty.
    Restart,
    /// (Cluster) every slot of the node holding the stream moves to another node.
    Reshard,
}

/// Writes `v1..vN` to key 1 on A while B reads it in a loop, with `disruption` halfway; checks
/// that no read on B that *started* later than a write's acknowledgement plus the bound
/// returned an older value, and that nothing failed.
async fn bound_holds(redis: Redis, disruption: Disruption) {
    let p = pair(&redis).await;
    let path = "/v1/kv/users/1";
    assert_eq!(p.hb.get(path).await.status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u32)>::new()));
    let reader = {
        let (hb, stop, reads) = (p.hb.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = hb.get(path).await;
                assert_eq!(r.status, 200, "B answered {}: {}", r.status, r.body);
                let n: u32 = r.json()["name"].as_str().expect("name")[1..].parse().expect("vN");
                reads.lock().unwrap().push((started, n));
            }
        })
    };
    // Each write is followed by reads on B that start past its bound.
    let past_bound = |acked: Instant| {
        let reads = reads.clone();
        async move {
            eventually(WAIT, "B reads past the bound", || async {
                let last = reads.lock().unwrap().last().map(|r| r.0);
                if last.is_some_and(|t| t >= acked + BOUND) {
                    Ok(())
                } else {
                    Err(last)
                }
            })
            .await
        }
    };
    const WRITES: u32 = 12;
    let mut acks = Vec::new();
    for i in 1..=WRITES {
        if i == WRITES / 2 {
            match disruption {
                Disruption::None => {}
                Disruption::KillChannels => {
                    let killed = redis.kill_channels().await;
                    assert!(killed >= 2, "both nodes' channels were connected ({killed} killed)");
                }
                Disruption::Flush => redis.flush(),
                Disruption::Restart => redis.stop(),
                Disruption::Reshard => redis.reshard("cachesync:{users}:changes"),
            }
        }
        if i == WRITES / 2 + 3 && matches!(disruption, Disruption::Restart) {
            redis.restart();
        }
        let w = p.ha.put(path, format!(r#"{{"id":1,"name":"v{i}"}}"#)).await;
        assert_eq!(w.status, 200, "A's write {i}: {}", w.body);
        let acked = Instant::now();
        acks.push((acked, i));
        past_bound(acked).await;
    }
    eventually(WAIT, "B returns the last write", || async {
        let r = p.hb.get(path).await;
        if r.json()["name"] == format!("v{WRITES}") {
            Ok(())
        } else {
            Err(r.body)
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    reader.await.expect("reader");
    let reads = reads.lock().unwrap().clone();
    let mut checked = 0;
    for (started, n) in &reads {
        let required = acks
            .iter()
            .filter(|(acked, _)| *acked + BOUND <= *started)
            .map(|(_, i)| *i)
            .max();
        if let Some(req) = required {
            checked += 1;
            assert!(
                *n >= req,
                "{disruption:?}: a read on B starting {:?} after write v{req} was acknowledged on A returned v{n}",
                started.duration_since(acks[req as usize - 1].0)
            );
        }
    }
    assert!(
        checked >= WRITES as usize,
        "reads started past each write's bound ({checked})"
    );
    let m = metrics(&p.hb).await;
    match disruption {
        Disruption::Flush | Disruption::Restart => assert!(
            metric(&m, "cachesync_l2_gaps_total{keyspace=\"users\",reason=\"epoch\"}") >= 1.0,
            "B saw that Redis lost its stream: {m}"
        ),
        Disruption::KillChannels | Disruption::None | Disruption::Reshard => {
            assert!(metric(&m, "cachesync_l2_invalidations_total") >= 1.0)
        }
    }
    drop(p);
}

#[tokio::test]
async fn a_write_on_one_node_is_never_read_old_on_another_past_the_bound() {
    bound_holds(Redis::server(), Disruption::None).await;
}

#[tokio::test]
async fn the_bound_holds_when_the_invalidation_channel_is_killed() {
    bound_holds(Redis::server(), Disruption::KillChannels).await;
}

#[tokio::test]
async fn the_bound_holds_when_redis_is_flushed() {
    bound_holds(Redis::server(), Disruption::Flush).await;
}

#[tokio::test]
async fn the_bound_holds_when_redis_restarts_empty() {
    bound_holds(Redis::server(), Disruption::Restart).await;
}

#[tokio::test]
async fn the_bound_holds_in_a_cluster_when_channels_are_killed() {
    bound_holds(Redis::cluster(), Disruption::KillChannels).await;
}

#[tokio::test]
async fn the_bound_holds_in_a_cluster_flushed_and_restarted() {
    bound_holds(Redis::cluster(), Disruption::Flush).await;
    bound_holds(Redis::cluster(), Disruption::Restart).await;
}

/// B's load of key 3 reads the old row and is held; A writes the key; B's load then returns.
/// Neither B's L1 nor L2 may end up with the old row.
async fn slow_fill_races_a_write(redis: Redis) {
    let p = pair(&redis).await;
    let ks = p.b.keyspace("users").expect("keyspace").clone();
    let (entered_rx, release) = hold_first_load(&ks);
    let slow = {
        let hb = p.hb.clone();
        tokio::spawn(async move { hb.get("/v1/kv/users/3").await })
    };
    entered_rx.await.expect("B's load ran its query");
    let w = p.ha.put("/v1/kv/users/3", r#"{"id":3,"name":"v1"}"#).await;
    assert_eq!(w.status, 200);
    // B hears of the write while its load is still held.
    eventually(WAIT, "B hears A's change", || async {
        let m = metrics(&p.hb).await;
        let n = metric(&m, "cachesync_l2_invalidations_total");
        if n >= 1.0 { Ok(()) } else { Err(n) }
    })
    .await;
    release.notify_one();
    let old = slow.await.expect("slow read");
    assert_eq!(
        old.json()["name"],
        "v0",
        "the held load answers what it read (it overlapped the write)"
    );
    ks.set_load_hook(None);
    // The held fill must not have replaced the write anywhere.
    let rec = redis.record("cachesync:users:3").await.expect("A's write is in L2");
    assert!(
        rec.value
            .as_deref()
            .is_some_and(|v| String::from_utf8_lossy(v).contains("v1")),
        "L2 holds the write, not the slow fill: {rec:?}"
    );
    let on_b = p.hb.get("/v1/kv/users/3").await;
    assert_eq!(
        on_b.json()["name"],
        "v1",
        "B's L1 did not keep the slow fill ({})",
        on_b.header("x-cache")
    );
    let m = metrics(&p.hb).await;
    assert!(metric(&m, "cachesync_cache_fills_skipped_total") >= 1.0, "{m}");
    drop(p);
}

#[tokio::test]
async fn a_slow_fill_racing_a_write_installs_the_old_row_nowhere() {
    slow_fill_races_a_write(Redis::server()).await;
}

#[tokio::test]
async fn a_slow_fill_racing_a_write_installs_the_old_row_nowhere_in_a_cluster() {
    slow_fill_races_a_write(Redis::cluster()).await;
}

/// Reads and writes on both nodes while Redis is killed and brought back: every request
/// answers 200, and afterwards both nodes serve what Postgres holds.
async fn redis_killed_under_load(redis: Redis) {
    let p = pair(&redis).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for (w, h) in [
        (0u64, p.ha.clone()),
        (1, p.hb.clone()),
        (2, p.ha.clone()),
        (3, p.hb.clone()),
    ] {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = 1 + (n * 7 + w) % 20;
                let r = if n.is_multiple_of(4) {
                    h.put(
                        &format!("/v1/kv/users/{key}"),
                        format!(r#"{{"id":{key},"name":"w{w}n{n}"}}"#),
                    )
                    .await
                } else {
                    h.get(&format!("/v1/kv/users/{key}")).await
                };
                if r.status != 200 {
                    errors.push(format!("{} {}", r.status, r.body));
                }
            }
            (n, errors)
        }));
    }
    let breaker_opens = || async {
        eventually(WAIT, "both nodes' breakers open", || async {
            let (ma, mb) = (metrics(&p.ha).await, metrics(&p.hb).await);
            let open = metric(&ma, "cachesync_l2_breaker_open") + metric(&mb, "cachesync_l2_breaker_open");
            if open >= 2.0 { Ok(()) } else { Err(open) }
        })
        .await
    };
    let requests = || async { metric(&metrics(&p.ha).await, "cachesync_http_requests_total") };
    // Some load with Redis up, then Redis gone under load.
    let at = requests().await;
    eventually(WAIT, "load runs", || async {
        if requests().await > at + 50.0 { Ok(()) } else { Err(()) }
    })
    .await;
    redis.stop();
    breaker_opens().await;
    let at = requests().await;
    eventually(WAIT, "load runs without Redis", || async {
        if requests().await > at + 100.0 { Ok(()) } else { Err(()) }
    })
    .await;
    redis.restart();
    eventually(WAIT, "the breakers close again", || async {
        let (ma, mb) = (metrics(&p.ha).await, metrics(&p.hb).await);
        let open = metric(&ma, "cachesync_l2_breaker_open") + metric(&mb, "cachesync_l2_breaker_open");
        if open == 0.0 { Ok(()) } else { Err(open) }
    })
    .await;
    let at = requests().await;
    eventually(WAIT, "load runs with Redis back", || async {
        if requests().await > at + 50.0 { Ok(()) } else { Err(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        let (n, errors) = t.await.expect("load task");
        assert!(errors.is_empty(), "client errors while Redis was down: {errors:?}");
        total += n;
    }
    assert!(total > 200, "{total} requests");
    // Nothing stale afterwards: each node serves what Postgres holds.
    for key in 1..=20 {
        let want: String = p.db.scalar(&format!("SELECT name FROM users WHERE id = {key}")).await;
        for h in [&p.ha, &p.hb] {
            eventually(WAIT, "each node serves Postgres's row", || async {
                let r = h.get(&format!("/v1/kv/users/{key}")).await;
                if r.json()["name"] == want.as_str() {
                    Ok(())
                } else {
                    Err(r.body)
                }
            })
            .await;
        }
    }
    drop(p);
}

#[tokio::test]
async fn redis_killed_under_load_causes_no_client_errors() {
    redis_killed_under_load(Redis::server()).await;
}

#[tokio::test]
async fn a_cluster_killed_under_load_causes_no_client_errors() {
    redis_killed_under_load(Redis::cluster()).await;
}

/// The compare-and-set script decides like `Record::supersedes` (the L1 order) on every pair of
/// a set of versions that covers each rule: positions, a change a load's snapshot could not
/// see, a load that saw a change, xid wrap-around.
#[tokio::test]
async fn the_compare_and_set_script_orders_like_l1() {
    let server = cachesync_testkit::redis::shared();
    let client = redis::Client::open(server.url()).expect("url");
    let mut c = client.get_multiplexed_async_connection().await.expect("connect");
    let prefix = server.key_prefix();
    let snap = |s: &str| Snapshot::parse(s);
    let value = |kind: Kind, lsn: u64, xid: Option<u32>, snapshot: Option<Snapshot>| Record {
        kind,
        lsn: Lsn(lsn),
        xid,
        snapshot,
        value: (kind == Kind::Value).then(|| bytes::Bytes::from_static(b"{}")),
    };
    let versions = vec![
        value(Kind::Value, 500, None, snap("90:100:95")),
        value(Kind::Value, 400, Some(95), None),
        value(Kind::Value, 400, Some(94), None),
        value(Kind::Absent, 600, Some(99), None),
        value(Kind::Value, 550, None, snap("98:99:")),
        value(Kind::Unknown, 450, Some(96), None),
        value(Kind::Value, 700, None, snap("4294967290:4294967306:4294967295")),
        value(Kind::Value, 650, Some(u32::MAX), None),
        value(Kind::Value, 650, Some(3), None),
        value(Kind::Absent, 0, None, snap("5:5:")),
    ];
    let mut cases = 0;
    for (i, old) in versions.iter().enumerate() {
        for (j, new) in versions.iter().enumerate() {
            let key = format!("{prefix}{i}-{j}");
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(old.encode())
                .query_async(&mut c)
                .await
                .expect("SET");
            let stored: i64 = cachesync::l2::script::CAS
                .key(&key)
                .arg(new.encode())
                .arg(60_000)
                .invoke_async(&mut c)
                .await
                .expect("CAS");
            assert_eq!(stored == 1, new.supersedes(old), "CAS of {new:?} over {old:?}");
            cases += 1;
        }
    }
    assert_eq!(cases, 100);
}

/// A sequence number that jumps (entries trimmed past a reader, or lost in a failover) makes
/// the reader suspect every L1 entry confirmed before; a suspect entry is revalidated by
/// version against L2 — kept when L2 holds the same version — not flushed.
#[tokio::test]
async fn a_gap_in_the_sequence_makes_entries_suspect_and_they_are_revalidated() {
    let redis = Redis::server();
    let p = pair(&redis).await;
    // A change announced, so the stream exists and B follows it.
    assert_eq!(p.ha.put("/v1/kv/users/5", r#"{"id":5,"name":"v1"}"#).await.status, 200);
    let on_b = until_named(&p.hb, 5, "v1").await;
    assert_eq!(on_b, "v1");
    let Redis::Server(server) = &redis else { unreachable!() };
    let meta = server.cli(&["HGET", "cachesync:{users}:meta", "e"]);
    let seq: u64 = server
        .cli(&["HGET", "cachesync:{users}:meta", "s"])
        .trim()
        .parse()
        .expect("seq");
    // An entry five places ahead: four were lost.
    server.cli(&[
        "XADD",
        "cachesync:{users}:changes",
        "*",
        "e",
        meta.trim(),
        "s",
        &(seq + 5).to_string(),
        "n",
        "elsewhere",
        "c",
        "",
        "f",
        "",
    ]);
    eventually(WAIT, "B sees the gap", || async {
        let m = metrics(&p.hb).await;
        let n = metric(&m, "cachesync_l2_gaps_total{keyspace=\"users\",reason=\"sequence\"}");
        if n >= 1.0 { Ok(()) } else { Err(n) }
    })
    .await;
    // The entry is suspect: its next read is revalidated against L2 (same version: kept).
    let before = selects(&p.db).await;
    let r = p.hb.get("/v1/kv/users/5").await;
    assert_eq!(r.json()["name"], "v1");
    let m = metrics(&p.hb).await;
    let confirmed = metric(
        &m,
        "cachesync_l2_revalidations_total{keyspace=\"users\",result=\"confirmed\"}",
    ) + metric(
        &m,
        "cachesync_l2_reconciled_total{keyspace=\"users\",result=\"confirmed\"}",
    );
    assert!(confirmed >= 1.0, "revalidated by version, not dropped: {m}");
    // Seen once in a full-suite run on a loaded machine (one reload): the L2 request counts
    // say whether Redis answered within the test's 200 ms timeout.
    let requests: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("cachesync_l2_requests_total"))
        .collect();
    assert_eq!(
        selects(&p.db).await,
        before,
        "L2 vouched for it: no reload; {requests:?}"
    );
    // Confirmed, it is served from L1 again. Not necessarily on the very next read: on a loaded
    // machine that read can come more than the bound after the confirmation while the channel's
    // reader has not come round, and then it is revalidated once more (and, if Redis misses the
    // 200 ms timeout, reloaded: seen once in a full-suite run).
    eventually(WAIT, "the confirmed entry is served from L1", || async {
        let again = p.hb.get("/v1/kv/users/5").await;
        match (again.header("x-cache"), again.json()["name"].as_str()) {
            ("hit", Some("v1")) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    drop(p);
}

/// A change whose announcement never came (written to L2 by something else) is caught by the
/// periodic reconciliation: B's L1 entry is compared with L2 by version and dropped.
#[tokio::test]
async fn reconciliation_catches_a_change_nobody_announced() {
    let redis = Redis::server();
    let p = pair(&redis).await;
    assert_eq!(p.hb.get("/v1/kv/users/6").await.json()["name"], "v0");
    // The row changes in Postgres and a newer record lands in L2, silently.
    let xid: i64 = p
        .db
        .scalar("WITH u AS (UPDATE users SET name = 'quiet' WHERE id = 6 RETURNING 1) SELECT txid_current() FROM u")
        .await;
    let lsn: String = p.db.scalar("SELECT pg_current_wal_lsn()::text").await;
    let lsn: Lsn = lsn.parse().expect("an LSN");
    let rec = Record {
        kind: Kind::Value,
        lsn,
        xid: Some(xid as u32),
        snapshot: None,
        value: Some(bytes::Bytes::from_static(br#"{"id":6,"name":"quiet"}"#)),
    };
    let Redis::Server(server) = &redis else { unreachable!() };
    let client = redis::Client::open(server.url()).expect("url");
    let mut c = client.get_multiplexed_async_connection().await.expect("connect");
    let stored: i64 = cachesync::l2::script::CAS
        .key("cachesync:users:6")
        .arg(rec.encode())
        .arg(60_000)
        .invoke_async(&mut c)
        .await
        .expect("CAS");
    assert_eq!(stored, 1, "newer than the fill");
    let r = until_named(&p.hb, 6, "quiet").await;
    assert_eq!(r, "quiet");
    let m = metrics(&p.hb).await;
    assert!(
        metric(
            &m,
            "cachesync_l2_reconciled_total{keyspace=\"users\",result=\"dropped\"}"
        ) >= 1.0,
        "{m}"
    );
    drop(p);
}

/// Every slot of the node holding the users stream moves to another node (keys and all) while
/// A writes and B reads: MOVED is followed, nothing fails, and the bound holds.
#[tokio::test]
async fn the_bound_holds_in_a_cluster_while_slots_move() {
    bound_holds(Redis::cluster(), Disruption::Reshard).await;
}

/// Reads key `id` on `h` until its name is `name`; returns the name.
async fn until_named(h: &Http, id: u32, name: &str) -> String {
    eventually(WAIT, "the node serves the new name", || async {
        let r = h.get(&format!("/v1/kv/users/{id}")).await;
        let got = r.json()["name"].as_str().unwrap_or_default().to_string();
        if got == name { Ok(got) } else { Err(r.body) }
    })
    .await
}

/// Two nodes missing one key at once make one query: the first takes the key's lease in Redis
/// and loads; the other waits for its fill and answers from L2.
#[tokio::test]
async fn a_miss_on_two_nodes_at_once_makes_one_query() {
    let redis = Redis::server();
    let p = pair_with(&redis, "lease = \"10s\"\n").await;
    let ks = p.b.keyspace("users").expect("keyspace").clone();
    let (entered_rx, release) = hold_first_load(&ks);
    let before = selects(&p.db).await;
    let on_b = {
        let hb = p.hb.clone();
        tokio::spawn(async move { hb.get("/v1/kv/users/8").await })
    };
    entered_rx.await.expect("B holds the lease and ran its query");
    let on_a = {
        let ha = p.ha.clone();
        tokio::spawn(async move { ha.get("/v1/kv/users/8").await })
    };
    eventually(WAIT, "A found the lease taken and waits for B's fill", || async {
        let m = metrics(&p.ha).await;
        let n = metric(&m, "cachesync_l2_requests_total{op=\"lease\",result=\"ok\"}");
        if n >= 1.0 { Ok(()) } else { Err(n) }
    })
    .await;
    release.notify_one();
    let (b, a) = (on_b.await.expect("B"), on_a.await.expect("A"));
    assert_eq!((b.status.as_u16(), b.header("x-cache")), (200, "miss"));
    assert_eq!((a.status.as_u16(), a.header("x-cache")), (200, "hit-l2"), "{}", a.body);
    assert_eq!(a.body, b.body);
    assert_eq!(selects(&p.db).await, before + 1, "one query for both nodes");
    drop(p);
}

/// A change A captured from Postgres (CDC) and a write A flushed behind reach B — a node
/// without CDC, which would otherwise keep its entries for their whole `ttl`.
#[tokio::test]
async fn changes_from_cdc_and_write_behind_flushes_reach_another_node() {
    let redis = Redis::server();
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO users SELECT g, 'v0' FROM generate_series(1, 5) g;
         CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'v0' FROM generate_series(1, 5) g;",
    )
    .await;
    let ks = |users: &str, items: &str| {
        format!(
            "[[keyspace]]\nname = \"users\"\ntable = \"public.users\"\nkey = \"id\"\nttl = \"5m\"\nl2 = true\n{users}\n\
             [[keyspace]]\nname = \"items\"\ntable = \"public.items\"\nkey = \"id\"\nttl = \"5m\"\nl2 = true\n{items}\n"
        )
    };
    let node = crate::common::Node::new();
    let a_text = node
        .config_text(&db, &ks("cdc = \"update\"", "write = \"behind\""), &redis.section())
        .replacen("[server]\n", "[server]\nnode_id = \"a\"\n", 1);
    let (a, ha) = node.start_text(&a_text).await;
    let b_text = db.config_text(&format!("{}{}", ks("", ""), redis.section())).replacen(
        "[server]\n",
        "[server]\nnode_id = \"b\"\n",
        1,
    );
    let (b, hb) = serve(cachesync::config::Config::parse(&b_text).expect("valid")).await;
    for name in ["users", "items"] {
        let t = b.keyspace(name).and_then(|k| k.l2().cloned()).expect("tier");
        eventually(WAIT, "B's channel connects", || async {
            if t.connected() { Ok(()) } else { Err(()) }
        })
        .await;
    }
    assert_eq!(hb.get("/v1/kv/users/1").await.json()["name"], "v0");
    assert_eq!(hb.get("/v1/kv/items/1").await.json()["name"], "v0");
    assert_eq!(hb.get("/v1/kv/users/1").await.header("x-cache"), "hit");

    db.exec("UPDATE users SET name = 'from-sql' WHERE id = 1").await;
    let got = eventually(WAIT, "B serves the change A captured", || async {
        let r = hb.get("/v1/kv/users/1").await;
        if r.json()["name"] == "from-sql" {
            Ok(r)
        } else {
            Err(r.body)
        }
    })
    .await;
    assert_ne!(
        got.header("x-cache"),
        "miss",
        "from L2 (A wrote the change there), not Postgres"
    );

    let w = ha.put("/v1/kv/items/1", r#"{"id":1,"name":"behind"}"#).await;
    assert_eq!(w.status, 202, "{}", w.body);
    eventually(WAIT, "B serves the write A flushed", || async {
        let r = hb.get("/v1/kv/items/1").await;
        if r.json()["name"] == "behind" {
            Ok(())
        } else {
            Err(r.body)
        }
    })
    .await;
    let m = metrics(&hb).await;
    assert!(
        metric(&m, "cachesync_l2_invalidations_total{keyspace=\"users\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "cachesync_l2_invalidations_total{keyspace=\"items\"}") >= 1.0,
        "{m}"
    );
    drop((a, b));
}

/// Holds the keyspace's first load after its query (before it installs) until `release` is
/// notified; `entered` fires when it is held.
fn hold_first_load(
    ks: &Arc<cachesync::keyspace::Keyspace>,
) -> (tokio::sync::oneshot::Receiver<()>, Arc<tokio::sync::Notify>) {
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let entered = Arc::new(std::sync::Mutex::new(Some(entered_tx)));
    let release = Arc::new(tokio::sync::Notify::new());
    let held = release.clone();
    ks.set_load_hook(Some(Arc::new(move |_key| {
        let (entered, release) = (entered.clone(), held.clone());
        Box::pin(async move {
            let first = entered.lock().unwrap().take();
            if let Some(tx) = first {
                let _ = tx.send(());
                release.notified().await;
            }
        })
    })));
    (entered_rx, release)
}

/// In a CDC keyspace, L2 answers a miss only while the node's own change stream keeps the
/// freshness contract; otherwise Postgres does (L2 may lag a change nobody has captured yet).
#[tokio::test]
async fn a_cdc_keyspace_asks_l2_only_while_its_stream_keeps_the_contract() {
    let redis = Redis::server();
    let db = Db::new().await;
    db.exec(USERS).await;
    let node = crate::common::Node::new();
    let text = node.config_text(
        &db,
        "[[keyspace]]\nname = \"users\"\ntable = \"public.users\"\nkey = \"id\"\ncdc = \"update\"\nwarm = false\nl2 = true\n",
        &redis.section(),
    );
    let (a, ha) = node.start_text(&text).await;
    // A record for key 4 that Postgres never held, newer than anything there.
    let Redis::Server(server) = &redis else { unreachable!() };
    let client = redis::Client::open(server.url()).expect("url");
    let mut c = client.get_multiplexed_async_connection().await.expect("connect");
    let planted = Record {
        kind: Kind::Value,
        lsn: Lsn(u64::MAX / 2),
        xid: None,
        snapshot: None,
        value: Some(bytes::Bytes::from_static(br#"{"id":4,"name":"planted"}"#)),
    };
    let _: () = redis::cmd("SET")
        .arg("cachesync:users:4")
        .arg(planted.encode())
        .query_async(&mut c)
        .await
        .expect("SET");
    let ks = a.keyspace("users").expect("keyspace").clone();
    // The stream no longer vouches for the keyspace: the miss goes to Postgres.
    ks.set_followed(false);
    let r = ha.get("/v1/kv/users/4").await;
    assert_eq!(
        (r.header("x-cache"), r.json()["name"].as_str()),
        ("miss", Some("v0")),
        "{}",
        r.body
    );
    // With the stream keeping the contract, L2 answers misses.
    ks.set_followed(true);
    let r = ha.get("/v1/kv/users/5").await;
    assert_eq!(r.header("x-cache"), "miss", "nothing in L2 yet for key 5");
    // Once A's fill is in Redis, a read that misses L1 is answered from L2.
    let r = eventually(WAIT, "a miss answered from L2", || async {
        ks.clear();
        let r = ha.get("/v1/kv/users/5").await;
        if r.header("x-cache") == "hit-l2" {
            Ok(r)
        } else {
            Err(r.header("x-cache").to_string())
        }
    })
    .await;
    assert_eq!(r.json()["name"], "v0");
    drop(a);
}

/// A value under a record's key that is not a record (another program wrote it) is never
/// served: the read goes to Postgres, and the fill replaces it with a record.
#[tokio::test]
async fn a_foreign_value_in_redis_is_never_served_and_gets_replaced() {
    let redis = Redis::server();
    let p = pair(&redis).await;
    let Redis::Server(server) = &redis else { unreachable!() };
    for (key, junk) in [
        ("7", "not a record"),
        ("8", "V-short"),
        ("9", "Vxxxxxxxxxxxxxxxxx\u{ff}\u{ff}"),
    ] {
        server.cli(&["SET", &format!("cachesync:users:{key}"), junk]);
        let r = p.ha.get(&format!("/v1/kv/users/{key}")).await;
        assert_eq!((r.status.as_u16(), r.header("x-cache")), (200, "miss"), "{}", r.body);
        assert_eq!(r.json()["name"], "v0");
        let rec = eventually(WAIT, "the fill replaces the foreign value", || async {
            match redis.record_raw(&format!("cachesync:users:{key}")).await {
                Some(b) if Record::decode(&b).is_some() => Ok(Record::decode(&b).unwrap()),
                other => Err(other),
            }
        })
        .await;
        assert_eq!(rec.kind, Kind::Value);
    }
    drop(p);
}

/// Redis comes back from an older snapshot (a restart from persistence, a failover to a replica
/// that missed the latest writes): the same epoch, a lower sequence, L2 records older than
/// changes already announced. No node may take those records for current: the regression
/// raises the floor to the newest change heard, and suspect entries reload from Postgres.
#[tokio::test]
async fn redis_going_back_in_time_is_not_taken_for_current() {
    let redis = Redis::server();
    let p = pair(&redis).await;
    let Redis::Server(server) = &redis else { unreachable!() };
    assert_eq!(
        p.ha.put("/v1/kv/users/11", r#"{"id":11,"name":"v1"}"#).await.status,
        200
    );
    assert_eq!(until_named(&p.hb, 11, "v1").await, "v1");
    // What Redis held after v1: the record and the sequence.
    let old_record = redis.record_raw("cachesync:users:11").await.expect("v1's record");
    let old_seq = server.cli(&["HGET", "cachesync:{users}:meta", "s"]).trim().to_string();
    assert_eq!(
        p.ha.put("/v1/kv/users/11", r#"{"id":11,"name":"v2"}"#).await.status,
        200
    );
    assert_eq!(until_named(&p.hb, 11, "v2").await, "v2");
    // Redis "restored" to before v2: the old record, the old sequence, v2's notice gone.
    let client = redis::Client::open(server.url()).expect("url");
    let mut c = client.get_multiplexed_async_connection().await.expect("connect");
    let last: redis::Value = redis::cmd("XREVRANGE")
        .arg("cachesync:{users}:changes")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await
        .expect("XREVRANGE");
    let id = match last {
        redis::Value::Array(items) => match items.into_iter().next() {
            Some(redis::Value::Array(mut e)) => redis::from_redis_value::<String>(e.remove(0)).expect("id"),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let _: () = redis::pipe()
        .cmd("SET")
        .arg("cachesync:users:11")
        .arg(old_record)
        .ignore()
        .cmd("HSET")
        .arg("cachesync:{users}:meta")
        .arg("s")
        .arg(&old_seq)
        .ignore()
        .cmd("XDEL")
        .arg("cachesync:{users}:changes")
        .arg(&id)
        .ignore()
        .query_async(&mut c)
        .await
        .expect("restore");
    eventually(WAIT, "both nodes see the sequence go back", || async {
        let (ma, mb) = (metrics(&p.ha).await, metrics(&p.hb).await);
        let key = "cachesync_l2_gaps_total{keyspace=\"users\",reason=\"epoch\"}";
        let n = metric(&ma, key).min(metric(&mb, key));
        if n >= 1.0 { Ok(()) } else { Err(n) }
    })
    .await;
    // Neither node serves v1 again: not from L2 on a miss (the restored record is below the
    // floor), not from L1 (suspect, and L2 may not vouch).
    p.b.keyspace("users").expect("ks").clear();
    let r = p.hb.get("/v1/kv/users/11").await;
    assert_eq!(
        r.json()["name"],
        "v2",
        "a miss after the restore: {} {}",
        r.header("x-cache"),
        r.body
    );
    for h in [&p.hb, &p.ha, &p.hb] {
        let r = h.get("/v1/kv/users/11").await;
        assert_eq!(r.json()["name"], "v2", "{} {}", r.header("x-cache"), r.body);
    }
    p.ha.get("/v1/kv/users/11").await;
    let rec = eventually(WAIT, "a fill puts v2 back in L2", || async {
        match redis.record("cachesync:users:11").await {
            Some(r)
                if r.value
                    .as_deref()
                    .is_some_and(|v| String::from_utf8_lossy(v).contains("v2")) =>
            {
                Ok(r)
            }
            other => {
                // Drop A's L1 entry so the next read misses and fills.
                p.a.keyspace("users").expect("ks").clear();
                p.ha.get("/v1/kv/users/11").await;
                Err(other)
            }
        }
    })
    .await;
    assert_eq!(rec.kind, Kind::Value);
    drop(p);
}
