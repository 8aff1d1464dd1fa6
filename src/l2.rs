//! The shared L2 tier on Redis (one server or a Redis Cluster) behind each node's L1, and the
//! cross-node invalidation that keeps every L1 from going silently stale.
//!
//! What it owns, and the rules:
//! - **Versioned records** ([`record`]). Every value in Redis carries the version L1 orders by
//!   (source position, transaction, a load's snapshot). Every write to Redis is the
//!   compare-and-set script ([`script::CAS`]): a slow fill, a late change or a retried write
//!   never replaces newer state. A delete leaves a versioned tombstone, an invalidation an
//!   "unknown since" marker, for `tombstone_ttl` — longer than a load can take — so a racing
//!   fill cannot put the old row back.
//! - **Fills are not broadcast.** A load from Postgres is written to L2 (compare-and-set) and
//!   nothing else. Only changes — writes, write-behind flushes, CDC — are announced.
//! - **A sequenced, resumable channel.** Changes are announced on a Redis Stream per keyspace
//!   ([`script::ANNOUNCE`]): each entry carries the stream's *epoch* (a random id kept in the
//!   keyspace's meta hash, recreated when Redis loses it) and a gap-free sequence number. Every
//!   node reads every stream from its last entry id, so a dropped connection loses nothing: the
//!   reader reconnects and resumes.
//! - **Gaps make entries suspect, never a flush.** A sequence that jumps (the stream was trimmed
//!   past the reader), goes back, or an epoch that changed (Redis restarted empty, was flushed,
//!   or failed over to a replica that had not seen the latest entries) marks every L1 entry
//!   confirmed before that moment *suspect*. A suspect entry is revalidated by version against
//!   L2 when it is read (and by the reconciler in the background): kept if L2 holds the same
//!   version, replaced if L2 holds a newer one, reloaded from Postgres if L2 cannot say.
//! - **The bound.** A change acknowledged on one node is announced within milliseconds; another
//!   node serves an L1 entry only while its channel has caught up to within
//!   `max_invalidation_delay` of now, or the entry itself was confirmed within it. So while the
//!   channel is cut (a killed connection, Redis down), entries older than the bound are
//!   revalidated before they are served, and nothing stays stale past the bound.
//! - **Backstops.** The reconciler compares every L1 entry with L2 every `reconcile_every`; an
//!   entry not confirmed for `l1_max_age` is revalidated before it is served.
//! - **Redis unavailable.** Every request has a deadline and goes through a circuit breaker
//!   ([`client`]); a failed L2 read is a miss (Postgres answers), a failed L2 write stays in
//!   the publisher's queue (newest version per key) and is retried until Redis takes it, so a
//!   write made during an outage still reaches L2 and every node's L1 when Redis returns.
//!
//! The tier applies to keyspaces with a table and `l2 = true`. With CDC on, the change stream
//! already keeps each node's L1 fresh (the freshness contract): such a node announces the
//! changes it captures (for nodes that do not capture) but drops nothing on notices, and asks
//! L2 on a miss only while its stream keeps the contract.

pub mod client;
pub mod config;
pub mod record;
pub mod script;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::Entry;
use crate::lsn::Lsn;
use crate::metrics::{counter, counter1, gauge, gauge1};
use client::{Client, Conn, L2Error};
use config::RedisConfig;
use record::{Notice, Record};

/// Changes one publisher round sends at most.
const PUBLISH_BATCH: usize = 512;
/// Stream entries one read takes at most.
const READ_COUNT: usize = 512;
/// L1 entries the reconciler compares per round trip.
const RECONCILE_CHUNK: usize = 256;

/// The tier's counters.
pub struct L2Metrics {
    requests: IntCounterVec,
    breaker_open: IntGauge,
    publish_backlog: IntGauge,
    announced: IntCounterVec,
    heard: IntCounterVec,
    gaps: IntCounterVec,
    revalidations: IntCounterVec,
    reconciled: IntCounterVec,
    channel_lag: IntGaugeVec,
    cas_rejected: IntCounter,
}

