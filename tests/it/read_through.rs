//! Read-through against real Postgres: hits, misses, absent rows, negative caching, single
//! flight counted on the server, value rendering, composite keys, and serving through an outage.

use std::time::Duration;

use cachesync_testkit::eventually;
use cachesync_testkit::postgres::{PgOptions, PgServer};
use serde_json::json;

use crate::common::{Db, WAIT, serve};

const USERS: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text UNIQUE);
INSERT INTO users VALUES (1, 'ada', 'ada@example.com'), (2, 'bob', NULL);";

fn users_keyspace(extra: &str) -> String {
    format!(
        "[[keyspace]]\nname = \"users\"\ntable = \"public.users\"\nkey = \"id\"\nttl = \"5m\"\nnegative_ttl = \"1s\"\n{extra}\n"
    )
}

/// Calls of the keyspace's load statement, as Postgres counted them.
pub(crate) async fn selects_of(db: &Db, table: &str) -> i64 {
    db.exec("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await;
    db.scalar(&format!(
        "SELECT COALESCE(sum(calls), 0)::int8 FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND query LIKE '%FROM \"public\".\"{table}\" WHERE%' AND query NOT LIKE '%pg_stat_statements%'"
    ))
    .await
}

#[tokio::test]
async fn miss_then_hit_then_absent_with_negative_caching() {
    let db = Db::new().await;
    db.exec(USERS).await;
    let (_server, http) = serve(db.config(&users_keyspace(""))).await;

    let first = http.get("/v1/kv/users/1").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("x-cache"), "miss");
    assert_eq!(
        first.json(),
        json!({"id": 1, "name": "ada", "email": "ada@example.com"})
    );
    assert_eq!(first.header("content-type"), "application/json");
    let etag = first.header("etag").to_string();
    assert!(etag.starts_with('"') && etag.len() > 2, "etag {etag}");
    assert_eq!(first.header("age"), "0");

    let second = http.get("/v1/kv/users/1").await;
    assert_eq!(second.header("x-cache"), "hit");
    assert_eq!(second.header("etag"), etag, "the version does not change on a hit");
    assert_eq!(second.body, first.body);

    // A NULL column renders as null; a leading zero names the same row and the same entry.
    assert_eq!(
        http.get("/v1/kv/users/2").await.json(),
        json!({"id": 2, "name": "bob", "email": null})
    );
    assert_eq!(http.get("/v1/kv/users/002").await.header("x-cache"), "hit");

    // An absent row: 404, then remembered for negative_ttl (1s), then asked again.
    let absent = http.get("/v1/kv/users/99").await;
    assert_eq!(absent.status, 404);
    assert_eq!(absent.error(), "not_found");
    assert_eq!(absent.header("x-cache"), "miss");
    let before = selects_of(&db, "users").await;
    db.exec("INSERT INTO users VALUES (99, 'late', NULL)").await;
    let cached_absent = http.get("/v1/kv/users/99").await;
    assert_eq!(cached_absent.status, 404, "still negatively cached");
    assert_eq!(cached_absent.header("x-cache"), "hit");
    assert_eq!(selects_of(&db, "users").await, before, "a negative hit does not query");
    let found = eventually(WAIT, "negative entry expires", || async {
        let r = http.get("/v1/kv/users/99").await;
        if r.status == 200 { Ok(r) } else { Err(r.status) }
    })
    .await;
    assert_eq!(found.json()["name"], "late");
    assert_eq!(found.header("x-cache"), "miss");
}

#[tokio::test]
async fn one_hundred_concurrent_cold_gets_make_one_select() {
    let db = Db::new().await;
    db.exec("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await;
    db.exec(USERS).await;
    let (_server, http) = serve(db.config(&users_keyspace(""))).await;
    // Make the load slow enough that every request arrives while it is in flight: hold a lock
    // that the SELECT waits for, and release it once all requests are waiting.
    let locker = db.pg.connect(&db.db.name).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    let before = selects_of(&db, "users").await;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.get("/v1/kv/users/1").await })
        })
        .collect();
    // All 100 requests have reached the server when its miss counter says so; only one load
    // is in flight however many are waiting for it.
    eventually(WAIT, "all requests waiting on the one load", || async {
        let stats = http.get("/v1/keyspaces").await.json()["keyspaces"][0]["stats"].clone();
        if stats["misses"] == 100 && stats["loads_in_flight"] == 1 {
            Ok(())
        } else {
            Err(stats)
        }
    })
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["name"], "ada");
    }
    let after = eventually(WAIT, "pg_stat_statements counted the load", || async {
        let n = selects_of(&db, "users").await;
        if n > before { Ok(n) } else { Err(n) }
    })
    .await;
    assert_eq!(
        after - before,
        1,
        "Postgres executed the load statement exactly once for 100 concurrent misses"
    );
}

