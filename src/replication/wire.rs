//! The replication wire format: the frames a log server streams in the body of an HTTP response,
//! and their incremental decoder. Pure (no I/O), so it is tested on its own.
//!
//! A frame is `kind (u8) | body length (u32 LE) | body`; integers in a body are LEB128.
//!
//! | Kind | Frame | Body |
//! |---|---|---|
//! | 1 | records | first offset, count, then per record: append time ms, payload length, payload (an encoded change event, byte for byte as in the upstream's log) |
//! | 2 | progress | log start, log end, *covered*, *as of* (wall ms; 0 unknown), instance, reloads: the log below *covered* holds every change committed in Postgres before *as of*; *reloads* counts reloads of the upstream's caches outside its log since its process *instance* started |
//! | 3 | failed | UTF-8 reason: the stream ends here (the follower reconnects) |
//! | 4 | snapshot head | position to follow from, keyspace count, per keyspace: name, whole (u8 1/0) |
//! | 5 | entries | keyspace index (into the head's list), count, entries (below) |
//! | 6 | snapshot end | entry count |
//! | 7 | picked records | the offset after the last record looked at, count, then per record: payload length, payload — a federation stream's events after the subscriber's version vector (not consecutive) |
//! | 8 | gossip | JSON: what the sender knows of every node's version vector (see `federation`) |
//!
//! An entry: key (length, UTF-8), flags (u8: 1 value, 2 xid, 4 snapshot, 8 read age, 16
//! federated), value (length, bytes), source position, version, xid, snapshot (xmax, count,
//! xids), read age ms, federated origin (length, UTF-8), sequence and epoch (0 and 0: not yet
//! known) — the optional ones only when their flag is set. Offsets in a records frame are consecutive.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::cache::{Entry, Snapshot};
use crate::commitlog::{Offset, Record};
use crate::event::{Stamp, get_varint, put_varint};
use crate::lsn::Lsn;

/// Largest frame body a decoder accepts (a records batch is far smaller).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Bytes before a frame's body.
const HEADER: usize = 5;

mod kind {
    pub const RECORDS: u8 = 1;
    pub const PROGRESS: u8 = 2;
    pub const FAILED: u8 = 3;
    pub const SNAPSHOT_HEAD: u8 = 4;
    pub const ENTRIES: u8 = 5;
    pub const SNAPSHOT_END: u8 = 6;
    pub const PICKED: u8 = 7;
    pub const GOSSIP: u8 = 8;
}

/// Where an upstream's log stands, as one progress frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub start: Offset,
    pub end: Offset,
    /// The log below this holds every change committed before `as_of_unix_ms`.
    pub covered: Offset,
    /// Wall-clock ms since the Unix epoch; 0 when the upstream does not know its freshness.
    pub as_of_unix_ms: u64,
    /// The upstream's process instance and how often it reloaded its caches outside its log
    /// (followers then take a new snapshot).
    pub instance: u64,
    pub reloads: u64,
}

/// One cache entry of a snapshot, with everything that orders it against changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireEntry {
    pub key: String,
    pub value: Option<Bytes>,
    pub lsn: u64,
    pub version: u64,
    pub xid: Option<u32>,
    pub snapshot: Option<(u32, Vec<u32>)>,
    /// How long ago the state was read from Postgres, when it was.
    pub read_age_ms: Option<u64>,
    /// For federated state: the event's origin and its stamp (`None` when not yet known).
    pub fed: Option<(String, Option<Stamp>)>,
}

impl WireEntry {
    /// The entry as it travels.
    pub fn of(key: &str, e: &Entry) -> WireEntry {
        WireEntry {
            key: key.to_string(),
            value: e.value.clone(),
            lsn: e.lsn.0,
            version: e.version,
            xid: e.xid,
            snapshot: e.snapshot.as_ref().map(|s| (s.xmax, s.xip.clone())),
            read_age_ms: e.read_at.map(|t| t.elapsed().as_millis() as u64),
            fed: e.fed.as_ref().map(|f| (f.origin.to_string(), f.stamp)),
        }
    }

