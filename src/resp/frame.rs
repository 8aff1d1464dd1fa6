//! Request framing: takes whole commands off a connection's read buffer — RESP arrays of bulk
//! strings (what every client sends, in RESP2 and RESP3 alike) and inline commands (a line of
//! words, as `telnet` or `redis-cli`'s inline mode sends) — under the listener's bounds.
//!
//! Why not the `redis-protocol` crate's decoder: it decodes any frame, nested arrays included,
//! by recursion with no depth bound — measured here, 10,000 nested `*1\r\n` (a 40 KB request)
//! overflow a 2 MiB stack, a tokio worker's, and abort the process — and it has no size bounds,
//! so a peer announcing `$2000000000` would have us buffer until the value arrived. A request is
//! one flat array of bulk strings, so one bounded, flat walk is both the safety check and the
//! parse. The crate stays as the oracle of this parser's property tests and fuzz target, which
//! check that both read every flat request alike.
//!
//! Errors follow Redis's wording; after one the connection is answered and closed, since the
//! stream's framing is lost (what Redis does).

use bytes::{Bytes, BytesMut};

/// The bounds one listener applies to requests (see `resp::config`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_inline: usize,
    pub max_bulk: u64,
    pub max_multibulk: u64,
    pub max_query: u64,
}

/// Why a request could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("Protocol error: invalid multibulk length")]
    MultibulkLength,
    #[error("Protocol error: invalid bulk length")]
    BulkLength,
    #[error("Protocol error: too big inline request")]
    InlineTooBig,
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("Protocol error: bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("Protocol error: the request is larger than max_query_bytes ({0} bytes)")]
    QueryTooBig(u64),
}

/// Longest length line (`*<n>\r\n`, `$<n>\r\n`) Redis accepts before deciding it is garbage.
const MAX_LENGTH_LINE: usize = 32;

/// Takes the next whole command off `buf`: `Ok(Some(args))` (possibly empty: a blank line or
/// `*0`, which the caller ignores), `Ok(None)` when more bytes are needed, or the error that
/// ends the connection. Arguments are slices of the buffer's bytes, not copies.
pub fn next_command(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let found = if buf[0] == b'*' {
        multibulk(buf, limits)?
    } else {
        return inline(buf, limits);
    };
    match found {
        Some((end, ranges)) => {
            let frame = buf.split_to(end).freeze();
            Ok(Some(ranges.into_iter().map(|(a, b)| frame.slice(a..b)).collect()))
        }
        None if buf.len() as u64 > limits.max_query => Err(ProtocolError::QueryTooBig(limits.max_query)),
        None => Ok(None),
    }
}

/// Reads a `\r\n`-terminated decimal length starting at `at`: `Ok(None)` when the line is not
/// complete yet. Returns the value and the offset after the line.
fn length_line(buf: &[u8], at: usize, bad: ProtocolError) -> Result<Option<(i64, usize)>, ProtocolError> {
    let window = &buf[at..buf.len().min(at + MAX_LENGTH_LINE)];
    let Some(cr) = window.iter().position(|&c| c == b'\r') else {
        return if window.len() >= MAX_LENGTH_LINE {
            Err(bad)
        } else {
            Ok(None)
        };
    };
    let Some(&lf) = buf.get(at + cr + 1) else {
        return Ok(None);
    };
    if lf != b'\n' {
        return Err(bad);
    }
    let text = std::str::from_utf8(&window[..cr]).map_err(|_| bad.clone())?;
    // Redis's string2ll: an optional '-', digits, no '+', no spaces, no leading zeros beyond "0".
    let ok_form = !text.is_empty()
        && !text.starts_with('+')
        && text.trim_start_matches('-').bytes().all(|c| c.is_ascii_digit())
        && !text.trim_start_matches('-').is_empty();
    let n: i64 = if ok_form {
        text.parse().map_err(|_| bad.clone())?
    } else {
        return Err(bad);
    };
    Ok(Some((n, at + cr + 2)))
}

/// A whole request: where it ends in the buffer, and its arguments' byte ranges.
type Framed = (usize, Vec<(usize, usize)>);

