//! Correct under change: schema migrations, restarts, outages and misconfiguration never leave a
//! cache silently wrong. One test per finding of the "correct under change" issue:
//!
//! 1. schema changes on a CDC table (drop, rename, add across a restart, table renamed or
//!    dropped, the key taken out of the replica identity);
//! 2. two sidecars with one node id (detected and refused; a slot consumed by another process
//!    is never resumed blind);
//! 3. a publication name that needs quoting;
//! 4. a SIGKILL restart under load keeps the freshness bound;
//! 5. a Postgres restart under load keeps the freshness bound;
//! 6. a restart with an existing slot does not wait on the temporary slot's session;
//! 7. a partial write-behind write onto a deeply nested row keeps every column.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachesync_testkit::eventually;
use cachesync_testkit::postgres::{PgOptions, PgServer, bindir};
use cachesync_testkit::sidecar::Sidecar;
use serde_json::json;

use crate::common::{Db, Http, Node, WAIT, metric, until};

fn keyspace(name: &str, table: &str, extra: &str) -> String {
    format!("[[keyspace]]\nname = \"{name}\"\ntable = \"{table}\"\nkey = \"id\"\n{extra}\n")
}

/// Starts `node` on `db` with keyspace `t` on table `t` (`ks` lines added to it) and `cdc` lines
/// added to `[cdc]`.
async fn start_t(db: &Db, node: &Node, ks: &str, cdc: &str) -> (cachesync::server::Server, Http) {
    node.start_text(&node.config_text(db, &keyspace("t", "t", ks), cdc))
        .await
}

// ---- 1. Schema changes ---------------------------------------------------------------------

