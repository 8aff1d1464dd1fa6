//! The HTTP front door tried as an attacker or a careless client would: slow and idle
//! connections are cut off, the connection bound refuses cleanly and recovers, every error —
//! including those the HTTP library answers itself — is the JSON error shape, keys with broken
//! escapes are refused, a foreign `Host` is refused, and `If-None-Match: *` is honoured.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cachesync::config::Config;
use cachesync_testkit::eventually;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{WAIT, metric, serve};

fn config(server_extra: &str) -> Config {
    Config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[[keyspace]]\nname = \"default\"\n"
    ))
    .expect("valid test config")
}

/// Reads whatever the server sends until it closes the connection (or `limit` passes).
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// A server whose API needs `token` (`[server] token_file` in a temp dir named after `what`).
async fn serve_with_token(what: &str, token: &str) -> cachesync::server::Server {
    let path = cachesync_testkit::temp_dir(what, None).join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    serve(config(&format!("token_file = \"{}\"", path.display()))).await.0
}

/// Sends `request` on a fresh connection and returns the whole answer (the server closes).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send");
    let (text, closed) = read_to_close(&mut s, WAIT).await;
    assert!(closed, "the server closed the connection; got so far: {text}");
    text
}

/// The status and JSON body of a raw answer.
fn parse(answer: &str) -> (u16, Value) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let status = head[9..12].parse().expect("a status code");
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {answer:?}"));
    (status, json)
}

