//! The listener's own HTTP/1.1 path for its hottest requests: a `GET` of one key that memory
//! answers, and a `PUT` or `DELETE` of one key. It parses the request head with `httparse`
//! (hyper's own parser) straight from the connection's read buffer. A hit's whole answer —
//! status line, the same headers and body [`kv::get_now`](super::kv::get_now) gives — goes into
//! the connection's write buffer, with no `Request`, no header map and no `Response` built. A
//! write whose head and body are both buffered is run through the handler the router calls, its
//! body handed over whole (see `listener`).
//!
//! Why not hyper for these too: on a hit, hyper's parse into `http` types, its dispatcher and its
//! encoder were the largest share of the sidecar's user time per request (`benches/http_cpu.rs`,
//! README "Closing the gaps"). On a write, hyper's dispatcher feeds the body to the handler
//! through a channel whose send wakes the connection's own task while it runs; the runtime then
//! requeues the task and wakes a second worker thread to steal it — a futex wake and two context
//! switches per write beside the request, on the critical path of a one-connection writer
//! (README "Measured"). Everything this path does not take is still hyper's: any other method or
//! route, a chunked body, a body over `server.max_body_bytes` or not buffered with its head
//! within [`MAX_HEAD`], `Connection` other than `keep-alive`, `Expect`, `Upgrade`, HTTP/1.0, a
//! query string, a head too large or not valid HTTP — and a read memory cannot answer (a miss,
//! a 404, any error) is answered by the same handler the router calls.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::AppState;

/// Headers a request this path takes may carry; more go to hyper (whose limit is 100).
const MAX_HEADERS: usize = 64;

/// A request head longer than this that is still incomplete goes to hyper, which answers 431
/// past its own limit; so does a write whose head and body together are longer and not yet
/// buffered (a body that small arrives with its head or just after it).
pub const MAX_HEAD: usize = 16 * 1024;

/// What the front of a connection's read buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A key read answered into the write buffer; its head took this many bytes.
    Answered(usize),
    /// A key request this path takes that the handler answers: a read memory could not
    /// answer, or a write.
    Handle(KeyRequest),
    /// Not a whole head yet, or a write's body not yet whole (head and body within
    /// [`MAX_HEAD`]).
    Partial,
    /// A request this path does not take: hyper serves the connection from here on.
    HandOver,
}

/// A key request the handler answers: what of it the handler reads.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyRequest {
    /// Bytes it took at the front of the buffer, head and body.
    pub len: usize,
    /// `GET`, `PUT` or `DELETE`.
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// Empty for a read.
    pub body: bytes::Bytes,
}

/// What a connection's requests have shown this path before.
#[derive(Debug, Default)]
pub struct Seen {
    /// The last `Host` value the allow-list admitted (a client sends the same one every time).
    host: Vec<u8>,
}

impl Seen {
    /// Whether `host` is on `[server] allowed_hosts`, remembering the last one that was.
    fn admits(&mut self, st: &AppState, host: &[u8]) -> bool {
        if !self.host.is_empty() && self.host == host {
            return true;
        }
        let admitted = std::str::from_utf8(host).is_ok_and(|h| st.server.host_allowed(h));
        if admitted {
            self.host.clear();
            self.host.extend_from_slice(host);
        }
        admitted
    }
}