#[tokio::test]
async fn a_dropped_column_is_never_served_and_changed_rows_stay_readable() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text, w text); INSERT INTO t VALUES (1, 'a', 'x'), (2, 'b', 'y');")
        .await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("t", "t", "cdc = \"update\"\nread_through = false"))
        .await;
    assert_eq!(
        http.get("/v1/kv/t/2").await.json(),
        json!({"id": 2, "v": "b", "w": "y"})
    );
    db.exec("ALTER TABLE t DROP COLUMN w; UPDATE t SET v = 'changed' WHERE id = 1;")
        .await;
    let r = until(
        &http,
        "/v1/kv/t/1",
        "the changed row, without the dropped column",
        |r| r.status == 200 && r.json()["v"] == "changed",
    )
    .await;
    assert_eq!(r.json(), json!({"id": 1, "v": "changed"}));
    // The untouched row is reloaded in the new shape: it never serves the dropped column again.
    let r = until(&http, "/v1/kv/t/2", "the untouched row in the new shape", |r| {
        r.status == 200 && r.json().get("w").is_none()
    })
    .await;
    assert_eq!(r.json(), json!({"id": 2, "v": "b"}));
    server.wait_ready(WAIT).await.expect("ready once reloaded");
    let m = http.get("/metrics").await.body;
    assert!(
        metric(
            &m,
            "cachesync_cdc_schema_changes_total{action=\"reloaded\",keyspace=\"t\"}"
        ) >= 1.0,
        "{m}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_column_dropped_on_a_quiet_table_is_seen_by_the_catalog_check() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text, w text); INSERT INTO t VALUES (1, 'a', 'x');")
        .await;
    let node = Node::new();
    // Read-through: the entry is loaded on demand; no row changes after the ALTER.
    let (server, http) = start_t(&db, &node, "cdc = \"update\"\nwarm = false", "schema_check = \"200ms\"").await;
    assert_eq!(
        http.get("/v1/kv/t/1").await.json(),
        json!({"id": 1, "v": "a", "w": "x"})
    );
    db.exec("ALTER TABLE t DROP COLUMN w").await;
    // Never a 500 "column w does not exist", never the dropped column for long.
    let r = eventually(WAIT, "the row in its new shape", || async {
        let r = http.get("/v1/kv/t/1").await;
        assert_ne!(r.status, 500, "a load must re-read the table, not fail: {}", r.body);
        if r.status == 200 && r.json().get("w").is_none() {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .await;
    assert_eq!(r.json(), json!({"id": 1, "v": "a"}));
    server.shutdown().await;
}

#[tokio::test]
async fn a_renamed_column_renames_the_field_in_every_entry() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text, w text); INSERT INTO t VALUES (1, 'a', 'x'), (2, 'b', 'y');")
        .await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("t", "t", "cdc = \"update\"\nread_through = false"))
        .await;
    db.exec("ALTER TABLE t RENAME COLUMN w TO z; UPDATE t SET v = 'changed' WHERE id = 1;")
        .await;
    until(&http, "/v1/kv/t/1", "the changed row under the new name", |r| {
        r.json() == json!({"id": 1, "v": "changed", "z": "x"})
    })
    .await;
    until(&http, "/v1/kv/t/2", "the untouched row under the new name", |r| {
        r.json() == json!({"id": 2, "v": "b", "z": "y"})
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_change_replayed_from_before_an_added_column_does_not_drop_the_newer_row() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b');")
        .await;
    let node = Node::new();
    let ks = keyspace("t", "t", "cdc = \"update\"\nread_through = false");
    let (server, _) = node.start(&db, &ks).await;
    server.shutdown().await;
    // While stopped: a change, then a migration. The restart warms the new shape and replays
    // the older change, which must not displace it.
    db.exec("UPDATE t SET v = 'while stopped' WHERE id = 1; ALTER TABLE t ADD COLUMN n int NOT NULL DEFAULT 7;")
        .await;
    let (server, http) = node.start(&db, &ks).await;
    let r = http.get("/v1/kv/t/1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"id": 1, "v": "while stopped", "n": 7}));
    // Let the replay finish, then check again: still there.
    db.exec("UPDATE t SET v = 'marker' WHERE id = 2").await;
    until(&http, "/v1/kv/t/2", "the stream caught up", |r| {
        r.json()["v"] == "marker"
    })
    .await;
    assert_eq!(
        http.get("/v1/kv/t/1").await.json(),
        json!({"id": 1, "v": "while stopped", "n": 7})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_renamed_table_empties_the_keyspace_and_makes_it_not_ready() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("t", "t", "cdc = \"update\"\nread_through = false"))
        .await;
    assert_eq!(http.get("/v1/kv/t/1").await.status, 200);
    db.exec("ALTER TABLE t RENAME TO t_old; UPDATE t_old SET v = 'moved' WHERE id = 1;")
        .await;
    let r = until(&http, "/readyz", "not ready with the reason", |r| r.status == 503).await;
    assert!(r.body.contains("public.t does not exist"), "{}", r.body);
    assert_eq!(
        http.get("/v1/kv/t/1").await.status,
        404,
        "the emptied keyspace serves nothing from the renamed table"
    );
    // Fixing the table makes it ready again, loaded from the table as it is.
    db.exec("ALTER TABLE t_old RENAME TO t").await;
    server.wait_ready(WAIT).await.expect("ready again once the table fits");
    until(&http, "/v1/kv/t/1", "reloaded after the table came back", |r| {
        r.status == 200 && r.json()["v"] == "moved"
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_dropped_table_is_seen_by_the_catalog_check_and_its_keyspace_emptied() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let node = Node::new();
    let (server, http) = start_t(
        &db,
        &node,
        "cdc = \"update\"\nread_through = false",
        "schema_check = \"200ms\"",
    )
    .await;
    assert_eq!(http.get("/v1/kv/t/1").await.status, 200);
    db.exec("DROP TABLE t").await;
    let r = until(&http, "/readyz", "not ready, naming the table", |r| r.status == 503).await;
    assert!(r.body.contains("public.t does not exist"), "{}", r.body);
    assert_eq!(
        http.get("/v1/kv/t/1").await.status,
        404,
        "nothing served from a dropped table"
    );
    // The keyspace says why and is emptied inside its bind; the capture that called the bind
    // counts the change right after it returns, so the count may trail `/readyz` by a moment.
    eventually(WAIT, "the unfit table is counted", || async {
        let m = http.get("/metrics").await.body;
        let n = metric(
            &m,
            "cachesync_cdc_schema_changes_total{action=\"unfit\",keyspace=\"t\"}",
        );
        if n >= 1.0 { Ok(()) } else { Err(n) }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_taken_out_of_the_replica_identity_empties_the_keyspace_with_the_fix_in_the_reason() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, email text UNIQUE NOT NULL, v text); ALTER TABLE t REPLICA IDENTITY FULL; \
         INSERT INTO t VALUES (1, 'a@x', 'a');",
    )
    .await;
    let node = Node::new();
    let ks =
        "[[keyspace]]\nname = \"by_email\"\ntable = \"t\"\nkey = \"email\"\ncdc = \"update\"\nread_through = false\n";
    let (server, http) = node.start_text(&node.config_text(&db, ks, "")).await;
    assert_eq!(http.get("/v1/kv/by_email/a@x").await.json()["v"], "a");
    // Deletes would no longer name the entry they remove.
    db.exec("ALTER TABLE t REPLICA IDENTITY DEFAULT; UPDATE t SET v = 'b' WHERE id = 1;")
        .await;
    let r = until(&http, "/readyz", "not ready, saying how to fix it", |r| r.status == 503).await;
    assert!(r.body.contains("replica identity"), "{}", r.body);
    assert_eq!(http.get("/v1/kv/by_email/a@x").await.status, 404, "emptied");
    // Fixed: ready again and loaded as the table is.
    db.exec("ALTER TABLE t REPLICA IDENTITY FULL; UPDATE t SET v = 'c' WHERE id = 1;")
        .await;
    server
        .wait_ready(WAIT)
        .await
        .expect("ready again once the key is in the identity");
    until(&http, "/v1/kv/by_email/a@x", "reloaded", |r| {
        r.status == 200 && r.json()["v"] == "c"
    })
    .await;
    server.shutdown().await;
}

// ---- 2. One node id on two nodes -----------------------------------------------------------

fn with_node_id(text: String, id: &str) -> String {
    text.replacen("[server]\n", &format!("[server]\nnode_id = \"{id}\"\n"), 1)
}

#[tokio::test]
async fn a_second_live_node_with_the_same_node_id_is_refused_by_name() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let first = Node::new();
    let ks = keyspace("t", "t", "cdc = \"update\"");
    let (a, _) = first
        .start_text(&with_node_id(first.config_text(&db, &ks, ""), "twin"))
        .await;
    // Same node id, so the same slot; its own log directory.
    let second = Node {
        log: cachesync_testkit::temp_dir("cdclog", None),
        slot: first.slot.clone(),
    };
    let b = cachesync::server::Server::start(
        cachesync::config::Config::parse(&with_node_id(second.config_text(&db, &ks, ""), "twin")).unwrap(),
    )
    .await
    .expect("the twin starts (and refuses to stream)");
    let http = Http::new(b.local_addr());
    let r = until(&http, "/readyz", "the twin names the conflict", |r| {
        r.status == 503 && r.body.contains("two live nodes share node_id twin")
    })
    .await;
    assert!(r.body.contains(&first.slot), "{}", r.body);
    let m = http.get("/metrics").await.body;
    assert!(
        metric(&m, "cachesync_cdc_slot_conflicts_total{kind=\"held\"}") >= 1.0,
        "{m}"
    );
    b.shutdown().await;
    a.shutdown().await;
}

/// `pg_recvlogical` holding `slot` and consuming (and confirming) what it gets.
fn recvlogical(db: &Db, slot: &str) -> Child {
    let bin = bindir().join("pg_recvlogical");
    assert!(
        bin.exists(),
        "{} is missing: install postgresql-15 (deploy/dev/install-deps.sh)",
        bin.display()
    );
    Command::new(bin)
        .args(["--start", "--no-loop", "-S", slot, "-d", &db.db.url, "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=cachesync"])
        .args(["--status-interval=1", "--fsync-interval=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pg_recvlogical starts")
}

#[tokio::test]
async fn a_slot_advanced_by_another_consumer_is_resnapshotted_not_resumed() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g;",
    )
    .await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("t", "t", "cdc = \"update\"\nread_through = false"))
        .await;
    assert_eq!(http.get("/v1/kv/t/3").await.json()["v"], "v3");
    // Another consumer takes the slot: kick this node off and hold the slot until it has it.
    let other: Arc<Mutex<Option<Child>>> = Arc::default();
    eventually(WAIT, "another consumer holds the slot", || async {
        db.sql
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL \
                 AND active_pid NOT IN (SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_recvlogical')",
                &[&node.slot],
            )
            .await
            .unwrap();
        {
            let mut o = other.lock().unwrap();
            if o.as_mut().is_none_or(|c| c.try_wait().unwrap().is_some()) {
                *o = Some(recvlogical(&db, &node.slot));
            }
        }
        let held: Option<String> = db
            .sql
            .query_opt(
                "SELECT a.application_name FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
                &[&node.slot],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        match held.as_deref() {
            Some("pg_recvlogical") => Ok(()),
            h => Err(format!("held by {h:?}")),
        }
    })
    .await;
    // Changes the other consumer takes, and confirms.
    db.exec("UPDATE t SET v = 'taken' WHERE id = 3; DELETE FROM t WHERE id = 4;")
        .await;
    let target: String = db.scalar("SELECT pg_current_wal_lsn()::text").await;
    eventually(WAIT, "the other consumer confirmed the changes", || async {
        let past: bool = db
            .sql
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&node.slot, &target],
            )
            .await
            .unwrap()
            .get(0);
        if past { Ok(()) } else { Err("not yet") }
    })
    .await;
    let mut other = other.lock().unwrap().take().unwrap();
    other.kill().unwrap();
    other.wait().unwrap();
    // This node gets its slot back, finds it past its own position, and reloads.
    until(&http, "/v1/kv/t/3", "the change the other consumer took", |r| {
        r.status == 200 && r.json()["v"] == "taken"
    })
    .await;
    until(&http, "/v1/kv/t/4", "the delete the other consumer took", |r| {
        r.status == 404
    })
    .await;
    let m = http.get("/metrics").await.body;
    assert!(
        metric(&m, "cachesync_cdc_slot_conflicts_total{kind=\"advanced\"}") >= 1.0,
        "{m}"
    );
    server.shutdown().await;
}

