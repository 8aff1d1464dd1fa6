//! The harness itself: its servers are real and reachable over loopback sockets.

use cachesync_testkit as testkit;

use crate::common::Db;

#[tokio::test]
async fn postgres_is_real_and_logical_replication_ready() {
    let db = Db::new().await;
    let level: String = db.scalar("SHOW wal_level").await;
    assert_eq!(level, "logical");
    let version: i32 = db.scalar("SELECT current_setting('server_version_num')::int").await;
    assert!(version >= 140000, "server version {version}");
    // Each test has its own database.
    let other = Db::new().await;
    assert_ne!(db.db.name, other.db.name);
}

#[tokio::test]
async fn redis_is_real_and_prefixes_are_per_test() {
    let server = testkit::redis::shared();
    let client = redis::Client::open(server.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let (a, b) = (server.key_prefix(), server.key_prefix());
    assert_ne!(a, b);
    let _: () = redis::cmd("SET")
        .arg(format!("{a}k"))
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let got: Option<String> = redis::cmd("GET")
        .arg(format!("{a}k"))
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(got.as_deref(), Some("1"));
    let other: Option<String> = redis::cmd("GET")
        .arg(format!("{b}k"))
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(other, None);
}

/// Sends an inline `PING` and reads the reply (`None` when the link closed).
async fn ping(s: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"PING\r\n").await.ok()?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(crate::common::WAIT, s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn the_fault_link_forwards_delays_cuts_blackholes_and_refuses() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    let redis = testkit::redis::shared();
    let target: std::net::SocketAddr = redis
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("redis listens on a socket address");
    let link = testkit::faultlink::FaultLink::start(target).await;

    // Forwards both ways.
    let mut s = TcpStream::connect(link.addr()).await.unwrap();
    assert_eq!(ping(&mut s).await.as_deref(), Some("+PONG\r\n"));
    assert!(link.forwarded() >= 13);

    // Delays each direction: a round trip takes at least twice the delay.
    link.set_delay(Duration::from_millis(50));
    let started = Instant::now();
    assert_eq!(ping(&mut s).await.as_deref(), Some("+PONG\r\n"));
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    link.set_delay(Duration::ZERO);

    // Blackholes: the request is read and dropped; nothing reaches the server, nothing closes.
    link.blackhole(true);
    let before = (link.forwarded(), link.swallowed());
    {
        use tokio::io::AsyncWriteExt;
        s.write_all(b"PING\r\n").await.unwrap();
    }
    testkit::eventually(crate::common::WAIT, "the blackhole swallows the request", || async {
        if link.swallowed() >= before.1 + 6 {
            Ok(())
        } else {
            Err(link.swallowed())
        }
    })
    .await;
    assert_eq!(link.forwarded(), before.0, "nothing was forwarded");
    link.blackhole(false);

    // Cuts every open connection: the client sees the close.
    let mut other = TcpStream::connect(link.addr()).await.unwrap();
    assert_eq!(ping(&mut other).await.as_deref(), Some("+PONG\r\n"));
    link.cut();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(crate::common::WAIT, other.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    // And serves new connections afterwards.
    let mut fresh = TcpStream::connect(link.addr()).await.unwrap();
    assert_eq!(ping(&mut fresh).await.as_deref(), Some("+PONG\r\n"));

    // Refuses: a new connection is closed at once.
    link.refuse(true);
    let mut refused = TcpStream::connect(link.addr()).await.unwrap();
    assert_eq!(ping(&mut refused).await, None);
    link.refuse(false);
    let mut again = TcpStream::connect(link.addr()).await.unwrap();
    assert_eq!(ping(&mut again).await.as_deref(), Some("+PONG\r\n"));
}
