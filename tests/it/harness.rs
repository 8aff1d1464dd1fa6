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