impl L2Metrics {
    fn new(r: &Registry) -> L2Metrics {
        L2Metrics {
            requests: counter(
                r,
                "cachesync_l2_requests_total",
                "Requests to the Redis tier, by operation and result (ok, error, timeout, open: refused by the circuit breaker).",
                &["op", "result"],
            ),
            breaker_open: gauge1(
                r,
                "cachesync_l2_breaker_open",
                "1 while the Redis tier's circuit breaker is open.",
            ),
            publish_backlog: gauge1(
                r,
                "cachesync_l2_publish_backlog",
                "Changes waiting to be written to Redis and announced (newest per key).",
            ),
            announced: counter(
                r,
                "cachesync_l2_announced_total",
                "Change notices this node announced on the invalidation channel.",
                &["keyspace"],
            ),
            heard: counter(
                r,
                "cachesync_l2_invalidations_total",
                "Change notices from other nodes applied to this node's L1.",
                &["keyspace"],
            ),
            gaps: counter(
                r,
                "cachesync_l2_gaps_total",
                "Times the invalidation channel showed something was missed, by reason (sequence, epoch); L1 entries confirmed before were marked suspect.",
                &["keyspace", "reason"],
            ),
            revalidations: counter(
                r,
                "cachesync_l2_revalidations_total",
                "Suspect or aged L1 entries revalidated on read, by outcome (confirmed by L2, replaced from L2, reloaded from Postgres, served with lag).",
                &["keyspace", "result"],
            ),
            reconciled: counter(
                r,
                "cachesync_l2_reconciled_total",
                "L1 entries the background reconciliation compared with L2, by outcome (confirmed, dropped: L2 was newer, unknown: L2 had nothing).",
                &["keyspace", "result"],
            ),
            channel_lag: gauge(
                r,
                "cachesync_l2_channel_lag_ms",
                "How long ago this node's invalidation channel was last known caught up.",
                &["keyspace"],
            ),
            cas_rejected: counter1(
                r,
                "cachesync_l2_cas_rejected_total",
                "Writes to Redis the compare-and-set refused because Redis held newer state.",
            ),
        }
    }

    fn request<T>(&self, op: &str, r: &Result<T, L2Error>) {
        let result = match r {
            Ok(_) => "ok",
            Err(L2Error::Open) => "open",
            Err(L2Error::Timeout(_)) => "timeout",
            Err(L2Error::Failed(_)) => "error",
        };
        self.requests.with_label_values(&[op, result]).inc();
    }
}

/// One change waiting to be written to Redis and announced.
struct Change {
    tier: Arc<Tier>,
    key: Arc<str>,
    record: Record,
}

#[derive(Default)]
struct Queue {
    changes: HashMap<(Arc<str>, Arc<str>), Change>,
    /// Keyspaces cleared (a TRUNCATE), at the highest position.
    clears: HashMap<Arc<str>, (Arc<Tier>, Lsn)>,
}

/// The shared part of the tier: the connection, the publisher's queue, the metrics.
pub struct L2 {
    client: Arc<Client>,
    /// This node's id (the origin of the CDC changes it captures).
    node: String,
    /// This process on the channel: the node id and a random suffix, so two processes that
    /// share a node id (a misconfiguration, or one host running two) still hear each other.
    instance: String,
    queue: Mutex<Queue>,
    wake: Notify,
    metrics: L2Metrics,
    /// Time zero of the channel clocks.
    base: Instant,
    /// Bumped after every publisher round (writers wait on it for their change).
    rounds: tokio::sync::watch::Sender<u64>,
    /// The publisher's last round failed: writers do not wait for the next one.
    failing: AtomicBool,
}

/// A fill's view of the channel when its load began: the fill is taken back if Redis lost its
/// epoch (or went back in sequence) meanwhile.
#[derive(Debug, Clone)]
pub struct Ticket {
    epoch: Option<Arc<str>>,
    seq: u64,
}

/// Where the reader of one keyspace's stream is.
#[derive(Debug, Default)]
struct ChannelState {
    epoch: Option<Arc<str>>,
    seq: u64,
    last_id: String,
}

/// The tier of one keyspace.
pub struct Tier {
    l2: Arc<L2>,
    pub keyspace: Arc<str>,
    ttl: Duration,
    negative_ttl: Duration,
    /// Whether the channel guards L1 (a keyspace without CDC: nothing else tells this node of
    /// another node's changes).
    guards_l1: bool,
    record_prefix: String,
    lease_prefix: String,
    meta_key: String,
    stream_key: String,
    channel: Mutex<ChannelState>,
    /// Microseconds since `base` at which the channel was last caught up (0: never).
    caught_up_us: AtomicU64,
    /// Entries confirmed before this (µs since `base`) are suspect.
    suspect_us: AtomicU64,
    /// Entries confirmed before this cannot be vouched for by L2 either (Redis lost writes):
    /// they are reloaded from the source.
    distrust_us: AtomicU64,
    /// The highest source position this node has heard announced (its own changes included).
    heard_lsn: AtomicU64,
    /// Source position below which L2 state is ignored (a clear announced at it).
    floor: AtomicU64,
    reconcile_now: Notify,
    connected: AtomicBool,
}

