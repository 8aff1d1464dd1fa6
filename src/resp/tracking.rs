//! Client-side caching (`CLIENT TRACKING`): which client holds which key, and the
//! invalidations sent when a key changes — by any path into the keyspace's door: a write over
//! RESP or HTTP, a write-behind write, a change from Postgres (CDC), a replicated or federated
//! event, a document dropped for room or age. A Redis server can only invalidate the writes it
//! sees; the sidecar sees the database's own changes too.
//!
//! Semantics are Redis's (<https://redis.io/docs/latest/develop/reference/client-side-caching/>):
//! - **Default mode**: a key a tracking client read is remembered for it; its next change sends
//!   the client one invalidation and forgets the pair (the client must read again to be told
//!   again). The table holds at most `tracking_max_keys` keys; past that the oldest are
//!   invalidated for their clients and forgotten, as Redis does.
//! - **BCAST**: every change of a key starting with one of the client's prefixes (any key,
//!   with none) is sent; nothing is remembered per key.
//! - `OPTIN`/`OPTOUT` decide per command whether a read is remembered (the connection asks);
//!   `NOLOOP` skips changes the client made itself (the task-local [`CURRENT`] says who is
//!   changing).
//! - **Where invalidations go**: to the client itself (a RESP3 `invalidate` push), or with
//!   `REDIRECT <id>` to another connection (which, in RESP2, receives them as messages on the
//!   `__redis__:invalidate` channel it subscribed to).
//!
//! Every client's sink is a bounded channel; a client that falls behind gets one "invalidate
//! everything" (a null key list) instead of an unbounded queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;

use crate::keyspace::Watch;

/// A connection's id (`CLIENT ID`).
pub type ClientId = u64;

tokio::task_local! {
    /// The RESP client whose command is running on this task (for `NOLOOP`).
    pub static CURRENT: ClientId;
}

/// Invalidations queued per client before it counts as fallen behind.
pub const SINK_CAPACITY: usize = 1024;

/// What a connection is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// These keys changed (names as the tracking client used them).
    Keys(Vec<Bytes>),
    /// Everything may have changed (a keyspace was cleared, or the client fell behind).
    Flush,
}

/// A connection's receiving end for notes.
#[derive(Clone)]
pub struct Sink {
    tx: mpsc::Sender<Note>,
    /// Set when a note could not be queued: the connection sends a flush once it catches up.
    pub overflowed: Arc<AtomicBool>,
}

impl Sink {
    pub fn new() -> (Sink, mpsc::Receiver<Note>) {
        let (tx, rx) = mpsc::channel(SINK_CAPACITY);
        (
            Sink {
                tx,
                overflowed: Arc::default(),
            },
            rx,
        )
    }

    fn send(&self, note: Note, sent: &IntCounter) {
        if self.tx.try_send(note).is_err() {
            self.overflowed.store(true, Ordering::Release);
        }
        sent.inc();
    }
}

/// How a client tracks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mode {
    /// Send to this client instead of to the tracking client itself.
    pub redirect: Option<ClientId>,
    /// BCAST, with its prefixes (none: every key).
    pub bcast: Option<Vec<Bytes>>,
    pub noloop: bool,
}

struct Table {
    /// `keyspace \0 key` → the clients that read it, with the name each used.
    keys: HashMap<String, Vec<(ClientId, Bytes)>>,
    /// Keys in the order they entered the table (some since forgotten), for the bound.
    order: VecDeque<String>,
    /// Every connection's sink, by client id.
    sinks: HashMap<ClientId, Sink>,
    /// Clients with tracking on.
    modes: HashMap<ClientId, Mode>,
}

/// The tracking table of one RESP front.
pub struct Tracking {
    /// Clients with tracking on: zero makes a change's check one atomic load.
    active: AtomicUsize,
    /// Of them, with NOLOOP (writes are attributed to their client only while there are some).
    noloop: AtomicUsize,
    max_keys: usize,
    /// The keyspace whose keys clients name without a prefix.
    default_keyspace: Option<String>,
    table: Mutex<Table>,
    /// `cachesync_resp_invalidations_total`
    sent: IntCounter,
    /// `cachesync_resp_tracking_keys`
    tracked: IntGauge,
}

