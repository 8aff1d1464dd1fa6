//! Replies and their encoding in RESP2 or RESP3, as the connection negotiated with `HELLO`.
//!
//! One [`Reply`] type for both versions: RESP3's richer types fall back the way Redis's do in
//! RESP2 (a map becomes a flat array of pairs, a set an array, a push an array, a verbatim
//! string a bulk string, null a null bulk or null array). Encoded straight into the
//! connection's output buffer: a pipelined batch of replies is one write.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::cache::Entry;

/// One reply.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A cached entry's value as a bulk string (nil when it has none): the entry read is held,
    /// not its bytes cloned (a shared reference count touched per read is a cross-core cost).
    Doc(Arc<Entry>),
    /// `+OK`
    Ok,
    /// A status line (`+PONG`, `+string`).
    Simple(&'static str),
    /// A status line built at run time (`TYPE`'s answer is static; `CLIENT INFO`-like text).
    Status(String),
    /// `-<text>`: the text starts with the error code (`ERR`, `WRONGTYPE`, `NOAUTH`…).
    Error(String),
    Int(i64),
    Bulk(Bytes),
    /// A null bulk string (RESP3 `_`).
    Nil,
    /// A null array (RESP3 `_`): what `*-1` means in RESP2.
    NilArray,
    Array(Vec<Reply>),
    /// RESP3 map; a flat array of pairs in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// RESP3 set; an array in RESP2.
    Set(Vec<Reply>),
    /// RESP3 verbatim string (`=len\r\ntxt:...`); a bulk string in RESP2 (`INFO`, `CLIENT LIST`).
    Verbatim(String),
    /// RESP3 out-of-band push (`>`); an array in RESP2 (pub/sub messages).
    Push(Vec<Reply>),
    /// Several replies to one command, one after another (`SUBSCRIBE a b` answers per channel).
    Seq(Vec<Reply>),
}

/// Replies compare by what they encode (tests, and `== Reply::Nil` checks).
impl PartialEq for Reply {
    fn eq(&self, other: &Reply) -> bool {
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        self.encode(&mut a, 3);
        other.encode(&mut b, 3);
        a == b
    }
}

impl Reply {
    pub fn err(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }

    pub fn bulk(text: impl AsRef<[u8]>) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(text.as_ref()))
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Appends this reply to `out` in protocol version `proto` (2 or 3).
    pub fn encode(&self, out: &mut BytesMut, proto: u8) {
        let v3 = proto >= 3;
        match self {
            Reply::Doc(e) => match &e.value {
                Some(v) => bulk(out, v),
                None => Reply::Nil.encode(out, proto),
            },
            Reply::Ok => out.put_slice(b"+OK\r\n"),
            Reply::Simple(s) => line(out, b'+', s.as_bytes()),
            Reply::Status(s) => line(out, b'+', clean(s).as_bytes()),
            Reply::Error(e) => line(out, b'-', clean(e).as_bytes()),
            Reply::Int(n) => {
                out.put_u8(b':');
                put_int(out, *n);
                out.put_slice(b"\r\n");
            }
            Reply::Bulk(b) => bulk(out, b),
            Reply::Nil if v3 => out.put_slice(b"_\r\n"),
            Reply::Nil => out.put_slice(b"$-1\r\n"),
            Reply::NilArray if v3 => out.put_slice(b"_\r\n"),
            Reply::NilArray => out.put_slice(b"*-1\r\n"),
            Reply::Array(items) => aggregate(out, b'*', items, proto),
            Reply::Set(items) => aggregate(out, if v3 { b'~' } else { b'*' }, items, proto),
            Reply::Push(items) => aggregate(out, if v3 { b'>' } else { b'*' }, items, proto),
            Reply::Map(pairs) => {
                if v3 {
                    header(out, b'%', pairs.len());
                } else {
                    header(out, b'*', pairs.len() * 2);
                }
                for (k, v) in pairs {
                    k.encode(out, proto);
                    v.encode(out, proto);
                }
            }
            Reply::Verbatim(text) if v3 => {
                header(out, b'=', text.len() + 4);
                out.put_slice(b"txt:");
                out.put_slice(text.as_bytes());
                out.put_slice(b"\r\n");
            }
            Reply::Verbatim(text) => bulk(out, text.as_bytes()),
            Reply::Seq(replies) => {
                for r in replies {
                    r.encode(out, proto);
                }
            }
        }
    }
}

