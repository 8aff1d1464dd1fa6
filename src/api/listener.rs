//! The HTTP listener: accepts connections, bounds how many are open at once, and serves each
//! under the front door's timeouts. A connection starts on the listener's own HTTP/1.1 path for
//! key reads and writes ([`super::fast`]): a hit is written from memory, any other key read and
//! every key write runs through [`Api::call`] (the handler the router calls) and its answer is
//! written the same way, and
//! several pipelined requests are answered in order with one write. The first request that path
//! does not take hands the connection, with the bytes already read, to hyper's HTTP/1 server
//! for the rest of its life.
//!
//! Why not `axum::serve`: it has no bound on connections and no timeouts, so a client sending
//! one header byte a second, or a few thousand idle keep-alive connections, hold file
//! descriptors forever. Here each connection's socket is wrapped in a [`Guarded`] stream that
//! knows (through a small counter the service wrapper keeps) whether a request is being handled:
//!
//! - **Header-read timeout**: once the first byte of a request has arrived, its headers must be
//!   complete within `header_read_timeout`, else the client gets `408` (the project's JSON error
//!   shape) and the connection is closed — a slowloris client is cut off however slowly it trickles.
//!   On the own path a key write's body is read before its handler runs, so a body that fits
//!   in [`fast::MAX_HEAD`] with its head is under the same bound.
//! - **Idle timeout**: a connection with no request in flight and no byte received for
//!   `idle_timeout` is closed (silently, as HTTP allows for idle keep-alive connections).
//! - **Connection bound**: beyond `max_connections` open connections, a new one is answered
//!   `503 too_many_connections` (JSON, `Retry-After`) and closed; capacity frees as others close.
//! - **JSON for hyper's own errors**: when hyper refuses a request before any handler ran (a
//!   malformed request line `400`, a URI too long `414`, headers too large `431`), it writes a
//!   bodiless response; the stream rewrites that one response into the JSON error shape. Every
//!   handler error already is JSON, so only a bodiless 4xx written with no request in flight is
//!   touched.
//!
//! A request being handled is never subject to either timeout (a slow load is the handler's
//! business). On shutdown each connection finishes its request in flight and closes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use super::Api;
use super::fast::{self, Parsed};
use bytes::{Buf, BytesMut};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use super::config::ServerConfig;
use crate::lifecycle::Tasks;

/// How long a refused connection gets to read its 503 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The limits one listener applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn of(c: &ServerConfig) -> Limits {
        Limits {
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            max_connections: c.max_connections,
        }
    }
}

/// Serves `app` on `listener` until `stop`, each connection a task of `tasks`. Returns once
/// accepting has stopped; connections finish their request in flight and close on their own
/// (the caller waits for `tasks`).
pub async fn serve(listener: TcpListener, app: Api, limits: Limits, stop: CancellationToken, tasks: Tasks) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Some((stream, _)) = crate::lifecycle::accept(&listener, &stop, "http").await else {
            return;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tasks.spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let (app, stop) = (app.clone(), stop.clone());
        tasks.spawn(async move {
            let _slot = slot;
            serve_connection(stream, app, limits, stop).await;
        });
    }
}

/// Bytes a connection's read buffer grows by.
const READ_CHUNK: usize = 8 * 1024;

/// A write buffer grown past this by a large answer is let go once written.
const MAX_KEPT_BUFFER: usize = 256 * 1024;