fn slot(keyspace: &str, key: &str) -> String {
    let mut s = String::with_capacity(keyspace.len() + key.len() + 1);
    s.push_str(keyspace);
    s.push('\0');
    s.push_str(key);
    s
}

impl Tracking {
    pub fn new(max_keys: usize, default_keyspace: Option<String>, sent: IntCounter, tracked: IntGauge) -> Tracking {
        Tracking {
            active: AtomicUsize::new(0),
            noloop: AtomicUsize::new(0),
            max_keys,
            default_keyspace,
            table: Mutex::new(Table {
                keys: HashMap::new(),
                order: VecDeque::new(),
                sinks: HashMap::new(),
                modes: HashMap::new(),
            }),
            sent,
            tracked,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection opened: notes for `id` go to `sink`.
    pub fn connect(&self, id: ClientId, sink: Sink) {
        self.lock().sinks.insert(id, sink);
    }

    /// A connection closed: it tracks nothing any more and receives nothing.
    pub fn disconnect(&self, id: ClientId) {
        self.lock().sinks.remove(&id);
        self.disable(id);
    }

    /// Whether any client tracks.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Whether any tracking client asked for NOLOOP.
    pub fn any_noloop(&self) -> bool {
        self.noloop.load(Ordering::Acquire) > 0
    }

    fn count(&self, mode: &Mode, delta: isize) {
        let apply = |a: &AtomicUsize| {
            if delta > 0 {
                a.fetch_add(1, Ordering::AcqRel);
            } else {
                a.fetch_sub(1, Ordering::AcqRel);
            }
        };
        apply(&self.active);
        if mode.noloop {
            apply(&self.noloop);
        }
    }

    /// Whether client `id` exists (a `REDIRECT` target must).
    pub fn exists(&self, id: ClientId) -> bool {
        self.lock().sinks.contains_key(&id)
    }

    /// Turns tracking on for `id` (or changes its mode).
    pub fn enable(&self, id: ClientId, mode: Mode) {
        let mut t = self.lock();
        self.count(&mode, 1);
        if let Some(old) = t.modes.insert(id, mode) {
            self.count(&old, -1);
        }
    }

    /// Turns tracking off for `id`; the keys it read are forgotten lazily.
    pub fn disable(&self, id: ClientId) {
        if let Some(old) = self.lock().modes.remove(&id) {
            self.count(&old, -1);
        }
    }

    /// Client `id` read `key` of `keyspace`, calling it `name`: tell it of the next change.
    pub fn track(&self, id: ClientId, keyspace: &str, key: &str, name: &Bytes) {
        let mut guard = self.lock();
        let t = &mut *guard;
        let s = slot(keyspace, key);
        match t.keys.get_mut(&s) {
            Some(readers) => match readers.iter_mut().find(|(c, _)| *c == id) {
                Some(r) => r.1 = name.clone(),
                None => readers.push((id, name.clone())),
            },
            None => {
                t.keys.insert(s.clone(), vec![(id, name.clone())]);
                t.order.push_back(s);
            }
        }
        // The bound: the oldest keys are invalidated for their readers and forgotten.
        while t.keys.len() > self.max_keys {
            let Some(old) = t.order.pop_front() else { break };
            if let Some(readers) = t.keys.remove(&old) {
                self.deliver(t, readers, None);
            }
        }
        if t.order.len() > 2 * self.max_keys.max(1024) {
            let keys = &t.keys;
            t.order.retain(|k| keys.contains_key(k));
        }
        self.tracked.set(t.keys.len() as i64);
    }

    /// Sends each reader its key's name, unless it is the client making the change with NOLOOP.
    fn deliver(&self, t: &Table, readers: Vec<(ClientId, Bytes)>, changer: Option<ClientId>) {
        for (id, name) in readers {
            let Some(mode) = t.modes.get(&id) else {
                continue; // tracking turned off since it read the key
            };
            if mode.noloop && changer == Some(id) {
                continue;
            }
            if let Some(sink) = t.sinks.get(&mode.redirect.unwrap_or(id)) {
                sink.send(Note::Keys(vec![name]), &self.sent);
            }
        }
    }
}

impl Watch for Tracking {
    fn changed(&self, keyspace: &str, key: &str) {
        if self.active.load(Ordering::Acquire) == 0 {
            return;
        }
        let changer = CURRENT.try_with(|c| *c).ok();
        let mut guard = self.lock();
        let t = &mut *guard;
        if let Some(readers) = t.keys.remove(&slot(keyspace, key)) {
            self.deliver(t, readers, changer);
            self.tracked.set(t.keys.len() as i64);
        }
        let mut public = None;
        for (id, mode) in &t.modes {
            let Some(prefixes) = &mode.bcast else { continue };
            if mode.noloop && changer == Some(*id) {
                continue;
            }
            let name = public.get_or_insert_with(|| {
                Bytes::from(super::public_name(self.default_keyspace.as_deref(), keyspace, key))
            });
            if (prefixes.is_empty() || prefixes.iter().any(|p| name.starts_with(p)))
                && let Some(sink) = t.sinks.get(&mode.redirect.unwrap_or(*id))
            {
                sink.send(Note::Keys(vec![name.clone()]), &self.sent);
            }
        }
    }

    fn cleared(&self, keyspace: &str) {
        if self.active.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut guard = self.lock();
        let t = &mut *guard;
        let prefix = slot(keyspace, "");
        t.keys.retain(|k, _| !k.starts_with(&prefix));
        self.tracked.set(t.keys.len() as i64);
        // Every tracking client drops its whole cache: cheaper than naming every key, and
        // what Redis sends on FLUSHALL.
        for (id, mode) in &t.modes {
            if let Some(sink) = t.sinks.get(&mode.redirect.unwrap_or(*id)) {
                sink.send(Note::Flush, &self.sent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracking(max: usize) -> Tracking {
        Tracking::new(
            max,
            Some("default".into()),
            IntCounter::new("s", "s").unwrap(),
            IntGauge::new("t", "t").unwrap(),
        )
    }

    fn keys(rx: &mut mpsc::Receiver<Note>) -> Vec<Note> {
        let mut out = Vec::new();
        while let Ok(n) = rx.try_recv() {
            out.push(n);
        }
        out
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn default_mode_tells_once_per_read() {
        let t = tracking(100);
        let (sink, mut rx) = Sink::new();
        t.connect(1, sink);
        t.enable(1, Mode::default());
        t.track(1, "users", "7", &b("users:7"));
        t.changed("users", "8");
        assert!(keys(&mut rx).is_empty(), "an unread key");
        t.changed("users", "7");
        assert_eq!(keys(&mut rx), vec![Note::Keys(vec![b("users:7")])]);
        t.changed("users", "7");
        assert!(keys(&mut rx).is_empty(), "forgotten until read again");
    }

    #[test]
    fn bcast_prefixes_redirect_noloop_and_the_bound() {
        let t = tracking(2);
        let (s1, mut rx1) = Sink::new();
        let (s2, mut rx2) = Sink::new();
        t.connect(1, s1);
        t.connect(2, s2);
        t.enable(
            1,
            Mode {
                redirect: Some(2),
                bcast: Some(vec![b("user")]),
                noloop: true,
            },
        );
        t.changed("users", "1");
        t.changed("orders", "1");
        t.changed("default", "userx");
        assert!(keys(&mut rx1).is_empty(), "redirected");
        assert_eq!(
            keys(&mut rx2),
            vec![Note::Keys(vec![b("users:1")]), Note::Keys(vec![b("userx")])]
        );
        CURRENT.sync_scope(1, || t.changed("users", "2"));
        assert!(keys(&mut rx2).is_empty(), "NOLOOP skips the client's own change");
        // The bound: a third key pushes the first out, with an invalidation.
        t.enable(2, Mode::default());
        for k in ["a", "b", "c"] {
            t.track(2, "default", k, &b(k));
        }
        assert_eq!(keys(&mut rx2), vec![Note::Keys(vec![b("a")])]);
        t.cleared("default");
        assert_eq!(keys(&mut rx2), vec![Note::Flush, Note::Flush]);
        t.disconnect(1);
        t.disconnect(2);
        t.changed("users", "3");
        assert_eq!(t.active.load(Ordering::Acquire), 0);
    }
}