// ---- 3. Identifiers ------------------------------------------------------------------------

#[tokio::test]
async fn a_publication_name_that_needs_quotes_streams() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let node = Node::new();
    let (server, http) = start_t(
        &db,
        &node,
        "cdc = \"update\"\nread_through = false",
        "publication = \"My Pub\"",
    )
    .await;
    let exists: bool = db
        .scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'My Pub')")
        .await;
    assert!(exists, "the publication is created under its exact name");
    db.exec("UPDATE t SET v = 'streamed' WHERE id = 1").await;
    until(&http, "/v1/kv/t/1", "a change through the quoted publication", |r| {
        r.json()["v"] == "streamed"
    })
    .await;
    server.shutdown().await;
}

// ---- 4 and 5. The freshness bound under restarts and outages -------------------------------

/// Writes to one row and reads it, recording when each value was acknowledged and what each
/// read returned, to check the freshness bound: a read that started at `t` may return a value
/// only if no newer value had been acknowledged before `t - bound`.
#[derive(Default)]
struct Timeline {
    /// (value, acknowledged at)
    acks: Vec<(i64, Instant)>,
    /// (started at, value, served with X-Cache-Lag-Ms)
    reads: Vec<(Instant, i64, bool)>,
    /// Writes that failed (the database was unreachable).
    write_errors: u64,
}