/// One connection, until the client closes it, a timeout closes it, or shutdown: key reads on
/// the listener's own path (`api::fast`), and from the first request that path does not take
/// on, hyper.
async fn serve_connection(stream: TcpStream, mut app: Api, limits: Limits, stop: CancellationToken) {
    let requests = Arc::new(Requests::default());
    let mut io = Guarded::new(stream, limits, requests.clone());
    // The connection's own token: a shared token's lock would be taken by every connection on
    // every core.
    let stop = stop.child_token();
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut seen = fast::Seen::default();
    loop {
        // Every whole request buffered is answered before the answers are written (pipelining).
        loop {
            match fast::serve(&app.state, &mut seen, &buf, &mut out) {
                Parsed::Answered(len) => {
                    requests.started.fetch_add(1, Ordering::AcqRel);
                    buf.advance(len);
                }
                Parsed::Handle(read) => {
                    let len = read.len;
                    // Answers already made are not held back while the handler waits.
                    if write_out(&mut io, &mut out).await.is_err() {
                        return;
                    }
                    let answered = {
                        let _in_flight = InFlight::new(requests.clone());
                        through_handler(&mut app, read, &mut out).await
                    };
                    match answered {
                        None => break_to_hyper!(io, buf, out, app, requests, stop),
                        Some(false) => return,
                        Some(true) => buf.advance(len),
                    }
                }
                Parsed::Partial => break,
                Parsed::HandOver => break_to_hyper!(io, buf, out, app, requests, stop),
            }
        }
        if write_out(&mut io, &mut out).await.is_err() {
            return;
        }
        if out.capacity() > MAX_KEPT_BUFFER {
            out = Vec::with_capacity(READ_CHUNK);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        // Shutdown first: a busy connection always has a read ready.
        let read = tokio::select! {
            biased;
            _ = &mut cancelled => return,
            r = io.read_buf(&mut buf) => r,
        };
        if !matches!(read, Ok(n) if n > 0) {
            return;
        }
    }
}

/// Writes the answers made so far, if any, and empties `out`.
async fn write_out(io: &mut Guarded, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Hands the connection to hyper with what is buffered, after the answers already made.
macro_rules! break_to_hyper {
    ($io:ident, $buf:ident, $out:ident, $app:ident, $requests:ident, $stop:ident) => {{
        if write_out(&mut $io, &mut $out).await.is_err() {
            return;
        }
        return serve_with_hyper(
            Rewind {
                prefix: $buf.freeze(),
                inner: $io,
            },
            $app,
            $requests,
            &$stop,
        )
        .await;
    }};
}
use break_to_hyper;

/// A key request the own path took but did not answer, run through the handler the router
/// calls with its whole body, its answer appended to `out` as HTTP/1.1. `None`: the head cannot
/// be rebuilt as `http` types (hyper takes the request); `Some(false)`: the answer's body failed
/// (the connection closes).
async fn through_handler(app: &mut Api, read: fast::KeyRequest, out: &mut Vec<u8>) -> Option<bool> {
    use http_body_util::BodyExt;
    let mut req = axum::http::Request::builder()
        .method(read.method)
        .uri(read.path)
        .body(axum::body::Body::from(read.body))
        .ok()?;
    *req.headers_mut() = read.headers;
    let (parts, body) = app.call(req).await.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Some(false);
    };
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    for (name, value) in &parts.headers {
        if name == axum::http::header::CONTENT_LENGTH || name == axum::http::header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
    }
    let bodiless = status.is_informational() || status == 204 || status == 304;
    if !bodiless {
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(&fast::date_at(std::time::Instant::now()));
    out.extend_from_slice(b"\r\n\r\n");
    if !bodiless {
        out.extend_from_slice(&body);
    }
    Some(true)
}

/// The rest of a connection served by hyper.
async fn serve_with_hyper(mut io: Rewind, app: Api, requests: Arc<Requests>, stop: &CancellationToken) {
    io.inner.hyper = true;
    let io = TokioIo::new(io);
    let svc = TowerToHyperService::new(Counted { inner: app, requests });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The timeouts are the stream's; hyper's own header timer would close without an answer.
    builder.header_read_timeout(None);
    crate::lifecycle::drive_connection(builder.serve_connection(io, svc), stop, "http").await;
}

/// A connection's stream with the bytes already read from it in front.
struct Rewind {
    prefix: bytes::Bytes,
    inner: Guarded,
}

impl AsyncRead for Rewind {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.prefix.is_empty() {
            let n = me.prefix.len().min(buf.remaining());
            buf.put_slice(&me.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Answers a connection over the bound with a JSON 503 and closes it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = error_body(
        "too_many_connections",
        &format!("the sidecar already holds {max} connections (server.max_connections); retry shortly"),
    );
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent so closing does not reset the connection under its reader.
        let mut sink = [0u8; 4096];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
        }
    })
    .await;
}

/// `{"error": code, "detail": detail}`, as every error answer.
fn error_body(code: &str, detail: &str) -> String {
    serde_json::json!({ "error": code, "detail": detail }).to_string()
}

/// What the stream needs to know of its connection's requests.
#[derive(Debug, Default)]
struct Requests {
    /// Handed to a handler so far.
    started: AtomicUsize,
    /// Being handled now.
    in_flight: AtomicUsize,
}

/// The API, counting its connection's requests.
#[derive(Clone)]
struct Counted {
    inner: Api,
    requests: Arc<Requests>,
}

impl Service<hyper::Request<Incoming>> for Counted {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = CountedCall;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: hyper::Request<Incoming>) -> Self::Future {
        let guard = InFlight::new(self.requests.clone());
        CountedCall {
            answer: self.inner.call(req),
            guard: Some(guard),
        }
    }
}

