//! Write-through against real Postgres: the write is in Postgres before the response, the cache
//! holds what Postgres stored, and every bad input gets its status, a clear message, and
//! changes nothing.

use serde_json::json;

use crate::common::{Db, Http, serve};

const SCHEMA: &str = "
CREATE TABLE users (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text UNIQUE,
    age int CHECK (age >= 0),
    code varchar(3),
    created timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00',
    name_upper text GENERATED ALWAYS AS (upper(name)) STORED
);
CREATE FUNCTION trim_name() RETURNS trigger AS $$ BEGIN NEW.name := btrim(NEW.name); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER trim_name BEFORE INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION trim_name();
CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
";

const KEYSPACES: &str = "
[[keyspace]]
name = \"users\"
table = \"users\"
key = \"id\"
write = \"through\"
[[keyspace]]
name = \"pairs\"
table = \"pairs\"
key = [\"a\", \"b\"]
write = \"through\"
[[keyspace]]
name = \"readonly\"
table = \"users\"
key = \"id\"
";

async fn setup() -> (Db, cachesync::server::Server, Http) {
    let db = Db::new().await;
    db.exec(SCHEMA).await;
    let mut config = db.config(KEYSPACES);
    config.server.max_body_bytes = 1024;
    config.server.max_key_bytes = 64;
    let (server, http) = serve(config).await;
    (db, server, http)
}

async fn row(db: &Db, id: i64) -> Option<String> {
    db.sql
        .query_opt("SELECT row_to_json(u)::text FROM users u WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn put_reaches_postgres_before_the_response_and_caches_what_was_stored() {
    let (db, _server, http) = setup().await;
    let put = http
        .put(
            "/v1/kv/users/1",
            r#"{"name": "  ada  ", "email": "ada@example.com", "age": 36}"#,
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    // Postgres already has it when the response arrives.
    let stored = row(&db, 1).await.expect("row is in Postgres when PUT returns");
    assert!(stored.contains(r#""name":"ada""#), "{stored}");
    // The response and the cache hold the stored row: trigger applied, default and generated
    // column filled in by Postgres.
    let expected = json!({"id": 1, "name": "ada", "email": "ada@example.com", "age": 36, "code": null,
                          "created": "2024-01-01T00:00:00Z", "name_upper": "ADA"});
    assert_eq!(put.json(), expected);
    let get = http.get("/v1/kv/users/1").await;
    assert_eq!(get.header("x-cache"), "hit");
    assert_eq!(get.json(), expected);
    assert_eq!(get.header("etag"), put.header("etag"));

    // An update names only some fields; the others keep their values.
    let upd = http.put("/v1/kv/users/1", r#"{"age": 37, "id": 1}"#).await;
    assert_eq!(upd.status, 200, "{}", upd.body);
    assert_eq!(upd.json()["age"], 37);
    assert_eq!(upd.json()["email"], "ada@example.com");
    assert_eq!(http.get("/v1/kv/users/1").await.json()["age"], 37);

    // DELETE removes the row, caches its absence, and a second DELETE finds nothing.
    assert_eq!(http.delete("/v1/kv/users/1").await.status, 204);
    assert!(row(&db, 1).await.is_none());
    let gone = http.get("/v1/kv/users/1").await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.header("x-cache"), "hit", "the deletion itself is cached");
    assert_eq!(http.delete("/v1/kv/users/1").await.status, 404);
}

#[tokio::test]
async fn composite_key_writes_take_the_key_from_the_url() {
    let (db, _server, http) = setup().await;
    let put = http.put("/v1/kv/pairs/5,x%2Cy", r#"{"v": "hello"}"#).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.json(), json!({"a": 5, "b": "x,y", "v": "hello"}));
    let v: String = db.scalar("SELECT v FROM pairs WHERE a = 5 AND b = 'x,y'").await;
    assert_eq!(v, "hello");
    let mismatch = http.put("/v1/kv/pairs/5,z", r#"{"a": 6, "v": "no"}"#).await;
    assert_eq!(mismatch.status, 400);
    assert_eq!(mismatch.error(), "key_mismatch");
}

/// Each bad request, its status and error code, and a fragment its detail must contain.
#[tokio::test]
async fn bad_inputs_get_clear_errors_and_write_nothing() {
    let (db, _server, http) = setup().await;
    http.put(
        "/v1/kv/users/1",
        r#"{"name": "ada", "email": "ada@example.com", "age": 36}"#,
    )
    .await;
    let before = row(&db, 1).await;
    let cached_before = http.get("/v1/kv/users/1").await.body;
    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(2000));
    let long_key = format!("/v1/kv/users/{}", "9".repeat(65));

    let cases: Vec<(&str, &str, String, u16, &str, &str)> = vec![
        ("PUT", "/v1/kv/nope/1", "{}".into(), 404, "unknown_keyspace", "users"),
        ("PUT", "/v1/kv/users/1", big, 413, "payload_too_large", "max_body_bytes"),
        ("PUT", &long_key, "{}".into(), 400, "invalid_key", "max_key_bytes"),
        ("PUT", "/v1/kv/users/1", "{not json".into(), 400, "invalid_json", "JSON"),
        ("PUT", "/v1/kv/users/1", "[1, 2]".into(), 400, "invalid_body", "object"),
        (
            "PUT",
            "/v1/kv/users/1",
            r#"{"nmae": "typo"}"#.into(),
            400,
            "unknown_field",
            "nmae",
        ),
        (
            "PUT",
            "/v1/kv/users/1",
            r#"{"age": "old"}"#.into(),
            400,
            "invalid_value",
            "`age`",
        ),
        (
            "PUT",
            "/v1/kv/users/1",
            r#"{"code": "toolong"}"#.into(),
            400,
            "invalid_value",
            "`code`",
        ),
        (
            "PUT",
            "/v1/kv/users/1",
            r#"{"id": 2, "name": "x"}"#.into(),
            400,
            "key_mismatch",
            "`id`",
        ),
        (
            "PUT",
            "/v1/kv/users/1",
            r#"{"name_upper": "X"}"#.into(),
            400,
            "not_writable",
            "name_upper",
        ),
        (
            "PUT",
            "/v1/kv/users/abc",
            r#"{"name": "x"}"#.into(),
            400,
            "invalid_key",
            "`id`",
        ),
        (
            "PUT",
            "/v1/kv/users/1",
            r#"{"age": -1}"#.into(),
            409,
            "conflict",
            "users_age_check",
        ),
        (
            "PUT",
            "/v1/kv/users/1",
            r#"{"name": null}"#.into(),
            400,
            "invalid_value",
            "NOT NULL",
        ),
        (
            "PUT",
            "/v1/kv/readonly/1",
            r#"{"name": "x"}"#.into(),
            405,
            "read_only",
            "write = \"through\"",
        ),
        (
            "DELETE",
            "/v1/kv/readonly/1",
            String::new(),
            405,
            "read_only",
            "read-only",
        ),
    ];
    for (method, path, body, status, code, fragment) in cases {
        let r = match method {
            "PUT" => http.put(path, body.clone()).await,
            _ => http.delete(path).await,
        };
        assert_eq!(r.status.as_u16(), status, "{method} {path} {body:.60}: {}", r.body);
        assert_eq!(r.error(), code, "{method} {path} {body:.60}: {}", r.body);
        assert!(
            r.detail().contains(fragment),
            "{method} {path}: detail {:?} should mention {fragment:?}",
            r.detail()
        );
        assert_eq!(row(&db, 1).await, before, "{method} {path} {body:.60} changed Postgres");
        assert_eq!(
            http.get("/v1/kv/users/1").await.body,
            cached_before,
            "{method} {path} changed the cache"
        );
    }
    // A unique violation on another row: 409, neither row changes.
    assert_eq!(http.put("/v1/kv/users/2", r#"{"name": "bob"}"#).await.status, 200);
    let dup = http.put("/v1/kv/users/2", r#"{"email": "ada@example.com"}"#).await;
    assert_eq!(dup.status, 409, "{}", dup.body);
    assert!(dup.detail().contains("users_email_key"), "{}", dup.detail());
    assert_eq!(http.get("/v1/kv/users/2").await.json()["email"], json!(null));
    let count: i64 = db.scalar("SELECT count(*) FROM users").await;
    assert_eq!(count, 2);
}