/// A request that did not arrive within `header_read_timeout` (1 s in these tests) was cut off
/// well before 10 s, with the JSON 408.
fn assert_cut_off(answer: &str, after: Duration) {
    assert!(after < Duration::from_secs(10), "cut off after {after:?}");
    let (status, body) = parse(answer);
    assert_eq!(
        (status, body["error"].as_str()),
        (408, Some("request_timeout")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let (server, http) = serve(config("header_read_timeout = \"1s\"")).await;
    let addr = server.local_addr();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    // One header byte every 100 ms: never complete, always active.
    let trickle = tokio::spawn(async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            if slow.write_all(b"a").await.is_err() {
                break;
            }
            tokio::select! {
                r = slow.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if started.elapsed() > WAIT {
                break;
            }
        }
        (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
    });
    // Meanwhile a normal client is served at once.
    for _ in 0..5 {
        assert_eq!(http.get("/healthz").await.status, 200);
    }
    let (answer, after) = trickle.await.unwrap();
    assert_cut_off(&answer, after);
    server.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (server, _http) = serve(config("idle_timeout = \"1s\"")).await;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Keep-alive: the connection stays open after the answer, then idles out.
    let started = Instant::now();
    let (rest, closed) = read_to_close(&mut s, WAIT).await;
    assert!(closed && rest.is_empty(), "closed without another answer: {rest:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // A connection that never sends anything idles out too.
    let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
    assert!(read_to_close(&mut silent, WAIT).await.1);
    server.shutdown().await;
}

#[tokio::test]
async fn the_connection_bound_refuses_cleanly_and_recovers() {
    let (server, http) = serve(config("max_connections = 4")).await;
    let addr = server.local_addr();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Each makes a request so it surely holds a slot, and keeps the connection.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        held.push(s);
    }
    let refused = raw(addr, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let (status, body) = parse(&refused);
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("too_many_connections")),
        "{refused}"
    );
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
    // One closes: new connections are served again.
    drop(held.pop());
    eventually(WAIT, "a freed slot is usable", || async {
        let r = http.get("/healthz").await;
        if r.status == 200 { Ok(()) } else { Err(r.status) }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn errors_the_http_library_answers_are_json_too() {
    let (server, _http) = serve(config("")).await;
    let addr = server.local_addr();
    // Not HTTP at all.
    let (status, body) = parse(&raw(addr, b"GARBAGE\r\n\r\n").await);
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    // Headers far beyond any sane size.
    let mut big = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    big.extend_from_slice(b"\r\n\r\n");
    let (status, body) = parse(&raw(addr, &big).await);
    assert_eq!((status, body["error"].as_str()), (431, Some("headers_too_large")));
    // A URI longer than the HTTP library takes.
    let long = format!(
        "GET /v1/kv/default/{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "k".repeat(70_000)
    );
    let (status, body) = parse(&raw(addr, long.as_bytes()).await);
    assert_eq!((status, body["error"].as_str()), (414, Some("uri_too_long")));
    server.shutdown().await;
}

#[tokio::test]
async fn a_foreign_host_is_refused_and_loopback_names_are_served() {
    let (server, _http) = serve(config("")).await;
    let addr = server.local_addr();
    let port = addr.port();
    // A key read takes a direct path past the router (`api::Api`): it is refused the same way.
    for path in ["/v1/keyspaces", "/v1/kv/default/k"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: attacker.example:7070\r\nConnection: close\r\n\r\n");
        let answer = raw(addr, req.as_bytes()).await;
        let (status, body) = parse(&answer);
        assert_eq!(
            (status, body["error"].as_str()),
            (421, Some("misdirected_host")),
            "{path}: {answer}"
        );
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "localhost".into(),
    ] {
        let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw(addr, req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
    server.shutdown().await;
}

/// GETs near the key route answer as the router would: the direct path for key reads
/// (`api::Api`) takes exactly the paths the router gives `kv::get`.
#[tokio::test]
async fn gets_beside_the_key_route_answer_as_the_router_does() {
    let (server, http) = serve(config("")).await;
    assert_eq!(http.put("/v1/kv/default/a/b", "{\"x\":1}").await.status, 200);
    for (path, status, error) in [
        ("/v1/kv/default/a/b", 200, ""),
        ("/v1/kv/default/a%2Fb", 200, ""),
        ("/v1/kv/default/missing", 404, "not_found"),
        ("/v1/kv/nope/k", 404, "unknown_keyspace"),
        ("/v1/kv/default/_mget", 405, "method_not_allowed"),
        ("/v1/kv/default/_mdelete", 405, "method_not_allowed"),
        ("/v1/kv/default/_mput", 405, "method_not_allowed"),
        ("/v1/kv/default/", 404, "no_route"),
        ("/v1/kv//k", 404, "unknown_keyspace"),
        ("/v1/kv/default", 404, "no_route"),
    ] {
        let r = http.get(path).await;
        assert_eq!(r.status.as_u16(), status, "{path}: {}", r.body);
        if !error.is_empty() {
            assert_eq!(r.error(), error, "{path}: {}", r.body);
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn keys_with_broken_escapes_are_refused_and_if_none_match_star_is_honoured() {
    let (server, http) = serve(config("")).await;
    for bad in ["%zz", "50%", "a%2"] {
        let r = http.put(&format!("/v1/kv/default/{bad}"), "1").await;
        assert_eq!(
            (r.status.as_u16(), r.error()),
            (400, "invalid_key".to_string()),
            "{bad}: {}",
            r.body
        );
    }
    // `50%25` is the one way to write "50%"; nothing was written under the refused spellings.
    assert_eq!(http.put("/v1/kv/default/50%25", "1").await.status, 200);
    assert_eq!(http.get("/v1/kv/default/50%25").await.body, "1");
    assert_eq!(http.get("/v1/kv/default/%zz").await.status, 400);
    let ks = http.get("/v1/keyspaces").await.json();
    assert_eq!(ks["keyspaces"][0]["stats"]["entries"], 1);
    // If-None-Match: * matches any current entry.
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/v1/kv/default/50%25", http.base))
        .header("if-none-match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = client
        .get(format!("{}/v1/kv/default/absent", http.base))
        .header("if-none-match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no entry: nothing to match");
    server.shutdown().await;
}

/// Eight clients increment one counter by read-modify-write with `If-Match` until 1,000
/// increments succeeded: the final value is exactly the number of 2xx answers, in every write
/// mode (in memory, write-through checked in Postgres under the row's lock, write-behind
/// checked against the node's current version).
#[tokio::test]
async fn conditional_read_modify_write_under_concurrency_counts_exactly() {
    let db = crate::common::Db::new().await;
    db.exec("CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL)")
        .await;
    let node = crate::common::Node::new();
    let keyspaces = "[[keyspace]]\nname = \"mem\"\n\
        [[keyspace]]\nname = \"wt\"\ntable = \"counters\"\nkey = \"id\"\nwrite = \"through\"\n\
        [[keyspace]]\nname = \"wb\"\ntable = \"counters\"\nkey = \"id\"\nwrite = \"behind\"\n";
    let (server, http) = node.start_text(&node.config_text(&db, keyspaces, "")).await;
    const TARGET: usize = 1000;
    for (ks, id) in [("mem", 1), ("wt", 2), ("wb", 3)] {
        let path = format!("/v1/kv/{ks}/{id}");
        // Create-only: the second create is refused.
        let client = reqwest::Client::new();
        let create = |body: &'static str| {
            client
                .put(format!("{}{path}", http.base))
                .header("if-none-match", "*")
                .body(body)
                .send()
        };
        assert!(create(r#"{"n": 0}"#).await.unwrap().status().is_success(), "{ks}");
        let again = create(r#"{"n": 0}"#).await.unwrap();
        assert_eq!(again.status(), 412, "{ks}: create-only refuses an existing key");
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let conflicts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (base, path, ok, conflicts) = (http.base.clone(), path.clone(), ok.clone(), conflicts.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    while ok.load(std::sync::atomic::Ordering::SeqCst) < TARGET {
                        let got = client.get(format!("{base}{path}")).send().await.unwrap();
                        let tag = got.headers()["etag"].to_str().unwrap().to_string();
                        let n = got.json::<Value>().await.unwrap()["n"].as_i64().unwrap();
                        let put = client
                            .put(format!("{base}{path}"))
                            .header("if-match", &tag)
                            .body(format!(r#"{{"n": {}}}"#, n + 1))
                            .send()
                            .await
                            .unwrap();
                        match put.status().as_u16() {
                            200 | 202 => {
                                if ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= TARGET {
                                    // Past the target by a racing success: still counted below.
                                }
                            }
                            412 => {
                                conflicts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            s => panic!("unexpected {s}: {}", put.text().await.unwrap()),
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let successes = ok.load(std::sync::atomic::Ordering::SeqCst);
        assert!(successes >= TARGET);
        let value = http.get(&path).await.json()["n"].as_i64().unwrap();
        assert_eq!(
            value as usize, successes,
            "{ks}: every 2xx is one increment, no lost update"
        );
        assert!(
            conflicts.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "{ks}: the clients did race"
        );
        // A stale tag is refused, and so is a missing entry.
        let stale = client
            .put(format!("{}{path}", http.base))
            .header("if-match", "\"0000000000000000\"")
            .body(r#"{"n": -1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), 412, "{ks}");
        let body: Value = stale.json().await.unwrap();
        assert_eq!(body["error"], "precondition_failed", "{ks}");
        let del = client
            .delete(format!("{}/v1/kv/{ks}/99", http.base))
            .header("if-match", "*")
            .send()
            .await
            .unwrap();
        assert_eq!(del.status(), 412, "{ks}: nothing to match");
    }
    crate::common::drained(&http).await;
    let stored: i64 = db.scalar("SELECT n FROM counters WHERE id = 3").await;
    let served = http.get("/v1/kv/wb/3").await.json()["n"].as_i64().unwrap();
    assert_eq!(stored, served, "write-behind's count reached Postgres");
    server.shutdown().await;
}

/// `_mput` / `_mdelete`: each item validated and conditioned like a single write and answered in
/// its own item; the good ones land (write-through in one transaction, write-behind with one log
/// append: consecutive offsets) and the bad ones change nothing.
#[tokio::test]
async fn bulk_writes_answer_per_item_and_land_only_the_good_ones() {
    let db = crate::common::Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL CHECK (v >= 0))")
        .await;
    let node = crate::common::Node::new();
    let keyspaces = "[[keyspace]]\nname = \"wt\"\ntable = \"t\"\nkey = \"id\"\nwrite = \"through\"\n\
        [[keyspace]]\nname = \"wb\"\ntable = \"t\"\nkey = \"id\"\nwrite = \"behind\"\n\
        [[keyspace]]\nname = \"mem\"\n";
    let (server, http) = node.start_text(&node.config_text(&db, keyspaces, "")).await;
    let statuses = |r: &crate::common::Resp| -> Vec<u64> {
        r.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["status"].as_u64().unwrap())
            .collect()
    };
    // Write-through: a good row, a value no int takes, a CHECK violation, a bad key, a good row.
    let r = http
        .post(
            "/v1/kv/wt/_mput",
            r#"{"items": [{"key": "1", "value": {"v": 10}}, {"key": "2", "value": {"v": "abc"}},
                          {"key": "3", "value": {"v": -1}}, {"key": "%zz", "value": {"v": 1}},
                          {"key": "4", "value": {"v": 40}}]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(statuses(&r), vec![200, 400, 409, 400, 200], "{}", r.body);
    let items = r.json()["items"].clone();
    assert_eq!(items[1]["error"], "invalid_value");
    assert_eq!(items[3]["error"], "invalid_key");
    assert_eq!(items[0]["value"]["v"], 10);
    let ids: Vec<i32> = db
        .sql
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 4], "the good items landed, the refused ones did not");
    // A stale If-Match fails its own item only.
    let tag = items[0]["etag"].as_str().unwrap().to_string();
    let body = serde_json::json!({"items": [
        {"key": "1", "value": {"v": 11}, "if_match": tag},
        {"key": "4", "value": {"v": 41}, "if_match": "\"0000000000000000\""},
    ]});
    let r = http.post("/v1/kv/wt/_mput", body.to_string()).await;
    assert_eq!(statuses(&r), vec![200, 412], "{}", r.body);
    assert_eq!(http.get("/v1/kv/wt/1").await.json()["v"], 11);
    assert_eq!(http.get("/v1/kv/wt/4").await.json()["v"], 40);
    let r = http.post("/v1/kv/wt/_mdelete", r#"{"keys": ["1", "99"]}"#).await;
    assert_eq!(statuses(&r), vec![204, 404], "{}", r.body);
    assert_eq!(http.get("/v1/kv/wt/1").await.status, 404);

    // Write-behind: the accepted items share one append (consecutive offsets).
    let r = http
        .post(
            "/v1/kv/wb/_mput",
            r#"{"items": [{"key": "10", "value": {"v": 1}}, {"key": "11", "value": {"v": null}},
                          {"key": "12", "value": {"v": 2}}, {"key": "10", "value": {"v": 3}}]}"#,
        )
        .await;
    assert_eq!(statuses(&r), vec![202, 400, 202, 202], "{}", r.body);
    let items = r.json()["items"].clone();
    let offsets: Vec<u64> = [0, 2, 3]
        .iter()
        .map(|&i| items[i]["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![offsets[0], offsets[0] + 1, offsets[0] + 2], "one append");
    assert_eq!(
        http.get("/v1/kv/wb/10").await.json()["v"],
        3,
        "later items of one key win"
    );
    let r = http
        .post("/v1/kv/wb/_mdelete", r#"{"items": [{"key": "12"}, {"key": "bad%"}]}"#)
        .await;
    assert_eq!(statuses(&r), vec![202, 400], "{}", r.body);
    crate::common::drained(&http).await;
    let rows: Vec<(i32, i32)> = db
        .sql
        .query("SELECT id, v FROM t WHERE id >= 10 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(10, 3)]);

    // In memory, and the bound on items.
    let r = http
        .post(
            "/v1/kv/mem/_mput",
            r#"{"items": [{"key": "a", "value": 1}, {"key": "b", "value": [2]}]}"#,
        )
        .await;
    assert_eq!(statuses(&r), vec![200, 200], "{}", r.body);
    assert_eq!(http.get("/v1/kv/mem/b").await.body, "[2]");
    let many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let r = http
        .post("/v1/kv/mem/_mdelete", serde_json::json!({ "keys": many }).to_string())
        .await;
    assert_eq!(
        (r.status.as_u16(), r.error()),
        (400, "bad_request".to_string()),
        "{}",
        r.body
    );
    server.shutdown().await;
}

#[test]
fn a_listener_others_can_reach_needs_a_credential() {
    let err = Config::parse("[server]\nlisten = \"0.0.0.0:7070\"\n")
        .expect_err("refused without a token")
        .to_string();
    assert!(
        err.contains("needs a credential") && err.contains("token_file"),
        "{err}"
    );
    let dir = cachesync_testkit::temp_dir("token", None);
    let short = dir.join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let err = Config::parse(&format!(
        "[server]\nlisten = \"0.0.0.0:7070\"\ntoken_file = \"{}\"\n",
        short.display()
    ))
    .expect_err("a weak token is refused")
    .to_string();
    assert!(err.contains("at least 16 characters") && !err.contains("abc"), "{err}");
    let good = dir.join("good");
    std::fs::write(&good, "0123456789abcdef0123\n").unwrap();
    let config = Config::parse(&format!(
        "[server]\nlisten = \"0.0.0.0:7070\"\ntoken_file = \"{}\"\n[[keyspace]]\nname = \"default\"\n",
        good.display()
    ))
    .expect("a token makes it acceptable");
    assert!(
        !format!("{config:?}").contains("0123456789abcdef0123"),
        "the token never shows in the config's debug output"
    );
}

#[tokio::test]
async fn with_a_token_every_route_but_the_probes_needs_it() {
    let token = "s3cret-token-0123456789";
    let server = serve_with_token("token", token).await;
    let base = format!("http://{}", server.local_addr());
    let client = reqwest::Client::new();
    let get = |path: &str, auth: Option<&str>| {
        let mut r = client.get(format!("{base}{path}"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    for (auth, what) in [
        (None, "no token"),
        (Some("Bearer wrong-token-0123456789"), "a wrong token"),
    ] {
        // A key read takes a direct path past the router (`api::Api`): it is refused the same way.
        for path in ["/v1/keyspaces", "/v1/kv/default/k"] {
            let r = get(path, auth).await.unwrap();
            assert_eq!(r.status(), 401, "{what}: {path}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized", "{what}: {path}");
            assert!(!body.to_string().contains(token), "the token is never echoed");
        }
    }
    let put = client
        .put(format!("{base}/v1/kv/default/k"))
        .body("{\"a\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 401, "writes too");
    let bearer = format!("Bearer {token}");
    assert_eq!(get("/v1/keyspaces", Some(&bearer)).await.unwrap().status(), 200);
    assert_eq!(get("/v1/kv/default/k", Some(&bearer)).await.unwrap().status(), 404);
    assert_eq!(get("/metrics", Some(&bearer)).await.unwrap().status(), 200);
    assert_eq!(
        get("/metrics", None).await.unwrap().status(),
        401,
        "metrics are not public"
    );
    // The probes answer orchestrators without credentials.
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    assert_eq!(get("/readyz", None).await.unwrap().status(), 200);
    server.shutdown().await;
}

/// One answer read off a keep-alive connection: status, headers (names lowercased) and body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads `n` answers off `s`, each framed by its `content-length` (none: no body, as for a 304).
async fn read_answers(s: &mut TcpStream, n: usize) -> Vec<Answer> {
    let mut buf: Vec<u8> = Vec::new();
    let mut answers = Vec::new();
    tokio::time::timeout(WAIT, async {
        while answers.len() < n {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buf[..end].to_vec()).expect("an ASCII head");
                let mut lines = head.split("\r\n");
                let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
                let headers: Vec<(String, String)> = lines
                    .map(|l| {
                        let (k, v) = l.split_once(':').unwrap();
                        (k.trim().to_ascii_lowercase(), v.trim().to_owned())
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap());
                if buf.len() >= end + 4 + len {
                    let body = buf[end + 4..end + 4 + len].to_vec();
                    buf.drain(..end + 4 + len);
                    answers.push((status, headers, body));
                    continue;
                }
            }
            let mut chunk = [0u8; 4096];
            let got = s.read(&mut chunk).await.expect("read");
            assert!(got > 0, "the server closed after {} answers", answers.len());
            buf.extend_from_slice(&chunk[..got]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} answers did not arrive"));
    assert!(
        buf.is_empty(),
        "nothing beyond the answers: {:?}",
        String::from_utf8_lossy(&buf)
    );
    answers
}

/// Reads one answer's head byte by byte, up to its blank line and no further (for an answer
/// whose `content-length` does not frame what follows: a `HEAD`'s, an interim `100`).
async fn read_head(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut head = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed before {what} arrived");
            head.push(byte[0]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} did not arrive"));
    head
}

/// The headers of an answer but `date`, sorted, to compare two answers.
fn comparable(a: &Answer) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut h: Vec<_> = a.1.iter().filter(|(k, _)| k != "date").cloned().collect();
    h.sort();
    (a.0, h, a.2.clone())
}

fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.1.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {a:?}"))
}

/// Key reads memory answers are written by the listener's own path (`api::fast`); everything
/// else goes to the handler or to hyper. Pipelined on one connection, in one write, every
/// request is answered, in order — hits, a miss, a 304, a request the own path hands to hyper
/// (a query string), a write, and reads after it.
#[tokio::test]
async fn pipelined_requests_of_every_kind_are_answered_in_order() {
    let (server, http) = serve(config("")).await;
    assert_eq!(http.put("/v1/kv/default/a", "{\"v\":1}").await.status, 200);
    let tag = http.get("/v1/kv/default/a").await.headers["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    let requests = format!(
        "GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\n\r\n\
         GET /v1/kv/default/missing HTTP/1.1\r\nHost: localhost\r\n\r\n\
         GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: {tag}\r\n\r\n\
         GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n\
         GET /v1/kv/default/a?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n\
         PUT /v1/kv/default/b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\n\r\n{{\"v\":2}}\
         GET /v1/kv/default/b HTTP/1.1\r\nHost: localhost\r\n\r\n\
         GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\n\r\n"
    );
    s.write_all(requests.as_bytes()).await.unwrap();
    let answers = read_answers(&mut s, 8).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(statuses, [200, 404, 304, 200, 200, 200, 200, 200], "{answers:?}");
    assert_eq!(answers[0].2, b"{\"v\":1}");
    assert_eq!(header(&answers[0], "x-cache"), "hit");
    assert_eq!(
        serde_json::from_slice::<Value>(&answers[1].2).unwrap()["error"],
        "not_found"
    );
    assert_eq!(header(&answers[2], "etag"), tag);
    assert!(answers[2].2.is_empty(), "a 304 has no body");
    assert_eq!(
        answers[6].2, b"{\"v\":2}",
        "the write is read back on the same connection"
    );
    assert_eq!(answers[7].2, b"{\"v\":1}");
    // A head that arrives in pieces is answered once whole.
    s.write_all(b"GET /v1/kv/def").await.unwrap();
    s.flush().await.unwrap();
    tokio::task::yield_now().await;
    s.write_all(b"ault/a HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answers = read_answers(&mut s, 1).await;
    assert_eq!((answers[0].0, answers[0].2.as_slice()), (200, &b"{\"v\":1}"[..]));
    server.shutdown().await;
}

/// A hit written by the listener's own path is the answer hyper and the handler give for the
/// same read (asked with a query string, which the own path hands to hyper): the same status,
/// headers and body — for a document, a 304 and, with a token, a refusal — and it is counted
/// in the request metrics.
#[tokio::test]
async fn a_hit_answers_exactly_as_the_handler_does() {
    let token = "parity-token-0123456789";
    let server = serve_with_token("fast-parity", token).await;
    let addr = server.local_addr();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let ask = |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").into_bytes();
    let mut setup = TcpStream::connect(addr).await.unwrap();
    setup
        .write_all(
            format!(
                "PUT /v1/kv/default/k HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 9\r\n\r\n{{\"v\":\"x\"}}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(read_answers(&mut setup, 1).await[0].0, 200);
    let metrics = |body: &[u8]| {
        String::from_utf8_lossy(body)
            .lines()
            .find(|l| {
                l.starts_with("cachesync_http_requests_total{")
                    && l.contains("op=\"get\"")
                    && l.contains("status=\"200\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let mut own = TcpStream::connect(addr).await.unwrap();
    let mut hyper = TcpStream::connect(addr).await.unwrap();
    own.write_all(&ask("/metrics", &auth)).await.unwrap();
    let before = metrics(&read_answers(&mut own, 1).await[0].2);
    let tag = {
        own.write_all(&ask("/v1/kv/default/k", &auth)).await.unwrap();
        header(&read_answers(&mut own, 1).await[0], "etag").to_owned()
    };
    for (extra, status) in [
        (auth.clone(), 200),
        (format!("{auth}If-None-Match: {tag}\r\n"), 304),
        (format!("{auth}If-None-Match: \"other\"\r\n"), 200),
        (String::new(), 401),
        ("Authorization: Bearer wrong-token-01234567\r\n".to_owned(), 401),
    ] {
        own.write_all(&ask("/v1/kv/default/k", &extra)).await.unwrap();
        hyper
            .write_all(&ask("/v1/kv/default/k?via=hyper", &extra))
            .await
            .unwrap();
        let (a, b) = (
            &read_answers(&mut own, 1).await[0],
            &read_answers(&mut hyper, 1).await[0],
        );
        assert_eq!(a.0, status, "{extra:?}: {a:?}");
        assert_eq!(comparable(a), comparable(b), "{extra:?}");
        assert!(a.1.iter().any(|(k, _)| k == "date"), "{a:?}");
    }
    own.write_all(&ask("/metrics", &auth)).await.unwrap();
    let after = metrics(&read_answers(&mut own, 1).await[0].2);
    // Own path: the etag read and two 200s; hyper's path: two 200s.
    assert_eq!(after - before, 5.0, "every 200 key read is counted");
    server.shutdown().await;
}

/// Key writes are the listener's own path too (`api::fast`): a `PUT` or `DELETE` whose head and
/// body are buffered runs through the handler with its whole body and answers exactly as the
/// same write through hyper (asked with a query string, which the own path hands over): the
/// same statuses, header names and bodies for a store, a failed precondition, a delete, a
/// second delete, a refusal without the token and a body that is not JSON. Nothing is written
/// by a refused write. A body that arrives after its head is answered once whole.
#[tokio::test]
async fn writes_on_the_own_path_answer_as_hyper_does() {
    let token = "write-parity-token-0123456789";
    let server = serve_with_token("fast-write-parity", token).await;
    let addr = server.local_addr();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let ask = |method: &str, path: &str, extra: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    // Status, header names and body (an error names its key: the two sides' keys differ).
    let names = |a: &Answer| {
        let mut n: Vec<String> = a.1.iter().map(|(k, _)| k.clone()).filter(|k| k != "date").collect();
        n.sort();
        (
            a.0,
            n,
            String::from_utf8_lossy(&a.2).replace("\\\"hyp\\\"", "\\\"own\\\""),
        )
    };
    let mut own = TcpStream::connect(addr).await.unwrap();
    let mut hyper = TcpStream::connect(addr).await.unwrap();
    let no_match = format!("{auth}If-Match: \"nope\"\r\n");
    let steps: [(&str, &str, &str, u16); 7] = [
        ("PUT", &auth, "{\"v\":1}", 200),
        ("PUT", &no_match, "{\"v\":9}", 412),
        ("PUT", "", "{\"v\":9}", 401),
        ("PUT", &auth, "{\"v\":", 400),
        ("PUT", &auth, "{\"v\":2}", 200),
        ("DELETE", &auth, "", 204),
        ("DELETE", &auth, "", 404),
    ];
    for (method, extra, body, status) in steps {
        own.write_all(&ask(method, "/v1/kv/default/own", extra, body))
            .await
            .unwrap();
        hyper
            .write_all(&ask(method, "/v1/kv/default/hyp?via=hyper", extra, body))
            .await
            .unwrap();
        let (a, b) = (
            &read_answers(&mut own, 1).await[0],
            &read_answers(&mut hyper, 1).await[0],
        );
        assert_eq!(a.0, status, "{method} {extra:?} {body:?}: {a:?}");
        assert_eq!(names(a), names(b), "{method} {extra:?} {body:?}");
        if status == 200 {
            // What was stored is read back, on the own path, as written.
            own.write_all(&ask("GET", "/v1/kv/default/own", &auth, ""))
                .await
                .unwrap();
            let read = &read_answers(&mut own, 1).await[0];
            assert_eq!((read.0, read.2.as_slice()), (200, body.as_bytes()), "{body}");
        }
    }
    // Both paths count each answer once, in the series of its keyspace, operation and status
    // (the commonest ones are held resolved; the others are looked up by label), and time it
    // in its operation's histogram; a refused token is counted by neither, as before.
    hyper.write_all(&ask("GET", "/metrics", &auth, "")).await.unwrap();
    let text = String::from_utf8(read_answers(&mut hyper, 1).await[0].2.clone()).unwrap();
    let count = |op: &str, status: u16| {
        metric(
            &text,
            &format!("cachesync_http_requests_total{{keyspace=\"default\",op=\"{op}\",status=\"{status}\"}}"),
        )
    };
    let counted = [
        ("put", 200),
        ("put", 412),
        ("put", 400),
        ("put", 401),
        ("delete", 204),
        ("delete", 404),
    ]
    .map(|(op, status)| (op, status, count(op, status)));
    assert_eq!(
        counted,
        [
            ("put", 200, 4.0),
            ("put", 412, 2.0),
            ("put", 400, 2.0),
            ("put", 401, 0.0),
            ("delete", 204, 2.0),
            ("delete", 404, 2.0)
        ]
    );
    let timed = |op: &str| {
        metric(
            &text,
            &format!("cachesync_http_request_duration_seconds_count{{op=\"{op}\"}}"),
        )
    };
    assert_eq!((timed("put"), timed("delete")), (8.0, 4.0));
    // The refused writes changed nothing: the key is gone after the delete, on both paths.
    own.write_all(&ask("GET", "/v1/kv/default/own", &auth, ""))
        .await
        .unwrap();
    assert_eq!(read_answers(&mut own, 1).await[0].0, 404);
    // A body that arrives after its head: answered once it is whole.
    let whole = ask("PUT", "/v1/kv/default/own", &auth, "{\"v\":3}");
    let split = whole.len() - 4;
    own.write_all(&whole[..split]).await.unwrap();
    own.flush().await.unwrap();
    tokio::task::yield_now().await;
    own.write_all(&whole[split..]).await.unwrap();
    let answers = read_answers(&mut own, 1).await;
    assert_eq!((answers[0].0, answers[0].2.as_slice()), (200, &b"{\"v\":3}"[..]));
    server.shutdown().await;
}

/// A key write's body on the own path is read before its handler runs, under the head's bound:
/// a body that never comes gets 408 within `header_read_timeout`, the connection is closed, and
/// nothing is written.
#[tokio::test]
async fn a_write_whose_body_never_arrives_is_cut_off() {
    let (server, http) = serve(config("header_read_timeout = \"1s\"")).await;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    s.write_all(b"PUT /v1/kv/default/late HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\n\r\n{\"v\"")
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_to_close(&mut s, WAIT).await;
    assert!(closed, "the connection is closed: {answer}");
    assert_cut_off(&answer, started.elapsed());
    // The detail names the body as well as the headers, and the setting that bounds both.
    let detail = parse(&answer).1["detail"].as_str().unwrap_or_default().to_string();
    assert!(
        detail.contains("its body") && detail.contains("server.header_read_timeout"),
        "{detail}"
    );
    assert_eq!(http.get("/v1/kv/default/late").await.status, 404, "nothing was written");
    server.shutdown().await;
}

/// A write the own path does not take whole goes to hyper, with the handler's answers: a body
/// over `server.max_body_bytes` gets 413 and the connection goes on; `Expect: 100-continue`
/// gets hyper's interim `100 Continue`, then the write's answer; a `DELETE` with a body is not
/// the own path's either.
#[tokio::test]
async fn writes_beside_the_own_path_get_hypers_semantics() {
    let (server, _http) = serve(config("max_body_bytes = 64")).await;
    let addr = server.local_addr();
    let big = format!("{{\"v\":\"{}\"}}", "x".repeat(100));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "PUT /v1/kv/default/big HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{big}\
             GET /v1/kv/default/big HTTP/1.1\r\nHost: localhost\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answers = read_answers(&mut s, 2).await;
    assert_eq!((answers[0].0, answers[1].0), (413, 404), "{answers:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&answers[0].2).unwrap()["error"],
        "payload_too_large"
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"PUT /v1/kv/default/e HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 7\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_head(&mut s, "100 Continue").await;
    assert!(
        interim.starts_with(b"HTTP/1.1 100 "),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(b"{\"v\":5}").await.unwrap();
    let answers = read_answers(&mut s, 1).await;
    assert_eq!((answers[0].0, answers[0].2.as_slice()), (200, &b"{\"v\":5}"[..]));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"DELETE /v1/kv/default/e HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}GET /v1/kv/default/e HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answers = read_answers(&mut s, 2).await;
    assert_eq!((answers[0].0, answers[1].0), (204, 404), "{answers:?}");
    server.shutdown().await;
}

/// Requests the listener's own path does not take are hyper's, with hyper's semantics: a
/// `Connection: close` or HTTP/1.0 read is answered and the connection closed, a chunked `GET`
/// and a `HEAD` are answered and the connection goes on; header names are matched in any case.
#[tokio::test]
async fn requests_beside_the_own_path_get_hypers_semantics() {
    let (server, http) = serve(config("")).await;
    let addr = server.local_addr();
    assert_eq!(http.put("/v1/kv/default/a", "{\"v\":1}").await.status, 200);
    for (req, what) in [
        (
            "GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            "Connection: close",
        ),
        ("GET /v1/kv/default/a HTTP/1.0\r\nHost: localhost\r\n\r\n", "HTTP/1.0"),
    ] {
        let answer = raw(addr, req.as_bytes()).await;
        // hyper answers an HTTP/1.0 request in HTTP/1.0.
        assert_eq!(answer.get(8..13), Some(" 200 "), "{what}: {answer}");
        assert!(answer.ends_with("{\"v\":1}"), "{what}: {answer}");
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /v1/kv/default/a HTTP/1.1\r\nhOsT: localhost\r\n\r\n\
          GET /v1/kv/default/a HTTP/1.1\r\nHOST: attacker.example\r\n\r\n\
          GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .unwrap();
    let answers = read_answers(&mut s, 4).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(statuses, [200, 421, 200, 200], "{answers:?}");
    assert_eq!(answers[2].2, b"{\"v\":1}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"HEAD /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\n\r\nGET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // A HEAD answer's content-length describes the body it does not carry: read it alone.
    let head = read_head(&mut s, "the HEAD answer").await;
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let answers = read_answers(&mut s, 1).await;
    assert_eq!((answers[0].0, answers[0].2.as_slice()), (200, &b"{\"v\":1}"[..]));
    server.shutdown().await;
}

/// The same pipelined requests arrive cut at every point of their bytes, in two writes: every
/// cut gets the same answers (a head or a body split across reads is waited for, never
/// answered early or twice).
#[tokio::test]
async fn pipelined_requests_cut_anywhere_get_the_same_answers() {
    let (server, http) = serve(config("")).await;
    assert_eq!(http.put("/v1/kv/default/a", "{\"v\":1}").await.status, 200);
    let requests: &[u8] = b"GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\n\r\n\
          GET /v1/kv/default/gone HTTP/1.1\r\nHost: localhost\r\n\r\n\
          PUT /v1/kv/default/b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\n\r\n{\"v\":2}\
          GET /v1/kv/default/b HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut expected = None;
    for cut in (1..requests.len()).step_by(5) {
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        s.write_all(&requests[..cut]).await.unwrap();
        s.flush().await.unwrap();
        tokio::task::yield_now().await;
        s.write_all(&requests[cut..]).await.unwrap();
        let answers: Vec<_> = read_answers(&mut s, 4).await.iter().map(comparable).collect();
        let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
        assert_eq!(statuses, [200, 404, 200, 200], "cut at {cut}");
        match &expected {
            None => expected = Some(answers),
            Some(first) => assert_eq!(&answers, first, "cut at {cut}"),
        }
    }
    server.shutdown().await;
}

/// Whether `bytes` is a run of whole HTTP/1.x answers (each head well formed, each body as long
/// as its `content-length`), possibly cut short at the end (the server closed mid-stream).
fn well_formed_answers(mut bytes: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    while !bytes.is_empty() {
        let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Err(format!("an answer's head is cut: {:?}", String::from_utf8_lossy(bytes)));
        };
        let head = std::str::from_utf8(&bytes[..end]).map_err(|e| e.to_string())?;
        let status_ok = head.len() >= 12
            && (head.starts_with("HTTP/1.1 ") || head.starts_with("HTTP/1.0 "))
            && head[9..12].bytes().all(|b| b.is_ascii_digit());
        if !status_ok {
            return Err(format!("not a status line: {head:?}"));
        }
        let len: usize = head
            .split("\r\n")
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if bytes.len() < end + 4 + len {
            return Err(format!("a body is cut: {head:?}"));
        }
        bytes = &bytes[end + 4 + len..];
        n += 1;
    }
    Ok(n)
}

/// Pipelined streams damaged at random (bytes flipped, dropped, doubled; cut short) are each
/// sent on a connection of their own and the write side closed: every connection ends within
/// the wait, whatever it is sent back is whole HTTP answers, and the server still answers a
/// plain read after all of them. (A fixed seed: the same cases every run.)
#[tokio::test]
async fn damaged_request_streams_get_whole_answers_or_a_close() {
    let (server, http) = serve(config("")).await;
    let addr = server.local_addr();
    assert_eq!(http.put("/v1/kv/default/a", "{\"v\":1}").await.status, 200);
    let clean: &[u8] = b"GET /v1/kv/default/a HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: \"x\"\r\n\r\n\
          GET /v1/kv/default/missing HTTP/1.1\r\nHost: localhost\r\n\r\n\
          PUT /v1/kv/default/b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\n\r\n{\"v\":2}\
          GET /v1/kv/default/b HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |below: usize| {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % below
    };
    let mut answered = 0;
    for case in 0..200 {
        let mut bytes = clean.to_vec();
        for _ in 0..1 + next(4) {
            let at = next(bytes.len());
            match next(4) {
                0 => bytes[at] ^= 1 << next(8),
                1 => {
                    bytes.remove(at);
                }
                2 => bytes.insert(at, bytes[at]),
                _ => bytes.truncate(at.max(1)),
            }
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let (text, closed) = read_to_close(&mut s, WAIT).await;
        assert!(
            closed,
            "case {case}: the connection ended; sent {:?}",
            String::from_utf8_lossy(&bytes)
        );
        match well_formed_answers(text.as_bytes()) {
            Ok(n) => answered += n,
            Err(e) => panic!("case {case}: {e}; sent {:?}", String::from_utf8_lossy(&bytes)),
        }
    }
    assert!(
        answered > 200,
        "most damaged streams still carry answerable requests: {answered}"
    );
    let r = http.get("/v1/kv/default/a").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "{\"v\":1}"));
    server.shutdown().await;
}
