//! CDC against real Postgres logical replication: changes reach the cache in both modes,
//! nothing is missed across a restart, the fill/invalidate race cannot leave an old value, an
//! unchanged TOAST column never produces a wrong value, lost slots are recreated and
//! resnapshotted, big transactions arrive whole, schema changes are followed, and readiness
//! follows the stream.

use std::sync::Arc;
use std::time::Duration;

use cachesync::commitlog::inspect;
use cachesync::event::ChangeEvent;
use cachesync_testkit::eventually;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use serde_json::json;

use crate::common::{Db, Http, Node, WAIT, hold_loads, metric, until};

fn keyspace(name: &str, table: &str, extra: &str) -> String {
    format!("[[keyspace]]\nname = \"{name}\"\ntable = \"{table}\"\nkey = \"id\"\nmax_entries = 500000\n{extra}\n")
}

async fn stats(http: &Http, name: &str) -> serde_json::Value {
    let all = http.get("/v1/keyspaces").await.json();
    all["keyspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap()["stats"]
        .clone()
}

#[tokio::test]
async fn inserts_updates_deletes_and_truncates_reach_the_cache_in_update_mode() {
    let db = Db::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, name text, email text); INSERT INTO users VALUES (1, 'ada', 'a@x'), (2, 'bob', NULL);").await;
    let node = Node::new();
    // No read-through: whatever the cache has came from the snapshot or the stream.
    let (server, http) = node
        .start(
            &db,
            &keyspace("users", "users", "cdc = \"update\"\nread_through = false"),
        )
        .await;

    let warm = http.get("/v1/kv/users/1").await;
    assert_eq!(warm.status, 200, "warmed from the snapshot: {}", warm.body);
    assert_eq!(warm.header("x-cache"), "hit");
    assert_eq!(warm.json(), json!({"id": 1, "name": "ada", "email": "a@x"}));

    db.exec("INSERT INTO users VALUES (3, 'cy', 'c@x')").await;
    let r = until(&http, "/v1/kv/users/3", "insert arrives", |r| r.status == 200).await;
    assert_eq!(r.json(), json!({"id": 3, "name": "cy", "email": "c@x"}));
    assert_eq!(r.header("x-cache"), "hit");

    db.exec("UPDATE users SET name = 'ada lovelace' WHERE id = 1").await;
    until(&http, "/v1/kv/users/1", "update arrives", |r| {
        r.status == 200 && r.json()["name"] == "ada lovelace"
    })
    .await;

    db.exec("DELETE FROM users WHERE id = 2").await;
    let gone = until(&http, "/v1/kv/users/2", "delete arrives", |r| r.status == 404).await;
    assert_eq!(gone.error(), "not_found");

    // Several changes to one row in one transaction: the last one wins.
    db.exec(
        "BEGIN; UPDATE users SET email = 'first' WHERE id = 3; UPDATE users SET email = 'last' WHERE id = 3; COMMIT;",
    )
    .await;
    until(&http, "/v1/kv/users/3", "last write in a transaction", |r| {
        r.json()["email"] == "last"
    })
    .await;

    db.exec("TRUNCATE users").await;
    until(&http, "/v1/kv/users/1", "truncate clears the keyspace", |r| {
        r.status == 404
    })
    .await;
    assert_eq!(http.get("/v1/kv/users/3").await.status, 404);

    let m = http.get("/metrics").await.body;
    assert!(
        metric(&m, "cachesync_cdc_events_total{keyspace=\"users\",op=\"put\"}") >= 4.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "cachesync_cdc_applied_events_total{keyspace=\"users\",op=\"clear\"}"
        ) >= 1.0
    );
    assert!(metric(&m, "cachesync_cdc_apply_lag_seconds_count") >= 5.0);
    assert_eq!(metric(&m, "cachesync_cdc_state{state=\"streaming\"}"), 1.0);
    assert!(metric(&m, "cachesync_cdc_confirmed_lsn") > 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn invalidate_mode_drops_changed_entries_and_the_next_read_loads_them() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'one'), (2, 'two');")
        .await;
    let node = Node::new();
    let (_server, http) = node
        .start(&db, &keyspace("items", "items", "cdc = \"invalidate\"\nwarm = false"))
        .await;
    assert_eq!(http.get("/v1/kv/items/1").await.header("x-cache"), "miss");
    assert_eq!(http.get("/v1/kv/items/1").await.header("x-cache"), "hit");
    db.exec("UPDATE items SET v = 'uno' WHERE id = 1").await;
    let r = until(&http, "/v1/kv/items/1", "the update invalidates", |r| {
        r.json()["v"] == "uno"
    })
    .await;
    assert_eq!(r.header("x-cache"), "miss", "the new value was loaded, not pushed");
    // A negatively cached key is invalidated by its insert.
    assert_eq!(http.get("/v1/kv/items/9").await.status, 404);
    db.exec("INSERT INTO items VALUES (9, 'nine')").await;
    until(
        &http,
        "/v1/kv/items/9",
        "the insert invalidates the negative entry",
        |r| r.status == 200,
    )
    .await;
    assert_eq!(http.get("/v1/kv/items/2").await.status, 200, "cache row 2");
    assert_eq!(http.get("/v1/kv/items/2").await.header("x-cache"), "hit");
    db.exec("DELETE FROM items WHERE id = 2").await;
    until(&http, "/v1/kv/items/2", "the delete invalidates", |r| r.status == 404).await;
}

