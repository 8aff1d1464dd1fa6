//! Hub and edges on real Postgres: one hub holds the slot and serves its log; edges follow it
//! over real sockets (through a fault link where the test needs one), bootstrap from its
//! snapshot, survive SIGKILL, cut and blackholed links, retention, a wiped hub log, and a wrong
//! token.

use std::path::PathBuf;
use std::time::Duration;

use cachesync::server::Server;
use cachesync_testkit::faultlink::FaultLink;
use cachesync_testkit::sidecar::Sidecar;
use cachesync_testkit::{eventually, temp_dir};
use serde_json::{Value, json};

use crate::common::{Db, Http, Node, WAIT, init_logging, metric, start_text as start, until};

const ITEMS: &str =
    "[[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\nread_through = false\n";

/// A hub's configuration: a slot of its own and a log server on a free port.
pub(crate) fn hub_text(db: &Db, node: &Node, keyspaces: &str, replication: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"hub\"\nshutdown_grace = \"5s\"\n\
         [postgres]\nurl = \"{}\"\nacquire_timeout = \"2s\"\nconnect_timeout = \"2s\"\n{keyspaces}\n\
         [log]\ndir = \"{}\"\n[cdc]\nslot = \"{}\"\nheartbeat = \"0s\"\nready_grace = \"1s\"\n\
         [replication]\nlisten = \"127.0.0.1:0\"\nheartbeat = \"50ms\"\n{replication}\n",
        db.db.url,
        node.log.display(),
        node.slot
    )
}

/// An edge's configuration: it follows `upstream` and holds no slot.
pub(crate) fn edge_text(
    db: &Db,
    name: &str,
    log: &std::path::Path,
    upstream: &str,
    keyspaces: &str,
    extra: &str,
) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"{name}\"\nshutdown_grace = \"5s\"\n\
         [postgres]\nurl = \"{}\"\nacquire_timeout = \"2s\"\nconnect_timeout = \"2s\"\n{keyspaces}\n\
         [log]\ndir = \"{}\"\n[cdc]\nsource = \"upstream\"\nready_grace = \"1s\"\n\
         [[upstream]]\nname = \"hub\"\nurl = \"http://{upstream}\"\nlink_timeout = \"1s\"\n{extra}\n",
        db.db.url,
        log.display(),
    )
}

async fn start_hub(db: &Db, node: &Node, keyspaces: &str) -> (Server, Http, String) {
    let (server, http) = start(&hub_text(db, node, keyspaces, "")).await;
    let addr = server.replication_addr().expect("the hub serves its log").to_string();
    (server, http, addr)
}

async fn replication(http: &Http) -> Value {
    http.get("/v1/replication").await.json()
}

/// Waits until the edge answers `path` with `want` (200 and that document, or 404 for `None`).
async fn converges(http: &Http, path: &str, want: Option<Value>) {
    until(http, path, &format!("{path} converges to {want:?}"), |r| match &want {
        Some(v) => r.status == 200 && r.json() == *v,
        None => r.status == 404,
    })
    .await;
}