    /// The entry as this node installs it.
    pub fn into_entry(self) -> Entry {
        let mut e = Entry::new(self.value, Lsn(self.lsn), self.version).with_xid(self.xid);
        e = e.with_snapshot(self.snapshot.map(|(xmax, xip)| Snapshot { xmax, xip }));
        if let Some(age) = self.read_age_ms {
            let now = tokio::time::Instant::now();
            e = e.read_at(now.checked_sub(std::time::Duration::from_millis(age)).unwrap_or(now));
        }
        if let Some((origin, stamp)) = self.fed {
            e = e.federated(origin.into(), stamp);
        }
        e
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Records {
        first: Offset,
        records: Vec<(u64, Bytes)>,
    },
    Progress(Progress),
    Failed(String),
    SnapshotHead {
        position: Offset,
        keyspaces: Vec<(String, bool)>,
    },
    Entries {
        keyspace: usize,
        entries: Vec<WireEntry>,
    },
    SnapshotEnd {
        entries: u64,
    },
    Picked {
        next: Offset,
        records: Vec<Bytes>,
    },
    Gossip(Bytes),
}

/// Why bytes are not frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn frame(out: &mut BytesMut, kind: u8, body: &[u8]) {
    out.reserve(HEADER + body.len());
    out.put_u8(kind);
    out.put_u32_le(body.len() as u32);
    out.put_slice(body);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends a records frame for `records` (consecutive offsets).
pub fn records(out: &mut BytesMut, records: &[Record]) {
    let Some(first) = records.first() else { return };
    let size: usize = records.iter().map(|r| r.payload.len() + 12).sum();
    let mut body = Vec::with_capacity(size + 16);
    put_varint(&mut body, first.offset.0);
    put_varint(&mut body, records.len() as u64);
    for r in records {
        put_varint(&mut body, r.timestamp_ms);
        put_bytes(&mut body, &r.payload);
    }
    frame(out, kind::RECORDS, &body);
}

pub fn progress(out: &mut BytesMut, p: Progress) {
    let mut body = Vec::with_capacity(32);
    for v in [p.start.0, p.end.0, p.covered.0, p.as_of_unix_ms, p.instance, p.reloads] {
        put_varint(&mut body, v);
    }
    frame(out, kind::PROGRESS, &body);
}

pub fn failed(out: &mut BytesMut, why: &str) {
    frame(out, kind::FAILED, why.as_bytes());
}

pub fn snapshot_head(out: &mut BytesMut, position: Offset, keyspaces: &[(String, bool)]) {
    let mut body = Vec::new();
    put_varint(&mut body, position.0);
    put_varint(&mut body, keyspaces.len() as u64);
    for (name, whole) in keyspaces {
        put_bytes(&mut body, name.as_bytes());
        body.push(u8::from(*whole));
    }
    frame(out, kind::SNAPSHOT_HEAD, &body);
}

pub fn entries(out: &mut BytesMut, keyspace: usize, entries: &[WireEntry]) {
    let mut body = Vec::new();
    put_varint(&mut body, keyspace as u64);
    put_varint(&mut body, entries.len() as u64);
    for e in entries {
        put_bytes(&mut body, e.key.as_bytes());
        let flags = u8::from(e.value.is_some())
            | (u8::from(e.xid.is_some()) << 1)
            | (u8::from(e.snapshot.is_some()) << 2)
            | (u8::from(e.read_age_ms.is_some()) << 3)
            | (u8::from(e.fed.is_some()) << 4);
        body.push(flags);
        if let Some(v) = &e.value {
            put_bytes(&mut body, v);
        }
        put_varint(&mut body, e.lsn);
        put_varint(&mut body, e.version);
        if let Some(x) = e.xid {
            put_varint(&mut body, u64::from(x));
        }
        if let Some((xmax, xip)) = &e.snapshot {
            put_varint(&mut body, u64::from(*xmax));
            put_varint(&mut body, xip.len() as u64);
            for x in xip {
                put_varint(&mut body, u64::from(*x));
            }
        }
        if let Some(age) = e.read_age_ms {
            put_varint(&mut body, age);
        }
        if let Some((origin, stamp)) = &e.fed {
            put_bytes(&mut body, origin.as_bytes());
            let st = stamp.unwrap_or_default();
            put_varint(&mut body, st.seq);
            put_varint(&mut body, st.epoch);
        }
    }
    frame(out, kind::ENTRIES, &body);
}

/// Appends a picked-records frame: `records` chosen from the log below `next`.
pub fn picked(out: &mut BytesMut, next: Offset, records: &[&[u8]]) {
    let size: usize = records.iter().map(|r| r.len() + 4).sum();
    let mut body = Vec::with_capacity(size + 16);
    put_varint(&mut body, next.0);
    put_varint(&mut body, records.len() as u64);
    for r in records {
        put_bytes(&mut body, r);
    }
    frame(out, kind::PICKED, &body);
}

pub fn gossip(out: &mut BytesMut, json: &[u8]) {
    frame(out, kind::GOSSIP, json);
}

pub fn snapshot_end(out: &mut BytesMut, count: u64) {
    let mut body = Vec::new();
    put_varint(&mut body, count);
    frame(out, kind::SNAPSHOT_END, &body);
}

/// Reads frames out of a byte stream that arrives in arbitrary pieces.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

/// A cursor over one frame's body.
struct Body<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Body<'a> {
    fn int(&mut self) -> Result<u64, WireError> {
        get_varint(self.b, &mut self.at).map_err(|e| WireError::Malformed(e.to_string()))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        u32::try_from(self.int()?).map_err(|_| WireError::Malformed("integer out of range".into()))
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.int()? as usize;
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| WireError::Malformed("field runs past the frame".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn text(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| WireError::Malformed("text is not UTF-8".into()))
    }

    fn byte(&mut self) -> Result<u8, WireError> {
        let b = *self
            .b
            .get(self.at)
            .ok_or_else(|| WireError::Malformed("frame ends early".into()))?;
        self.at += 1;
        Ok(b)
    }

    /// A count of items each at least `min` bytes long, checked against what is left (so a
    /// hostile count cannot make the decoder reserve memory).
    fn count(&mut self, min: usize) -> Result<usize, WireError> {
        let n = self.int()? as usize;
        if n.saturating_mul(min) > self.b.len() - self.at {
            return Err(WireError::Malformed("count larger than the frame".into()));
        }
        Ok(n)
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes received.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let k = self.buf[0];
        let len = u32::from_le_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        self.buf.advance(HEADER);
        let body = self.buf.split_to(len).freeze();
        decode(k, &body).map(Some)
    }
}

fn decode(k: u8, body: &Bytes) -> Result<Frame, WireError> {
    let mut b = Body { b: body, at: 0 };
    let frame = match k {
        kind::RECORDS => {
            let first = Offset(b.int()?);
            let n = b.count(2)?;
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let ts = b.int()?;
                let len = b.int()? as usize;
                let end =
                    b.at.checked_add(len)
                        .filter(|e| *e <= body.len())
                        .ok_or_else(|| WireError::Malformed("record runs past the frame".into()))?;
                records.push((ts, body.slice(b.at..end)));
                b.at = end;
            }
            Frame::Records { first, records }
        }
        kind::PROGRESS => Frame::Progress(Progress {
            start: Offset(b.int()?),
            end: Offset(b.int()?),
            covered: Offset(b.int()?),
            as_of_unix_ms: b.int()?,
            instance: b.int()?,
            reloads: b.int()?,
        }),
        kind::FAILED => Frame::Failed(String::from_utf8_lossy(body).into_owned()),
        kind::SNAPSHOT_HEAD => {
            let position = Offset(b.int()?);
            let n = b.count(2)?;
            let mut keyspaces = Vec::with_capacity(n);
            for _ in 0..n {
                let name = b.text()?;
                keyspaces.push((name, b.byte()? == 1));
            }
            Frame::SnapshotHead { position, keyspaces }
        }
        kind::ENTRIES => {
            let keyspace = b.int()? as usize;
            let n = b.count(4)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let key = b.text()?;
                let flags = b.byte()?;
                let value = if flags & 1 != 0 {
                    Some(Bytes::copy_from_slice(b.bytes()?))
                } else {
                    None
                };
                let lsn = b.int()?;
                let version = b.int()?;
                let xid = if flags & 2 != 0 { Some(b.u32()?) } else { None };
                let snapshot = if flags & 4 != 0 {
                    let xmax = b.u32()?;
                    let m = b.count(1)?;
                    let mut xip = Vec::with_capacity(m);
                    for _ in 0..m {
                        xip.push(b.u32()?);
                    }
                    Some((xmax, xip))
                } else {
                    None
                };
                let read_age_ms = if flags & 8 != 0 { Some(b.int()?) } else { None };
                let fed = if flags & 16 != 0 {
                    let origin = b.text()?;
                    let stamp = Stamp {
                        seq: b.int()?,
                        epoch: b.int()?,
                    };
                    Some((origin, (stamp.seq != 0).then_some(stamp)))
                } else {
                    None
                };
                entries.push(WireEntry {
                    key,
                    value,
                    lsn,
                    version,
                    xid,
                    snapshot,
                    read_age_ms,
                    fed,
                });
            }
            Frame::Entries { keyspace, entries }
        }
        kind::SNAPSHOT_END => Frame::SnapshotEnd { entries: b.int()? },
        kind::PICKED => {
            let next = Offset(b.int()?);
            let n = b.count(1)?;
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let len = b.int()? as usize;
                let end =
                    b.at.checked_add(len)
                        .filter(|e| *e <= body.len())
                        .ok_or_else(|| WireError::Malformed("record runs past the frame".into()))?;
                records.push(body.slice(b.at..end));
                b.at = end;
            }
            Frame::Picked { next, records }
        }
        kind::GOSSIP => {
            b.at = body.len();
            Frame::Gossip(body.clone())
        }
        other => return Err(WireError::UnknownKind(other)),
    };
    if k != kind::FAILED && b.at != body.len() {
        return Err(WireError::Malformed(format!(
            "{} bytes left over in a frame of kind {k}",
            body.len() - b.at
        )));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(offset: u64, payload: &[u8]) -> Record {
        Record {
            offset: Offset(offset),
            timestamp_ms: 1_700_000_000_000 + offset,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn sample() -> (BytesMut, Vec<Frame>) {
        let mut out = BytesMut::new();
        records(&mut out, &[record(7, b"a"), record(8, b""), record(9, &[0xff; 300])]);
        let p = Progress {
            start: Offset(3),
            end: Offset(10),
            covered: Offset(9),
            as_of_unix_ms: 1_700_000_000_123,
            instance: u64::MAX,
            reloads: 2,
        };
        progress(&mut out, p);
        snapshot_head(&mut out, Offset(9), &[("users".into(), true), ("orders".into(), false)]);
        let e = vec![
            WireEntry {
                key: "1".into(),
                value: Some(Bytes::from_static(b"{\"id\":1}")),
                lsn: 42,
                version: 99,
                xid: Some(7),
                snapshot: Some((10, vec![8, 9])),
                read_age_ms: Some(5),
                fed: Some(("eu".into(), Some(Stamp { seq: 3, epoch: 77 }))),
            },
            WireEntry {
                key: "2".into(),
                value: None,
                lsn: 43,
                version: 100,
                xid: None,
                snapshot: None,
                read_age_ms: None,
                fed: None,
            },
        ];
        entries(&mut out, 1, &e);
        snapshot_end(&mut out, 2);
        picked(&mut out, Offset(40), &[b"x", b""]);
        gossip(&mut out, b"{}");
        failed(&mut out, "bye");
        let frames = vec![
            Frame::Records {
                first: Offset(7),
                records: vec![
                    (1_700_000_000_007, Bytes::from_static(b"a")),
                    (1_700_000_000_008, Bytes::new()),
                    (1_700_000_000_009, Bytes::from(vec![0xff; 300])),
                ],
            },
            Frame::Progress(p),
            Frame::SnapshotHead {
                position: Offset(9),
                keyspaces: vec![("users".into(), true), ("orders".into(), false)],
            },
            Frame::Entries {
                keyspace: 1,
                entries: e,
            },
            Frame::SnapshotEnd { entries: 2 },
            Frame::Picked {
                next: Offset(40),
                records: vec![Bytes::from_static(b"x"), Bytes::new()],
            },
            Frame::Gossip(Bytes::from_static(b"{}")),
            Frame::Failed("bye".into()),
        ];
        (out, frames)
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let (bytes, want) = sample();
        for piece in [1, 2, 3, 7, 64, bytes.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, want, "pieces of {piece} bytes");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn a_frame_claiming_too_much_is_refused_before_it_arrives() {
        let mut d = Decoder::new();
        d.push(&[1, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(d.next_frame(), Err(WireError::TooLarge(_))));
        let mut d = Decoder::new();
        d.push(&[99, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(WireError::UnknownKind(99)));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(kind in 1u8..=8, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut d = Decoder::new();
            let mut bytes = BytesMut::new();
            frame(&mut bytes, kind, &body);
            d.push(&bytes);
            let _ = d.next_frame();
        }
    }
}
