//! The Redis-protocol front: existing Redis clients and tools (`redis-cli`, `redis-benchmark`,
//! client libraries) talk to the sidecar's keyspaces unchanged.
//!
//! - [`config`]: `[resp]` — address, password, default keyspace, bounds.
//! - [`frame`]: takes whole commands (RESP arrays and inline lines) off the read buffer,
//!   bounded; [`reply`]: replies encoded in RESP2 or RESP3.
//! - [`conn`]: one connection — read, frame every complete command in the buffer, run them in
//!   order, answer the whole batch with one write (pipelining); invalidation pushes between.
//!   [`session`]: the connection's state the commands change.
//! - [`commands`]: the data commands and how a key routes to a keyspace; [`admin`]: the
//!   connection and server commands (`HELLO`, `AUTH`, `CLIENT`, `INFO`, `CONFIG`, `COMMAND`…)
//!   and the command table.
//! - [`tracking`]: `CLIENT TRACKING`, fed by every change the keyspaces' door lets through —
//!   including Postgres's own, through CDC.
//!
//! Keys: `keyspace:key` routes to the keyspace when the part before the first `:` names one;
//! any other key goes, whole, to `[resp] default_keyspace`. Values: a table's keyspace reads
//! and writes JSON documents exactly as over HTTP (write-through or write-behind as
//! configured); an in-memory keyspace stores any bytes, with per-key expiry.
//!
//! The listener is on by default on 127.0.0.1:6380 in the embedded default (no config file);
//! a config file turns it on with a `[resp]` section. Only loopback may go without a password.

pub mod admin;
pub mod commands;
pub mod config;
pub mod conn;
pub mod frame;
pub mod reply;
pub mod session;
pub mod tracking;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::lifecycle::Tasks;
use crate::metrics::{counter, counter1, gauge1};
use crate::patterns::Pipeline;
pub use config::RespConfig;
use tracking::{ClientId, Tracking};

/// The Redis version this front reports (`INFO`, `HELLO`): modern clients enable the features
/// it implements (RESP3, `CLIENT SETINFO`) from it.
pub const REDIS_VERSION: &str = "7.2.4";

/// The name a client uses for `key` of `keyspace`: bare in the default keyspace, else
/// `keyspace:key` (what `SCAN` lists and what BCAST tracking sends).
pub fn public_name(default_keyspace: Option<&str>, keyspace: &str, key: &str) -> String {
    if default_keyspace == Some(keyspace) {
        key.to_string()
    } else {
        format!("{keyspace}:{key}")
    }
}

/// `cachesync_resp_*` metrics. Command labels are the command table's names (or `other`), so
/// the label set is bounded.
pub struct RespMetrics {
    /// `cachesync_resp_connections`: open now.
    pub connections: IntGauge,
    /// `cachesync_resp_connections_total{result="accepted|refused"}`
    pub accepted: IntCounter,
    pub refused: IntCounter,
    /// `cachesync_resp_commands_total{command,result="ok|error"}`, resolved per command.
    commands: Vec<(IntCounter, IntCounter)>,
    other: (IntCounter, IntCounter),
    /// `cachesync_resp_bytes_total{direction="in|out"}`
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
}

impl RespMetrics {
    fn new(r: &prometheus::Registry) -> (RespMetrics, IntCounter, IntGauge) {
        let conns = counter(
            r,
            "cachesync_resp_connections_total",
            "RESP connections, by result (accepted, refused over max_clients)",
            &["result"],
        );
        let cmds: IntCounterVec = counter(
            r,
            "cachesync_resp_commands_total",
            "RESP commands run, by command and result (ok, error)",
            &["command", "result"],
        );
        let bytes = counter(
            r,
            "cachesync_resp_bytes_total",
            "Bytes read from and written to RESP clients",
            &["direction"],
        );
        let pair = |name: &str| {
            (
                cmds.with_label_values(&[name, "ok"]),
                cmds.with_label_values(&[name, "error"]),
            )
        };
        let m = RespMetrics {
            connections: gauge1(r, "cachesync_resp_connections", "RESP connections open now"),
            accepted: conns.with_label_values(&["accepted"]),
            refused: conns.with_label_values(&["refused"]),
            commands: admin::COMMANDS.iter().map(|c| pair(c.name)).collect(),
            other: pair("other"),
            bytes_in: bytes.with_label_values(&["in"]),
            bytes_out: bytes.with_label_values(&["out"]),
        };
        let sent = counter1(
            r,
            "cachesync_resp_invalidations_total",
            "Client-tracking invalidations sent to RESP clients",
        );
        let tracked = gauge1(
            r,
            "cachesync_resp_tracking_keys",
            "Keys remembered for default-mode client tracking",
        );
        (m, sent, tracked)
    }

    /// Adds `n` commands of table index `index` (`None`: unknown) with result `ok`.
    pub fn commands(&self, index: Option<usize>, ok: bool, n: u64) {
        let (good, bad) = index.and_then(|i| self.commands.get(i)).unwrap_or(&self.other);
        if ok { good.inc_by(n) } else { bad.inc_by(n) }
    }
}

