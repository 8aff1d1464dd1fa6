//! Hub and edges on real Postgres: one hub holds the slot and serves its log; edges follow it
//! over real sockets (through a fault link where the test needs one), bootstrap from its
//! snapshot, survive SIGKILL, cut and blackholed links, retention, a wiped hub log, and a wrong
//! token.

use std::path::PathBuf;
use std::time::Duration;

use cachesync::server::Server;
use cachesync_testkit::faultlink::FaultLink;
use cachesync_testkit::sidecar::Sidecar;
use cachesync_testkit::{eventually, temp_dir, unique};
use serde_json::{Value, json};

use crate::common::{Db, Http, Node, WAIT, init_logging, metric, until};

const ITEMS: &str = "[[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\nread_through = false\n";

/// A hub's configuration: a slot of its own and a log server on a free port.
fn hub_text(db: &Db, node: &Node, keyspaces: &str, replication: &str) -> String {
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
fn edge_text(db: &Db, name: &str, log: &std::path::Path, upstream: &str, keyspaces: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nnode_id = \"{name}\"\nshutdown_grace = \"5s\"\n\
         [postgres]\nurl = \"{}\"\nacquire_timeout = \"2s\"\nconnect_timeout = \"2s\"\n{keyspaces}\n\
         [log]\ndir = \"{}\"\n[cdc]\nsource = \"upstream\"\nready_grace = \"1s\"\n\
         [[upstream]]\nname = \"hub\"\nurl = \"http://{upstream}\"\nlink_timeout = \"1s\"\n{extra}\n",
        db.db.url,
        log.display(),
    )
}

/// An in-process node from a configuration text, once every keyspace is ready.
async fn start(text: &str) -> (Server, Http) {
    init_logging();
    let server = Server::start(cachesync::config::Config::parse(text).expect("valid test config"))
        .await
        .expect("server starts");
    server
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("keyspaces become ready");
    let http = Http::new(server.local_addr());
    (server, http)
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
        .query("SELECT slot_name::text FROM pg_replication_slots WHERE NOT temporary", &[])
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
    assert_eq!(names, vec![hub_node.slot.clone()], "exactly one slot for a hub and three edges");
    let senders: i64 = db
        .scalar("SELECT count(*) FROM pg_stat_replication WHERE application_name LIKE 'cachesync%'")
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
    assert!(metric(&metrics, "cachesync_replication_received_records_total") >= 4.0, "{metrics}");
    assert_eq!(metric(&metrics, "cachesync_replication_upstream_connected"), 1.0);
    let hub_metrics = hub_http.get("/metrics").await.body;
    assert_eq!(metric(&hub_metrics, "cachesync_replication_followers"), 3.0);
    assert!(metric(&hub_metrics, "cachesync_replication_sent_records_total") >= 12.0);

    for (server, _, _) in edges {
        server.shutdown().await;
    }
    hub.shutdown().await;
}