async fn slots(db: &Db) -> Vec<String> {
    db.sql
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE NOT temporary AND database = current_database()",
            &[],
        )
        .await
        .expect("slots")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_hub_and_three_edges_share_one_slot_and_every_change_reaches_every_edge() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 50) g;").await;
    let hub_node = Node::new();
    let (hub, hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    let mut edges = Vec::new();
    for i in 0..3 {
        let log = temp_dir("edgelog", None);
        let (server, http) = start(&edge_text(&db, &format!("edge{i}"), &log, &addr, ITEMS, "")).await;
        edges.push((server, http, log));
    }
    // Bootstrapped from the hub's snapshot: warm with no read-through of their own.
    for (_, http, _) in &edges {
        let r = http.get("/v1/kv/items/7").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json(), json!({"id": 7, "name": "n7"}));
    }
    let names = slots(&db).await;
    assert_eq!(
        names,
        vec![hub_node.slot.clone()],
        "exactly one slot for a hub and three edges"
    );
    let senders: i64 = db
        .scalar(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE s.database = current_database()",
        )
        .await;
    assert_eq!(senders, 1, "one WAL sender");

    db.exec("INSERT INTO items VALUES (100, 'new')").await;
    db.exec("UPDATE items SET name = 'changed' WHERE id = 1").await;
    db.exec("DELETE FROM items WHERE id = 2").await;
    for (_, http, _) in &edges {
        converges(http, "/v1/kv/items/100", Some(json!({"id": 100, "name": "new"}))).await;
        converges(http, "/v1/kv/items/1", Some(json!({"id": 1, "name": "changed"}))).await;
        converges(http, "/v1/kv/items/2", None).await;
    }
    db.exec("TRUNCATE items").await;
    for (_, http, _) in &edges {
        converges(http, "/v1/kv/items/1", None).await;
        converges(http, "/v1/kv/items/100", None).await;
    }

    // The hub shows its followers; each edge shows its upstream.
    let report = eventually(WAIT, "the hub lists three followers", || async {
        let r = replication(&hub_http).await;
        let n = r["followers"].as_array().map_or(0, |f| f.len());
        if n == 3 { Ok(r) } else { Err(r) }
    })
    .await;
    assert_eq!(report["role"], "hub");
    assert_eq!(report["log"]["identity"].as_str().unwrap().len(), 32);
    let edge_report = replication(&edges[0].1).await;
    assert_eq!(edge_report["role"], "edge");
    assert_eq!(edge_report["upstreams"][0]["connected"], true);
    assert_eq!(edge_report["upstreams"][0]["identity"], report["log"]["identity"]);
    let metrics = edges[0].1.get("/metrics").await.body;
    assert!(
        metric(&metrics, "cachesync_replication_received_records_total") >= 4.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "cachesync_replication_upstream_connected"), 1.0);
    let hub_metrics = hub_http.get("/metrics").await.body;
    assert_eq!(metric(&hub_metrics, "cachesync_replication_followers"), 3.0);
    assert!(metric(&hub_metrics, "cachesync_replication_sent_records_total") >= 12.0);

    for (server, _, _) in edges {
        server.shutdown().await;
    }
    hub.shutdown().await;
}

/// Reads `items/1..=keys` on `http` until `stop`, failing if any key's counter ever goes back.
/// Returns how many reads it made.
/// A node that is killed mid-read is not a failure: its requests just fail.
async fn never_back(http: Http, keys: i64, stop: tokio::sync::watch::Receiver<bool>) -> Result<u64, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut seen = vec![-1i64; keys as usize + 1];
    let mut reads = 0;
    while !*stop.borrow() {
        for k in 1..=keys {
            let Ok(r) = client.get(format!("{}/v1/kv/items/{k}", http.base)).send().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            if r.status() != 200 {
                continue;
            }
            let Ok(doc) = r.json::<Value>().await else { continue };
            reads += 1;
            let n = doc["n"].as_i64().unwrap_or(-1);
            if n < seen[k as usize] {
                return Err(format!("key {k} went back from {} to {n}", seen[k as usize]));
            }
            seen[k as usize] = n;
        }
    }
    Ok(reads)
}