/// Reads the request at the front of `buf`; a key read memory answers is appended to `out`.
pub fn serve(st: &AppState, seen: &mut Seen, buf: &[u8], out: &mut Vec<u8>) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::HandOver,
    };
    let (Some(method), Some(1), Some(path)) = (req.method, req.version, req.path) else {
        return Parsed::HandOver;
    };
    let method = match method {
        "GET" => Method::GET,
        "PUT" => Method::PUT,
        "DELETE" => Method::DELETE,
        _ => return Parsed::HandOver,
    };
    if !path.bytes().all(plain_path_byte) || !super::is_key_path(path) {
        return Parsed::HandOver;
    }
    let (mut host, mut authorization, mut if_none_match, mut content_length) = (None, None, None, None);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Parsed::HandOver;
            }
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case("if-none-match") {
            if_none_match.get_or_insert(h.value);
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization.get_or_insert(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            // One plain decimal length; anything else (a list, a second header) is hyper's.
            let parsed = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (content_length, parsed) {
                (None, Some(n)) => content_length = Some(n),
                _ => return Parsed::HandOver,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return Parsed::HandOver;
            }
        } else if ["transfer-encoding", "expect", "upgrade"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            return Parsed::HandOver;
        }
    }
    let body_len = content_length.unwrap_or(0);
    if method != Method::PUT && body_len != 0 {
        return Parsed::HandOver;
    }
    if body_len > st.server.max_body_bytes {
        // The handler's 413, through hyper, which reads no more of it than it must.
        return Parsed::HandOver;
    }
    let Some(end) = usize::try_from(body_len).ok().and_then(|b| len.checked_add(b)) else {
        return Parsed::HandOver;
    };
    if buf.len() < end {
        return if end <= MAX_HEAD {
            Parsed::Partial
        } else {
            Parsed::HandOver
        };
    }
    if method == Method::GET {
        let admitted = host.is_none_or(|h| seen.admits(st, h))
            && st.server.token.as_ref().is_none_or(|token| {
                authorization
                    .and_then(|v| v.strip_prefix(b"Bearer "))
                    .is_some_and(|p| crate::credential::same_secret(p.trim_ascii(), token.expose().as_bytes()))
            });
        let started = Instant::now();
        if admitted && super::kv::write_now(st, started, &date_at(started), path, if_none_match, out) {
            return Parsed::Answered(len);
        }
    }
    // A write, a read refused (the handler's path answers 421 / 401 exactly as the router
    // does), or a read memory cannot answer: the handler takes it. A header `http` would not
    // take as it is goes to hyper with the request.
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::HandOver;
        };
        headers.append(name, value);
    }
    Parsed::Handle(KeyRequest {
        len: end,
        method,
        path: path.to_owned(),
        headers,
        body: bytes::Bytes::copy_from_slice(&buf[len..end]),
    })
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) is always this long.
const DATE_LEN: usize = 29;

thread_local! {
    /// The `Date` header's value and the monotonic instant until which it holds.
    static DATE: Cell<(Option<Instant>, [u8; DATE_LEN])> = const { Cell::new((None, [0; DATE_LEN])) };
}

/// The `Date` header's value at `now` (a monotonic reading the caller took anyway): the wall
/// clock is read and the value formatted once a second per thread, as hyper does, and in
/// between only compared.
pub fn date_at(now: Instant) -> [u8; DATE_LEN] {
    let (until, text) = DATE.get();
    if until.is_some_and(|u| now < u) {
        return text;
    }
    let wall = SystemTime::now();
    let into_second = wall
        .duration_since(UNIX_EPOCH)
        .map_or(Duration::ZERO, |d| Duration::from_nanos(u64::from(d.subsec_nanos())));
    let mut text = [b' '; DATE_LEN];
    let formatted = httpdate::fmt_http_date(wall);
    let n = formatted.len().min(DATE_LEN);
    text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
    DATE.set((Some(now + (Duration::from_secs(1) - into_second)), text));
    text
}

/// Whether `b` may stand in a path this path takes as it is: RFC 3986's unreserved and
/// sub-delimiter characters, `:`, `@`, `/` and `%`. A query, a fragment or anything a URI
/// parser might treat otherwise goes to hyper, so such a request gets hyper's answer.
fn plain_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_is_the_wall_clocks_second_and_kept_within_it() {
        let now = Instant::now();
        let text = date_at(now);
        let parsed = httpdate::parse_http_date(std::str::from_utf8(&text).unwrap()).expect("an IMF-fixdate");
        let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(off < Duration::from_secs(2), "{off:?}");
        // Within the same second the same value is given without reading the wall clock.
        assert_eq!(date_at(now), text);
        // Past the second, the wall clock is read again.
        let again = date_at(now + Duration::from_millis(1_001));
        let again = httpdate::parse_http_date(std::str::from_utf8(&again).unwrap()).unwrap();
        assert!(again >= parsed);
        assert!(SystemTime::now().duration_since(again).unwrap_or_default() < Duration::from_secs(2));
    }

    #[test]
    fn only_plain_paths_are_taken() {
        for path in [
            "/v1/kv/default/a",
            "/v1/kv/users/acme,7",
            "/v1/kv/d/a%2Fb",
            "/v1/kv/d/x:y@z",
        ] {
            assert!(path.bytes().all(plain_path_byte), "{path}");
        }
        for path in [
            "/v1/kv/d/a?x=1",
            "/v1/kv/d/a#f",
            "/v1/kv/d/a b",
            "/v1/kv/d/\"a\"",
            "/v1/kv/d/{a}",
        ] {
            assert!(!path.bytes().all(plain_path_byte), "{path}");
        }
    }
}
