//! Refresh-ahead against a real Postgres: hot keys never expire under readers, a failed reload
//! keeps the old value, writes and CDC changes win over a refresh, and a burst of hot keys
//! never runs more refreshes at once than the keyspace's limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachesync_testkit::eventually;

use crate::common::{Db, Http, Node, WAIT, hold_loads, metric, serve};

fn keyspace(table: &str, extra: &str) -> String {
    format!("[[keyspace]]\nname = \"{table}\"\ntable = \"{table}\"\nkey = \"id\"\n{extra}\n")
}

async fn metrics(http: &Http) -> String {
    http.get("/metrics").await.body
}

fn refreshes(m: &str, ks: &str, result: &str) -> f64 {
    metric(
        m,
        &format!("cachesync_refresh_completed_total{{keyspace=\"{ks}\",result=\"{result}\"}}"),
    )
}

#[tokio::test]
async fn a_steady_reader_of_a_hot_key_never_waits_and_follows_postgres() {
    let db = Db::new().await;
    db.exec("CREATE TABLE hot (id int PRIMARY KEY, v int NOT NULL); INSERT INTO hot VALUES (1, 0);")
        .await;
    let (server, http) = serve(db.config(&keyspace("hot", "ttl = \"1s\"\nrefresh_ahead = 0.5"))).await;
    let first = http.get("/v1/kv/hot/1").await;
    assert_eq!(first.header("x-cache"), "miss");

    // One reader every 20 ms for 10 s; Postgres changes the row every second.
    let started = Instant::now();
    let mut updates: Vec<(i32, Instant)> = Vec::new();
    let mut seen: Vec<(i32, Instant)> = Vec::new();
    let mut origins = std::collections::BTreeMap::<String, usize>::new();
    let mut next_update = started + Duration::from_secs(1);
    while started.elapsed() < Duration::from_secs(10) {
        if Instant::now() >= next_update && updates.len() < 8 {
            let v = updates.len() as i32 + 1;
            db.exec(&format!("UPDATE hot SET v = {v} WHERE id = 1")).await;
            updates.push((v, Instant::now()));
            next_update += Duration::from_secs(1);
        }
        let r = http.get("/v1/kv/hot/1").await;
        assert_eq!(r.status, 200, "{}", r.body);
        *origins.entry(r.header("x-cache").to_string()).or_default() += 1;
        let v = r.json()["v"].as_i64().unwrap() as i32;
        if seen.last().is_none_or(|(last, _)| *last != v) {
            seen.push((v, Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !origins.contains_key("miss"),
        "no read after warm-up waited for a load: {origins:?}"
    );
    assert!(
        origins.get("stale-refreshing").is_some_and(|n| *n >= 10),
        "reads late in the entry's life were answered at once while it refreshed: {origins:?}"
    );
    let m = metrics(&http).await;
    assert_eq!(
        metric(&m, "cachesync_cache_misses_total{keyspace=\"hot\"}"),
        1.0,
        "only the warm-up missed"
    );
    assert!(
        refreshes(&m, "hot", "succeeded") >= 10.0,
        "the key was refreshed about twice a second: {}",
        refreshes(&m, "hot", "succeeded")
    );
    // Every change in Postgres was served within the TTL of being made.
    for (v, at) in &updates {
        let (_, shown) = seen
            .iter()
            .find(|(s, _)| s >= v)
            .unwrap_or_else(|| panic!("value {v} was never served: {seen:?}"));
        assert!(
            shown.saturating_duration_since(*at) < Duration::from_millis(1500),
            "value {v} appeared {:?} after its update",
            shown.saturating_duration_since(*at)
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn cold_keys_are_left_to_expire() {
    let db = Db::new().await;
    db.exec("CREATE TABLE cold (id int PRIMARY KEY, v int); INSERT INTO cold VALUES (1, 1);")
        .await;
    let (server, http) = serve(db.config(&keyspace("cold", "ttl = \"500ms\"\nrefresh_ahead = 0.5"))).await;
    assert_eq!(http.get("/v1/kv/cold/1").await.header("x-cache"), "miss");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        http.get("/v1/kv/cold/1").await.header("x-cache"),
        "miss",
        "an entry nobody read in its refresh window expired"
    );
    let m = metrics(&http).await;
    assert_eq!(metric(&m, "cachesync_refresh_started_total{keyspace=\"cold\"}"), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_fails_keeps_the_old_value_until_it_expires() {
    let db = Db::new().await;
    db.exec("CREATE TABLE flaky (id int PRIMARY KEY, v text); INSERT INTO flaky VALUES (1, 'old');")
        .await;
    let text = db
        .config_text(&keyspace("flaky", "ttl = \"3s\"\nrefresh_ahead = 0.3"))
        .replace(
            "acquire_timeout = \"2s\"",
            "acquire_timeout = \"2s\"\nstatement_timeout = \"200ms\"",
        );
    let (server, http) = serve(cachesync::config::Config::parse(&text).unwrap()).await;
    assert_eq!(http.get("/v1/kv/flaky/1").await.json()["v"], "old");
    let loaded = Instant::now();
    // Another session changes the row and holds the table locked: reloads time out.
    let locker = db.pg.connect(&db.db.name).await;
    locker
        .batch_execute("BEGIN; UPDATE flaky SET v = 'new' WHERE id = 1; LOCK TABLE flaky IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = http.get("/v1/kv/flaky/1").await;
    assert_eq!(r.header("x-cache"), "stale-refreshing");
    assert_eq!(r.json()["v"], "old");
    eventually(WAIT, "the refresh fails", || async {
        let n = refreshes(&metrics(&http).await, "flaky", "failed");
        if n >= 1.0 { Ok(()) } else { Err(n) }
    })
    .await;
    // Until the TTL really expires, reads keep answering the old value at once.
    while loaded.elapsed() < Duration::from_millis(2600) {
        let r = http.get("/v1/kv/flaky/1").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_ne!(r.header("x-cache"), "miss");
        assert_eq!(r.json()["v"], "old");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&http).await;
    assert!(metric(&m, "cachesync_source_loads_total{keyspace=\"flaky\",result=\"error\"}") >= 1.0);
    // Postgres answers again: the change arrives.
    locker.batch_execute("COMMIT").await.unwrap();
    eventually(WAIT, "the new value is served", || async {
        let v = http.get("/v1/kv/flaky/1").await.json()["v"].clone();
        if v == "new" { Ok(()) } else { Err(v) }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_write_or_a_change_during_a_slow_refresh_wins() {
    for how in ["write", "cdc"] {
        let db = Db::new().await;
        db.exec("CREATE TABLE users (id int PRIMARY KEY, name text); INSERT INTO users VALUES (1, 'old');")
            .await;
        let extra = match how {
            "write" => "ttl = \"4s\"\nrefresh_ahead = 0.25\nwrite = \"through\"",
            _ => "ttl = \"4s\"\nrefresh_ahead = 0.25\ncdc = \"update\"\nwarm = false",
        };
        let node = Node::new();
        let (server, http) = node.start(&db, &keyspace("users", extra)).await;
        assert_eq!(http.get("/v1/kv/users/1").await.json()["name"], "old");
        let ks = server.keyspace("users").expect("configured").clone();
        let gate = hold_loads(&ks);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The read that schedules the refresh is answered at once, while the refresh is held.
        let r = http.get("/v1/kv/users/1").await;
        assert_eq!(r.header("x-cache"), "stale-refreshing", "{how}");
        assert_eq!(r.json()["name"], "old");
        gate.reached
            .lock()
            .await
            .recv()
            .await
            .expect("the refresh ran its query");
        // While the refresh holds the old row, the key changes.
        match how {
            "write" => {
                let w = http.put("/v1/kv/users/1", r#"{"name": "written"}"#).await;
                assert_eq!(w.status, 200, "{}", w.body);
            }
            _ => {
                db.exec("UPDATE users SET name = 'written' WHERE id = 1").await;
                server.cdc_caught_up(WAIT).await.unwrap();
                eventually(WAIT, "the change is applied", || async {
                    let m = metrics(&http).await;
                    let n = metric(&m, "cachesync_cdc_applied_events_total{keyspace=\"users\"");
                    if n >= 1.0 { Ok(()) } else { Err(n) }
                })
                .await;
            }
        }
        ks.set_load_hook(None);
        gate.release.notify_one();
        eventually(WAIT, "the refresh ends superseded", || async {
            let n = refreshes(&metrics(&http).await, "users", "superseded");
            if n >= 1.0 { Ok(()) } else { Err(n) }
        })
        .await;
        let after = http.get("/v1/kv/users/1").await;
        assert_eq!(
            after.json()["name"],
            "written",
            "{how}: the refresh did not install the row it read before the change"
        );
        let m = metrics(&http).await;
        assert_eq!(refreshes(&m, "users", "succeeded"), 0.0, "{how}");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_thousand_hot_keys_never_run_more_refreshes_at_once_than_the_limit() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE many (id int PRIMARY KEY, v int); INSERT INTO many SELECT g, g FROM generate_series(1, 1000) g;",
    )
    .await;
    let (server, http) = serve(db.config(&keyspace(
        "many",
        "ttl = \"30s\"\nrefresh_ahead = 0.04\nrefresh_concurrency = 4\nmax_entries = 10000",
    )))
    .await;
    let keys: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    let warm = http
        .post("/v1/kv/many/_mget", serde_json::json!({ "keys": keys }).to_string())
        .await;
    assert_eq!(warm.status, 200);
    let m = metrics(&http).await;
    assert_eq!(metric(&m, "cachesync_cache_misses_total{keyspace=\"many\"}"), 1000.0);

    // Count refresh loads running at once, each held 10 ms.
    let ks = server.keyspace("many").expect("configured").clone();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, mx) = (running.clone(), most.clone());
    ks.set_load_hook(Some(Arc::new(move |_key| {
        let (running, most) = (r.clone(), mx.clone());
        Box::pin(async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            running.fetch_sub(1, Ordering::SeqCst);
        })
    })));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Every key read at once: 50 clients, 20 keys each.
    let tasks: Vec<_> = keys
        .chunks(20)
        .map(|chunk| {
            let (http, chunk) = (http.clone(), chunk.to_vec());
            tokio::spawn(async move {
                let mut origins = Vec::new();
                for k in chunk {
                    let r = http.get(&format!("/v1/kv/many/{k}")).await;
                    assert_eq!(r.status, 200);
                    origins.push(r.header("x-cache").to_string());
                }
                origins
            })
        })
        .collect();
    for t in tasks {
        for origin in t.await.unwrap() {
            assert_ne!(origin, "miss", "hot keys are answered from the cache");
        }
    }
    eventually(WAIT, "every key is refreshed", || async {
        let n = refreshes(&metrics(&http).await, "many", "succeeded");
        if n >= 1000.0 { Ok(()) } else { Err(n) }
    })
    .await;
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 4, "at most refresh_concurrency refreshes ran at once: {most}");
    assert_eq!(most, 4, "the limit was used, not undercut");
    let m = metrics(&http).await;
    assert_eq!(metric(&m, "cachesync_refresh_started_total{keyspace=\"many\"}"), 1000.0);
    assert_eq!(metric(&m, "cachesync_refresh_in_flight{keyspace=\"many\"}"), 0.0);
    assert_eq!(metric(&m, "cachesync_refresh_queued{keyspace=\"many\"}"), 0.0);
    assert_eq!(
        metric(&m, "cachesync_cache_misses_total{keyspace=\"many\"}"),
        1000.0,
        "no reader missed after the warm-up"
    );
    ks.set_load_hook(None);
    server.shutdown().await;
}

/// CDC cannot see a view's changes; refresh-ahead keeps a hot key of one fresh anyway.
#[tokio::test]
async fn a_view_cdc_cannot_follow_stays_fresh_under_readers() {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL); \
         CREATE TABLE payments (account int NOT NULL REFERENCES accounts, amount numeric NOT NULL); \
         CREATE VIEW balances AS SELECT a.id, a.name, count(p.amount)::int AS payments \
           FROM accounts a LEFT JOIN payments p ON p.account = a.id GROUP BY a.id, a.name; \
         CREATE VIEW twice AS SELECT id FROM accounts UNION ALL SELECT id FROM accounts; \
         INSERT INTO accounts VALUES (1, 'ada'), (2, 'alan');",
    )
    .await;
    let (server, http) = serve(db.config(&format!(
        "{}{}",
        keyspace("balances", "ttl = \"1s\"\nrefresh_ahead = 0.5"),
        keyspace("twice", "ttl = \"1s\"")
    )))
    .await;
    let first = http.get("/v1/kv/balances/1").await;
    assert_eq!(first.header("x-cache"), "miss");
    assert_eq!(first.json()["payments"], 0);

    let started = Instant::now();
    let mut paid: Option<Instant> = None;
    let mut shown: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(4) {
        if paid.is_none() && started.elapsed() >= Duration::from_secs(1) {
            db.exec("INSERT INTO payments VALUES (1, 9.99)").await;
            paid = Some(Instant::now());
        }
        let r = http.get("/v1/kv/balances/1").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_ne!(r.header("x-cache"), "miss", "no read after warm-up waited for a load");
        if shown.is_none() && r.json()["payments"] == 1 {
            shown = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lag = shown.expect("the payment reached the cached view row") - paid.unwrap();
    assert!(
        lag < Duration::from_millis(1500),
        "the view row followed its tables within the TTL: {lag:?}"
    );

    // A view cannot promise a unique key; a key with two rows fails naming the view.
    let r = http.get("/v1/kv/twice/1").await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("2 rows of public.twice have this key"), "{}", r.body);
    assert_eq!(http.get("/v1/kv/twice/3").await.status, 404);
    server.shutdown().await;
}