/// A request being answered, counted in flight until the answer is ready or the call is
/// dropped (a plain struct: a second boxed future per request costs an allocation).
struct CountedCall {
    answer: super::ApiCall,
    /// Dropped with the answer's readiness, not later with the call.
    guard: Option<InFlight>,
}

impl Future for CountedCall {
    type Output = Result<axum::response::Response, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = ready!(Pin::new(&mut self.answer).poll(cx));
        self.guard = None;
        Poll::Ready(Ok(answer))
    }
}

/// One request in flight; the count drops however the handler ends (done, error, cancelled).
struct InFlight(Arc<Requests>);

impl InFlight {
    fn new(r: Arc<Requests>) -> InFlight {
        r.in_flight.fetch_add(1, Ordering::AcqRel);
        r.started.fetch_add(1, Ordering::AcqRel);
        InFlight(r)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// No request in flight and no byte of the next one yet: the idle timer runs.
    Idle,
    /// Bytes of a request arrived but no handler has it yet: the header timer runs.
    Head,
    /// A handler has the request: no timer.
    Busy,
}

/// A connection's socket with the front door's timers and the rewrite of hyper's bodiless
/// error answers (see the module docs).
struct Guarded {
    stream: TcpStream,
    limits: Limits,
    requests: Arc<Requests>,
    /// `requests.started` when the stream last looked.
    seen: usize,
    wait: Wait,
    /// When the current wait ends (see [`Guarded::expired`]).
    deadline: Instant,
    /// Fires at or before `deadline`; moved only when it fires early or must fire earlier, so
    /// a request costs no timer-wheel update.
    timer: Pin<Box<Sleep>>,
    /// A 408 being written before the connection is closed.
    timeout_reply: Option<(Vec<u8>, usize)>,
    /// A rewritten error answer still being written: the bytes, how far, and how many of the
    /// caller's bytes it stands for.
    rewrite: Option<(Vec<u8>, usize, usize)>,
    /// Whether hyper writes to the stream (only its answers are rewritten).
    hyper: bool,
}

impl Guarded {
    fn new(stream: TcpStream, limits: Limits, requests: Arc<Requests>) -> Guarded {
        Guarded {
            stream,
            deadline: Instant::now() + limits.idle_timeout,
            timer: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            limits,
            requests,
            seen: 0,
            wait: Wait::Idle,
            timeout_reply: None,
            rewrite: None,
            hyper: false,
        }
    }

    fn busy(&self) -> bool {
        self.requests.in_flight.load(Ordering::Acquire) > 0
    }

    /// Moves the state machine after a read of `n` bytes (`0`: before a pending read).
    fn observe_read(&mut self, n: usize) {
        let started = self.requests.started.load(Ordering::Acquire);
        let handled_since = std::mem::replace(&mut self.seen, started) != started;
        if self.busy() {
            self.wait = Wait::Busy;
            return;
        }
        if handled_since {
            // A request was handled (maybe too quickly for a read to see it busy): the wait for
            // the next one starts now.
            self.arm(if n == 0 { Wait::Idle } else { Wait::Head });
            return;
        }
        match (self.wait, n) {
            (Wait::Busy, 0) => self.arm(Wait::Idle),
            (Wait::Busy | Wait::Idle, _) if n > 0 => self.arm(Wait::Head),
            _ => {}
        }
    }