#[tokio::test]
async fn changes_committed_while_stopped_arrive_after_a_restart() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'before');")
        .await;
    let node = Node::new();
    // No warm load and no read-through: after the restart, only the stream can fill the cache.
    let ks = keyspace("t", "t", "cdc = \"update\"\nwarm = false\nread_through = false");
    let (server, http) = node.start(&db, &ks).await;
    db.exec("INSERT INTO t VALUES (2, 'live')").await;
    until(&http, "/v1/kv/t/2", "live change", |r| r.status == 200).await;
    server.shutdown().await;

    db.exec("UPDATE t SET v = 'while stopped' WHERE id = 2; INSERT INTO t VALUES (3, 'new while stopped'); UPDATE t SET v = 'x' WHERE id = 3;").await;
    db.exec("INSERT INTO t SELECT g, 'bulk ' || g FROM generate_series(10, 59) g")
        .await;

    let (server, http) = node.start(&db, &ks).await;
    until(&http, "/v1/kv/t/2", "update made while stopped", |r| {
        r.status == 200 && r.json()["v"] == "while stopped"
    })
    .await;
    until(&http, "/v1/kv/t/3", "insert made while stopped", |r| {
        r.status == 200 && r.json()["v"] == "x"
    })
    .await;
    for id in [10, 35, 59] {
        until(
            &http,
            &format!("/v1/kv/t/{id}"),
            "bulk insert made while stopped",
            |r| r.status == 200,
        )
        .await;
    }
    // Row 1 was never changed since the slot was created: nothing brought it (no warm, no
    // read-through), which shows the rows above came from the resumed stream.
    assert_eq!(http.get("/v1/kv/t/1").await.status, 404);
    // The log holds the replayed events with their commit positions.
    let mut events = Vec::new();
    inspect::dump(&node.log, None, None, |r| {
        events.push(ChangeEvent::decode(&r.payload).unwrap())
    })
    .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.key == "3" && e.source_position > 0 && e.source_xid.is_some())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_load_that_raced_an_update_never_installs_the_old_value() {
    for mode in ["update", "invalidate"] {
        let db = Db::new().await;
        db.exec("CREATE TABLE users (id int PRIMARY KEY, name text); INSERT INTO users VALUES (1, 'old');")
            .await;
        let node = Node::new();
        let (server, http) = node
            .start(
                &db,
                &keyspace("users", "users", &format!("cdc = \"{mode}\"\nwarm = false")),
            )
            .await;
        let ks = server.keyspace("users").expect("configured").clone();
        // Hold the load between its query and its install.
        let gate = hold_loads(&ks);
        let slow = tokio::spawn({
            let http = http.clone();
            async move { http.get("/v1/kv/users/1").await }
        });
        gate.reached.lock().await.recv().await.expect("the load ran its query");
        // The row changes and CDC applies it while the load holds the old row.
        db.exec("UPDATE users SET name = 'new' WHERE id = 1").await;
        server
            .cdc_caught_up(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        eventually(WAIT, "the change is applied", || async {
            let applied = http.get("/metrics").await.body;
            if metric(&applied, "cachesync_cdc_applied_events_total{keyspace=\"users\"") >= 1.0 {
                Ok(())
            } else {
                Err(applied.len())
            }
        })
        .await;
        ks.set_load_hook(None);
        gate.release.notify_one();
        let raced = slow.await.unwrap();
        assert_eq!(
            raced.json()["name"],
            "old",
            "{mode}: the racing read may answer what it read"
        );
        let after = http.get("/v1/kv/users/1").await;
        assert_eq!(
            after.json()["name"],
            "new",
            "{mode}: the old value was not left in the cache"
        );
        assert_eq!(stats(&http, "users").await["fills_skipped"], 1, "{mode}");
        server.shutdown().await;
    }
}

/// A read-through load that read the row before a warm load installed a newer version of it
/// (a resnapshot) must not install its older result afterwards: the warm load goes through the
/// keyspace's door, which revokes the load's lease.
#[tokio::test]
async fn a_load_that_raced_a_warm_load_never_installs_the_old_value() {
    let db = Db::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, name text); INSERT INTO users VALUES (1, 'old');")
        .await;
    let config = db.config(&keyspace("users", "users", ""));
    let pg = config.postgres.clone().expect("the test config has [postgres]");
    let server = cachesync::server::Server::start(config).await.expect("start");
    server.wait_ready(WAIT).await.expect("ready");
    let http = Http::at(format!("http://{}", server.local_addr()));
    let ks = server.keyspace("users").expect("configured").clone();
    let gate = hold_loads(&ks);
    let slow = tokio::spawn({
        let http = http.clone();
        async move { http.get("/v1/kv/users/1").await }
    });
    gate.reached.lock().await.recv().await.expect("the load ran its query");
    // The row changes, and a warm load from a snapshot taken after the change installs it while
    // the load still holds the old row.
    db.exec("UPDATE users SET name = 'new' WHERE id = 1").await;
    let snap = db.pg.connect(&db.db.name).await;
    snap.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let row = snap
        .query_one("SELECT pg_export_snapshot(), pg_current_wal_lsn()::text", &[])
        .await
        .unwrap();
    let (name, lsn): (String, String) = (row.get(0), row.get(1));
    let cp: cachesync::lsn::Lsn = lsn.parse().expect("an LSN");
    let rows = cachesync::cdc::postgres::snapshot::warm(
        &pg,
        &name,
        cp,
        std::slice::from_ref(&ks),
        &Arc::new(cachesync::hlc::Hlc::new()),
        &cachesync::metrics::Metrics::new(),
        1024,
        &cachesync::lifecycle::Tasks::detached(),
    )
    .await
    .expect("warm load");
    assert_eq!(rows, 1);
    snap.batch_execute("COMMIT").await.unwrap();
    ks.set_load_hook(None);
    gate.release.notify_one();
    assert_eq!(
        slow.await.unwrap().json()["name"],
        "old",
        "the racing read may answer what it read"
    );
    let after = http.get("/v1/kv/users/1").await;
    assert_eq!(
        after.json()["name"],
        "new",
        "the load did not install the old row over the warm one"
    );
    assert_eq!(stats(&http, "users").await["fills_skipped"], 1);
    server.shutdown().await;
}

