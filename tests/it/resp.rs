//! The Redis-protocol front, driven by real Redis tools and clients: `redis-cli`,
//! `redis-benchmark`, the Rust `redis` crate, redis-py (RESP2 and RESP3), and raw sockets for
//! what no client sends (malformed and half-sent frames). Tables are real Postgres tables; the
//! tracking tests change rows in Postgres and wait for the invalidation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::BytesMut;
use cachesync::server::Server;
use cachesync_testkit::redis::cli_bin;
use cachesync_testkit::sidecar::Sidecar;
use cachesync_testkit::{eventually, temp_dir};
use redis::AsyncCommands;
use redis_protocol::resp3::decode::complete::decode;
use redis_protocol::resp3::types::OwnedFrame;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Db, Http, Node, WAIT, metric, start_text, until};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cachesync"))
}

/// `redis-cli -p <port> args…` (output and success; a failing command is not a failed run).
/// Async: the server under test may run on this very runtime.
async fn cli(addr: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new(cli_bin())
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .await
        .expect("run redis-cli");
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// Pipes a script of commands into one `redis-cli` connection; one output line per reply line.
async fn cli_script(addr: SocketAddr, extra: &[&str], script: &str) -> Vec<String> {
    let mut child = tokio::process::Command::new(cli_bin())
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A raw connection reading whole RESP frames (decoded by the `redis-protocol` crate).
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next frame, or `None` once the server closed the connection.
    async fn frame(&mut self) -> Option<OwnedFrame> {
        loop {
            if let Some((frame, used)) = decode(&self.buf).expect("the server writes valid RESP") {
                let _ = self.buf.split_to(used);
                return Some(frame);
            }
            let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a reply within the deadline")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    async fn cmd(&mut self, args: &[&str]) -> OwnedFrame {
        let mut wire = format!("*{}\r\n", args.len());
        for a in args {
            wire.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.send(wire.as_bytes()).await;
        self.frame().await.expect("a reply")
    }
}

/// Every string and number in a frame, depth first.
fn flat(f: &OwnedFrame) -> Vec<String> {
    match f {
        OwnedFrame::Array { data, .. } | OwnedFrame::Push { data, .. } => data.iter().flat_map(flat).collect(),
        OwnedFrame::Set { data, .. } => data.iter().flat_map(flat).collect(),
        OwnedFrame::Map { data, .. } => data.iter().flat_map(|(k, v)| [flat(k), flat(v)].concat()).collect(),
        other => vec![text(other)],
    }
}

fn text(f: &OwnedFrame) -> String {
    match f {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => {
            String::from_utf8_lossy(data).into_owned()
        }
        OwnedFrame::SimpleError { data, .. } => data.clone(),
        OwnedFrame::BlobError { data, .. } => String::from_utf8_lossy(data).into_owned(),
        OwnedFrame::Number { data, .. } => data.to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn redis_cli_works_against_the_embedded_default() {
    let sidecar = Sidecar::spawn(bin(), None);
    let addr = sidecar.resp.expect("the embedded default serves RESP");
    assert_eq!(cli(addr, &["ping"]).await, "PONG");
    assert_eq!(cli(addr, &["set", "a", "1"]).await, "OK");
    assert_eq!(cli(addr, &["get", "a"]).await, "1");
    assert_eq!(cli(addr, &["incr", "a"]).await, "2");
    assert_eq!(cli(addr, &["incrby", "a", "10"]).await, "12");
    assert_eq!(cli(addr, &["append", "a", "x"]).await, "3");
    assert_eq!(
        cli(addr, &["incr", "a"]).await,
        "ERR value is not an integer or out of range"
    );
    // One connection, a script with errors in the middle: every command answered, in order.
    let lines = cli_script(
        addr,
        &[],
        "set k v EX 100\nttl k\nfoo bar\nset n 5 NX\nset n 6 NX\nget n\nset n 7 XX GET\nget n\ngetdel n\nexists k n\ntype k\ntype n\nstrlen k\nselect 0\nselect 1\npersist k\nexpire k 1000 GT\npexpire k 5 LT\nmset x 1 y 2\nmget x y nothere\ndel x y nothere\necho hi\n",
    ).await;
    assert_eq!(
        lines,
        [
            "OK",
            "100",
            "ERR unknown command 'foo', with args beginning with: 'bar' ",
            "", // redis-cli follows an error with an empty line
            "OK",
            "",
            "5",
            "5",
            "7",
            "7",
            "1",
            "string",
            "none",
            "1",
            "OK",
            "ERR DB index is out of range",
            "",
            "1",
            "0",
            "1",
            "OK",
            "1",
            "2",
            "",
            "2",
            "hi",
        ],
        "{lines:#?}"
    );
    // The 5 ms expiry: the key goes away.
    eventually(WAIT, "k expires", || async {
        let ttl = cli(addr, &["pttl", "k"]).await;
        if ttl == "-2" { Ok(()) } else { Err(ttl) }
    })
    .await;
    assert_eq!(cli(addr, &["exists", "k"]).await, "0");
    // SCAN walks every key once; MATCH and COUNT.
    for i in 0..300 {
        cli_script(addr, &[], &format!("set scan:{i} v\n")).await;
    }
    let (mut cursor, mut seen) = ("0".to_string(), std::collections::BTreeSet::new());
    loop {
        let out = cli(addr, &["scan", &cursor, "match", "scan:*", "count", "7"]).await;
        let mut lines = out.lines();
        cursor = lines.next().unwrap().to_string();
        seen.extend(lines.map(str::to_string));
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(seen.len(), 300);
    assert!(cli(addr, &["dbsize"]).await.parse::<u64>().unwrap() >= 300);
    // What clients ask on connect.
    assert!(cli(addr, &["info", "server"]).await.contains("redis_version:7.2"));
    let info = cli(addr, &["info"]).await;
    for section in [
        "# Server",
        "# Clients",
        "# Stats",
        "# Keyspace",
        "connected_clients:1",
        "keyspace_hits:",
    ] {
        assert!(info.contains(section), "{section} in {info}");
    }
    assert_eq!(cli(addr, &["config", "get", "save"]).await, "save");
    assert_eq!(cli(addr, &["config", "get", "appendonly"]).await, "appendonly\nno");
    assert!(
        cli(addr, &["config", "set", "x", "y"])
            .await
            .starts_with("ERR CONFIG SET is not supported")
    );
    assert!(cli(addr, &["command", "count"]).await.parse::<u64>().unwrap() > 30);
    assert!(
        cli(addr, &["command", "docs", "get"])
            .await
            .contains("Returns the value of a key.")
    );
    let named = cli_script(
        addr,
        &[],
        "client setname app-1\nclient getname\nclient id\nclient list\n",
    )
    .await;
    assert_eq!(named[..2], ["OK", "app-1"]);
    assert!(
        named[3].contains("name=app-1") && named[3].contains("lib-name="),
        "{named:?}"
    );
    // RESP3 through redis-cli -3 (HELLO 3): maps come back as maps.
    let hello = cli(addr, &["-3", "hello", "3"]).await;
    assert!(hello.contains("proto") && hello.contains('3'), "{hello}");
    assert_eq!(cli(addr, &["-3", "get", "nothere"]).await, "");
    // An in-memory value written over RESP is served over HTTP as the same bytes.
    cli(addr, &["set", "bytes", "not json"]).await;
    let http = Http::at(sidecar.base_url());
    let got = http.get("/v1/kv/default/bytes").await;
    assert_eq!((got.status.as_u16(), got.body.as_str()), (200, "not json"));
    assert_eq!(got.header("content-type"), "application/octet-stream");
    let metrics = http.get("/metrics").await.body;
    assert!(metric(&metrics, "cachesync_resp_commands_total{command=\"get\",result=\"ok\"}") >= 1.0);
    assert!(
        metric(
            &metrics,
            "cachesync_resp_commands_total{command=\"other\",result=\"error\"}"
        ) >= 1.0
    );
    assert!(metric(&metrics, "cachesync_resp_bytes_total{direction=\"in\"}") > 0.0);
    assert!(metric(&metrics, "cachesync_resp_connections_total{result=\"accepted\"}") >= 10.0);
    assert!(metric(&metrics, "cachesync_cache_hits_total{keyspace=\"default\",tier=\"l1\"}") >= 1.0);
}

#[tokio::test]
async fn inline_commands_pipelines_and_random_payloads() {
    let (server, _http) = start_text(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[keyspace]]\nname = \"default\"\n[resp]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let addr = server.resp_addr().unwrap();
    let mut raw = Raw::connect(addr).await;
    // Inline, with quotes.
    raw.send(b"SET greeting \"hello world\"\r\nGET greeting\r\n").await;
    assert_eq!(text(&raw.frame().await.unwrap()), "OK");
    assert_eq!(text(&raw.frame().await.unwrap()), "hello world");
    // A pipeline of 100 commands in one write, answered in order.
    let mut wire = String::new();
    for i in 0..100 {
        wire.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\np{i}\r\n$1\r\n{}\r\n",
            format!("p{i}").len(),
            i % 10
        ));
    }
    for i in 0..100 {
        wire.push_str(&format!("*2\r\n$3\r\nGET\r\n${}\r\np{i}\r\n", format!("p{i}").len()));
    }
    raw.send(wire.as_bytes()).await;
    for _ in 0..100 {
        assert_eq!(text(&raw.frame().await.unwrap()), "OK");
    }
    for i in 0..100 {
        assert_eq!(text(&raw.frame().await.unwrap()), (i % 10).to_string());
    }
    // Any bytes round-trip exactly (in-memory keyspaces store bytes, not documents).
    let client = redis::Client::open(format!("redis://{addr}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _: () = conn.set("blob", &payload).await.unwrap();
    let back: Vec<u8> = conn.get("blob").await.unwrap();
    assert_eq!(back, payload);
    server.shutdown().await;
}

/// Raw bytes no client sends: each gets Redis's error (then the connection closes, as the
/// framing is lost) or a bounded wait; the server keeps serving everyone else.
#[tokio::test]
async fn malformed_oversized_and_half_sent_frames_get_errors_never_a_crash() {
    let (server, _http) = start_text(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[keyspace]]\nname = \"default\"\n[resp]\nlisten = \"127.0.0.1:0\"\nmax_bulk_bytes = \"1KiB\"\nmax_query_bytes = \"64KiB\"\nmax_inline_bytes = \"1KiB\"\nidle_timeout = \"1s\"\nmax_clients = 20\n",
    )
    .await;
    let addr = server.resp_addr().unwrap();
    let nested = "*1\r\n".repeat(10_000);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"*1\r\n:5\r\n".to_vec(), "ERR Protocol error: expected '$', got ':'"),
        (
            b"*2\r\n$3\r\nGET\r\n$99999999999\r\n".to_vec(),
            "ERR Protocol error: invalid bulk length",
        ),
        (b"*1\r\n$2000\r\n".to_vec(), "ERR Protocol error: invalid bulk length"),
        (
            b"*99999999\r\n".to_vec(),
            "ERR Protocol error: invalid multibulk length",
        ),
        (b"*x\r\n".to_vec(), "ERR Protocol error: invalid multibulk length"),
        (nested.into_bytes(), "ERR Protocol error: expected '$', got '*'"),
        (
            b"*1\r\n$3\r\nGETXX\r\n".to_vec(),
            "ERR Protocol error: bulk string not followed by CRLF",
        ),
        (vec![b'a'; 2000], "ERR Protocol error: too big inline request"),
        (
            b"set a \"unbalanced\r\n".to_vec(),
            "ERR Protocol error: unbalanced quotes in request",
        ),
    ];
    for (bytes, expected) in cases {
        let mut raw = Raw::connect(addr).await;
        raw.send(&bytes).await;
        let reply = raw.frame().await.expect("an error reply");
        assert_eq!(text(&reply), expected);
        assert!(raw.frame().await.is_none(), "then the connection closes");
    }
    // A bulk string within max_bulk_bytes but a request beyond max_query_bytes, sent whole.
    let mut raw = Raw::connect(addr).await;
    let mut big = b"*100\r\n".to_vec();
    for _ in 0..70 {
        big.extend_from_slice(b"$1000\r\n");
        big.extend_from_slice(&[b'x'; 1000]);
        big.extend_from_slice(b"\r\n");
    }
    raw.send(&big).await;
    assert!(text(&raw.frame().await.unwrap()).contains("larger than max_query_bytes"));
    // Half a frame, then silence: the idle timeout closes it (a bounded wait, not a hang).
    let mut raw = Raw::connect(addr).await;
    raw.send(b"*2\r\n$3\r\nGET\r\n$5\r\nab").await;
    assert!(raw.frame().await.is_none(), "closed by the idle timeout");
    // Unknown commands and wrong arities answer errors and keep the connection.
    let mut raw = Raw::connect(addr).await;
    assert!(text(&raw.cmd(&["FLUSHALL"]).await).starts_with("ERR unknown command 'FLUSHALL'"));
    assert_eq!(
        text(&raw.cmd(&["GET"]).await),
        "ERR wrong number of arguments for 'get' command"
    );
    assert!(text(&raw.cmd(&["CLIENT", "NOPE"]).await).contains("Try CLIENT HELP"));
    assert_eq!(text(&raw.cmd(&["PING"]).await), "PONG");
    drop(raw);
    // Garbage from many clients at once, then a well-behaved one is served.
    let mut junk = Vec::new();
    for i in 0..10u32 {
        junk.push(tokio::spawn(async move {
            let mut raw = Raw::connect(addr).await;
            let bytes: Vec<u8> = (0..4096u32).map(|j| ((i * 31 + j * 17) % 256) as u8).collect();
            raw.send(&bytes).await;
            while raw.frame().await.is_some() {}
        }));
    }
    for j in junk {
        j.await.unwrap();
    }
    let mut raw = Raw::connect(addr).await;
    assert_eq!(text(&raw.cmd(&["SET", "still", "up"]).await), "OK");
    assert_eq!(text(&raw.cmd(&["GET", "still"]).await), "up");
    // Past max_clients: Redis's error, and the others are unaffected. First every earlier
    // connection is gone (the server closes its side a moment after the client sees it).
    eventually(
        WAIT,
        "only this connection (and the asking one) are open",
        || async move {
            let mut asking = Raw::connect(addr).await;
            let info = flat(&asking.cmd(&["INFO", "clients"]).await).join("");
            if info.contains("connected_clients:2\r\n") {
                Ok(())
            } else {
                Err(info)
            }
        },
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..19 {
        let mut r = Raw::connect(addr).await;
        assert_eq!(text(&r.cmd(&["PING"]).await), "PONG");
        held.push(r);
    }
    let mut over = Raw::connect(addr).await;
    assert_eq!(text(&over.frame().await.unwrap()), "ERR max number of clients reached");
    assert_eq!(text(&raw.cmd(&["PING"]).await), "PONG");
    drop(held);
    server.shutdown().await;
}

#[tokio::test]
async fn a_password_is_required_off_loopback_and_checked_on_it() {
    let dir = temp_dir("resp-auth", None);
    let pw = dir.join("password");
    std::fs::write(&pw, "correct-horse-battery\n").unwrap();
    let off = cachesync::config::Config::parse("[[keyspace]]\nname = \"default\"\n[resp]\nlisten = \"0.0.0.0:6390\"\n")
        .expect_err("a non-loopback RESP listener needs a password");
    assert!(off.to_string().contains("[resp] password_file"), "{off}");
    let (server, _http) = start_text(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[keyspace]]\nname = \"default\"\n[resp]\nlisten = \"127.0.0.1:0\"\npassword_file = \"{}\"\n",
        pw.display()
    ))
    .await;
    let addr = server.resp_addr().unwrap();
    let mut raw = Raw::connect(addr).await;
    assert_eq!(text(&raw.cmd(&["GET", "a"]).await), "NOAUTH Authentication required.");
    assert!(text(&raw.cmd(&["AUTH", "wrong-password-here"]).await).starts_with("WRONGPASS"));
    assert!(text(&raw.cmd(&["HELLO", "3"]).await).starts_with("NOAUTH HELLO must be called"));
    assert_eq!(
        text(&raw.cmd(&["AUTH", "default", "correct-horse-battery"]).await),
        "OK"
    );
    assert_eq!(text(&raw.cmd(&["SET", "a", "1"]).await), "OK");
    assert_eq!(text(&raw.cmd(&["RESET"]).await), "RESET");
    assert_eq!(text(&raw.cmd(&["GET", "a"]).await), "NOAUTH Authentication required.");
    // HELLO 3 AUTH in one step, as RESP3 clients do.
    let hello = raw
        .cmd(&["HELLO", "3", "AUTH", "default", "correct-horse-battery"])
        .await;
    assert!(matches!(hello, OwnedFrame::Map { .. }), "{hello:?}");
    assert_eq!(text(&raw.cmd(&["GET", "a"]).await), "1");
    // redis-cli and the redis crate with the password in their usual places.
    assert_eq!(
        cli(addr, &["-a", "correct-horse-battery", "--no-auth-warning", "get", "a"]).await,
        "1"
    );
    let client = redis::Client::open(format!("redis://:correct-horse-battery@{addr}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let a: String = conn.get("a").await.unwrap();
    assert_eq!(a, "1");
    let log = std::fs::read_to_string(pw).unwrap();
    assert!(!format!("{:?}", server.state().server).contains(log.trim()));
    server.shutdown().await;
}

/// A config with a write-through table keyspace, a write-behind one, an in-memory default, and
/// the RESP front.
fn tables(node: &Node, db: &Db) -> String {
    node.config_text(
        db,
        "[[keyspace]]\nname = \"users\"\ntable = \"users\"\nkey = \"id\"\nwrite = \"through\"\ncdc = \"update\"\n\
         [[keyspace]]\nname = \"events\"\ntable = \"events\"\nkey = \"id\"\nwrite = \"behind\"\n\
         [[keyspace]]\nname = \"orders\"\ntable = \"orders\"\nkey = [\"tenant\", \"id\"]\nwrite = \"through\"\n\
         [[keyspace]]\nname = \"default\"\n",
        "[resp]\nlisten = \"127.0.0.1:0\"\n",
    )
}

async fn table_server() -> (Db, Server, Http) {
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL); INSERT INTO users VALUES (1, 'ada');\
         CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL);\
         CREATE TABLE orders (tenant text, id int, total int NOT NULL, PRIMARY KEY (tenant, id));\
         INSERT INTO orders VALUES ('acme,inc', 7, 70);",
    )
    .await;
    let node = Node::new();
    let (server, http) = node.start_text(&tables(&node, &db)).await;
    (db, server, http)
}

#[tokio::test]
async fn the_redis_crate_reads_and_writes_tables_through_their_pipelines() {
    let (db, server, http) = table_server().await;
    let addr = server.resp_addr().unwrap();
    let client = redis::Client::open(format!("redis://{addr}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // A row as JSON, exactly as HTTP serves it.
    let ada: String = conn.get("users:1").await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ada).unwrap(),
        json!({"id": 1, "name": "ada"})
    );
    assert_eq!(ada, http.get("/v1/kv/users/1").await.body);
    // Write-through: in Postgres before the OK.
    let _: () = conn.set("users:2", r#"{"name": "bob"}"#).await.unwrap();
    assert_eq!(db.scalar::<String>("SELECT name FROM users WHERE id = 2").await, "bob");
    // A pipeline, and MGET across a table and the default keyspace.
    let (a, b, missing): (String, String, Option<String>) = redis::pipe()
        .set("plain", "text")
        .ignore()
        .get("users:2")
        .get("plain")
        .get("users:99")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(a.contains("bob"));
    assert_eq!((b.as_str(), missing), ("text", None));
    let many: Vec<Option<String>> = conn.mget(&["users:1", "plain", "nothing"]).await.unwrap();
    assert!(many[0].as_ref().unwrap().contains("ada"));
    assert_eq!(many[1..], [Some("text".to_string()), None]);
    // MSET into a table: one transaction.
    let _: () = redis::cmd("MSET")
        .arg("users:3")
        .arg(r#"{"name":"cy"}"#)
        .arg("users:4")
        .arg(r#"{"name":"di"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM users").await, 4);
    // Errors say why, Redis-style, and change nothing.
    let bad: redis::RedisResult<()> = conn.set("users:5", "not json").await;
    assert!(format!("{}", bad.unwrap_err()).contains("not valid JSON"));
    let bad: redis::RedisResult<()> = conn.set_ex("users:5", r#"{"name":"e"}"#, 10).await;
    assert!(format!("{}", bad.unwrap_err()).contains("in-memory keyspaces only"));
    let bad: redis::RedisResult<i64> = conn.incr("users:1", 1).await;
    assert!(bad.is_err());
    let bad: redis::RedisResult<()> = conn.set("users:abc", r#"{"name":"x"}"#).await;
    assert!(bad.is_err(), "a key that is not an integer");
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM users").await, 4);
    // NX on a table: Postgres decides.
    let nx: Option<String> = redis::cmd("SET")
        .arg("users:1")
        .arg(r#"{"name":"zed"}"#)
        .arg("NX")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(nx, None);
    assert_eq!(db.scalar::<String>("SELECT name FROM users WHERE id = 1").await, "ada");
    // TTL of a row: it lives until deleted.
    let ttl: i64 = conn.ttl("users:1").await.unwrap();
    assert_eq!(ttl, -1);
    let n: i64 = conn.del(&["users:3", "users:4", "users:404"]).await.unwrap();
    assert_eq!(n, 2);
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM users").await, 2);
    // A composite key in its URL form: components in key order, a comma inside one as %2C.
    let order: String = conn.get("orders:acme%2Cinc,7").await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&order).unwrap(),
        json!({"tenant": "acme,inc", "id": 7, "total": 70})
    );
    let _: () = conn.set("orders:acme%2Cinc,8", r#"{"total": 80}"#).await.unwrap();
    assert_eq!(
        db.scalar::<i32>("SELECT total FROM orders WHERE tenant = 'acme,inc' AND id = 8")
            .await,
        80
    );
    // Write-behind: OK once durable in the log; Postgres gets it soon after.
    let _: () = conn.set("events:1", r#"{"kind":"signup"}"#).await.unwrap();
    let back: String = conn.get("events:1").await.unwrap();
    assert!(back.contains("signup"), "read-your-writes: {back}");
    eventually(WAIT, "the write-behind write reaches Postgres", || async {
        let n: i64 = db.scalar("SELECT count(*) FROM events WHERE kind = 'signup'").await;
        if n == 1 { Ok(()) } else { Err(n) }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_resp3_tracking_client_of_the_redis_crate_is_told_when_postgres_changes_a_row() {
    let (db, server, http) = table_server().await;
    let addr = server.resp_addr().unwrap();
    let client = redis::Client::open(format!("redis://{addr}/?protocol=resp3")).unwrap();
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ada: String = conn.get("users:1").await.unwrap();
    assert!(ada.contains("ada"));
    // The change happens in Postgres itself, not through the sidecar.
    db.exec("UPDATE users SET name = 'ada lovelace' WHERE id = 1").await;
    let push = tokio::time::timeout(WAIT, pushes.recv())
        .await
        .expect("an invalidation within the deadline")
        .expect("the push channel is open");
    assert_eq!(push.kind, redis::PushKind::Invalidate);
    assert_eq!(
        push.data,
        vec![redis::Value::Array(vec![redis::Value::BulkString(b"users:1".to_vec())])]
    );
    let now: String = conn.get("users:1").await.unwrap();
    assert!(now.contains("ada lovelace"), "{now}");
    // A write over HTTP is a change too; a key never read is not tracked.
    let _: String = conn.get("users:1").await.unwrap();
    assert_eq!(http.put("/v1/kv/users/1", r#"{"name":"ada b"}"#).await.status, 200);
    let push = tokio::time::timeout(WAIT, pushes.recv()).await.unwrap().unwrap();
    assert_eq!(push.kind, redis::PushKind::Invalidate);
    db.exec("UPDATE users SET name = 'nobody read me' WHERE id = 1").await;
    until(&http, "/v1/kv/users/1", "the change arrives", |r| {
        r.body.contains("nobody")
    })
    .await;
    assert!(
        pushes.try_recv().is_err(),
        "not read since its last invalidation: not tracked"
    );
    server.shutdown().await;
}

/// BCAST with a prefix, and RESP2 redirection to a connection subscribed to
/// `__redis__:invalidate`, as RESP2 clients do it.
#[tokio::test]
async fn bcast_and_resp2_redirect_deliver_invalidations_of_database_changes() {
    let (db, server, _http) = table_server().await;
    let addr = server.resp_addr().unwrap();
    let mut sub = Raw::connect(addr).await;
    let id = text(&sub.cmd(&["CLIENT", "ID"]).await);
    let reply = sub.cmd(&["SUBSCRIBE", "__redis__:invalidate"]).await;
    assert_eq!(flat(&reply), ["subscribe", "__redis__:invalidate", "1"]);
    let mut tracker = Raw::connect(addr).await;
    assert_eq!(
        text(
            &tracker
                .cmd(&["CLIENT", "TRACKING", "on", "REDIRECT", &id, "BCAST", "PREFIX", "users:"])
                .await
        ),
        "OK"
    );
    assert_eq!(text(&tracker.cmd(&["SET", "other", "x"]).await), "OK");
    db.exec("INSERT INTO users VALUES (7, 'gus')").await;
    let msg = sub.frame().await.expect("an invalidation message");
    assert_eq!(flat(&msg), ["message", "__redis__:invalidate", "users:7"]);
    // Option errors as Redis words them.
    let mut c = Raw::connect(addr).await;
    assert_eq!(
        text(&c.cmd(&["CLIENT", "TRACKING", "on", "PREFIX", "a"]).await),
        "ERR PREFIX option requires BCAST mode to be enabled"
    );
    assert_eq!(
        text(&c.cmd(&["CLIENT", "TRACKING", "on", "REDIRECT", "999999"]).await),
        "ERR The client ID you want redirect to does not exist"
    );
    server.shutdown().await;
}

/// In-memory keys over RESP3: OPTIN tracks only what follows `CLIENT CACHING yes`, NOLOOP
/// keeps the client's own writes quiet, another client's write and an expiry both invalidate.
#[tokio::test]
async fn optin_noloop_and_expiry_invalidations_of_in_memory_keys() {
    let (server, _http) = start_text(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[keyspace]]\nname = \"default\"\n[resp]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let addr = server.resp_addr().unwrap();
    let mut other = Raw::connect(addr).await;
    for k in ["a", "b"] {
        assert_eq!(text(&other.cmd(&["SET", k, "1"]).await), "OK");
    }
    let mut me = Raw::connect(addr).await;
    assert!(matches!(me.cmd(&["HELLO", "3"]).await, OwnedFrame::Map { .. }));
    assert_eq!(
        text(&me.cmd(&["CLIENT", "TRACKING", "on", "OPTIN", "NOLOOP"]).await),
        "OK"
    );
    assert_eq!(text(&me.cmd(&["CLIENT", "CACHING", "yes"]).await), "OK");
    assert_eq!(text(&me.cmd(&["GET", "a"]).await), "1");
    assert_eq!(
        text(&me.cmd(&["GET", "b"]).await),
        "1",
        "not after CACHING yes: not tracked"
    );
    // Another client's writes: only the tracked key is invalidated.
    assert_eq!(text(&other.cmd(&["SET", "b", "2"]).await), "OK");
    assert_eq!(text(&other.cmd(&["SET", "a", "2"]).await), "OK");
    let push = me.frame().await.unwrap();
    assert!(matches!(push, OwnedFrame::Push { .. }), "{push:?}");
    assert_eq!(flat(&push), ["invalidate", "a"]);
    // Its own write of a key it tracks: NOLOOP, nothing; a PING proves nothing was queued.
    assert_eq!(text(&me.cmd(&["CLIENT", "CACHING", "yes"]).await), "OK");
    assert_eq!(text(&me.cmd(&["GET", "a"]).await), "2");
    assert_eq!(text(&me.cmd(&["SET", "a", "3"]).await), "OK");
    assert_eq!(text(&me.cmd(&["PING"]).await), "PONG");
    // A tracked key that expires is invalidated too, with nothing else touching the cache.
    assert_eq!(text(&other.cmd(&["SET", "t", "v", "PX", "100"]).await), "OK");
    assert_eq!(text(&me.cmd(&["CLIENT", "CACHING", "yes"]).await), "OK");
    assert_eq!(text(&me.cmd(&["GET", "t"]).await), "v");
    let push = me.frame().await.expect("an invalidation once t expires");
    assert_eq!(flat(&push), ["invalidate", "t"]);
    let info = flat(&me.cmd(&["CLIENT", "TRACKINGINFO"]).await).join(" ");
    assert!(info.contains("optin") && info.contains("noloop"), "{info}");
    server.shutdown().await;
}

/// The Python client, in a virtualenv made by `deploy/dev/client-tools.sh`.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var("CACHESYNC_CLIENT_VENV").map_or_else(|_| root.join("target/client-tools"), PathBuf::from);
    let py = venv.join("bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import redis"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "redis-py was not found in {}: run deploy/dev/client-tools.sh (it installs redis==8.1.0 from PyPI into target/client-tools), or point CACHESYNC_CLIENT_VENV at a virtualenv that has it",
        venv.display()
    );
    py
}

const PY_CLIENT: &str = r#"
import json, sys, time, redis
port, proto = int(sys.argv[1]), int(sys.argv[2])
r = redis.Redis(host="127.0.0.1", port=port, protocol=proto, decode_responses=True)
out = {"ping": r.ping(), "set": r.set("py:k", "v1"), "get": r.get("py:k")}
p = r.pipeline(transaction=False)
p.set("py:a", "1"); p.incr("py:a"); p.get("py:a"); p.get("users:1")
out["pipeline"] = p.execute()
out["mget"] = r.mget(["py:a", "py:k", "py:none"])
out["row"] = json.loads(r.get("users:1"))
out["setex"] = r.setex("py:t", 100, "x")
out["ttl"] = r.ttl("py:t")
try:
    r.set("users:9", "not json")
    out["bad"] = "accepted"
except redis.ResponseError as e:
    out["bad"] = str(e)
if proto == 3:
    seen = []
    t = redis.Redis(host="127.0.0.1", port=port, protocol=3, decode_responses=True)
    conn = t.connection_pool.get_connection()
    conn.send_command("CLIENT", "TRACKING", "ON")
    assert conn.read_response() == "OK"
    conn.send_command("GET", "users:1")
    conn.read_response()
    def on_push(msg):
        seen.append(msg)
    conn._parser.set_invalidation_push_handler(on_push)
    print("READY", flush=True)
    deadline = time.time() + 20
    while not seen and time.time() < deadline:
        if conn.can_read(timeout=0.2):
            conn.read_response(push_request=True)
    out["invalidated"] = seen
print(json.dumps(out), flush=True)
"#;

#[tokio::test]
async fn redis_py_speaks_resp2_and_resp3_and_receives_invalidations() {
    let py = python();
    let (db, server, _http) = table_server().await;
    let addr = server.resp_addr().unwrap();
    for proto in ["2", "3"] {
        let mut child = tokio::process::Command::new(&py)
            .args(["-c", PY_CLIENT, &addr.port().to_string(), proto])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut result = None;
        while let Ok(Ok(Some(line))) = tokio::time::timeout(WAIT, lines.next_line()).await {
            if line == "READY" {
                // The script tracks users:1 now: change the row in Postgres itself.
                db.exec(&format!(
                    "UPDATE users SET name = 'changed by proto {proto}' WHERE id = 1"
                ))
                .await;
            } else {
                result = Some(line);
                break;
            }
        }
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "redis-py (protocol {proto}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out: serde_json::Value = serde_json::from_str(&result.expect("a result line")).unwrap();
        assert_eq!(out["ping"], true);
        assert_eq!((out["set"].clone(), out["get"].clone()), (json!(true), json!("v1")));
        assert_eq!(
            out["pipeline"].as_array().unwrap()[0..3],
            [json!(true), json!(2), json!("2")]
        );
        assert!(out["pipeline"][3].as_str().unwrap().contains("\"id\":1"));
        assert_eq!(out["mget"], json!(["2", "v1", null]));
        assert_eq!(out["row"]["id"], 1);
        assert_eq!(out["setex"], true);
        assert_eq!(out["ttl"], 100);
        assert!(out["bad"].as_str().unwrap().contains("not valid JSON"), "{out}");
        if proto == "3" {
            let shown = out["invalidated"].to_string();
            assert!(
                shown.contains("users:1"),
                "the tracking client heard of the change: {shown}"
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn redis_benchmark_runs_to_completion_and_unsupported_commands_fail_cleanly() {
    let sidecar = Sidecar::spawn(bin(), None);
    let addr = sidecar.resp.unwrap();
    let bench = cachesync_testkit::find_program(
        "redis-benchmark",
        "CACHESYNC_REDIS_BENCHMARK",
        &[PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")],
    )
    .expect("redis-benchmark was not found: install it with `apt-get install -y redis-tools` or run deploy/dev/install-deps.sh");
    let run = |tests: &str, pipeline: &str| {
        Command::new(&bench)
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
            .args(["-t", tests, "-n", "3000", "-c", "10", "-d", "100", "-q", "-P", pipeline])
            .output()
            .expect("run redis-benchmark")
    };
    for pipeline in ["1", "16"] {
        let out = run("ping,set,get,incr,mset", pipeline);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "redis-benchmark -P {pipeline}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET (10 keys)"] {
            let done = stdout
                .split(['\r', '\n'])
                .any(|l| l.trim_start().starts_with(&format!("{test}: ")) && l.contains("requests per second"));
            assert!(done, "{test} finished (-P {pipeline}): {stdout}");
        }
    }
    // An unsupported command: redis-benchmark (7.x) stops at the first error reply, which names
    // the command; the server carries on.
    let out = run("lpush", "1");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("ERR unknown command 'LPUSH'"),
        "LPUSH is refused by name: {all}"
    );
    assert_eq!(cli(addr, &["ping"]).await, "PONG");
    let info = cli(addr, &["info", "stats"]).await;
    let processed: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(processed >= 2 * 6 * 3000, "{processed}");
    assert_eq!(
        cli(addr, &["get", "key:__rand_int__"]).await.len(),
        100,
        "the SET payload is there"
    );
}