    fn arm(&mut self, wait: Wait) {
        self.wait = wait;
        let after = match wait {
            Wait::Head => self.limits.header_read_timeout,
            _ => self.limits.idle_timeout,
        };
        self.deadline = Instant::now() + after;
        if self.deadline < self.timer.deadline() {
            self.timer.as_mut().reset(self.deadline);
        }
    }

    /// Whether the current wait's deadline has passed. A timer that fired early (the deadline
    /// moved later since it was set) is moved to the deadline and polled again.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.deadline {
                return true;
            }
            let deadline = self.deadline;
            self.timer.as_mut().reset(deadline);
        }
        false
    }

    /// Writes the 408 for a request whose headers did not arrive in time; `Ready` once done.
    fn poll_timeout_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, at)) = self.timeout_reply.as_mut() {
            if *at == bytes.len() {
                break;
            }
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &bytes[*at..]))?;
            if n == 0 {
                break;
            }
            *at += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The JSON body hyper's bodiless answer for `status` gets.
fn library_error(status: u16) -> Option<(&'static str, &'static str)> {
    Some(match status {
        400 => ("bad_request", "the request is not valid HTTP/1.1"),
        408 => ("request_timeout", "the request's headers did not arrive in time"),
        413 => ("payload_too_large", "the request is too large"),
        414 => ("uri_too_long", "the request's URI is too long"),
        431 => ("headers_too_large", "the request's headers are too large"),
        _ => return None,
    })
}

/// If `buf` is hyper's own bodiless error answer, the same answer with the JSON error body.
fn rewrite_library_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status: u16 = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let (code, detail) = library_error(status)?;
    let mut lines = head.trim_end().split("\r\n");
    let status_line = lines.next()?;
    let mut headers: Vec<&str> = Vec::new();
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        match name.as_str() {
            "content-length" if line.split(':').nth(1).map(str::trim) != Some("0") => return None,
            "content-length" | "content-type" | "transfer-encoding" => {}
            _ => headers.push(line),
        }
    }
    if buf.len() > head_end {
        return None; // it has a body: not hyper's bodiless answer
    }
    let body = error_body(code, detail);
    let mut out = format!("{status_line}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    Some(out.into_bytes())
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.timeout_reply.is_some() {
            ready!(me.poll_timeout_reply(cx))?;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request headers did not arrive in time",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut me.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let n = buf.filled().len() - before;
                if r.is_ok() {
                    me.observe_read(n);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                me.observe_read(0);
                if me.wait != Wait::Busy && me.expired(cx) {
                    if me.wait == Wait::Idle {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection closed")));
                    }
                    let body = error_body(
                        "request_timeout",
                        &format!(
                            "the request did not arrive within {} (server.header_read_timeout): its headers, and for a key write of up to 16 KiB its body",
                            humantime::format_duration(me.limits.header_read_timeout)
                        ),
                    );
                    let resp = format!(
                        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    me.timeout_reply = Some((resp.into_bytes(), 0));
                    ready!(me.poll_timeout_reply(cx))?;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request headers did not arrive in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.hyper
            && me.rewrite.is_none()
            && !me.busy()
            && buf.starts_with(b"HTTP/1.1 4")
            && let Some(bytes) = rewrite_library_error(buf)
        {
            me.rewrite = Some((bytes, 0, buf.len()));
        }
        if let Some((bytes, at, stands_for)) = me.rewrite.as_mut() {
            while *at < bytes.len() {
                let n = ready!(Pin::new(&mut me.stream).poll_write(cx, &bytes[*at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *at += n;
            }
            let n = *stands_for;
            me.rewrite = None;
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut me.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bodiless_errors_become_json_and_nothing_else_is_touched() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 15:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite_library_error(hyper_431).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(head.contains("date: Tue"), "other headers are kept: {head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "headers_too_large");
        // Our own errors carry a body: left alone. So are successes and other statuses.
        assert!(rewrite_library_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}").is_none());
        assert!(rewrite_library_error(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite_library_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