/// A table large enough to be read by several COPY streams over page ranges: every row the
/// snapshot sees is loaded once — rows deleted before it are not, rows updated before it (their
/// new versions at the table's end) carry the new value.
#[tokio::test]
async fn a_large_table_is_warmed_whole_over_several_streams() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE big (id int PRIMARY KEY, name text NOT NULL, pad text NOT NULL);
         INSERT INTO big SELECT g, 'row ' || g, repeat('x', 400) FROM generate_series(1, 20000) g;
         DELETE FROM big WHERE id % 7 = 0;
         UPDATE big SET name = 'updated ' || id WHERE id % 5 = 0;",
    )
    .await;
    // Outside a transaction: the page count the load splits by.
    db.exec("VACUUM ANALYZE big").await;
    let pages: i32 = db.scalar("SELECT relpages FROM pg_class WHERE relname = 'big'").await;
    assert!(
        pages >= 1024,
        "the table must be large enough to be split across streams: {pages} pages"
    );
    let expected: i64 = db.scalar("SELECT count(*) FROM big").await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("big", "big", "cdc = \"update\"\nread_through = false"))
        .await;
    assert_eq!(stats(&http, "big").await["entries"], expected, "every row once");
    for (id, want) in [
        (1, Some("row 1")),
        (5, Some("updated 5")),
        (7, None),
        (10_001, Some("row 10001")),
        (19_995, Some("updated 19995")),
        (19_998, Some("row 19998")),
        (19_999, None),
        (20_000, Some("updated 20000")),
    ] {
        let r = http.get(&format!("/v1/kv/big/{id}")).await;
        match want {
            Some(name) => {
                assert_eq!(r.status, 200, "{id}: {}", r.body);
                assert_eq!(r.header("x-cache"), "hit", "{id}");
                assert_eq!(r.json()["name"], name, "{id}");
            }
            None => assert_eq!(r.status, 404, "{id} was deleted before the snapshot"),
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_update_with_an_unchanged_toast_column_never_produces_a_wrong_value() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, 'title ' || g, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 300) i) FROM generate_series(1, 3) g;",
    )
    .await;
    let body: String = db.scalar("SELECT body FROM docs WHERE id = 1").await;
    assert!(body.len() > 8000, "the value is stored out of line");
    let node = Node::new();
    let (_server, http) = node.start(&db, &keyspace("docs", "docs", "cdc = \"update\"")).await;
    // Row 1 is cached (warm load).
    assert_eq!(http.get("/v1/kv/docs/1").await.json()["body"], body.as_str());

    db.exec("UPDATE docs SET title = 'retitled' WHERE id = 1").await;
    let r = until(&http, "/v1/kv/docs/1", "title change", |r| {
        r.json()["title"] == "retitled"
    })
    .await;
    assert_eq!(
        r.json()["body"],
        body.as_str(),
        "the unsent body was merged from the cached entry"
    );
    assert_eq!(r.header("x-cache"), "hit");

    let mut unchanged = Vec::new();
    inspect::dump(&node.log, None, None, |r| {
        let e = ChangeEvent::decode(&r.payload).unwrap();
        if e.keyspace == "docs" {
            unchanged.push((e.key.clone(), e.unchanged.clone()));
        }
    })
    .unwrap();
    assert!(
        unchanged.contains(&("1".to_string(), vec!["body".to_string()])),
        "Postgres did not resend the TOASTed body: {unchanged:?}"
    );
}