/// A status or error text with no line breaks (they would end the line early).
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['\r', '\n']) {
        s.replace(['\r', '\n'], " ").into()
    } else {
        s.into()
    }
}

fn line(out: &mut BytesMut, kind: u8, text: &[u8]) {
    out.reserve(text.len() + 3);
    out.put_u8(kind);
    out.put_slice(text);
    out.put_slice(b"\r\n");
}

fn header(out: &mut BytesMut, kind: u8, n: usize) {
    out.put_u8(kind);
    put_int(out, n as i64);
    out.put_slice(b"\r\n");
}

/// Appends a bulk string (`$<len>\r\n<bytes>\r\n`).
pub fn bulk(out: &mut BytesMut, b: &[u8]) {
    out.reserve(b.len() + 16);
    header(out, b'$', b.len());
    out.put_slice(b);
    out.put_slice(b"\r\n");
}

fn aggregate(out: &mut BytesMut, kind: u8, items: &[Reply], proto: u8) {
    header(out, kind, items.len());
    for i in items {
        i.encode(out, proto);
    }
}

fn put_int(out: &mut BytesMut, n: i64) {
    let mut buf = itoa::Buffer::new();
    out.put_slice(buf.format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: &Reply, proto: u8) -> String {
        let mut out = BytesMut::new();
        r.encode(&mut out, proto);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn encodes_both_versions() {
        assert_eq!(enc(&Reply::Ok, 2), "+OK\r\n");
        assert_eq!(enc(&Reply::bulk("hi"), 2), "$2\r\nhi\r\n");
        assert_eq!(enc(&Reply::Nil, 2), "$-1\r\n");
        assert_eq!(enc(&Reply::Nil, 3), "_\r\n");
        assert_eq!(enc(&Reply::NilArray, 2), "*-1\r\n");
        assert_eq!(enc(&Reply::Int(-5), 3), ":-5\r\n");
        let map = Reply::Map(vec![(Reply::bulk("a"), Reply::Int(1))]);
        assert_eq!(enc(&map, 2), "*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(&map, 3), "%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(&Reply::Verbatim("x".into()), 3), "=5\r\ntxt:x\r\n");
        let push = Reply::Push(vec![Reply::bulk("invalidate"), Reply::NilArray]);
        assert_eq!(enc(&push, 3), ">2\r\n$10\r\ninvalidate\r\n_\r\n");
        assert_eq!(
            enc(&Reply::err("ERR a\r\nb"), 2),
            "-ERR a  b\r\n",
            "no line break inside"
        );
    }

    /// Every reply decodes with the `redis-protocol` crate as the same value.
    #[test]
    fn the_crate_reads_what_we_write() {
        use redis_protocol::resp3::decode::complete::decode;
        let r = Reply::Array(vec![
            Reply::bulk("a"),
            Reply::Int(7),
            Reply::Nil,
            Reply::Map(vec![(Reply::Simple("k"), Reply::Set(vec![Reply::Int(2)]))]),
            Reply::Verbatim("text".into()),
        ]);
        let mut out = BytesMut::new();
        r.encode(&mut out, 3);
        let (_, used) = decode(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        let mut v2 = BytesMut::new();
        r.encode(&mut v2, 2);
        let (_, used) = redis_protocol::resp2::decode::decode(&v2).unwrap().unwrap();
        assert_eq!(used, v2.len());
    }
}
