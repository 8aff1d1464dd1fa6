//! One lifecycle for every task the sidecar runs: where tasks are spawned, how they learn to
//! stop, and the order in which they are stopped. Also the one [`Backoff`] every retry loop uses,
//! and the one accept loop ([`accept`]) and connection driver ([`drive_connection`]) every
//! listener uses.
//!
//! A running server has one [`Lifecycle`] with a phase per step of the ordered shutdown —
//! [`Phase::Serve`] (listeners, request work such as refreshes, keyspace binding), then
//! [`Phase::Capture`] (the change stream, its applier, heartbeats, snapshot workers), then
//! [`Phase::Drain`] (the write-behind flusher's stages), then [`Phase::Log`] (the commit log's
//! timers). Each phase has its own cancellation token and task tracker; every task is spawned
//! through a phase's [`Tasks`] handle, so shutdown can cancel a phase and wait for exactly its
//! tasks before it moves on — "stop accepting → stop capture after confirming durable positions
//! → drain write-behind → sync the log" — and say which phase did not finish in time.
//!
//! Lower layers (the commit log, CDC) take a `Tasks` handle rather than calling `tokio::spawn`,
//! so nothing runs outside the lifecycle. A standalone handle ([`Tasks::detached`]) serves
//! tests and tools that have no server around them. The one thread not spawned here is the
//! commit log's writer: a dedicated OS thread (its fsyncs block), stopped by `CommitLog::close`
//! in the log phase.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The next connection on `listener`, or `None` once `stop` is cancelled. Accept errors (out of
/// file descriptors and the like) are logged (`what` names the listener) and retried after a
/// moment instead of spinning.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => {
                    let _ = s.0.set_nodelay(true);
                    return Some(s);
                }
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accepting a connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = stop.cancelled() => return None,
                    }
                }
            },
            _ = stop.cancelled() => return None,
        }
    }
}

/// Drives one HTTP connection until it ends; once `stop` is cancelled, lets the request in
/// flight finish and closes it (`what` names the listener in the log).
pub async fn drive_connection<C>(conn: C, stop: &CancellationToken, what: &str)
where
    C: hyper_util::server::graceful::GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    // The connection's own token: the select below checks it on every wake-up, and a shared
    // token's lock would be taken by every connection on every core.
    let stop = stop.child_token();
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, listener = what, "a connection ended with an error");
    }
}

/// A step of the ordered shutdown, in the order the steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Listeners and the work requests start.
    Serve,
    /// Change capture and its applier.
    Capture,
    /// The write-behind flusher.
    Drain,
    /// The commit log's background timers.
    Log,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::Serve, Phase::Capture, Phase::Drain, Phase::Log];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Serve => "serve",
            Phase::Capture => "capture",
            Phase::Drain => "drain",
            Phase::Log => "log",
        }
    }
}

/// The spawn handle of one phase: tasks spawned here are tracked, and are told to stop (through
/// [`Tasks::token`]) when the phase stops.
#[derive(Clone, Debug)]
pub struct Tasks {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    /// A handle belonging to no server (tests, tools): nothing stops it but its own token.
    pub fn detached() -> Tasks {
        Tasks {
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Spawns a tracked task. It should watch [`Tasks::token`] in every wait.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Runs blocking work on the blocking pool, tracked.
    pub fn spawn_blocking<F, T>(&self, f: F) -> tokio::task::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn_blocking(f)
    }

    /// Cancelled when this phase stops.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// A token cancelled when this phase stops, or earlier by whoever holds it.
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// Tasks of this phase still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Waits, without cancelling, for the phase's tasks to end by themselves (a drain) until
    /// `deadline`. `false` if some were still running then.
    pub async fn finish(&self, deadline: Instant) -> bool {
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait()).await.is_ok()
    }

    /// Cancels the phase and waits for its tasks until `deadline`. `false` if some were still
    /// running then.
    pub async fn stop(&self, deadline: Instant) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait()).await.is_ok()
    }
}

/// Every phase's tasks.
#[derive(Debug)]
pub struct Lifecycle {
    phases: [Tasks; 4],
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            phases: std::array::from_fn(|_| Tasks::detached()),
        }
    }

    /// The spawn handle of `phase`.
    pub fn tasks(&self, phase: Phase) -> Tasks {
        self.phases[phase as usize].clone()
    }

    /// Whether `phase` has been told to stop.
    pub fn is_stopping(&self, phase: Phase) -> bool {
        self.phases[phase as usize].token.is_cancelled()
    }
}

/// Capped exponential backoff with jitter, whose waits end early on cancellation.
///
/// Each wait is the current delay scaled by a random factor in `[0.5, 1.5)` (so many clients
/// retrying one server spread out), then the delay doubles up to `max`. [`Backoff::reset`] after
/// a success starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The next wait (jittered), advancing the delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.mul_f64(0.5 + rand::random::<f64>());
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// The un-jittered delay the next wait is based on.
    pub fn current(&self) -> Duration {
        self.next
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// Waits the next delay. `false` if `stop` was cancelled first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let bases = [100, 200, 350, 350];
        for base in bases {
            assert_eq!(b.current(), Duration::from_millis(base));
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(base / 2) && d < Duration::from_millis(base * 3 / 2),
                "{d:?} not within jitter of {base} ms"
            );
        }
        b.reset();
        assert_eq!(b.current(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_early_on_cancellation() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!b.wait(&stop).await);
        let live = CancellationToken::new();
        assert!(b.wait(&live).await, "an uncancelled wait runs its course");
    }

    #[tokio::test]
    async fn stopping_a_phase_cancels_and_waits_for_exactly_its_tasks() {
        let life = Lifecycle::new();
        let serve = life.tasks(Phase::Serve);
        let drain = life.tasks(Phase::Drain);
        let t = serve.token().clone();
        serve.spawn(async move { t.cancelled().await });
        let d = drain.token().clone();
        drain.spawn(async move { d.cancelled().await });
        assert!(serve.stop(Instant::now() + Duration::from_secs(5)).await);
        assert!(serve.is_empty());
        assert!(
            !life.is_stopping(Phase::Drain) && drain.len() == 1,
            "other phases keep running"
        );
        assert!(drain.stop(Instant::now() + Duration::from_secs(5)).await);
    }
}
