//! Write-behind against real Postgres: acknowledged writes are read at once and reach Postgres;
//! one bad row among thousands is set aside without stalling the rest; a full backlog answers
//! 503; CDC echoes never make the writing node go back; an outage loses nothing; SIGKILL under
//! load loses nothing; SIGTERM drains.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachesync_testkit::eventually;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use cachesync_testkit::sidecar::Sidecar;
use serde_json::json;

use crate::common::{Db, Http, Node, WAIT, backlog, drained, metric};

/// Text that `COPY`, JSON and the cache's rendering each escape their own way.
const TRICKY: [&str; 10] = [
    "plain",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    "\\N",
    "quote \" and 'single'",
    "{braces,and,commas}",
    "ünïcödé ✓",
    "",
];

fn keyspace(name: &str, table: &str, extra: &str) -> String {
    format!("[[keyspace]]\nname = \"{name}\"\ntable = \"{table}\"\nkey = \"id\"\nwrite = \"behind\"\n{extra}\n")
}

/// A read-through keyspace `reader` on `table`: it loads what Postgres stored, to compare with
/// what a write-behind keyspace installed.
fn reader(table: &str) -> String {
    format!("[[keyspace]]\nname = \"reader\"\ntable = \"{table}\"\nkey = \"id\"\n")
}