impl L2 {
    pub fn new(config: RedisConfig, node: &str, registry: &Registry) -> Arc<L2> {
        let metrics = L2Metrics::new(registry);
        let gauge = metrics.breaker_open.clone();
        let client = Client::new(config, Box::new(move |open| gauge.set(open as i64)));
        Arc::new(L2 {
            client,
            node: node.to_string(),
            instance: format!("{node}/{:08x}", rand::random::<u32>()),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            metrics,
            base: Instant::now(),
            rounds: tokio::sync::watch::channel(0).0,
            failing: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &RedisConfig {
        self.client.config()
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64 + 1
    }

    /// The tier of one keyspace.
    pub fn tier(self: &Arc<Self>, keyspace: &str, ttl: Duration, negative_ttl: Duration, guards_l1: bool) -> Arc<Tier> {
        let p = &self.config().prefix;
        Arc::new(Tier {
            l2: self.clone(),
            keyspace: keyspace.into(),
            ttl,
            negative_ttl,
            guards_l1,
            record_prefix: format!("{p}:{keyspace}:"),
            // `!` appears in no prefix and no keyspace name: no record key looks like this.
            lease_prefix: format!("{p}!lease:{keyspace}:"),
            meta_key: format!("{p}:{{{keyspace}}}:meta"),
            stream_key: format!("{p}:{{{keyspace}}}:changes"),
            channel: Mutex::new(ChannelState {
                last_id: "0-0".into(),
                ..ChannelState::default()
            }),
            caught_up_us: AtomicU64::new(0),
            suspect_us: AtomicU64::new(0),
            distrust_us: AtomicU64::new(0),
            heard_lsn: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            reconcile_now: Notify::new(),
            connected: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, change: Change) {
        let mut q = self.lock();
        let id = (change.tier.keyspace.clone(), change.key.clone());
        match q.changes.get(&id) {
            // Keep the newer of the two (the older one's notice is covered by the newer's).
            Some(old) if !change.record.supersedes(&old.record) => {}
            _ => {
                q.changes.insert(id, change);
            }
        }
        self.metrics.publish_backlog.set(q.changes.len() as i64);
        drop(q);
        self.wake.notify_one();
    }

    fn pending(&self, keyspace: &Arc<str>, key: &Arc<str>) -> bool {
        self.lock().changes.contains_key(&(keyspace.clone(), key.clone()))
    }

    /// Writes queued changes to Redis and announces them, until `stop`; then one last round.
    /// After a failed round it retries within a quarter of the invalidation bound — sooner
    /// when a write arrives — whatever the breaker says: once Redis is back, changes acknowledged
    /// meanwhile must reach the other nodes well within the bound.
    pub async fn run_publisher(self: Arc<Self>, stop: CancellationToken) {
        let cap = (self.config().max_invalidation_delay / 4).max(Duration::from_millis(10));
        let mut backoff = Duration::from_millis(10);
        loop {
            let ok = self.publish_round().await;
            self.failing.store(!ok, Ordering::Release);
            if ok {
                backoff = Duration::from_millis(10);
            }
            if stop.is_cancelled() {
                return;
            }
            let empty = {
                let q = self.lock();
                q.changes.is_empty() && q.clears.is_empty()
            };
            if ok || empty {
                tokio::select! {
                    _ = self.wake.notified(), if empty => {}
                    _ = tokio::task::yield_now(), if !empty => {}
                    _ = stop.cancelled() => { self.publish_round().await; return; }
                }
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.wake.notified() => {}
                    _ = stop.cancelled() => { self.publish_round().await; return; }
                }
                backoff = (backoff * 2).min(cap);
            }
        }
    }

    /// One batch: compare-and-set each record, then one announcement per keyspace. Returns
    /// false when Redis failed (what failed is queued again, unless something newer came).
    async fn publish_round(&self) -> bool {
        let (batch, clears) = {
            let mut q = self.lock();
            let keys: Vec<_> = q.changes.keys().take(PUBLISH_BATCH).cloned().collect();
            let batch: Vec<Change> = keys.iter().filter_map(|k| q.changes.remove(k)).collect();
            let clears: Vec<(Arc<Tier>, Lsn)> = q.clears.drain().map(|(_, c)| c).collect();
            (batch, clears)
        };
        if batch.is_empty() && clears.is_empty() {
            return true;
        }
        let mut ok = true;
        let mut by_keyspace: HashMap<Arc<str>, (Arc<Tier>, Vec<Change>)> = HashMap::new();
        for c in batch {
            by_keyspace
                .entry(c.tier.keyspace.clone())
                .or_insert_with(|| (c.tier.clone(), Vec::new()))
                .1
                .push(c);
        }
        let one_server = matches!(self.config().target, config::RedisTarget::Server(_));
        let mut failed = Vec::new();
        for (_, (tier, changes)) in by_keyspace {
            let published = if one_server {
                // One round trip: every record and the announcement, in one script.
                tier.publish(&changes).await.is_ok()
            } else {
                // A cluster: each record in its own slot, then the announcement in the stream's.
                let results = futures::future::join_all(
                    changes
                        .iter()
                        .map(|c| tier.cas(false, &c.key, &c.record, tier.ttl_of(&c.record))),
                )
                .await;
                results.iter().all(Result::is_ok) && tier.announce(&notices_of(&changes), None).await.is_ok()
            };
            if !published {
                // Written or not, all again: the compare-and-set makes a repeat harmless.
                failed.extend(changes);
            }
        }
        for (tier, lsn) in clears {
            if tier.announce(&[], Some(lsn)).await.is_err() {
                ok = false;
                let mut q = self.lock();
                let e = q.clears.entry(tier.keyspace.clone()).or_insert((tier, lsn));
                e.1 = e.1.max(lsn);
            }
        }
        if !failed.is_empty() {
            ok = false;
            for c in failed {
                self.enqueue(c);
            }
        }
        self.metrics.publish_backlog.set(self.lock().changes.len() as i64);
        self.rounds.send_modify(|r| *r += 1);
        ok
    }
}

impl Tier {
    fn record_key(&self, key: &str) -> String {
        format!("{}{key}", self.record_prefix)
    }

    fn metrics(&self) -> &L2Metrics {
        &self.l2.metrics
    }

    fn ttl_of(&self, r: &Record) -> Duration {
        match r.kind {
            record::Kind::Value => self.ttl,
            _ => self.l2.config().tombstone_ttl,
        }
    }

    /// Whether `node` is this node.
    pub fn is_node(&self, node: &str) -> bool {
        self.l2.node == node
    }

    /// A change of `key` to `entry`'s state, to be written to Redis and announced.
    pub fn changed(self: &Arc<Self>, key: Arc<str>, entry: &Entry) {
        self.l2.enqueue(Change {
            tier: self.clone(),
            key,
            record: Record::of_entry(entry),
        });
    }

    /// A change of `key` at `lsn` by `xid` whose new state is not known.
    pub fn invalidated(self: &Arc<Self>, key: Arc<str>, lsn: Lsn, xid: Option<u32>) {
        self.l2.enqueue(Change {
            tier: self.clone(),
            key,
            record: Record::unknown(lsn, xid),
        });
    }

    /// The keyspace was cleared (a TRUNCATE) at `lsn`: everything in L2 from before is void.
    pub fn cleared(self: &Arc<Self>, lsn: Lsn) {
        self.floor.fetch_max(lsn.0, Ordering::AcqRel);
        let mut q = self.l2.lock();
        let e = q.clears.entry(self.keyspace.clone()).or_insert((self.clone(), lsn));
        e.1 = e.1.max(lsn);
        drop(q);
        self.l2.wake.notify_one();
    }

    /// Compare-and-set of `key`'s record; `guarded`: through the breaker (a read's fill).
    async fn cas(&self, guarded: bool, key: &str, rec: &Record, ttl: Duration) -> Result<bool, L2Error> {
        let k = self.record_key(key);
        let bytes = rec.encode();
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let r = self
            .l2
            .client
            .call_as(guarded, |mut c: Conn| async move {
                script::CAS
                    .key(&k)
                    .arg(bytes)
                    .arg(ttl_ms)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        self.metrics().request("cas", &r);
        let stored = r? == 1;
        if !stored {
            self.metrics().cas_rejected.inc();
        }
        Ok(stored)
    }

    /// One server: compare-and-set of every change's record and their announcement, in one
    /// script.
    async fn publish(&self, changes: &[Change]) -> Result<(), L2Error> {
        let proposed = new_epoch();
        let payload = record::encode_notices(&notices_of(changes));
        let maxlen = self.l2.config().stream_maxlen;
        let node = self.l2.instance.clone();
        let mut inv = script::PUBLISH.prepare_invoke();
        inv.key(&self.meta_key).key(&self.stream_key);
        inv.arg(proposed).arg(maxlen).arg(node).arg(payload).arg("");
        for c in changes {
            inv.key(self.record_key(&c.key));
            inv.arg(c.record.encode())
                .arg(self.ttl_of(&c.record).as_millis().max(1) as u64);
        }
        let r = self
            .l2
            .client
            .call_as(false, |mut conn: Conn| async move {
                inv.invoke_async::<Vec<i64>>(&mut conn).await
            })
            .await;
        self.metrics().request("publish", &r);
        let stored = r?;
        let rejected = stored.iter().filter(|s| **s == 0).count();
        self.metrics().cas_rejected.inc_by(rejected as u64);
        self.metrics()
            .announced
            .with_label_values(&[&self.keyspace])
            .inc_by(changes.len() as u64);
        Ok(())
    }

    async fn announce(&self, notices: &[Notice], clear: Option<Lsn>) -> Result<(), L2Error> {
        let proposed = new_epoch();
        let payload = record::encode_notices(notices);
        let floor = clear.map(|l| format!("{:020}", l.0)).unwrap_or_default();
        let (meta, stream) = (self.meta_key.clone(), self.stream_key.clone());
        let maxlen = self.l2.config().stream_maxlen;
        let node = self.l2.instance.clone();
        let r = self
            .l2
            .client
            .call_as(false, |mut c: Conn| async move {
                script::ANNOUNCE
                    .key(&meta)
                    .key(&stream)
                    .arg(proposed)
                    .arg(maxlen)
                    .arg(node)
                    .arg(payload)
                    .arg(floor)
                    .invoke_async::<(String, u64)>(&mut c)
                    .await
            })
            .await;
        self.metrics().request("announce", &r);
        r?;
        self.metrics()
            .announced
            .with_label_values(&[&self.keyspace])
            .inc_by(notices.len().max(clear.is_some() as usize) as u64);
        Ok(())
    }

    /// Waits until this node's change of `key` is in Redis and announced — so a write is
    /// acknowledged only once every other node can learn of it — or until Redis has had its
    /// deadline twice. While the publisher's rounds fail (Redis down) it does not wait: the
    /// change stays queued and is published the moment Redis takes it, and the write goes on.
    pub async fn published(&self, key: &Arc<str>) {
        if self.l2.failing.load(Ordering::Acquire) {
            return;
        }
        let mut rounds = self.l2.rounds.subscribe();
        let wait = async {
            while self.publishing(key) && !self.l2.failing.load(Ordering::Acquire) {
                if rounds.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(self.l2.config().timeout * 2, wait).await;
    }

    /// Whether a change of `key` made here is still on its way to Redis (its L2 state is older
    /// than this node's: read it from the source instead).
    pub fn publishing(&self, key: &Arc<str>) -> bool {
        self.l2.pending(&self.keyspace, key)
    }

    /// The record of `key` in L2, if any (a record below the keyspace's floor counts as none).
    pub async fn get(&self, key: &str) -> Result<Option<Record>, L2Error> {
        let k = self.record_key(key);
        let r = self
            .l2
            .client
            .call(|mut c: Conn| async move { redis::cmd("GET").arg(&k).query_async::<Option<Vec<u8>>>(&mut c).await })
            .await;
        self.metrics().request("get", &r);
        Ok(r?
            .and_then(|b| Record::decode(&b))
            .filter(|rec| rec.lsn.0 >= self.floor.load(Ordering::Acquire)))
    }

    /// Takes the key's load lease in Redis (`SET NX PX`): true when this node should load it;
    /// false when another node is loading it (wait for its fill with [`Tier::await_fill`]).
    /// Off (`lease = "0s"`): always true.
    pub async fn take_lease(&self, key: &str) -> Result<bool, L2Error> {
        let lease = self.l2.config().lease;
        if lease.is_zero() {
            return Ok(true);
        }
        let k = format!("{}{key}", self.lease_prefix);
        let node = self.l2.node.clone();
        let r = self
            .l2
            .client
            .call(|mut c: Conn| async move {
                redis::cmd("SET")
                    .arg(&k)
                    .arg(node)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease.as_millis().max(1) as u64)
                    .query_async::<Option<String>>(&mut c)
                    .await
            })
            .await;
        self.metrics().request("lease", &r);
        Ok(r?.is_some())
    }

    /// Polls L2 for the state another node's leased load will fill, for at most the lease.
    pub async fn await_fill(&self, key: &str) -> Option<Record> {
        let deadline = Instant::now() + self.l2.config().lease;
        let mut step = Duration::from_millis(1);
        while Instant::now() < deadline {
            tokio::time::sleep(step).await;
            match self.get(key).await {
                Ok(Some(rec)) if rec.is_state() => return Some(rec),
                Ok(_) => {}
                Err(_) => return None,
            }
            step = (step * 2).min(Duration::from_millis(8));
        }
        None
    }

    /// The channel as a load begins.
    pub fn ticket(&self) -> Ticket {
        let c = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        Ticket {
            epoch: c.epoch.clone(),
            seq: c.seq,
        }
    }

    /// Writes a loaded entry to L2 (compare-and-set), then takes it back if Redis lost its
    /// epoch since the load began (a write between the load's snapshot and that loss would be
    /// gone from Redis, and the fill must not stand in for it). Nothing is announced.
    pub async fn fill(&self, key: &str, entry: &Entry, ticket: Ticket) {
        let Some(epoch) = ticket.epoch else {
            // The channel has not synchronized yet: no way to check the fill afterwards.
            return;
        };
        let rec = Record::of_entry(entry);
        let ttl = match rec.kind {
            record::Kind::Value => self.ttl,
            _ if self.negative_ttl.is_zero() => return,
            _ => self.ttl.min(self.negative_ttl),
        };
        if !matches!(self.cas(true, key, &rec, ttl).await, Ok(true)) {
            return;
        }
        let meta = self.meta_key.clone();
        let r = self
            .l2
            .client
            .call(|mut c: Conn| async move {
                redis::cmd("HMGET")
                    .arg(&meta)
                    .arg("e")
                    .arg("s")
                    .query_async::<(Option<String>, Option<u64>)>(&mut c)
                    .await
            })
            .await;
        self.metrics().request("fill_check", &r);
        let intact = matches!(&r, Ok((Some(e), s)) if **e == *epoch && s.unwrap_or(0) >= ticket.seq);
        if !intact {
            let k = self.record_key(key);
            let bytes = rec.encode();
            let r = self
                .l2
                .client
                .call(
                    |mut c: Conn| async move { script::DELETE_IF.key(&k).arg(bytes).invoke_async::<i64>(&mut c).await },
                )
                .await;
            self.metrics().request("fill_undo", &r);
        }
    }

    /// Whether an L1 entry may be served as it is (see the module docs); always true for a
    /// keyspace the channel does not guard.
    pub fn trusts(&self, e: &Entry) -> bool {
        if !self.guards_l1 {
            return true;
        }
        let now = Instant::now();
        let confirmed = e.confirmed_at();
        if now.saturating_duration_since(confirmed) > self.l2.config().l1_max_age {
            return false;
        }
        let c = self.l2.micros(confirmed);
        if c < self.suspect_us.load(Ordering::Acquire) {
            return false;
        }
        let bound = self.l2.config().max_invalidation_delay.as_micros() as u64;
        let now_us = self.l2.micros(now);
        let caught = self.caught_up_us.load(Ordering::Acquire);
        caught + bound >= now_us || c + bound >= now_us
    }

    /// Marks every L1 entry confirmed before now suspect, and wakes the reconciler. With
    /// `lost_writes` (Redis itself lost data: a restart from an older snapshot, a failover to
    /// a replica that had not seen the latest writes, a flush), L2 cannot vouch for them
    /// either, and what L2 holds from before the newest change this node heard of is ignored.
    fn suspect_all(&self, reason: &str, lost_writes: bool) {
        let now = self.l2.micros(Instant::now());
        self.suspect_us.fetch_max(now, Ordering::AcqRel);
        if lost_writes {
            self.distrust_us.fetch_max(now, Ordering::AcqRel);
            self.floor
                .fetch_max(self.heard_lsn.load(Ordering::Acquire), Ordering::AcqRel);
        }
        self.metrics().gaps.with_label_values(&[&self.keyspace, reason]).inc();
        tracing::warn!(keyspace = %self.keyspace, reason, "the invalidation channel missed changes; L1 entries confirmed before now are suspect and will be revalidated");
        self.reconcile_now.notify_one();
    }

    /// Whether L2 may vouch for an entry confirmed at `checked` (not after Redis lost writes).
    pub fn may_vouch(&self, e: &Entry) -> bool {
        let confirmed = self.l2.micros(e.confirmed_at());
        confirmed >= self.distrust_us.load(Ordering::Acquire)
    }

    pub(crate) fn revalidated(&self, result: &str) {
        self.metrics()
            .revalidations
            .with_label_values(&[&self.keyspace, result])
            .inc();
    }

    /// Whether the reader is connected and has synchronized at least once.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

/// The notices announcing `changes`.
fn notices_of(changes: &[Change]) -> Vec<Notice> {
    changes
        .iter()
        .map(|c| Notice {
            key: c.key.to_string(),
            lsn: c.record.lsn,
            xid: c.record.xid,
        })
        .collect()
}

/// A fresh random epoch id.
fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// What the reader needs of the keyspace it keeps fresh (implemented by `keyspace`).
pub trait Guarded: Send + Sync + 'static {
    /// Another node changed `key` at this version: forget the L1 entry unless it is newer.
    fn heard(&self, key: Arc<str>, lsn: Lsn, xid: Option<u32>) -> impl Future<Output = ()> + Send;
    /// Another node cleared the keyspace.
    fn heard_clear(&self);
    /// L1's entries, for reconciliation.
    fn l1_entries(&self) -> Vec<(Arc<str>, Arc<Entry>)>;
    /// L2 holds the entry's version: mark it confirmed now (unless it changed meanwhile).
    fn confirm(&self, key: Arc<str>, entry: &Arc<Entry>, at: Instant) -> impl Future<Output = ()> + Send;
}

/// One stream entry as the reader reads it.
struct StreamEntry {
    id: String,
    epoch: String,
    seq: u64,
    node: String,
    notices: Vec<u8>,
    floor: String,
}

fn parse_entries(v: redis::Value) -> Vec<StreamEntry> {
    use redis::Value;
    let mut out = Vec::new();
    // XREAD: [[stream, [[id, [field, value, ...]], ...]]] (RESP2) or a map (RESP3).
    let streams: Vec<Value> = match v {
        Value::Array(a) => a,
        Value::Map(m) => m.into_iter().map(|(k, v)| Value::Array(vec![k, v])).collect(),
        _ => return out,
    };
    for s in streams {
        let Value::Array(mut pair) = s else { continue };
        if pair.len() != 2 {
            continue;
        }
        let Value::Array(items) = pair.pop().unwrap_or(Value::Nil) else {
            continue;
        };
        for item in items {
            let Value::Array(mut iv) = item else { continue };
            if iv.len() != 2 {
                continue;
            }
            let fields = iv.pop().unwrap_or(Value::Nil);
            let id: String = redis::from_redis_value(iv.pop().unwrap_or(Value::Nil)).unwrap_or_default();
            let fields: Vec<Vec<u8>> = redis::from_redis_value(fields).unwrap_or_default();
            let mut e = StreamEntry {
                id,
                epoch: String::new(),
                seq: 0,
                node: String::new(),
                notices: Vec::new(),
                floor: String::new(),
            };
            for kv in fields.chunks(2) {
                let [k, v] = kv else { continue };
                match k.as_slice() {
                    b"e" => e.epoch = String::from_utf8_lossy(v).into(),
                    b"s" => e.seq = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
                    b"n" => e.node = String::from_utf8_lossy(v).into(),
                    b"c" => e.notices = v.clone(),
                    b"f" => e.floor = String::from_utf8_lossy(v).into(),
                    _ => {}
                }
            }
            out.push(e);
        }
    }
    out
}

impl Tier {
    /// Reads this keyspace's stream and applies other nodes' changes to `ks`, until `stop`.
    pub async fn run_reader<G: Guarded>(self: Arc<Self>, ks: Arc<G>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let block = (self.l2.config().max_invalidation_delay / 5).max(Duration::from_millis(10));
        loop {
            let r = tokio::select! {
                r = self.read_session(&ks, block) => r,
                _ = stop.cancelled() => return,
            };
            self.connected.store(false, Ordering::Release);
            if let Err(e) = r {
                tracing::debug!(keyspace = %self.keyspace, error = %e, "the invalidation channel is down; reconnecting");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One connection's life: synchronize, then read until an error.
    async fn read_session<G: Guarded>(&self, ks: &Arc<G>, block: Duration) -> Result<(), L2Error> {
        let mut conn = Client::open(self.l2.config(), None).await?;
        self.sync(&mut conn).await?;
        self.connected.store(true, Ordering::Release);
        loop {
            let last_id = self.channel.lock().unwrap_or_else(|p| p.into_inner()).last_id.clone();
            let sent = Instant::now();
            let read = tokio::time::timeout(
                block + self.l2.config().timeout + Duration::from_secs(1),
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(block.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&self.stream_key)
                    .arg(&last_id)
                    .query_async::<redis::Value>(&mut conn),
            )
            .await
            .map_err(|_| L2Error::Timeout(block))??;
            let entries = parse_entries(read);
            let n = entries.len();
            if n == 0 {
                // Idle: check that Redis still has the epoch we follow (a flush or restart with
                // no change since shows only there).
                self.sync(&mut conn).await?;
            }
            for e in entries {
                if !self.take(&e) {
                    // The epoch changed: everything before is suspect; start over from the new
                    // stream's end.
                    self.sync(&mut conn).await?;
                    break;
                }
                // A CDC keyspace's own change stream brings every change (the freshness
                // contract keeps it); dropping entries on notices too would only turn hits
                // into L2 reads. The channel still tracks the epoch its fills are checked by.
                let notices = record::decode_notices(&e.notices).unwrap_or_default();
                if let Some(max) = notices.iter().map(|n| n.lsn.0).max() {
                    self.heard_lsn.fetch_max(max, Ordering::AcqRel);
                }
                if e.node != self.l2.instance && self.guards_l1 {
                    self.metrics()
                        .heard
                        .with_label_values(&[&self.keyspace])
                        .inc_by(notices.len() as u64);
                    for n in notices {
                        ks.heard(n.key.into(), n.lsn, n.xid).await;
                    }
                    if !e.floor.is_empty() {
                        if let Ok(f) = e.floor.parse::<u64>() {
                            self.floor.fetch_max(f, Ordering::AcqRel);
                        }
                        ks.heard_clear();
                    }
                }
            }
            if n < READ_COUNT {
                self.caught_up_us.store(self.l2.micros(sent), Ordering::Release);
            }
            self.metrics()
                .channel_lag
                .with_label_values(&[&self.keyspace])
                .set(self.channel_lag().as_millis() as i64);
        }
    }

    /// How long ago the channel was last known caught up.
    pub fn channel_lag(&self) -> Duration {
        let now = self.l2.micros(Instant::now());
        Duration::from_micros(now.saturating_sub(self.caught_up_us.load(Ordering::Acquire)))
    }

    /// Takes one stream entry's place in the sequence; false when its epoch is not the one
    /// followed (the caller resynchronizes).
    fn take(&self, e: &StreamEntry) -> bool {
        let mut c = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        match c.epoch.as_deref() {
            Some(ep) if ep != e.epoch => return false,
            None => c.epoch = Some(e.epoch.as_str().into()),
            Some(_) => {}
        }
        if e.seq != c.seq + 1 {
            drop(c);
            // Entries trimmed away before this reader read them: L2 still has the state.
            self.suspect_all("sequence", false);
            c = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        }
        c.seq = e.seq;
        c.last_id = e.id.clone();
        true
    }

    /// Makes sure the keyspace's meta hash exists, then compares it with what this reader
    /// followed: a different epoch or a lower sequence means Redis lost entries — every entry
    /// confirmed before now is suspect, and reading restarts from the stream's end.
    async fn sync(&self, conn: &mut Conn) -> Result<(), L2Error> {
        let _: bool = redis::cmd("HSETNX")
            .arg(&self.meta_key)
            .arg("e")
            .arg(new_epoch())
            .query_async(conn)
            .await?;
        let (epoch, seq, floor): (Option<String>, Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(&self.meta_key)
            .arg("e")
            .arg("s")
            .arg("f")
            .query_async(conn)
            .await?;
        let epoch = epoch.unwrap_or_default();
        let seq = seq.unwrap_or(0);
        if let Some(f) = floor.and_then(|f| f.parse::<u64>().ok()) {
            self.floor.fetch_max(f, Ordering::AcqRel);
        }
        let (known, lost) = {
            let c = self.channel.lock().unwrap_or_else(|p| p.into_inner());
            let lost = c.epoch.as_deref().is_some_and(|e| e != epoch) || (c.epoch.is_some() && seq < c.seq);
            (c.epoch.is_some(), lost)
        };
        if known && !lost {
            return Ok(());
        }
        if lost {
            self.suspect_all("epoch", true);
        }
        // Start from the stream's newest entry: what came before is covered by the suspicion
        // (or, on a first start, by an empty L1).
        let last: redis::Value = redis::cmd("XREVRANGE")
            .arg(&self.stream_key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let newest = parse_entries(redis::Value::Array(vec![redis::Value::Array(vec![
            redis::Value::Nil,
            last,
        ])]));
        let mut c = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        match newest.into_iter().next() {
            Some(e) if e.epoch == epoch => {
                c.seq = e.seq;
                c.last_id = e.id;
            }
            _ => {
                c.seq = seq;
                c.last_id = "0-0".into();
            }
        }
        c.epoch = Some(epoch.into());
        Ok(())
    }

    /// Compares L1 with L2 every `reconcile_every`, and at once after a gap, until `stop`.
    pub async fn run_reconciler<G: Guarded>(self: Arc<Self>, ks: Arc<G>, stop: CancellationToken) {
        let every = self.l2.config().reconcile_every;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.reconcile_now.notified() => {}
                _ = stop.cancelled() => return,
            }
            if self.guards_l1 {
                self.reconcile(&ks, &stop).await;
            }
        }
    }

    async fn reconcile<G: Guarded>(&self, ks: &Arc<G>, stop: &CancellationToken) {
        let entries = ks.l1_entries();
        for chunk in entries.chunks(RECONCILE_CHUNK) {
            if stop.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let got = futures::future::join_all(chunk.iter().map(|(k, _)| self.get(k))).await;
            for ((key, entry), rec) in chunk.iter().zip(got) {
                let result = match rec {
                    Err(_) => return,
                    // Redis lost writes since this entry was confirmed: only the source can
                    // tell, on the entry's next read.
                    Ok(Some(_)) if !self.may_vouch(entry) => "unknown",
                    Ok(Some(rec)) => {
                        let l2 = rec.to_entry(0);
                        if l2.supersedes(entry) && entry.supersedes(&l2) && rec.is_state() {
                            // The same version: confirmed as of the start of this round trip.
                            if entry.checked_at.is_none_or(|c| c < started) {
                                ks.confirm(key.clone(), entry, started).await;
                            }
                            "confirmed"
                        } else if l2.supersedes(entry) {
                            ks.heard(key.clone(), rec.lsn, rec.xid).await;
                            "dropped"
                        } else {
                            "unknown"
                        }
                    }
                    Ok(None) => "unknown",
                };
                self.metrics()
                    .reconciled
                    .with_label_values(&[&self.keyspace, result])
                    .inc();
            }
            tokio::task::yield_now().await;
        }
    }
}