/// What `CLIENT LIST` and `INFO` show of one connection.
pub struct ClientInfo {
    pub id: ClientId,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    pub created: Instant,
    /// Milliseconds after `created` of the last command.
    pub last_active_ms: AtomicU64,
    pub proto: AtomicU8,
    /// Index in the command table of the last command (`usize::MAX`: none yet).
    pub last_cmd: AtomicUsize,
    /// Name, library name and version (`CLIENT SETNAME`, `CLIENT SETINFO`), tracking.
    pub names: Mutex<Names>,
}

#[derive(Default, Clone)]
pub struct Names {
    pub name: String,
    pub lib_name: String,
    pub lib_ver: String,
    pub tracking: bool,
}

/// Counters `INFO stats` reports.
#[derive(Default)]
pub struct Stats {
    pub connections_received: AtomicU64,
    pub commands_processed: AtomicU64,
    pub rejected_connections: AtomicU64,
}

/// The RESP front of one server: shared by every connection.
pub struct Front {
    pub config: RespConfig,
    pub state: Arc<AppState>,
    /// The keyspace that takes keys naming none (resolved at start).
    pub default_keyspace: Option<String>,
    pub tracking: Arc<Tracking>,
    pub metrics: RespMetrics,
    pub stats: Stats,
    pub clients: Mutex<BTreeMap<ClientId, Arc<ClientInfo>>>,
    pub started: Instant,
    next_id: AtomicU64,
}

impl Front {
    /// Builds the front over the server's pipelines and registers its metrics; every keyspace
    /// reports its changes to the front's client tracking from now on.
    pub fn new(config: RespConfig, state: Arc<AppState>) -> Arc<Front> {
        let default_keyspace = config.default_keyspace.clone().or_else(|| {
            state
                .pipelines
                .contains_key(config::DEFAULT_KEYSPACE)
                .then(|| config::DEFAULT_KEYSPACE.to_string())
        });
        let (metrics, sent, tracked) = RespMetrics::new(&state.metrics.registry);
        let tracking = Arc::new(Tracking::new(
            config.tracking_max_keys,
            default_keyspace.clone(),
            sent,
            tracked,
        ));
        for p in state.pipelines.values() {
            p.keyspace().set_watch(tracking.clone());
        }
        Arc::new(Front {
            config,
            state,
            default_keyspace,
            tracking,
            metrics,
            stats: Stats::default(),
            clients: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.state.pipelines.get(name)
    }

    fn register(&self, addr: SocketAddr, laddr: SocketAddr) -> Arc<ClientInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(ClientInfo {
            id,
            addr,
            laddr,
            created: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            proto: AtomicU8::new(2),
            last_cmd: AtomicUsize::new(usize::MAX),
            names: Mutex::new(Names::default()),
        });
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, info.clone());
        info
    }

    fn unregister(&self, id: ClientId) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.tracking.disconnect(id);
    }

    /// Every open connection, by id.
    pub fn client_list(&self) -> Vec<Arc<ClientInfo>> {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// How often, while a client tracks keys, the in-memory keyspaces' expired documents are
/// swept (so their invalidations go out within about this long of their expiry, as Redis's
/// active expiry does, even when nothing else touches the cache).
pub const TRACKING_SWEEP: std::time::Duration = std::time::Duration::from_millis(250);

/// While any client tracks, sweeps the in-memory keyspaces every [`TRACKING_SWEEP`].
async fn sweep_expired(front: Arc<Front>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TRACKING_SWEEP) => {}
        }
        if front.tracking.is_active() {
            for p in front.state.pipelines.values().filter(|p| p.is_in_memory()) {
                p.keyspace().housekeep().await;
            }
        }
    }
}

/// Serves RESP on `listener` until `stop`, each connection a task of `tasks`; beyond
/// `max_clients` a connection is answered Redis's error and closed.
pub async fn serve(listener: TcpListener, front: Arc<Front>, stop: CancellationToken, tasks: Tasks) {
    tasks.spawn(sweep_expired(front.clone(), stop.clone()));
    let slots = Arc::new(Semaphore::new(front.config.max_clients));
    let laddr = listener.local_addr().ok();
    loop {
        let Some((stream, peer)) = crate::lifecycle::accept(&listener, &stop, "resp").await else {
            return;
        };
        front.stats.connections_received.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            front.metrics.refused.inc();
            front.stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(conn::refuse(stream));
            continue;
        };
        front.metrics.accepted.inc();
        let info = front.register(peer, laddr.unwrap_or(peer));
        let (front, stop) = (front.clone(), stop.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let id = info.id;
            front.metrics.connections.inc();
            conn::serve_connection(front.clone(), stream, info, stop).await;
            front.metrics.connections.dec();
            front.unregister(id);
        });
    }
}