#[tokio::test]
async fn acknowledged_writes_are_read_at_once_and_reach_postgres() {
    let db = Db::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, email text, age int NOT NULL DEFAULT 0)")
        .await;
    let node = Node::new();
    // One entry of L1: the reads below can only be answered by the pending writes.
    let (server, http) = node
        .start_text(&node.config_text(&db, &keyspace("users", "users", "max_entries = 1"), ""))
        .await;
    // Hold the table against writes (reads still work) so nothing is flushed yet.
    let locker = db.lock("users").await;

    let put = http.put("/v1/kv/users/1", r#"{"name": "ada", "email": "a@x"}"#).await;
    assert_eq!(put.status, 202, "{}", put.body);
    assert_eq!(put.json(), json!({"id": 1, "name": "ada", "email": "a@x"}));
    assert!(!put.header("etag").is_empty() && !put.header("x-log-offset").is_empty());
    for id in 2..=20 {
        assert_eq!(
            http.put(&format!("/v1/kv/users/{id}"), format!(r#"{{"name": "n{id}"}}"#))
                .await
                .status,
            202
        );
    }
    for id in 2..=20 {
        let r = http.get(&format!("/v1/kv/users/{id}")).await;
        assert_eq!(
            r.status, 200,
            "read-your-writes for {id} though L1 holds one entry: {}",
            r.body
        );
        assert_eq!(r.json()["name"], format!("n{id}"));
    }
    // A partial write merges into the pending document.
    let upd = http.put("/v1/kv/users/1", r#"{"age": 36}"#).await;
    assert_eq!(upd.status, 202);
    assert_eq!(upd.json(), json!({"id": 1, "name": "ada", "email": "a@x", "age": 36}));
    assert_eq!(http.get("/v1/kv/users/1").await.json()["age"], 36);
    assert_eq!(http.delete("/v1/kv/users/20").await.status, 202);
    assert_eq!(http.get("/v1/kv/users/20").await.status, 404);
    // Bad input is refused synchronously and never queued.
    assert_eq!(http.put("/v1/kv/users/3", r#"{"nmae": "x"}"#).await.status, 400);
    assert_eq!(http.put("/v1/kv/users/3", r#"{"id": 4}"#).await.status, 400);
    assert!(backlog(&http).await >= 22.0);
    let count: i64 = db.scalar("SELECT count(*) FROM users").await;
    assert_eq!(count, 0, "nothing flushed while the table is locked");

    locker.batch_execute("COMMIT").await.unwrap();
    drained(&http).await;
    let row: String = db.scalar("SELECT row_to_json(u)::text FROM users u WHERE id = 1").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&row).unwrap(),
        json!({"id": 1, "name": "ada", "email": "a@x", "age": 36})
    );
    let count: i64 = db.scalar("SELECT count(*) FROM users").await;
    assert_eq!(
        count, 19,
        "rows 1..19 are in Postgres; 20 was deleted before it was flushed"
    );
    // After the flush reads come from what Postgres stored (the default filled in).
    let r = http.get("/v1/kv/users/7").await;
    assert_eq!(r.json(), json!({"id": 7, "name": "n7", "email": null, "age": 0}));
    let m = http.get("/metrics").await.body;
    assert!(
        metric(
            &m,
            "cachesync_writebehind_accepted_total{keyspace=\"users\",op=\"put\"}"
        ) >= 21.0
    );
    assert!(metric(&m, "cachesync_writebehind_flush_batch_rows_count") >= 1.0);
    assert_eq!(metric(&m, "cachesync_writebehind_oldest_unflushed_seconds"), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn one_bad_row_among_ten_thousand_is_set_aside_and_the_rest_land() {
    let db = Db::new().await;
    db.exec("CREATE TABLE nums (id int PRIMARY KEY, v int NOT NULL CONSTRAINT nums_v_check CHECK (v >= 0))")
        .await;
    let node = Node::new();
    let (server, http) = node
        .start_text(&node.config_text(
            &db,
            &keyspace("nums", "nums", "max_entries = 20000"),
            "[write_behind]\nbatch_rows = 500\n",
        ))
        .await;
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let http = http.clone();
            tokio::spawn(async move {
                for id in (t..10_000).step_by(16) {
                    let v = if id == 5000 { -1 } else { id };
                    let r = http.put(&format!("/v1/kv/nums/{id}"), format!(r#"{{"v": {v}}}"#)).await;
                    assert_eq!(r.status, 202, "{}", r.body);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    drained(&http).await;
    let count: i64 = db.scalar("SELECT count(*) FROM nums").await;
    assert_eq!(count, 9_999, "every good row landed");
    let m = http.get("/metrics").await.body;
    let batches = metric(&m, "cachesync_writebehind_flush_batch_rows_count");
    let within = metric(&m, "cachesync_writebehind_flush_batch_rows_bucket{le=\"512\"}");
    assert!(
        batches >= 20.0 && within == batches,
        "batches hold at most batch_rows = 500 writes: {within} of {batches} within 512 rows"
    );
    let letters = http.get("/v1/deadletters").await.json()["deadletters"].clone();
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    assert_eq!(letters[0]["key"], "5000");
    assert!(
        letters[0]["error"].as_str().unwrap().contains("nums_v_check"),
        "{letters}"
    );
    assert_eq!(letters[0]["doc"]["v"], -1);
    assert_eq!(
        http.get("/v1/kv/nums/5000").await.status,
        404,
        "the rejected write is no longer shown as pending"
    );
    // The queue keeps flowing after it.
    assert_eq!(http.put("/v1/kv/nums/20000", r#"{"v": 1}"#).await.status, 202);
    drained(&http).await;
    let late: i64 = db.scalar("SELECT count(*) FROM nums WHERE id = 20000").await;
    assert_eq!(late, 1);
    let m = http.get("/metrics").await.body;
    assert_eq!(metric(&m, "cachesync_writebehind_deadletters"), 1.0);

    // Fix the cause, requeue: it lands.
    db.exec("ALTER TABLE nums DROP CONSTRAINT nums_v_check").await;
    let id = letters[0]["id"].as_u64().unwrap();
    let rq = http.post(&format!("/v1/deadletters/{id}/requeue"), "").await;
    assert_eq!(rq.status, 202, "{}", rq.body);
    drained(&http).await;
    let v: i32 = db.scalar("SELECT v FROM nums WHERE id = 5000").await;
    assert_eq!(v, -1);
    // Values the column certainly refuses are turned away at once, and nothing is queued.
    for (body, says) in [
        (r#"{"v": null}"#, "NOT NULL"),
        (r#"{"v": true}"#, "expected an integer"),
        (r#"{"v": 3000000000}"#, "out of range"),
        (r#"{"v": "99999999999"}"#, "out of range"),
    ] {
        let r = http.put("/v1/kv/nums/30000", body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["error"], "invalid_value", "{}", r.body);
        assert!(r.body.contains(says) && r.body.contains("`v`"), "{}", r.body);
    }
    assert_eq!(backlog(&http).await, 0.0);
    assert_eq!(http.get("/v1/kv/nums/30000").await.status, 404);
    // Another bad write (a rule only Postgres knows: a CHECK constraint), dropped by the operator.
    db.exec("ALTER TABLE nums ADD CONSTRAINT nums_v_not_77 CHECK (v <> -77)")
        .await;
    assert_eq!(http.put("/v1/kv/nums/30000", r#"{"v": -77}"#).await.status, 202);
    drained(&http).await;
    let letters = http.get("/v1/deadletters").await.json()["deadletters"].clone();
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    let id = letters[0]["id"].as_u64().unwrap();
    assert_eq!(http.delete(&format!("/v1/deadletters/{id}")).await.status, 204);
    assert_eq!(http.delete(&format!("/v1/deadletters/{id}")).await.status, 404);
    assert!(
        http.get("/v1/deadletters").await.json()["deadletters"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    server.shutdown().await;
}

/// A flush of many rows `COPY`s them into a staging table; what it stores must be exactly what
/// the JSON path stores. The same documents go to a write-through keyspace (one row per
/// statement, `jsonb_populate_record`) and to a write-behind one (batches of hundreds, two sets
/// of columns in one transaction); the two tables must then hold the same rows, and reads the
/// same documents.
#[tokio::test]
async fn a_bulk_flush_stores_every_type_exactly_as_a_single_row_write_does() {
    let db = Db::new().await;
    let schema = "(id int PRIMARY KEY, t text NOT NULL, j jsonb, a int[], ta text[], n numeric, \
                  b bool, ts timestamptz, note text NOT NULL DEFAULT 'none')";
    db.exec(&format!("CREATE TABLE behind {schema}; CREATE TABLE through {schema};"))
        .await;
    let node = Node::new();
    let keyspaces = format!(
        "{}[[keyspace]]\nname = \"through\"\ntable = \"through\"\nkey = \"id\"\nwrite = \"through\"\n",
        keyspace("behind", "behind", "max_entries = 10000")
    );
    let (server, http) = node
        .start_text(&node.config_text(&db, &keyspaces, "[write_behind]\nbatch_rows = 1000\n"))
        .await;
    let tricky = TRICKY;
    let full = |id: usize| {
        let s = tricky[id % tricky.len()];
        json!({
            "t": format!("{s} {id}"),
            "j": if id.is_multiple_of(7) { json!(null) } else { json!({"s": s, "n": [id, null, {"deep": s}]}) },
            "a": if id.is_multiple_of(5) { json!([[1, 2], [3, id]]) } else { json!([id, null, -1]) },
            "ta": [s, "x,y", null, "\"q\""],
            "n": if id.is_multiple_of(3) { json!("12345678901234567890.000000000001") } else { json!(1.5) },
            "b": id.is_multiple_of(2),
            "ts": "2024-03-01T12:34:56.5+02:00",
        })
    };
    // Only some columns: new rows take the defaults of the others.
    let partial = |id: usize| json!({"t": tricky[id % tricky.len()], "n": id});
    // Hold the write-behind table so every write below is flushed in one batch.
    let locker = db.lock("behind").await;
    for id in 0..300usize {
        let body = if id < 200 { full(id) } else { partial(id) };
        for ks in ["behind", "through"] {
            let r = http.put(&format!("/v1/kv/{ks}/{id}"), body.to_string()).await;
            assert!(r.status == 202 || r.status == 200, "{ks} {id}: {}", r.body);
        }
    }
    // Rows written in full first, then in part: the update keeps the other columns.
    for id in 0..50usize {
        for ks in ["behind", "through"] {
            let r = http
                .put(&format!("/v1/kv/{ks}/{id}"), partial(id + 1).to_string())
                .await;
            assert!(r.status == 202 || r.status == 200, "{ks} {id}: {}", r.body);
        }
    }
    locker.batch_execute("COMMIT").await.unwrap();
    drained(&http).await;
    let differ: i64 = db
        .scalar(
            "SELECT count(*) FROM ((SELECT * FROM behind EXCEPT ALL SELECT * FROM through) \
             UNION ALL (SELECT * FROM through EXCEPT ALL SELECT * FROM behind)) d",
        )
        .await;
    let rows: i64 = db.scalar("SELECT count(*) FROM behind").await;
    assert_eq!((rows, differ), (300, 0), "both tables hold the same 300 rows");
    let m = http.get("/metrics").await.body;
    assert!(
        metric(&m, "cachesync_writebehind_flush_batch_rows_sum") >= 300.0,
        "every row was flushed"
    );
    for id in [0usize, 1, 5, 7, 49, 50, 199, 200, 299] {
        let (a, b) = (
            http.get(&format!("/v1/kv/behind/{id}")).await,
            http.get(&format!("/v1/kv/through/{id}")).await,
        );
        assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
        assert_eq!(a.json(), b.json(), "key {id} reads the same from both");
    }
    server.shutdown().await;
}

/// Rows whose every column Postgres stores exactly as given (text, unbounded varchar, integers
/// — JSON numbers or strings spelled as Postgres spells them — booleans, NULL) are installed in
/// L1 from what was written, with no row sent back, and read exactly as a load from Postgres
/// renders them: through the `COPY` path and the JSON path alike. A trigger created while the
/// sidecar runs (so its binding does not know it) is noticed in the flush's own transaction:
/// nothing of that table is installed as written, and the keys read what the trigger stored. A
/// table whose trigger is there from the start has its rows sent back and installed as stored.
#[tokio::test]
async fn rows_stored_as_written_are_installed_without_a_round_trip_and_a_new_trigger_is_honoured() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE wb (id bigint PRIMARY KEY, name text NOT NULL, nick varchar, small smallint, flag bool, n int); \
         CREATE TABLE known (id bigint PRIMARY KEY, name text NOT NULL); \
         CREATE FUNCTION checked() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.name := NEW.name || ' (checked)'; RETURN NEW; END $$; \
         CREATE TRIGGER checked BEFORE INSERT OR UPDATE ON known FOR EACH ROW EXECUTE FUNCTION checked();",
    )
    .await;
    let node = Node::new();
    // `reader` loads the same rows from Postgres: what the cache renders from a stored row.
    // `known`'s trigger is there from the start: its rows always come back from Postgres.
    let keyspaces = [
        keyspace("wb", "wb", "max_entries = 10000\nnegative_ttl = \"10m\""),
        keyspace("known", "known", "max_entries = 10000"),
        reader("wb"),
    ]
    .concat();
    let (server, http) = node
        .start_text(&node.config_text(&db, &keyspaces, "[write_behind]\nbatch_rows = 1000\n"))
        .await;
    let tricky = TRICKY;
    let body = |id: i64, phase: &str| {
        json!({
            "name": format!("{} {phase} {id}", tricky[id as usize % tricky.len()]),
            "nick": if id % 4 == 0 { json!(null) } else { json!(format!("n\t{id}")) },
            "small": if id % 3 == 0 { json!((-id).to_string()) } else { json!(id % 100) },
            "flag": id % 2 == 0,
            "n": -id * 1000,
        })
    };
    let as_written = |m: &str| metric(m, "cachesync_writebehind_rows_as_written_total{keyspace=\"wb\"}");
    // 100 rows in one batch (copied), then 10 one at a time (bound as JSON).
    one_batch(&db, &http, "wb", (0..100).map(|id| (id, body(id, "one")))).await;
    for id in 100..110 {
        let r = http.put(&format!("/v1/kv/wb/{id}"), body(id, "one").to_string()).await;
        assert_eq!(r.status, 202, "{id}: {}", r.body);
        drained(&http).await;
    }
    assert_eq!(
        as_written(&http.get("/metrics").await.body),
        110.0,
        "every row installed as written"
    );
    for id in 0..110 {
        let (w, r) = (
            http.get(&format!("/v1/kv/wb/{id}")).await,
            http.get(&format!("/v1/kv/reader/{id}")).await,
        );
        assert_eq!((w.status.as_u16(), r.status.as_u16()), (200, 200), "{id}");
        assert_eq!(w.header("x-cache"), "hit", "{id}: the installed entry answers");
        assert_eq!(r.header("x-cache"), "miss", "{id}: loaded from Postgres");
        assert_eq!(
            w.body, r.body,
            "{id}: the installed document is the stored row's, byte for byte"
        );
    }
    // A table whose binding knows its trigger: the rows come back and are installed as stored.
    for id in 0..40 {
        let r = http
            .put(
                &format!("/v1/kv/known/{id}"),
                json!({"name": format!("k{id}")}).to_string(),
            )
            .await;
        assert_eq!(r.status, 202, "{id}: {}", r.body);
    }
    drained(&http).await;
    let m = http.get("/metrics").await.body;
    assert_eq!(
        metric(&m, "cachesync_writebehind_rows_as_written_total{keyspace=\"known\"}"),
        0.0
    );
    for id in 0..40 {
        let w = http.get(&format!("/v1/kv/known/{id}")).await;
        assert_eq!((w.status.as_u16(), w.header("x-cache")), (200, "hit"), "{id}");
        assert_eq!(
            w.json()["name"],
            format!("k{id} (checked)"),
            "{id}: as the trigger stored it"
        );
    }
    // A trigger the binding does not know: the flush sees it and installs nothing as written.
    db.exec("CREATE TRIGGER checked BEFORE INSERT OR UPDATE ON wb FOR EACH ROW EXECUTE FUNCTION checked();")
        .await;
    let locker = db.lock("wb").await;
    let ids: Vec<i64> = (0..50).chain(200..240).collect();
    for &id in &ids {
        // A few keys are deleted and written again in the same batch: the re-inserted row,
        // not the delete, is what they read (with absent keys cached, a delete would stick).
        if id % 10 == 3 {
            let r = http.delete(&format!("/v1/kv/wb/{id}")).await;
            assert_eq!(r.status, 202, "{id}: {}", r.body);
        }
        let r = http.put(&format!("/v1/kv/wb/{id}"), body(id, "two").to_string()).await;
        assert_eq!(r.status, 202, "{id}: {}", r.body);
    }
    locker.batch_execute("COMMIT").await.unwrap();
    drained(&http).await;
    assert_eq!(
        as_written(&http.get("/metrics").await.body),
        110.0,
        "nothing more installed as written"
    );
    for &id in &ids {
        let w = http.get(&format!("/v1/kv/wb/{id}")).await;
        assert_eq!(w.status, 200, "{id}");
        assert_eq!(w.header("x-cache"), "miss", "{id}: loaded again, not installed");
        // An upsert that updates runs the trigger twice (before the insert, then the update).
        let stored: String = db.scalar(&format!("SELECT name FROM wb WHERE id = {id}")).await;
        assert!(stored.ends_with(" (checked)"), "{id}: {stored}");
        assert_eq!(w.json()["name"], stored, "{id}: the trigger's value");
    }
    server.shutdown().await;
}

/// Writes `docs` (id, document) while `table` is locked, so the flusher takes them as one batch,
/// then waits until they are flushed.
async fn one_batch(db: &Db, http: &Http, table: &str, docs: impl IntoIterator<Item = (i64, serde_json::Value)>) {
    let locker = db.lock(table).await;
    for (id, doc) in docs {
        let r = http.put(&format!("/v1/kv/{table}/{id}"), doc.to_string()).await;
        assert_eq!(r.status, 202, "{id}: {}", r.body);
    }
    locker.batch_execute("COMMIT").await.unwrap();
    drained(http).await;
}

#[tokio::test]
async fn new_keys_are_copied_straight_into_the_table_and_existing_keys_fall_back_to_the_upsert() {
    let db = Db::new().await;
    db.exec("CREATE TABLE fresh (id bigint PRIMARY KEY, name text NOT NULL, v int)")
        .await;
    let node = Node::new();
    let keyspaces = keyspace("fresh", "fresh", "max_entries = 10000") + &reader("fresh");
    let (server, http) = node
        .start_text(&node.config_text(
            &db,
            &keyspaces,
            "[write_behind]\nbatch_rows = 50\nbatch_delay = \"3s\"\n",
        ))
        .await;
    let tricky = TRICKY;
    let doc =
        |id: i64, phase: &str| json!({"name": format!("{} {phase} {id}", tricky[id as usize % tricky.len()]), "v": id});
    let tries = |result: &str, m: &str| {
        metric(
            m,
            &format!("cachesync_writebehind_insert_first_total{{keyspace=\"fresh\",result=\"{result}\"}}"),
        )
    };
    // Every key new: copied straight in. Each batch takes 50 writes (all this test writes at a
    // time are multiples of 50, so no batch waits out the long delay).
    one_batch(&db, &http, "fresh", (0..100).map(|id| (id, doc(id, "one")))).await;
    let m = http.get("/metrics").await.body;
    assert!(tries("inserted", &m) >= 1.0, "{m}");
    assert_eq!(tries("conflict", &m), 0.0);
    // Half the keys exist: the copy is refused, rolled back, and the upsert stores all of them.
    one_batch(
        &db,
        &http,
        "fresh",
        (50..100).chain(100..150).map(|id| (id, doc(id, "two"))),
    )
    .await;
    let m = http.get("/metrics").await.body;
    let inserted = tries("inserted", &m);
    assert!(tries("conflict", &m) >= 1.0, "the second batch fell back: {m}");
    let count: i64 = db.scalar("SELECT count(*) FROM fresh").await;
    assert_eq!(count, 150, "each key stored once");
    for id in 0..150 {
        let phase = if id < 50 { "one" } else { "two" };
        let stored: String = db.scalar(&format!("SELECT name FROM fresh WHERE id = {id}")).await;
        assert_eq!(stored, doc(id, phase)["name"], "{id}");
        let (w, r) = (
            http.get(&format!("/v1/kv/fresh/{id}")).await,
            http.get(&format!("/v1/kv/reader/{id}")).await,
        );
        assert_eq!((w.status.as_u16(), w.header("x-cache")), (200, "hit"), "{id}");
        assert_eq!(w.body, r.body, "{id}: the installed document is the stored row's");
    }
    // After a conflict a few batches skip the copy; then new keys are copied straight in again.
    let mut next = 150;
    while tries("inserted", &http.get("/metrics").await.body) == inserted {
        assert!(
            next < 150 + 10 * 50,
            "ten batches of new keys later, none was copied straight in"
        );
        one_batch(&db, &http, "fresh", (next..next + 50).map(|id| (id, doc(id, "three")))).await;
        next += 50;
    }
    let count: i64 = db.scalar("SELECT count(*) FROM fresh WHERE id >= 150").await;
    assert_eq!(count, next - 150);
    // A key inserted by someone else while its write waits: the copy meets it, and the upsert
    // stores the write over it.
    let conflicts = tries("conflict", &http.get("/metrics").await.body);
    let locker = db.lock("fresh").await;
    for id in 1000..1050 {
        let r = http
            .put(&format!("/v1/kv/fresh/{id}"), doc(id, "four").to_string())
            .await;
        assert_eq!(r.status, 202, "{id}: {}", r.body);
    }
    locker
        .batch_execute("INSERT INTO fresh VALUES (1049, 'someone else', 0); COMMIT;")
        .await
        .unwrap();
    drained(&http).await;
    let stored: String = db.scalar("SELECT name FROM fresh WHERE id = 1049").await;
    assert_eq!(
        stored,
        doc(1049, "four")["name"],
        "the acknowledged write is what is stored"
    );
    let count: i64 = db.scalar("SELECT count(*) FROM fresh WHERE id >= 1000").await;
    assert_eq!(count, 50);
    let w = http.get("/v1/kv/fresh/1049").await;
    assert_eq!(w.json()["name"], doc(1049, "four")["name"]);
    assert!(
        tries("conflict", &http.get("/metrics").await.body) > conflicts,
        "the copy met the key"
    );
    server.shutdown().await;
}

/// A tmpfs mounted for one test (the process runs as root, as on CI); unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(bytes: u64) -> SmallDisk {
        let dir = cachesync_testkit::temp_dir("smalldisk", None);
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill the commit log's disk and needs root (as CI has): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_full_disk_under_the_log_is_named_as_such_and_loses_nothing_acknowledged() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let disk = SmallDisk::mount(1 << 20);
    let text = format!(
        "{}\n[log]\ndir = \"{}\"\nsegment_bytes = \"64KiB\"\n",
        db.config_text(&keyspace("t", "t", "")),
        disk.0.join("log").display()
    );
    let (server, http) = crate::common::serve(cachesync::config::Config::parse(&text).unwrap()).await;
    // Postgres holds the flush back, so the log only grows.
    let locker = db.lock("t").await;
    let value = "x".repeat(2000);
    let mut acked = Vec::new();
    let mut full = None;
    for id in 0..2000 {
        let r = http
            .put(&format!("/v1/kv/t/{id}"), format!(r#"{{"v": "{value}"}}"#))
            .await;
        match r.status.as_u16() {
            202 => acked.push(id),
            _ => {
                full = Some((id, r));
                break;
            }
        }
    }
    let (refused_id, r) = full.expect("a 1 MiB disk fills up");
    assert_eq!(
        (r.status.as_u16(), r.error()),
        (507, "disk_full".to_string()),
        "{}",
        r.body
    );
    assert!(r.detail().contains("disk"), "{}", r.detail());
    assert_eq!(
        http.get(&format!("/v1/kv/t/{refused_id}")).await.status,
        404,
        "the refused write changed nothing"
    );
    assert!(acked.len() > 50, "{} writes fit", acked.len());
    // Everything acknowledged reaches Postgres once it lets the flush through.
    locker.batch_execute("COMMIT").await.unwrap();
    drained(&http).await;
    let n: i64 = db.scalar("SELECT count(*) FROM t").await;
    assert_eq!(n as usize, acked.len());
    server.shutdown().await;
}

/// Values Postgres certainly refuses get the same 400 from both write modes, and write-behind
/// acknowledges none of them (before, each got a 202, was served to readers, then became a dead
/// letter).
#[tokio::test]
async fn write_behind_refuses_what_write_through_refuses_with_the_same_answer() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, big bigint, n int, s text, code varchar(5), u uuid, at timestamptz, ok bool)",
    )
    .await;
    let node = Node::new();
    let keyspaces = format!(
        "{}[[keyspace]]\nname = \"wt\"\ntable = \"t\"\nkey = \"id\"\nwrite = \"through\"\n",
        keyspace("wb", "t", "")
    );
    let (server, http) = node.start_text(&node.config_text(&db, &keyspaces, "")).await;
    let cases = [
        r#"{"big": 18446744073709551616}"#,
        r#"{"n": 1e400}"#,
        r#"{"n": "abc"}"#,
        r#"{"s": "a\u0000b"}"#,
        r#"{"code": "toolong"}"#,
        r#"{"u": "not-a-uuid"}"#,
        r#"{"at": "whenever"}"#,
        r#"{"ok": "maybe"}"#,
    ];
    for body in cases {
        let through = http.put("/v1/kv/wt/1", body).await;
        let behind = http.put("/v1/kv/wb/1", body).await;
        assert_eq!(through.status, 400, "{body}: {}", through.body);
        assert_eq!(
            (behind.status, behind.error(), behind.detail()),
            (through.status, through.error(), through.detail()),
            "{body}: both modes answer alike"
        );
        assert_eq!(behind.error(), "invalid_value", "{body}");
    }
    assert_eq!(backlog(&http).await, 0.0, "nothing was acknowledged");
    assert_eq!(http.get("/v1/kv/wb/1").await.status, 404);
    // A good write of the same fields is taken by both.
    let good = r#"{"big": 9007199254740993, "n": "42", "s": "fine", "code": "five ", "u": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "at": "2026-12-01 10:00+00", "ok": "yes"}"#;
    assert_eq!(http.put("/v1/kv/wb/2", good).await.status, 202);
    assert_eq!(http.put("/v1/kv/wt/3", good).await.status, 200);
    drained(&http).await;
    let n: i64 = db.scalar("SELECT count(*) FROM t").await;
    assert_eq!(n, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_backlog_answers_503_and_accepts_again_once_drained() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let node = Node::new();
    let (server, http) = node
        .start_text(&node.config_text(
            &db,
            &keyspace("t", "t", ""),
            "[write_behind]\nmax_backlog_records = 5\n",
        ))
        .await;
    let locker = db.lock("t").await;
    for id in 0..5 {
        assert_eq!(http.put(&format!("/v1/kv/t/{id}"), r#"{"v": 1}"#).await.status, 202);
    }
    let full = http.put("/v1/kv/t/5", r#"{"v": 1}"#).await;
    assert_eq!(full.status, 503, "{}", full.body);
    assert_eq!(full.header("retry-after"), "1");
    assert!(full.detail().contains("backlog is full"), "{}", full.detail());
    assert_eq!(full.error(), "backlog_full", "not mistaken for Postgres being down");
    assert_eq!(
        http.get("/v1/kv/t/5").await.status,
        404,
        "the refused write changed nothing"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    drained(&http).await;
    assert_eq!(http.put("/v1/kv/t/5", r#"{"v": 1}"#).await.status, 202);
    drained(&http).await;
    let n: i64 = db.scalar("SELECT count(*) FROM t").await;
    assert_eq!(n, 6);
    assert!(metric(&http.get("/metrics").await.body, "cachesync_writebehind_rejected_total") >= 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn with_cdc_on_the_same_keyspace_the_writing_node_never_goes_back() {
    let db = Db::new().await;
    db.exec("CREATE TABLE ctr (id int PRIMARY KEY, v bigint NOT NULL)")
        .await;
    let node = Node::new();
    let ks = keyspace("ctr", "ctr", "cdc = \"update\"");
    let (server, http) = node
        .start_text(&node.config_text(&db, &ks, "[write_behind]\nbatch_delay = \"1ms\"\n"))
        .await;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let last: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_secs(4);
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let (http, violations, last) = (http.clone(), violations.clone(), last.clone());
            tokio::spawn(async move {
                let mut v = 0i64;
                while Instant::now() < stop_at {
                    v += 1;
                    for k in 0..3 {
                        let id = t * 10 + k;
                        let r = http.put(&format!("/v1/kv/ctr/{id}"), format!(r#"{{"v": {v}}}"#)).await;
                        assert_eq!(r.status, 202, "{}", r.body);
                        last.lock().unwrap().insert(id, v);
                    }
                    for k in 0..3 {
                        let id = t * 10 + k;
                        let got = http.get(&format!("/v1/kv/ctr/{id}")).await.json()["v"]
                            .as_i64()
                            .unwrap_or(-1);
                        if got < v {
                            violations.lock().unwrap().push((id, got, v));
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        violations.lock().unwrap().is_empty(),
        "reads older than the acknowledged write: {:?}",
        violations.lock().unwrap()
    );
    drained(&http).await;
    server.cdc_caught_up(WAIT).await.unwrap();
    let last = last.lock().unwrap().clone();
    for (id, v) in last.iter() {
        let stored: i64 = db
            .sql
            .query_one("SELECT v FROM ctr WHERE id = $1", &[&(*id as i32)])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, *v, "key {id}");
        assert_eq!(http.get(&format!("/v1/kv/ctr/{id}")).await.json()["v"], *v);
    }
    let m = http.get("/metrics").await.body;
    assert!(
        metric(&m, "cachesync_cdc_echoes_total") >= 1.0,
        "the flushes were recognised in the stream: {m}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn writes_are_acknowledged_through_a_postgres_outage_and_none_is_lost() {
    let pg = PgServer::start(PgOptions::default());
    let db = Db::on(pg.clone()).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)")
        .await;
    let node = Node::new();
    let (server, http) = node
        .start_text(&node.config_text(
            &db,
            &keyspace("items", "items", ""),
            "[write_behind]\nretry_max = \"1s\"\n",
        ))
        .await;
    let acked = Arc::new(Mutex::new(Vec::<i32>::new()));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let (http, acked, running) = (http.clone(), acked.clone(), running.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = t * 1_000_000 + i;
                    i += 1;
                    let r = http
                        .put(&format!("/v1/kv/items/{id}"), format!(r#"{{"v": "w{id}"}}"#))
                        .await;
                    assert_eq!(r.status, 202, "{}", r.body);
                    acked.lock().unwrap().push(id);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.stop();
    let before = acked.lock().unwrap().len();
    let mut backlogs = Vec::new();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        backlogs.push(backlog(&http).await);
    }
    let during = acked.lock().unwrap().len() - before;
    assert!(
        during > 1000,
        "writes kept being acknowledged during the outage: {during}"
    );
    assert!(
        backlogs.windows(2).all(|w| w[1] >= w[0]) && backlogs.last().unwrap() > &1000.0,
        "the backlog rose: {backlogs:?}"
    );
    let age = metric(
        &http.get("/metrics").await.body,
        "cachesync_writebehind_oldest_unflushed_seconds",
    );
    assert!(
        age >= 25.0,
        "the oldest unflushed write has waited the whole outage: {age}"
    );
    pg.resume();
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    drained(&http).await;
    let db2 = pg.connect(&db.db.name).await;
    let stored: Vec<i32> = db2
        .query("SELECT id FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    let mut stored_sorted = stored.clone();
    stored_sorted.sort_unstable();
    assert_eq!(
        stored_sorted, acked,
        "every acknowledged write is in Postgres, nothing else"
    );
    server.shutdown().await;
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cachesync"))
}

#[tokio::test]
async fn sigkill_under_load_loses_no_acknowledged_write() {
    let db = Db::new().await;
    db.exec("CREATE TABLE kv (id text PRIMARY KEY, v bigint NOT NULL)")
        .await;
    let node = Node::new();
    let config = node.config_text(
        &db,
        "[[keyspace]]\nname = \"kv\"\ntable = \"kv\"\nkey = \"id\"\nwrite = \"behind\"\n",
        "[write_behind]\nbatch_rows = 200\n",
    );
    // Unique keys must all land. Each writer's hot key must end at its last acknowledged value —
    // or at a value that writer sent after it: a write in flight at the kill may have been made
    // durable without its 202 reaching the client, and then it may land (it is newer). Anything
    // older than the last acknowledged value, or never sent, is a lost acknowledged write.
    let unique: Arc<Mutex<Vec<String>>> = Arc::default();
    let hot: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let sent: Arc<Mutex<HashMap<String, Vec<i64>>>> = Arc::default();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    for cycle in 0..20 {
        let mut sidecar = Sidecar::spawn(bin(), Some(&config));
        let http = Http::at(sidecar.base_url());
        eventually(WAIT, "ready", || async {
            if http.get("/readyz").await.status == 200 {
                Ok(())
            } else {
                Err(())
            }
        })
        .await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..12)
            .map(|w| {
                let (http, unique, hot, sent, stop) =
                    (http.clone(), unique.clone(), hot.clone(), sent.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        let (key, v) = if i.is_multiple_of(3) {
                            (format!("hot-{w}"), (cycle * 1_000_000 + i) as i64)
                        } else {
                            (format!("u-{cycle}-{w}-{i}"), i as i64)
                        };
                        if key.starts_with("hot-") {
                            sent.lock().unwrap().entry(key.clone()).or_default().push(v);
                        }
                        let client = reqwest::Client::new();
                        let r = client
                            .put(format!("{}/v1/kv/kv/{key}", http.base))
                            .body(format!(r#"{{"v": {v}}}"#))
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 202 => {
                                if key.starts_with("hot-") {
                                    hot.lock().unwrap().insert(key, v);
                                } else {
                                    unique.lock().unwrap().push(key);
                                }
                            }
                            // Refused (503): not acknowledged; try again.
                            Ok(r) => {
                                assert_eq!(r.status(), 503, "unexpected status");
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            Err(_) => return, // the sidecar is gone: this write was not acknowledged
                        }
                    }
                })
            })
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(300 + seed % 700)).await;
        sidecar.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            let _ = w.await;
        }
        println!(
            "cycle {cycle}: {} unique and {} hot keys acknowledged so far",
            unique.lock().unwrap().len(),
            hot.lock().unwrap().len()
        );
    }
    // A last start flushes whatever the kills left in the log.
    let sidecar = Sidecar::spawn(bin(), Some(&config));
    let http = Http::at(sidecar.base_url());
    drained(&http).await;
    let rows: HashMap<String, i64> = db
        .sql
        .query("SELECT id, v FROM kv", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let unique = unique.lock().unwrap();
    assert!(unique.len() > 500, "the writers made progress: {}", unique.len());
    let missing: Vec<&String> = unique.iter().filter(|k| !rows.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing from Postgres, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let sent = sent.lock().unwrap();
    for (k, acked) in hot.lock().unwrap().iter() {
        let stored = rows.get(k).copied();
        let allowed: Vec<i64> = sent[k].iter().copied().filter(|v| v >= acked).collect();
        assert!(
            stored.is_some_and(|v| allowed.contains(&v)),
            "hot key {k} holds {stored:?}: its last acknowledged value is {acked}, and only that or a later value its writer sent ({allowed:?}) may be there"
        );
    }
}

#[tokio::test]
async fn sigterm_drains_the_backlog_and_what_cannot_drain_is_flushed_on_the_next_start() {
    let pg = PgServer::start(PgOptions::default());
    let db = Db::on(pg.clone()).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL)").await;
    let node = Node::new();
    let config = node
        .config_text(&db, &keyspace("t", "t", ""), "")
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"3s\"");
    // 1. The flush is held by a lock when SIGTERM arrives; released, the drain completes.
    let mut sidecar = Sidecar::spawn(bin(), Some(&config));
    let http = Http::at(sidecar.base_url());
    eventually(WAIT, "ready", || async {
        if http.get("/readyz").await.status == 200 {
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    let locker = db.lock("t").await;
    for id in 0..50 {
        assert_eq!(http.put(&format!("/v1/kv/t/{id}"), r#"{"v": 1}"#).await.status, 202);
    }
    sidecar.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    locker.batch_execute("COMMIT").await.unwrap();
    let status = sidecar.wait_timeout(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{}", sidecar.log());
    assert!(
        sidecar.log().contains("every write-behind write reached Postgres"),
        "{}",
        sidecar.log()
    );
    let n: i64 = db.scalar("SELECT count(*) FROM t").await;
    assert_eq!(n, 50);

    // 2. Postgres is down at shutdown: the writes stay durable and land after the next start.
    let mut sidecar = Sidecar::spawn(bin(), Some(&config));
    let http = Http::at(sidecar.base_url());
    eventually(WAIT, "ready", || async {
        if http.get("/readyz").await.status == 200 {
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    pg.stop();
    for id in 100..150 {
        assert_eq!(http.put(&format!("/v1/kv/t/{id}"), r#"{"v": 2}"#).await.status, 202);
    }
    sidecar.signal("TERM");
    sidecar
        .wait_timeout(Duration::from_secs(20))
        .expect("exits after the grace period");
    assert!(sidecar.log().contains("left unflushed"), "{}", sidecar.log());
    pg.resume();
    // Hold the flush back across the restart to see the writes before they reach Postgres.
    let c = db.lock("t").await;
    let sidecar = Sidecar::spawn(bin(), Some(&config));
    let http = Http::at(sidecar.base_url());
    eventually(WAIT, "ready", || async {
        if http.get("/readyz").await.status == 200 {
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    // Read-your-writes survives the restart, before the flush.
    assert_eq!(http.get("/v1/kv/t/120").await.json()["v"], 2);
    assert!(backlog(&http).await >= 50.0);
    c.batch_execute("COMMIT").await.unwrap();
    drained(&http).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM t WHERE v = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
}