#[tokio::test]
async fn an_unchanged_toast_column_without_a_cached_entry_drops_the_entry() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO docs VALUES (1, 'a', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 300) i));",
    )
    .await;
    let body: String = db.scalar("SELECT body FROM docs WHERE id = 1").await;
    let node = Node::new();
    // Not warmed: nothing cached when the update arrives.
    let (server, http) = node
        .start(&db, &keyspace("docs", "docs", "cdc = \"update\"\nwarm = false"))
        .await;
    db.exec("UPDATE docs SET title = 'b' WHERE id = 1").await;
    server.cdc_caught_up(WAIT).await.unwrap();
    let r = http.get("/v1/kv/docs/1").await;
    assert_eq!(r.header("x-cache"), "miss", "no partial row was cached");
    assert_eq!(r.json()["title"], "b");
    assert_eq!(r.json()["body"], body.as_str());
}

/// Drops `slot`, terminating whatever walsender holds it, until the drop succeeds.
async fn drop_slot(db: &Db, slot: &str) {
    eventually(WAIT, "the slot is dropped", || async {
        db.sql.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL", &[&slot]).await.ok();
        match db.sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
}

#[tokio::test]
async fn a_dropped_slot_is_recreated_and_the_keyspace_resnapshotted() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g;",
    )
    .await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("t", "t", "cdc = \"update\"\nread_through = false"))
        .await;
    assert_eq!(http.get("/v1/kv/t/5").await.json()["v"], "v5");
    drop_slot(&db, &node.slot).await;
    // Changes made while there is no slot: the stream cannot deliver them; only a new
    // snapshot can.
    db.exec("UPDATE t SET v = 'changed' WHERE id = 5; DELETE FROM t WHERE id = 6; INSERT INTO t VALUES (21, 'new');")
        .await;
    until(&http, "/v1/kv/t/5", "resnapshot brings the update", |r| {
        r.status == 200 && r.json()["v"] == "changed"
    })
    .await;
    until(&http, "/v1/kv/t/6", "resnapshot drops the deleted row", |r| {
        r.status == 404
    })
    .await;
    until(&http, "/v1/kv/t/21", "resnapshot brings the insert", |r| {
        r.status == 200
    })
    .await;
    let m = http.get("/metrics").await.body;
    assert!(metric(&m, "cachesync_cdc_slot_recreations_total") >= 1.0, "{m}");
    assert!(metric(&m, "cachesync_cdc_snapshots_total") >= 2.0);
    // And the new slot streams.
    db.exec("UPDATE t SET v = 'after' WHERE id = 1").await;
    until(&http, "/v1/kv/t/1", "streaming resumes on the new slot", |r| {
        r.json()["v"] == "after"
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_invalidated_slot_is_detected_and_resnapshotted_after_a_restart() {
    // A server of its own, keeping little WAL for inactive slots.
    let pg = PgServer::start(PgOptions {
        durable: false,
        settings: vec![("max_slot_wal_keep_size".into(), "1MB".into())],
    });
    let db = Db::on(pg.clone()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one'); CREATE TABLE filler (id int, pad text);").await;
    let node = Node::new();
    let ks = keyspace("t", "t", "cdc = \"update\"\nread_through = false");
    let (server, http) = node.start(&db, &ks).await;
    assert_eq!(http.get("/v1/kv/t/1").await.status, 200);
    server.shutdown().await;
    // While stopped: a change, then enough WAL for the checkpoint to invalidate the slot.
    db.exec("UPDATE t SET v = 'uno' WHERE id = 1").await;
    for _ in 0..4 {
        db.exec("INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, 20000) g; SELECT pg_switch_wal(); CHECKPOINT;").await;
    }
    let status: String = db
        .sql
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&node.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost", "the test setup invalidated the slot");

    let (server, http) = node.start(&db, &ks).await;
    let r = http.get("/v1/kv/t/1").await;
    assert_eq!(
        r.json()["v"],
        "uno",
        "the change lost with the slot came back through the resnapshot"
    );
    let m = http.get("/metrics").await.body;
    assert!(metric(&m, "cachesync_cdc_slot_recreations_total") >= 1.0, "{m}");
    db.exec("UPDATE t SET v = 'streamed' WHERE id = 1").await;
    until(&http, "/v1/kv/t/1", "the new slot streams", |r| {
        r.json()["v"] == "streamed"
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_transaction_of_100k_rows_arrives_whole() {
    let db = Db::new().await;
    db.exec("CREATE TABLE big (id int PRIMARY KEY, v text)").await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("big", "big", "cdc = \"update\"\nread_through = false"))
        .await;
    db.exec("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 100000) g")
        .await;
    eventually(Duration::from_secs(60), "all 100k rows are cached", || async {
        let s = stats(&http, "big").await;
        if s["entries"] == 100000 { Ok(()) } else { Err(s) }
    })
    .await;
    for id in [1, 31337, 100000] {
        assert_eq!(
            http.get(&format!("/v1/kv/big/{id}")).await.json()["v"],
            format!("row {id}")
        );
    }
    let m = http.get("/metrics").await.body;
    assert_eq!(
        metric(&m, "cachesync_cdc_events_total{keyspace=\"big\",op=\"put\"}"),
        100000.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn schema_changes_are_followed() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let node = Node::new();
    let (server, http) = node
        .start(&db, &keyspace("t", "t", "cdc = \"update\"\nread_through = false"))
        .await;
    db.exec("ALTER TABLE t ADD COLUMN extra int; INSERT INTO t VALUES (2, 'b', 42);")
        .await;
    let r = until(&http, "/v1/kv/t/2", "a row with the new column", |r| r.status == 200).await;
    assert_eq!(r.json(), json!({"id": 2, "v": "b", "extra": 42}));
    db.exec("ALTER TABLE t ALTER COLUMN extra TYPE bigint; UPDATE t SET extra = 9007199254740993 WHERE id = 2;")
        .await;
    let r = until(&http, "/v1/kv/t/2", "a changed column type", |r| {
        r.body.contains("9007199254740993")
    })
    .await;
    assert!(r.body.contains("\"extra\":9007199254740993"), "{}", r.body);
    server.shutdown().await;
}

#[tokio::test]
async fn readiness_follows_the_stream() {
    let pg = PgServer::start(PgOptions::default());
    let db = Db::on(pg.clone()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one');")
        .await;
    let node = Node::new();
    let (server, http) = node.start(&db, &keyspace("t", "t", "cdc = \"update\"")).await;
    assert_eq!(http.get("/readyz").await.status, 200);
    pg.stop();
    let r = until(
        &http,
        "/readyz",
        "not ready once the stream is down past the grace",
        |r| r.status == 503,
    )
    .await;
    assert!(
        r.json()["not_ready"]["t"]
            .as_str()
            .unwrap()
            .contains("replication stream down"),
        "{}",
        r.body
    );
    // Cached entries are still served while the stream is down.
    assert_eq!(http.get("/v1/kv/t/1").await.status, 200);
    pg.resume();
    server
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready again after Postgres returns");
    db_reconnect_and_update(&pg, &db.db.name).await;
    until(&http, "/v1/kv/t/1", "streaming again", |r| r.json()["v"] == "again").await;
    server.shutdown().await;
}

async fn db_reconnect_and_update(pg: &PgServer, name: &str) {
    let c = pg.connect(name).await;
    c.batch_execute("UPDATE t SET v = 'again' WHERE id = 1").await.unwrap();
}