/// Waits until the load has been running a while: `reads` reads and `acks` writes recorded.
async fn under_load(timeline: &Arc<Mutex<Timeline>>, reads: usize, acks: usize) {
    eventually(WAIT, "the load is running", || async {
        let t = timeline.lock().unwrap();
        if t.reads.len() >= reads && t.acks.len() >= acks {
            Ok(())
        } else {
            Err((t.reads.len(), t.acks.len()))
        }
    })
    .await;
}

impl Timeline {
    /// Reads outside the bound that were not reported as such, among reads started in `window`.
    fn violations(&self, bound: Duration, counted: impl Fn(Instant) -> bool) -> (usize, usize, Vec<String>) {
        let mut bad = Vec::new();
        let mut n = 0;
        for &(at, v, reported) in &self.reads {
            if !counted(at) || reported {
                continue;
            }
            n += 1;
            if let Some(&(newer, acked)) = self.acks.iter().find(|(w, a)| *w > v && *a + bound < at) {
                bad.push(format!(
                    "read {v} although {newer} was acknowledged {:?} before the read",
                    at - acked
                ));
            }
        }
        (n, bad.len(), bad.into_iter().take(5).collect())
    }
}

/// Runs a writer (one UPDATE after another) and a reader (GETs against `base()`) until `stop`.
async fn drive(
    db_url: String,
    base: Arc<Mutex<String>>,
    timeline: Arc<Mutex<Timeline>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let writer = {
        let (timeline, stop) = (timeline.clone(), stop.clone());
        tokio::spawn(async move {
            let mut v = 0i64;
            while !stop.is_cancelled() {
                let Ok((client, conn)) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await else {
                    timeline.lock().unwrap().write_errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(conn);
                while !stop.is_cancelled() {
                    if client
                        .execute("UPDATE t SET n = $1 WHERE id = 1", &[&(v + 1)])
                        .await
                        .is_err()
                    {
                        timeline.lock().unwrap().write_errors += 1;
                        break;
                    }
                    v += 1;
                    timeline.lock().unwrap().acks.push((v, Instant::now()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    while !stop.is_cancelled() {
        let url = format!("{}/v1/kv/t/1", base.lock().unwrap());
        let started = Instant::now();
        let Ok(r) = client.get(&url).header("host", "localhost").send().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let reported = r.headers().contains_key("x-cache-lag-ms");
        if r.status() != 200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if let Some(n) = body["n"].as_i64() {
            timeline.lock().unwrap().reads.push((started, n, reported));
        }
    }
    writer.await.unwrap();
}

const BOUND: Duration = Duration::from_millis(100);

#[tokio::test]
async fn a_sigkill_restart_under_load_keeps_the_freshness_bound() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO t VALUES (1, 0);")
        .await;
    let node = Node::new();
    let text = node.config_text(
        &db,
        &keyspace("t", "t", "cdc = \"update\""),
        "max_staleness = \"100ms\"",
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_cachesync"));
    let mut a = Sidecar::spawn(bin, Some(&text));
    let ready = |addr: String| async move {
        eventually(WAIT, "the sidecar is ready", || async {
            let r = Http::at(addr.clone()).get("/readyz").await;
            if r.status == 200 { Ok(()) } else { Err(r.body) }
        })
        .await
    };
    ready(a.base_url()).await;
    let base = Arc::new(Mutex::new(a.base_url()));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(drive(db.db.url.clone(), base.clone(), timeline.clone(), stop.clone()));
    under_load(&timeline, 200, 50).await;
    a.kill();
    let b = Sidecar::spawn(bin, Some(&text));
    let restarted = Instant::now();
    *base.lock().unwrap() = b.base_url();
    ready(b.base_url()).await;
    // Keep going well past the catch-up.
    eventually(WAIT, "reads after the restart", || async {
        let n = timeline
            .lock()
            .unwrap()
            .reads
            .iter()
            .filter(|r| r.0 > restarted)
            .count();
        if n >= 300 { Ok(()) } else { Err(n) }
    })
    .await;
    stop.cancel();
    run.await.unwrap();
    let t = timeline.lock().unwrap();
    let (n, bad, examples) = t.violations(BOUND, |at| at > restarted);
    assert!(n >= 300, "{n} reads after the restart");
    assert_eq!(
        bad,
        0,
        "{bad} of {n} reads after the restart were outside the bound: {examples:?}\n{}",
        b.log()
    );
}

#[tokio::test]
async fn a_postgres_restart_under_load_keeps_the_freshness_bound() {
    let pg = PgServer::start(PgOptions::default());
    let db = Db::on(pg.clone()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO t VALUES (1, 0);")
        .await;
    let node = Node::new();
    let (server, _) = start_t(&db, &node, "cdc = \"update\"", "max_staleness = \"100ms\"").await;
    let base = Arc::new(Mutex::new(format!("http://{}", server.local_addr())));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(drive(db.db.url.clone(), base, timeline.clone(), stop.clone()));
    under_load(&timeline, 200, 50).await;
    let down = Instant::now();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop()).await.unwrap();
    // Down until the writer has seen it fail a few times.
    let failed = timeline.lock().unwrap().write_errors;
    eventually(WAIT, "writes fail while Postgres is down", || async {
        let n = timeline.lock().unwrap().write_errors;
        if n >= failed + 3 { Ok(()) } else { Err(n) }
    })
    .await;
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.resume()).await.unwrap();
    let up = Instant::now();
    eventually(WAIT, "reads after Postgres returned", || async {
        let n = timeline.lock().unwrap().reads.iter().filter(|r| r.0 > up).count();
        if n >= 300 { Ok(()) } else { Err(n) }
    })
    .await;
    stop.cancel();
    run.await.unwrap();
    // Reads that started while Postgres itself was down do not count.
    let (n, bad, examples) = timeline.lock().unwrap().violations(BOUND, |at| at < down || at > up);
    assert!(n >= 300, "{n} reads counted");
    assert_eq!(bad, 0, "{bad} of {n} reads were outside the bound: {examples:?}");
    server.shutdown().await;
}

// ---- 6. Restart without a pause ------------------------------------------------------------

#[tokio::test]
async fn a_restart_with_an_existing_slot_closes_the_warm_start_session_at_once() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let node = Node::new();
    let ks = keyspace("t", "t", "cdc = \"update\"");
    let (server, _) = node.start(&db, &ks).await;
    server.shutdown().await;
    let (server, http) = node.start(&db, &ks).await;
    let m = http.get("/metrics").await.body;
    assert!(
        m.contains("cachesync_cdc_session_close_timeouts_total 0"),
        "the temporary slot's session ended without waiting out a timeout: {m}"
    );
    let pattern = format!("{}_w%", node.slot);
    eventually(WAIT, "the temporary slot is gone", || async {
        let n: i64 = db
            .sql
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1",
                &[&pattern],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 { Ok(()) } else { Err(n) }
    })
    .await;
    server.shutdown().await;
}

// ---- 7. Write-behind overlay at any depth --------------------------------------------------

#[tokio::test]
async fn a_partial_write_onto_a_deeply_nested_row_keeps_every_column() {
    let db = Db::new().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    db.exec(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, v text, body jsonb); INSERT INTO docs VALUES (1, 'a', '{deep}'), (2, 'c', '{{\"k\": 1}}');"
    ))
    .await;
    let node = Node::new();
    let (server, http) = node
        .start_text(&node.config_text(
            &db,
            "[[keyspace]]\nname = \"docs\"\ntable = \"docs\"\nkey = \"id\"\nwrite = \"behind\"\n",
            "",
        ))
        .await;
    assert_eq!(http.get("/v1/kv/docs/1").await.status, 200);
    let put = http.put("/v1/kv/docs/1", r#"{"v": "b"}"#).await;
    assert_eq!(put.status, 202, "{}", put.body);
    let expected = format!(r#"{{"id":1,"v":"b","body":{deep}}}"#);
    assert_eq!(put.body.replace(' ', ""), expected, "the write keeps the nested column");
    let r = http.get("/v1/kv/docs/1").await;
    assert_eq!(r.body.replace(' ', ""), expected);
    // A body nested too deeply to check is refused clearly, and changes nothing.
    let too_deep = format!(r#"{{"body": {}1{}}}"#, "[".repeat(200), "]".repeat(200));
    let refused = http.put("/v1/kv/docs/1", too_deep).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(http.get("/v1/kv/docs/1").await.body.replace(' ', ""), expected);
    // A partial write to a key this node never read builds on the stored row, not on nothing.
    let put = http.put("/v1/kv/docs/2", r#"{"v": "d"}"#).await;
    assert_eq!(put.status, 202, "{}", put.body);
    assert_eq!(put.json(), json!({"id": 2, "v": "d", "body": {"k": 1}}));
    server.shutdown().await;
}