/// A whole multibulk request, or `None` when incomplete.
fn multibulk(buf: &[u8], limits: &Limits) -> Result<Option<Framed>, ProtocolError> {
    let Some((count, mut at)) = length_line(buf, 1, ProtocolError::MultibulkLength)? else {
        return Ok(None);
    };
    if count > limits.max_multibulk as i64 {
        return Err(ProtocolError::MultibulkLength);
    }
    if count <= 0 {
        // `*0` and `*-1`: nothing to run (Redis ignores them too).
        return Ok(Some((at, Vec::new())));
    }
    // Capacity from what is buffered, not from what the peer announced.
    let mut ranges = Vec::with_capacity((count as usize).min(buf.len() / 4 + 1));
    for _ in 0..count {
        let Some(&kind) = buf.get(at) else {
            return Ok(None);
        };
        if kind != b'$' {
            return Err(ProtocolError::ExpectedBulk(kind as char));
        }
        let Some((len, body)) = length_line(buf, at + 1, ProtocolError::BulkLength)? else {
            return Ok(None);
        };
        if len < 0 || len as u64 > limits.max_bulk {
            return Err(ProtocolError::BulkLength);
        }
        let end = body + len as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        ranges.push((body, end));
        at = end + 2;
    }
    Ok(Some((at, ranges)))
}

/// An inline command: one line (ending in `\n`, optionally `\r\n`) split into words, with
/// Redis's quoting (`"..."` with escapes, `'...'`).
fn inline(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(nl) = buf.iter().position(|&c| c == b'\n') else {
        return if buf.len() > limits.max_inline {
            Err(ProtocolError::InlineTooBig)
        } else {
            Ok(None)
        };
    };
    if nl > limits.max_inline {
        return Err(ProtocolError::InlineTooBig);
    }
    let line = buf.split_to(nl + 1);
    let mut line = &line[..nl];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    split_args(line).map(Some)
}

