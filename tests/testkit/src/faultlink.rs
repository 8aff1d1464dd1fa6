//! A loopback TCP proxy that can misbehave, for partition tests on machines without netem: put it
//! between a client and a server and it forwards both ways until told to
//!
//! - **delay** every chunk it forwards, in both directions ([`FaultLink::set_delay`]);
//! - **cut** every open connection at once, as a crashed switch or a killed peer would
//!   ([`FaultLink::cut`]); new connections are accepted again afterwards;
//! - **blackhole**: keep every connection open, accept new ones, read what is sent and forward
//!   nothing, in either direction ([`FaultLink::blackhole`]) — the partition a TCP keepalive or an
//!   application timeout has to notice, since nothing is ever closed;
//! - **refuse** new connections (accept, then close at once: a peer that is down).
//!
//! Counters say what went through and what was swallowed, so a test can wait for a condition
//! ("the blackhole swallowed the request") instead of sleeping.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct State {
    delay_us: AtomicU64,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    forwarded: AtomicU64,
    swallowed: AtomicU64,
    accepted: AtomicU64,
}

/// The proxy; it stops when dropped.
pub struct FaultLink {
    addr: SocketAddr,
    state: Arc<State>,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultLink {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> FaultLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State::default());
        let (cuts, _) = watch::channel(0u64);
        let task = {
            let (state, cuts) = (state.clone(), cuts.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    state.accepted.fetch_add(1, Ordering::Relaxed);
                    if state.refuse.load(Ordering::Relaxed) {
                        drop(client);
                        continue;
                    }
                    let (state, cut) = (state.clone(), cuts.subscribe());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let mut cut = cut;
                        // Either direction ending, or a cut, ends the connection (both halves
                        // of both sockets are dropped with this task).
                        tokio::select! {
                            _ = pump(cr, sw, &state) => {}
                            _ = pump(sr, cw, &state) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        FaultLink {
            addr,
            state,
            cuts,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delays every forwarded chunk by `d` (zero: none).
    pub fn set_delay(&self, d: Duration) {
        self.state.delay_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Closes every open connection now.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Swallows everything in both directions (on) or forwards again (off).
    pub fn blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::Relaxed);
    }

    /// Closes new connections as soon as they are accepted (on), or serves them again (off).
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::Relaxed);
    }

    /// Bytes forwarded so far (counted as they are handed on).
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::Relaxed)
    }

    /// Bytes read and dropped by the blackhole so far.
    pub fn swallowed(&self) -> u64 {
        self.state.swallowed.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultLink {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Copies `from` to `to` chunk by chunk, as the link's state says.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, state: &State) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if state.blackhole.load(Ordering::Relaxed) {
            state.swallowed.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        let delay = state.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        // Counted before the write, so a peer that has read the bytes sees them counted.
        state.forwarded.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