#[tokio::test]
async fn common_postgres_types_render_as_json() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE things (
            id int PRIMARY KEY, big bigint, small smallint, price numeric(30,10), ratio double precision,
            label text, flag boolean, at timestamptz, day date, uid uuid, doc jsonb, tags text[], nums int[],
            grid int[][], nothing text, nan numeric)
         ;
         INSERT INTO things VALUES (1, 9007199254740993, -3, 12345678901234567890.0123456789, 0.5,
            'say \"hi\"', true, '2024-03-01 12:34:56.5+05:30', '2024-03-01', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
            '{\"a\": [1, {\"b\": null}]}', ARRAY['x', 'y z', NULL], ARRAY[1,2,3], ARRAY[[1,2],[3,4]], NULL, 'NaN');",
    )
    .await;
    let (_server, http) = serve(db.config("[[keyspace]]\nname = \"things\"\ntable = \"things\"\nkey = \"id\"\n")).await;
    let r = http.get("/v1/kv/things/1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Exact digits survive: compare the raw text, not a float-parsed value.
    assert!(r.body.contains(r#""big":9007199254740993"#), "{}", r.body);
    assert!(
        r.body.contains(r#""price":12345678901234567890.0123456789"#),
        "{}",
        r.body
    );
    let v = r.json();
    assert_eq!(v["small"], json!(-3));
    assert_eq!(v["ratio"], json!(0.5));
    assert_eq!(v["label"], json!("say \"hi\""));
    assert_eq!(v["flag"], json!(true));
    assert_eq!(v["at"], json!("2024-03-01T07:04:56.500Z"));
    assert_eq!(v["day"], json!("2024-03-01"));
    assert_eq!(v["uid"], json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    assert_eq!(v["doc"], json!({"a": [1, {"b": null}]}));
    assert_eq!(v["tags"], json!(["x", "y z", null]));
    assert_eq!(v["nums"], json!([1, 2, 3]));
    assert_eq!(v["grid"], json!([[1, 2], [3, 4]]));
    assert_eq!(v["nothing"], json!(null));
    assert_eq!(v["nan"], json!("NaN"));
}

#[tokio::test]
async fn composite_keys_and_column_mapping() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE orders (tenant text, id int, total numeric, internal text, PRIMARY KEY (tenant, id));
         INSERT INTO orders VALUES ('acme', 7, 10.50, 'x'), ('a,b', 7, 1, 'y');",
    )
    .await;
    let ks = "[[keyspace]]\nname = \"orders\"\ntable = \"orders\"\nkey = [\"tenant\", \"id\"]\ncolumns = [\"tenant\", \"id\", \"total as amount\"]\n";
    let (_server, http) = serve(db.config(ks)).await;
    let r = http.get("/v1/kv/orders/acme,7").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body, r#"{"tenant":"acme","id":7,"amount":10.50}"#,
        "numeric keeps its digits"
    );
    assert!(r.json().get("internal").is_none(), "unmapped columns are left out");
    // A comma inside a component is escaped.
    let escaped = http.get("/v1/kv/orders/a%2Cb,7").await;
    assert_eq!(escaped.json()["tenant"], "a,b");
    // Wrong number of components, or a component of the wrong type: 400 naming the problem.
    let arity = http.get("/v1/kv/orders/acme").await;
    assert_eq!(arity.status, 400);
    assert!(arity.detail().contains("tenant, id"), "{}", arity.detail());
    let bad = http.get("/v1/kv/orders/acme,seven").await;
    assert_eq!(bad.status, 400);
    assert!(bad.detail().contains("`id`"), "{}", bad.detail());
    // _mget uses the same key encoding.
    let m = http
        .post("/v1/kv/orders/_mget", r#"{"keys": ["acme,7", "acme,8", "acme,x"]}"#)
        .await;
    assert_eq!(m.status, 200, "{}", m.body);
    let items = m.json()["items"].clone();
    assert_eq!(items[0]["found"], true);
    assert_eq!(items[0]["value"]["tenant"], "acme");
    assert_eq!(items[1]["found"], false);
    assert_eq!(items[2]["error"], "invalid_key");
}

#[tokio::test]
async fn with_postgres_stopped_cached_keys_are_served_and_misses_get_503() {
    // A server of its own: this test stops it.
    let pg = PgServer::start(PgOptions::default());
    let db = Db::on(pg.clone()).await;
    db.exec(USERS).await;
    let (_server, http) = serve(db.config(&users_keyspace("write = \"through\""))).await;
    assert_eq!(http.get("/v1/kv/users/1").await.status, 200);

    pg.stop();
    let cached = http.get("/v1/kv/users/1").await;
    assert_eq!(cached.status, 200);
    assert_eq!(cached.header("x-cache"), "hit");
    assert_eq!(cached.json()["name"], "ada");
    let miss = http.get("/v1/kv/users/2").await;
    assert_eq!(miss.status, 503, "{}", miss.body);
    assert_eq!(miss.error(), "unavailable");
    assert_eq!(miss.header("retry-after"), "1");
    let write = http.put("/v1/kv/users/1", r#"{"name": "changed"}"#).await;
    assert_eq!(write.status, 503, "{}", write.body);
    assert_eq!(
        http.get("/v1/kv/users/1").await.json()["name"],
        "ada",
        "a failed write leaves the cache untouched"
    );
    assert!(!miss.body.contains("postgres://"), "no connection string in errors");

    pg.resume();
    let back = eventually(
        Duration::from_secs(30),
        "misses load again after Postgres returns",
        || async {
            let r = http.get("/v1/kv/users/2").await;
            if r.status == 200 { Ok(r) } else { Err(r.status) }
        },
    )
    .await;
    assert_eq!(back.json()["name"], "bob");
}

#[tokio::test]
async fn a_sidecar_started_before_its_database_becomes_ready_by_itself() {
    let pg = PgServer::start(PgOptions::default());
    let db = Db::on(pg.clone()).await;
    db.exec(USERS).await;
    pg.stop();
    let server = cachesync::server::Server::start(db.config(&users_keyspace("")))
        .await
        .unwrap();
    let http = crate::common::Http::new(server.local_addr());
    let r = http.get("/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.json()["not_ready"]["users"].is_string(), "{}", r.body);
    assert_eq!(http.get("/v1/kv/users/1").await.status, 503);
    pg.resume();
    server
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("binds once Postgres is up");
    assert_eq!(http.get("/v1/kv/users/1").await.json()["name"], "ada");
}