/// Splits an inline line into arguments like Redis's `sdssplitargs`.
pub fn split_args(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Ok(args);
        }
        let mut cur = Vec::new();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            if in_dq {
                if i >= n {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                match line[i] {
                    b'\\'
                        if i + 3 < n
                            && line[i + 1] == b'x'
                            && hex(line[i + 2]).is_some()
                            && hex(line[i + 3]).is_some() =>
                    {
                        cur.push(hex(line[i + 2]).unwrap_or(0) * 16 + hex(line[i + 3]).unwrap_or(0));
                        i += 3;
                    }
                    b'\\' if i + 1 < n => {
                        i += 1;
                        cur.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            c => c,
                        });
                    }
                    b'"' => {
                        // A closing quote must be followed by a space or the end.
                        if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                            return Err(ProtocolError::UnbalancedQuotes);
                        }
                        in_dq = false;
                        i += 1;
                        break;
                    }
                    c => cur.push(c),
                }
            } else if in_sq {
                if i >= n {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                match line[i] {
                    b'\\' if i + 1 < n && line[i + 1] == b'\'' => {
                        i += 1;
                        cur.push(b'\'');
                    }
                    b'\'' => {
                        if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                            return Err(ProtocolError::UnbalancedQuotes);
                        }
                        in_sq = false;
                        i += 1;
                        break;
                    }
                    c => cur.push(c),
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    c if c.is_ascii_whitespace() => break,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        debug_assert!(!in_dq && !in_sq);
        args.push(Bytes::from(cur));
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_inline: 64,
        max_bulk: 16,
        max_multibulk: 8,
        max_query: 1024,
    };

    fn one(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        next_command(&mut BytesMut::from(input), &LIMITS)
    }

    fn args(v: &[&str]) -> Vec<Bytes> {
        v.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect()
    }

    #[test]
    fn frames_multibulk_and_inline_commands() {
        assert_eq!(
            one(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n").unwrap(),
            Some(args(&["GET", "a"]))
        );
        assert_eq!(one(b"*2\r\n$3\r\nGET\r\n$1\r\na").unwrap(), None, "half sent");
        assert_eq!(one(b"*2\r\n$3\r\nGET\r\n$1\r").unwrap(), None);
        assert_eq!(one(b"*0\r\n").unwrap(), Some(vec![]));
        assert_eq!(one(b"set a 'b c'\r\n").unwrap(), Some(args(&["set", "a", "b c"])));
        assert_eq!(one(b"PING\n").unwrap(), Some(args(&["PING"])));
        assert_eq!(one(b"echo \"a\\x41\\n\"\n").unwrap(), Some(args(&["echo", "aA\n"])));
        assert_eq!(one(b"   \r\n").unwrap(), Some(vec![]));
        assert_eq!(one(b"PING").unwrap(), None);
        // Pipelined: one command at a time, the rest left in the buffer.
        let mut buf = BytesMut::from(&b"PING\r\n*1\r\n$4\r\nPING\r\n"[..]);
        assert_eq!(next_command(&mut buf, &LIMITS).unwrap(), Some(args(&["PING"])));
        assert_eq!(next_command(&mut buf, &LIMITS).unwrap(), Some(args(&["PING"])));
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_what_redis_refuses() {
        use ProtocolError::*;
        assert_eq!(one(b"*9\r\n"), Err(MultibulkLength), "over max_multibulk");
        assert_eq!(one(b"*x\r\n"), Err(MultibulkLength));
        assert_eq!(
            one(b"*1\r\n$17\r\n"),
            Err(BulkLength),
            "over max_bulk, before the body arrives"
        );
        assert_eq!(one(b"*1\r\n$-1\r\n"), Err(BulkLength));
        assert_eq!(one(b"*1\r\n:1\r\n"), Err(ExpectedBulk(':')));
        assert_eq!(one(b"*1\r\n*1\r\n"), Err(ExpectedBulk('*')), "no nesting");
        assert_eq!(one(b"*1\r\n$1\r\nab\r\n"), Err(MissingCrlf));
        assert_eq!(one(&[b'x'; 65]), Err(InlineTooBig));
        assert_eq!(one(b"set a \"b\n"), Err(UnbalancedQuotes));
        assert_eq!(one(b"*1\r\n$+1\r\na\r\n"), Err(BulkLength));
        assert_eq!(one(&[b'*'; 40]), Err(MultibulkLength), "a length line that never ends");
        let big = LIMITS.max_query as usize + 1;
        let mut half = b"*2\r\n$3\r\nGET\r\n".to_vec();
        half.resize(big, b'$');
        assert!(one(&half).is_err());
    }

    /// Any flat request within the bounds reads the same here as with the `redis-protocol`
    /// crate's decoder, alone and pipelined, and byte by byte.
    fn encode(cmd: &[Vec<u8>]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", cmd.len()).into_bytes();
        for a in cmd {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    proptest! {
        #[test]
        fn agrees_with_the_crate(cmds in proptest::collection::vec(
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 1..8), 1..5)) {
            let mut wire = Vec::new();
            for c in &cmds {
                wire.extend_from_slice(&encode(c));
            }
            // The oracle.
            let mut at = 0;
            for c in &cmds {
                let (frame, used) = redis_protocol::resp2::decode::decode(&wire[at..]).unwrap().unwrap();
                let redis_protocol::resp2::types::OwnedFrame::Array(items) = frame else { panic!() };
                let theirs: Vec<Vec<u8>> = items.into_iter().map(|f| match f {
                    redis_protocol::resp2::types::OwnedFrame::BulkString(b) => b,
                    other => panic!("{other:?}"),
                }).collect();
                prop_assert_eq!(&theirs, c);
                at += used;
            }
            // Ours, fed one byte at a time.
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for b in &wire {
                buf.extend_from_slice(&[*b]);
                while let Some(args) = next_command(&mut buf, &LIMITS).unwrap() {
                    got.push(args.into_iter().map(|a| a.to_vec()).collect::<Vec<_>>());
                }
            }
            prop_assert_eq!(got, cmds);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn never_panics_and_always_progresses(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                let before = buf.len();
                match next_command(&mut buf, &LIMITS) {
                    Ok(Some(_)) => prop_assert!(buf.len() < before, "a command consumes bytes"),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
