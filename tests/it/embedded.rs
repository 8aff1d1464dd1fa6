//! The binary with no configuration: the embedded in-memory default, and shutdown on SIGTERM.

use std::path::Path;
use std::time::Duration;

use cachesync_testkit::sidecar::Sidecar;

use crate::common::{Db, Http, WAIT};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cachesync"))
}

#[tokio::test]
async fn no_config_serves_the_default_keyspace_from_memory() {
    let sidecar = Sidecar::spawn(bin(), None);
    let http = Http::at(sidecar.base_url());
    let put = http.put("/v1/kv/default/a", r#"{"x":1}"#).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let got = http.get("/v1/kv/default/a").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), serde_json::json!({"x": 1}));
    assert_eq!(got.header("x-cache"), "hit");
    assert!(!got.header("etag").is_empty());
    assert_eq!(http.get("/v1/kv/default/missing").await.status, 404);
    assert_eq!(http.get("/healthz").await.status, 200);
    assert_eq!(http.get("/readyz").await.status, 200);
    let listed = http.get("/v1/keyspaces").await.json();
    assert_eq!(listed["keyspaces"][0]["name"], "default");
    assert_eq!(listed["keyspaces"][0]["stats"]["entries"], 1);
    let del = http.delete("/v1/kv/default/a").await;
    assert_eq!(del.status, 204);
    assert_eq!(http.get("/v1/kv/default/a").await.status, 404);
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let db = Db::new().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'one');")
        .await;
    let config = db.config_text("[[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\n");
    let mut sidecar = Sidecar::spawn(bin(), Some(&config));
    let http = Http::at(sidecar.base_url());
    cachesync_testkit::eventually(WAIT, "sidecar ready", || async {
        if http.get("/readyz").await.status == 200 {
            Ok(())
        } else {
            Err("not ready")
        }
    })
    .await;

    // Hold a lock so a read-through load blocks inside Postgres, making the request in-flight.
    let locker = db.pg.connect(&db.db.name).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    let slow = tokio::spawn({
        let http = http.clone();
        async move { http.get("/v1/kv/items/1").await }
    });
    // Wait until the load is really waiting on the lock.
    cachesync_testkit::eventually(WAIT, "load blocked on the lock", || async {
        let n: i64 = db.scalar("SELECT count(*) FROM pg_locks WHERE NOT granted").await;
        if n > 0 { Ok(()) } else { Err(n) }
    })
    .await;
    sidecar.signal("TERM");
    // New connections are refused once the listener is closed.
    cachesync_testkit::eventually(WAIT, "listener closed", || async {
        match tokio::net::TcpStream::connect(sidecar.addr).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting"),
        }
    })
    .await;
    locker.batch_execute("COMMIT").await.unwrap();
    let resp = slow.await.unwrap();
    assert_eq!(resp.status, 200, "the in-flight request completes: {}", resp.body);
    assert_eq!(resp.json()["v"], "one");
    let status = sidecar
        .wait_timeout(Duration::from_secs(20))
        .expect("exits after draining");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        sidecar.log().contains("shutdown complete"),
        "log says how shutdown ended:\n{}",
        sidecar.log()
    );
}

/// `THP_enabled` of a running process, as the kernel reports it.
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no THP_enabled line in /proc/{pid}/status (needs Linux 5.0 or later)"))
}

#[tokio::test]
async fn the_binary_turns_huge_pages_off_unless_mimalloc_is_told_to_allow_them() {
    assert!(
        std::env::var_os("MIMALLOC_ALLOW_THP").is_none(),
        "unset MIMALLOC_ALLOW_THP to run this test: the sidecar inherits it"
    );
    let plain = Sidecar::spawn(bin(), None);
    assert_eq!(Http::at(plain.base_url()).get("/healthz").await.status, 200);
    assert_eq!(thp_enabled(plain.pid()), "0", "huge pages are off by default");
    let allowed = Sidecar::spawn_with_env(bin(), None, &[("MIMALLOC_ALLOW_THP", "1")]);
    assert_eq!(Http::at(allowed.base_url()).get("/healthz").await.status, 200);
    assert_eq!(
        thp_enabled(allowed.pid()),
        "1",
        "MIMALLOC_ALLOW_THP=1 leaves them to the system"
    );
}
