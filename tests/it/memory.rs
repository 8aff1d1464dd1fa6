//! Memory bounds, measured on the real process: a `max_bytes` keyspace filled well past its
//! bound over RESP holds no more than the bound in resident memory, and no much less either —
//! so a byte bound means what it says, for both stores.

use std::path::Path;

use cachesync_testkit::rss_bytes;
use cachesync_testkit::sidecar::Sidecar;

use crate::common::{Http, metric};

const BOUND: u64 = 64 << 20;
const VALUE: usize = 200;
const BATCH: usize = 2_000;
const CLIENTS: usize = 4;

/// Writes keys `from..from + n` (16 bytes each, `VALUE`-byte values) in pipelined batches.
async fn fill(conn: &mut redis::aio::MultiplexedConnection, from: usize, n: usize) {
    for start in (from..from + n).step_by(BATCH) {
        let mut pipe = redis::pipe();
        for i in start..(start + BATCH).min(from + n) {
            let value: Vec<u8> = (0..VALUE).map(|j| b'a' + ((i * 31 + j * 7) % 26) as u8).collect();
            pipe.set(format!("key:{i:012}"), value).ignore();
        }
        let () = pipe.query_async(conn).await.expect("pipelined SETs");
    }
}

/// A connection that waits for its answers however long they take: a loaded machine (a debug
/// build, or the suite's other tests beside a sidecar that has just started) can take longer
/// than the client's default 500 ms over a batch of `BATCH` SETs.
async fn patient(client: &redis::Client) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect")
}

/// Writes keys `from..from + n` over `CLIENTS` connections at once, as an application's many
/// clients would (the server's worker threads all take writes).
async fn fill_concurrently(client: &redis::Client, from: usize, n: usize) {
    let share = n.div_ceil(CLIENTS);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut conn = patient(client).await;
        let start = from + c * share;
        let count = share.min((from + n).saturating_sub(start));
        tasks.push(tokio::spawn(async move { fill(&mut conn, start, count).await }));
    }
    for t in tasks {
        t.await.expect("a filling client");
    }
}

async fn weighed(http: &Http) -> f64 {
    let text = http.get("/metrics").await.body;
    metric(&text, "cachesync_cache_weighted_size_bytes{keyspace=\"default\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_bytes_keyspace_filled_past_its_bound_holds_about_the_bound_in_rss() {
    for store in ["cache", "compact"] {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[keyspace]]\nname = \"default\"\nstore = \"{store}\"\nmax_bytes = \"{BOUND}\"\nttl = \"24h\"\n[resp]\nlisten = \"127.0.0.1:0\"\n"
        );
        let sidecar = Sidecar::spawn(Path::new(env!("CARGO_BIN_EXE_cachesync")), Some(&config));
        let http = Http::new(sidecar.addr);
        let client = redis::Client::open(format!("redis://{}", sidecar.resp.expect("RESP is on"))).expect("client");
        let mut conn = patient(&client).await;
        // A first small batch brings up the connection's buffers and the allocator's pools, so
        // the baseline below is the server at work, not at rest.
        fill(&mut conn, 0, BATCH).await;
        let before = rss_bytes(sidecar.pid());
        // Twice what the bound holds at the smallest per-entry cost either store charges, so
        // the bound is reached and then its whole content is replaced at least once.
        let n = (2 * BOUND / (16 + VALUE as u64 + 100)) as usize;
        fill_concurrently(&client, BATCH, n).await;
        let held: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.expect("DBSIZE");
        let grown = rss_bytes(sidecar.pid()).saturating_sub(before);
        let weighed = weighed(&http).await;
        let ratio = grown as f64 / BOUND as f64;
        eprintln!(
            "store {store}: wrote {n} entries, holds {held}, weighed {weighed:.0} B, RSS grew {grown} B = {ratio:.3} × the bound"
        );
        assert!(
            weighed <= BOUND as f64,
            "{store}: the weighed size {weighed} stays within the bound {BOUND}"
        );
        assert!(
            (held as usize) < n,
            "{store}: the bound evicted entries (holds {held} of {n})"
        );
        assert!(
            (0.9..=1.1).contains(&ratio),
            "{store}: RSS grew {grown} B for a {BOUND} B bound ({ratio:.3}×): the weights do not reflect the real cost per entry"
        );
    }
}