/// Bumps `n` of random keys among `1..=keys` in small transactions until `stop`.
/// `done` counts the updates committed so far.
async fn churn(
    db_url: String,
    keys: i64,
    stop: tokio::sync::watch::Receiver<bool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> u64 {
    let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut n = 0;
    while !*stop.borrow() {
        let k = (n as i64 % keys) + 1;
        client
            .execute("UPDATE items SET n = n + 1 WHERE id = $1", &[&(k as i32)])
            .await
            .expect("update");
        n += 1;
        done.store(n, std::sync::atomic::Ordering::Relaxed);
    }
    n
}

/// Every key of the edge equals the database's row (a missing row: 404).
async fn matches_database(db: &Db, http: &Http, keys: i64) {
    let rows = db.sql.query("SELECT id, n FROM items", &[]).await.expect("rows");
    let by_id: std::collections::HashMap<i32, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for k in 1..=keys {
        let want = by_id.get(&(k as i32)).map(|n| json!({"id": k, "n": n}));
        converges(http, &format!("/v1/kv/items/{k}"), want).await;
    }
}

#[tokio::test]
async fn an_edge_killed_while_rows_change_resumes_with_nothing_missed_and_nothing_older() {
    let db = Db::new().await;
    let keys = 20;
    db.exec(&format!("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {keys}) g;")).await;
    let hub_node = Node::new();
    let (hub, _hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    let log = temp_dir("edgelog", None);
    let text = edge_text(&db, "edge-k", &log, &addr, ITEMS, "");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cachesync"));
    let mut edge = Sidecar::spawn(bin, Some(&text));
    let http = Http::new(edge.addr);
    until(&http, "/readyz", "the edge is ready", |r| r.status == 200).await;

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writes_so_far = || done.load(std::sync::atomic::Ordering::Relaxed);
    let writer = tokio::spawn(churn(db.db.url.clone(), keys, stop.clone(), done.clone()));
    let (killed_tx, killed) = tokio::sync::watch::channel(false);
    let reader = tokio::spawn(never_back(http.clone(), keys, killed));
    // Let changes flow through the edge, then kill it mid-stream.
    eventually(WAIT, "the edge applies changes", || async {
        let m = http.get("/metrics").await.body;
        let n = metric(&m, "cachesync_replication_received_records_total");
        if n >= 50.0 { Ok(()) } else { Err(n) }
    })
    .await;
    edge.kill();
    killed_tx.send(true).expect("stop the first reader");
    let reads_before = reader.await.expect("reader").expect("no key went back before the kill");
    // Restarted on the same log: it resumes from its stored place while rows keep changing.
    let mut edge = Sidecar::spawn(bin, Some(&text));
    let http = Http::new(edge.addr);
    let reader = tokio::spawn(never_back(http.clone(), keys, stop.clone()));
    until(&http, "/readyz", "the restarted edge is ready", |r| r.status == 200).await;
    let at_restart = writes_so_far();
    eventually(WAIT, "changes keep arriving after the restart", || async {
        let m = http.get("/metrics").await.body;
        let n = metric(&m, "cachesync_replication_received_records_total");
        let w = writes_so_far();
        if n >= 50.0 && w >= at_restart + 50 {
            Ok(())
        } else {
            Err((n, w))
        }
    })
    .await;
    stop_tx.send(true).expect("stop");
    let writes = writer.await.expect("writer");
    let reads_after = reader
        .await
        .expect("reader")
        .expect("no key went back after the restart");
    assert!(
        writes >= 100 && reads_after > 0,
        "{writes} writes, {reads_before}+{reads_after} reads"
    );
    // Nothing missed: every key ends at the database's value.
    matches_database(&db, &http, keys).await;
    let report = replication(&http).await;
    assert!(report["upstreams"][0]["position"].as_u64().unwrap() > 0, "{report}");
    assert!(edge.log().contains("bootstrapped from the upstream's snapshot"));
    edge.signal("TERM");
    assert!(edge.wait_timeout(WAIT).is_some(), "the edge stops on SIGTERM");
    hub.shutdown().await;
}

#[tokio::test]
async fn a_cut_link_is_survived_from_memory_and_the_edge_catches_up_when_it_heals() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0), (2, 0);")
        .await;
    let hub_node = Node::new();
    let (hub, _hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    let link = FaultLink::start(addr.parse().unwrap()).await;
    let log = temp_dir("edgelog", None);
    let (edge, http) = start(&edge_text(&db, "edge-c", &log, &link.addr().to_string(), ITEMS, "")).await;
    db.exec("UPDATE items SET n = 1 WHERE id = 1").await;
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 1}))).await;

    // Cut every connection and keep new ones out for 5 s.
    link.refuse(true);
    link.cut();
    db.exec("UPDATE items SET n = 2 WHERE id = 1; DELETE FROM items WHERE id = 2; INSERT INTO items VALUES (3, 3);")
        .await;
    let down = until(&http, "/v1/replication", "the edge reports the link down", |r| {
        r.json()["upstreams"][0]["connected"] == false
    })
    .await;
    assert!(down.json()["upstreams"][0]["last_error"].is_string(), "{}", down.body);
    // Still serving from memory, saying how far behind it may be; not ready past the grace.
    let r = http.get("/v1/kv/items/1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = until(&http, "/v1/kv/items/1", "reads report their lag", |r| {
        !r.header("x-cache-lag-ms").is_empty()
    })
    .await;
    assert_eq!(r.json(), json!({"id": 1, "n": 1}), "the old value, from memory");
    let ready = until(&http, "/readyz", "not ready past the grace", |r| r.status == 503).await;
    assert!(ready.body.contains("upstream hub unreachable"), "{}", ready.body);
    tokio::time::sleep(Duration::from_secs(5)).await; // the partition's length, not a wait for a condition
    link.refuse(false);
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 2}))).await;
    converges(&http, "/v1/kv/items/2", None).await;
    converges(&http, "/v1/kv/items/3", Some(json!({"id": 3, "n": 3}))).await;
    until(&http, "/readyz", "ready again", |r| r.status == 200).await;
    let m = http.get("/metrics").await.body;
    assert!(metric(&m, "cachesync_replication_reconnects_total") >= 1.0);
    assert_eq!(
        metric(&m, "cachesync_replication_bootstraps_total"),
        1.0,
        "a healed link resumes from its place, with no second snapshot"
    );
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn changes_made_while_an_edge_was_stopped_reach_it_on_a_quiet_database() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0), (2, 0);")
        .await;
    let hub_node = Node::new();
    let (hub, _hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    let log = temp_dir("edgelog", None);
    let text = edge_text(&db, "edge-q", &log, &addr, ITEMS, "");
    let (edge, _) = start(&text).await;
    edge.shutdown().await;
    // While the edge is away: changes, then nothing more.
    db.exec("UPDATE items SET n = 1 WHERE id = 1; DELETE FROM items WHERE id = 2;")
        .await;
    let hub_log = hub.state().log.clone().unwrap();
    let stored = || {
        let text = std::fs::read_to_string(log.join("upstreams/hub.position")).unwrap();
        text.split(' ').nth(2).unwrap().parse::<u64>().unwrap()
    };
    eventually(WAIT, "the hub logged the changes", || async {
        let (end, at) = (hub_log.end().0, stored());
        if end > at { Ok(()) } else { Err((end, at)) }
    })
    .await;
    // It fetches from its stored place and applies from the snapshot's; it becomes ready
    // though no change arrives after it.
    let (edge, http) = start(&text).await;
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 1}))).await;
    converges(&http, "/v1/kv/items/2", None).await;
    until(&http, "/v1/replication", "the edge reaches the hub's end", |r| {
        r.json()["upstreams"][0]["position"].as_u64() == Some(hub_log.end().0)
    })
    .await;
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_blackholed_link_is_detected_and_reported() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0);")
        .await;
    let hub_node = Node::new();
    let (hub, _hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    let link = FaultLink::start(addr.parse().unwrap()).await;
    let log = temp_dir("edgelog", None);
    let (edge, http) = start(&edge_text(&db, "edge-b", &log, &link.addr().to_string(), ITEMS, "")).await;
    link.blackhole(true);
    let r = until(&http, "/v1/replication", "the dead link is reported", |r| {
        r.json()["upstreams"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("looks dead"))
    })
    .await;
    assert_eq!(r.json()["upstreams"][0]["connected"], false, "{}", r.body);
    let m = http.get("/metrics").await.body;
    assert!(metric(&m, "cachesync_replication_link_timeouts_total") >= 1.0, "{m}");
    assert!(link.swallowed() > 0, "the blackhole swallowed traffic");
    link.blackhole(false);
    db.exec("UPDATE items SET n = 9 WHERE id = 1").await;
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 9}))).await;
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_clearly_on_both_sides_and_never_logged() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0);")
        .await;
    let dir = temp_dir("tokens", None);
    let (good, bad) = ("hub-token-0123456789abcdef", "not-the-token-fedcba9876543210");
    std::fs::write(dir.join("hub"), good).unwrap();
    std::fs::write(dir.join("bad"), bad).unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cachesync"));
    let hub_node = Node::new();
    let port = cachesync_testkit::free_port();
    let hub_cfg = hub_text(
        &db,
        &hub_node,
        ITEMS,
        &format!("token_file = \"{}\"", dir.join("hub").display()),
    )
    .replace(
        "[replication]\nlisten = \"127.0.0.1:0\"",
        &format!("[replication]\nlisten = \"127.0.0.1:{port}\""),
    );
    let hub = Sidecar::spawn(bin, Some(&hub_cfg));
    until(&Http::new(hub.addr), "/readyz", "the hub is ready", |r| r.status == 200).await;
    let upstream = format!("127.0.0.1:{port}");
    let edge = Sidecar::spawn(
        bin,
        Some(&edge_text(
            &db,
            "edge-t",
            &temp_dir("edgelog", None),
            &upstream,
            ITEMS,
            &format!("token_file = \"{}\"", dir.join("bad").display()),
        )),
    );
    let http = Http::new(edge.addr);
    let r = until(&http, "/v1/replication", "the refusal is reported", |r| {
        r.json()["upstreams"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused this node's token"))
    })
    .await;
    assert!(!r.body.contains(bad) && !r.body.contains(good), "{}", r.body);
    let ready = http.get("/readyz").await;
    assert_eq!(
        ready.status, 503,
        "an edge its hub refuses is not ready: {}",
        ready.body
    );
    let hub_metrics = Http::new(hub.addr).get("/metrics").await.body;
    assert!(
        metric(
            &hub_metrics,
            "cachesync_replication_refusals_total{reason=\"unauthorized\"}"
        ) >= 1.0
    );
    eventually(WAIT, "both sides log the refusal", || async {
        let (h, e) = (hub.log(), edge.log());
        if h.contains("refused a follower") && e.contains("refused this node") {
            Ok(())
        } else {
            Err(format!("hub:\n{h}\nedge:\n{e}"))
        }
    })
    .await;
    for log in [hub.log(), edge.log()] {
        assert!(
            !log.contains(good) && !log.contains(bad),
            "a token leaked into a log:\n{log}"
        );
    }
    // The right token is let in.
    std::fs::write(dir.join("bad"), good).unwrap();
    let edge2 = Sidecar::spawn(
        bin,
        Some(&edge_text(
            &db,
            "edge-t2",
            &temp_dir("edgelog", None),
            &upstream,
            ITEMS,
            &format!("token_file = \"{}\"", dir.join("bad").display()),
        )),
    );
    until(
        &Http::new(edge2.addr),
        "/readyz",
        "an edge with the token is ready",
        |r| r.status == 200,
    )
    .await;
}

#[tokio::test]
async fn a_wiped_and_recreated_hub_log_is_detected_by_the_edge() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0);")
        .await;
    let hub_node = Node::new();
    let port = cachesync_testkit::free_port();
    let hub_cfg = hub_text(&db, &hub_node, ITEMS, "").replace(
        "[replication]\nlisten = \"127.0.0.1:0\"",
        &format!("[replication]\nlisten = \"127.0.0.1:{port}\""),
    );
    let (hub, _) = start(&hub_cfg).await;
    let log = temp_dir("edgelog", None);
    let (edge, http) = start(&edge_text(&db, "edge-w", &log, &format!("127.0.0.1:{port}"), ITEMS, "")).await;
    let first = replication(&http).await["upstreams"][0]["identity"].clone();
    db.exec("UPDATE items SET n = 1 WHERE id = 1").await;
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 1}))).await;
    hub.shutdown().await;
    // The hub's log is wiped (a lost volume) and the hub comes back on the same address.
    for f in std::fs::read_dir(&hub_node.log).unwrap() {
        let p: PathBuf = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "log" || e == "index") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let (hub, _) = start(&hub_cfg).await;
    db.exec("UPDATE items SET n = 2 WHERE id = 1").await;
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 2}))).await;
    let report = replication(&http).await;
    assert_ne!(
        report["upstreams"][0]["identity"], first,
        "the edge follows the new log: {report}"
    );
    let m = http.get("/metrics").await.body;
    assert!(
        metric(
            &m,
            "cachesync_replication_bootstraps_total{reason=\"identity\",upstream=\"hub\"}"
        ) >= 1.0,
        "{m}"
    );
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn an_edge_past_the_hubs_retention_bootstraps_from_a_snapshot_and_converges() {
    let db = Db::new().await;
    let keys = 200;
    db.exec(&format!("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {keys}) g;")).await;
    let hub_node = Node::new();
    let small_log = "[log]\ndir";
    let hub_cfg = hub_text(&db, &hub_node, ITEMS, "").replace(
        small_log,
        "[log]\nsegment_bytes = \"4KiB\"\nretention_bytes = \"8KiB\"\nretention_check = \"1h\"\ndir",
    );
    let (hub, _hub_http, addr) = {
        let (s, h) = start(&hub_cfg).await;
        let a = s.replication_addr().unwrap().to_string();
        (s, h, a)
    };
    let log = temp_dir("edgelog", None);
    let text = edge_text(&db, "edge-r", &log, &addr, ITEMS, "");
    let (edge, http) = start(&text).await;
    // A connected follower holds retention: records it has not reported stay.
    db.exec("UPDATE items SET n = n + 1").await;
    matches_database(&db, &http, 3).await;
    edge.shutdown().await;
    // While the edge is away, many changes, and retention removes what it had not seen.
    for _ in 0..5 {
        db.exec("UPDATE items SET n = n + 1").await;
    }
    db.exec("DELETE FROM items WHERE id = 5").await;
    let hub_log = hub.state().log.clone().unwrap();
    eventually(WAIT, "the hub's log holds every change", || async {
        let end = hub_log.end().0;
        if end >= (keys * 6) as u64 { Ok(()) } else { Err(end) }
    })
    .await;
    let removed = hub_log.apply_retention().await.unwrap();
    assert!(removed > 0, "retention removed old segments");
    let stored = std::fs::read_to_string(log.join("upstreams/hub.position")).unwrap();
    let next: u64 = stored.split(' ').nth(2).unwrap().parse().unwrap();
    assert!(
        next < hub_log.start().0,
        "the edge's place ({next}) is before the hub's log ({})",
        hub_log.start()
    );
    let (edge, http) = start(&text).await;
    matches_database(&db, &http, keys as i64).await;
    converges(&http, "/v1/kv/items/5", None).await;
    let m = http.get("/metrics").await.body;
    assert_eq!(
        metric(
            &m,
            "cachesync_replication_bootstraps_total{reason=\"retention\",upstream=\"hub\"}"
        ),
        1.0,
        "{m}"
    );
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_row_deleted_while_an_edge_bootstraps_never_comes_back() {
    let db = Db::new().await;
    let keys = 3000;
    db.exec(&format!("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {keys}) g;")).await;
    let hub_node = Node::new();
    let (hub, _hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    // A slow link stretches the bootstrap so deletes land while it runs.
    let link = FaultLink::start(addr.parse().unwrap()).await;
    link.set_delay(Duration::from_millis(30));
    let deleter = {
        let url = db.db.url.clone();
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            for id in (1..=keys).step_by(7) {
                client
                    .execute("DELETE FROM items WHERE id = $1", &[&id])
                    .await
                    .expect("delete");
            }
        })
    };
    let log = temp_dir("edgelog", None);
    let (edge, http) = start(&edge_text(&db, "edge-d", &log, &link.addr().to_string(), ITEMS, "")).await;
    deleter.await.expect("deletes");
    link.set_delay(Duration::ZERO);
    db.exec("INSERT INTO items VALUES (100000, 1)").await;
    converges(&http, "/v1/kv/items/100000", Some(json!({"id": 100000, "n": 1}))).await;
    for id in (1..=keys).step_by(7) {
        let r = http.get(&format!("/v1/kv/items/{id}")).await;
        assert_eq!(r.status, 404, "deleted row {id} came back: {}", r.body);
    }
    for id in [2, 3, keys] {
        let r = http.get(&format!("/v1/kv/items/{id}")).await;
        assert_eq!(r.status, 200, "row {id} is there: {}", r.body);
    }
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn write_behind_on_an_edge_never_goes_back_under_rapid_overwrites() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0);")
        .await;
    let hub_node = Node::new();
    let (hub, _hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    let wb = ITEMS.replace("read_through = false", "read_through = true\nwrite = \"behind\"");
    let log = temp_dir("edgelog", None);
    let (edge, http) = start(&edge_text(
        &db,
        "edge-wb",
        &log,
        &addr,
        &wb,
        "[write_behind]\nbatch_delay = \"1ms\"\n",
    ))
    .await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let reader = tokio::spawn(never_back(http.clone(), 1, stop.clone()));
    let last = 400;
    for n in 1..=last {
        let r = http.put("/v1/kv/items/1", json!({"id": 1, "n": n}).to_string()).await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    crate::common::drained(&http).await;
    // The flushes' echoes come back through the hub; none of them takes the key back.
    let hub_echoes = eventually(WAIT, "the echoes pass through the hub", || async {
        let n: i32 = db.scalar("SELECT n FROM items WHERE id = 1").await;
        if n == last { Ok(n) } else { Err(n) }
    })
    .await;
    assert_eq!(hub_echoes, last);
    let hub_log = hub.state().log.clone().unwrap();
    eventually(WAIT, "the edge has every echo the hub logged", || async {
        let at = replication(&http).await["upstreams"][0]["position"]
            .as_u64()
            .unwrap_or(0);
        let end = hub_log.end().0;
        if at >= end { Ok(()) } else { Err((at, end)) }
    })
    .await;
    let m = http.get("/metrics").await.body;
    assert!(
        metric(&m, "cachesync_replication_received_records_total") >= 1.0,
        "echoes arrived: {m}"
    );
    stop_tx.send(true).unwrap();
    let reads = reader.await.unwrap().expect("the edge never went back");
    assert!(reads > 0);
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": last}))).await;
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_second_hub_on_the_same_slot_reports_the_conflict_and_takes_nothing() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0);")
        .await;
    let hub_node = Node::new();
    let (hub, hub_http, _addr) = start_hub(&db, &hub_node, ITEMS).await;
    let other = Node {
        log: temp_dir("cdclog", None),
        slot: hub_node.slot.clone(),
    };
    let text = hub_text(&db, &other, ITEMS, "").replace("node_id = \"hub\"", "node_id = \"hub2\"");
    init_logging();
    let second = Server::start(cachesync::config::Config::parse(&text).unwrap())
        .await
        .expect("starts");
    let why = eventually(WAIT, "the second hub says why it is not ready", || async {
        match second.wait_ready(Duration::from_millis(200)).await {
            Err(why) if why.contains(&hub_node.slot) => Ok(why),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(why.contains("hub"), "names who holds the slot: {why}");
    // The first keeps its stream.
    db.exec("UPDATE items SET n = 5 WHERE id = 1").await;
    converges(&hub_http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 5}))).await;
    assert!(!second.is_ready());
    assert_eq!(slots(&db).await, vec![hub_node.slot.clone()]);
    second.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_tls_link_carries_the_log_and_an_untrusted_certificate_is_refused() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0);")
        .await;
    let dir = temp_dir("tls", None);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    std::fs::write(dir.join("hub.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("hub.key"), cert.key_pair.serialize_pem()).unwrap();
    let hub_node = Node::new();
    let tls = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        dir.join("hub.pem").display(),
        dir.join("hub.key").display()
    );
    let (hub, _) = start(&hub_text(&db, &hub_node, ITEMS, &tls)).await;
    let upstream = format!("localhost:{}", hub.replication_addr().unwrap().port());
    let https = |text: String| text.replace("url = \"http://", "url = \"https://");
    let trusting = https(edge_text(
        &db,
        "edge-tls",
        &temp_dir("edgelog", None),
        &upstream,
        ITEMS,
        &format!("ca_file = \"{}\"", dir.join("hub.pem").display()),
    ));
    let (edge, http) = start(&trusting).await;
    db.exec("UPDATE items SET n = 7 WHERE id = 1").await;
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 7}))).await;
    // Without the hub's certificate to trust, the link is refused and says why.
    let doubting = https(edge_text(
        &db,
        "edge-notls",
        &temp_dir("edgelog", None),
        &upstream,
        ITEMS,
        "",
    ));
    init_logging();
    let untrusted = Server::start(cachesync::config::Config::parse(&doubting).unwrap())
        .await
        .expect("starts");
    let uhttp = Http::new(untrusted.local_addr());
    let r = until(&uhttp, "/v1/replication", "the certificate is refused", |r| {
        r.json()["upstreams"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate"))
    })
    .await;
    assert_eq!(r.json()["upstreams"][0]["connected"], false);
    assert!(!untrusted.is_ready());
    untrusted.shutdown().await;
    edge.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_hub_that_reloads_outside_its_log_makes_its_edges_take_a_new_snapshot() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL); INSERT INTO items VALUES (1, 0), (2, 0);")
        .await;
    let hub_node = Node::new();
    let (hub, hub_http, addr) = start_hub(&db, &hub_node, ITEMS).await;
    let log = temp_dir("edgelog", None);
    let (edge, http) = start(&edge_text(&db, "edge-s", &log, &addr, ITEMS, "")).await;
    // The hub loses its slot: it recreates it and reloads its keyspaces from the new slot's
    // snapshot — state its log never carried. (A terminated session holds the slot for a moment:
    // retry the drop until it is gone.)
    let slot = hub_node.slot.clone();
    eventually(WAIT, "the hub's slot is dropped", || async {
        db.exec(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
        ))
        .await;
        let dropped = db
            .sql
            .query(
                &format!("SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}' AND active_pid IS NULL"),
                &[],
            )
            .await
            .map(|rows| rows.len())
            .unwrap_or(0);
        if dropped == 1 { Ok(()) } else { Err("the slot is still held") }
    })
    .await;
    until(&hub_http, "/metrics", "the hub recreated its slot", |r| {
        metric(&r.body, "cachesync_cdc_slot_recreations_total") >= 1.0
    })
    .await;
    let r = until(&http, "/metrics", "the edge took a new snapshot", |r| {
        metric(
            &r.body,
            "cachesync_replication_bootstraps_total{reason=\"upstream_reload\",upstream=\"hub\"}",
        ) >= 1.0
    })
    .await;
    assert!(metric(&r.body, "cachesync_replication_bootstraps_total") >= 2.0);
    db.exec("UPDATE items SET n = 3 WHERE id = 2").await;
    converges(&http, "/v1/kv/items/2", Some(json!({"id": 2, "n": 3}))).await;
    converges(&http, "/v1/kv/items/1", Some(json!({"id": 1, "n": 0}))).await;
    edge.shutdown().await;
    hub.shutdown().await;
}
