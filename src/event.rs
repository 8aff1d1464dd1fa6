//! The change event: everything that changes a cache entry — a CDC row change, an API write, a
//! federated peer's event — and its compact binary encoding in the commit log.
//!
//! Encoding (format 1): one format byte, then fields as `tag (u8) | length (LEB128) | bytes`.
//! Integers inside a field are LEB128. A decoder skips tags it does not know, so later builds
//! can add fields without breaking segments written by earlier ones; a format byte newer than
//! this build understands is an error, never a guess. Decoding never panics, whatever the input
//! (see the property tests and the fuzz target in `tests/fuzz`).
//!
//! | Tag | Field | Type |
//! |---|---|---|
//! | 1 | keyspace | UTF-8 |
//! | 2 | key | UTF-8 |
//! | 3 | op | u8: 1 put, 2 delete, 3 invalidate, 4 clear (the whole keyspace; key empty), 5 rejected (the home region's Postgres rejected a write taken elsewhere; value: the dead letter) |
//! | 4 | value | bytes (a JSON document; puts only) |
//! | 5 | origin node id | UTF-8 |
//! | 6 | version (hybrid logical clock) | LEB128 u64 |
//! | 7 | source | u8: 1 cdc, 2 api, 3 federation |
//! | 8 | source position (LSN for CDC) | LEB128 u64 |
//! | 9 | source time (commit time for CDC), µs since the Unix epoch | LEB128 u64 |
//! | 10 | fields left out of `value` because the source did not send them (unchanged TOAST) | LEB128 count, then each as LEB128 length + UTF-8 |
//! | 11 | source transaction id (the 32-bit xid for CDC and writes) | LEB128 u64 |
//! | 12 | fields a write named (write-behind: the columns the flush writes; `value` is the whole document readers see) | as tag 10 |
//! | 13 | federation stamp: the origin's gap-free sequence number and its log epoch (see `federation`) | fixed: u64 LE sequence, u64 LE epoch |
//!
//! A federated event's stamp is always the first field and its origin the second, so the log's
//! admission hook (`federation::Sequencer`) finds them without decoding the rest; an event the
//! origin has yet to sequence carries sequence 0, which the hook fills in as it is appended.

use bytes::Bytes;

/// The event format this build writes, and the newest it reads.
pub const EVENT_FORMAT: u8 = 1;

/// What the event does to its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The entry's new value is `value`.
    Put = 1,
    /// The row is gone.
    Delete = 2,
    /// The entry changed to something not carried here; forget it.
    Invalidate = 3,
    /// Every entry of the keyspace is gone (a TRUNCATE); the key is empty.
    Clear = 4,
    /// A write of the key taken in another region was rejected by the home's Postgres; the
    /// value is the dead letter (JSON). Changes no entry.
    Rejected = 5,
}

impl Op {
    /// The op as a metric label and in logs.
    pub fn label(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Invalidate => "invalidate",
            Op::Clear => "clear",
            Op::Rejected => "rejected",
        }
    }
}

/// Where the event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Cdc = 1,
    Api = 2,
    Federation = 3,
}

/// One change to one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub keyspace: String,
    pub key: String,
    pub op: Op,
    /// The JSON document, for puts.
    pub value: Option<Bytes>,
    /// Id of the node where the change entered cachesync.
    pub origin: String,
    /// Hybrid-logical-clock version assigned at the origin.
    pub version: u64,
    pub source: Source,
    /// Position in the source (the commit LSN for CDC), zero when none.
    pub source_position: u64,
    /// When the source committed the change, µs since the epoch; zero when unknown.
    pub source_time_us: u64,
    /// Fields of the row the source did not send (unchanged TOAST values): `value` lacks them,
    /// and whoever applies the event must take them from the current entry or drop it.
    pub unchanged: Vec<String>,
    /// The source transaction's id, when known.
    pub source_xid: Option<u32>,
    /// For an API write: the fields the client named (a write-behind flush writes only these).
    pub written: Vec<String>,
    /// Set on events that federate between regions: their place in their origin's sequence.
    pub stamp: Option<Stamp>,
}

/// A federated event's identity beside its origin: the origin's log epoch (a new one when a
/// node's log is created afresh, so a wiped node never reuses numbers its peers have seen) and
/// its gap-free sequence number within that epoch (0: not yet sequenced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Stamp {
    pub seq: u64,
    pub epoch: u64,
}

/// Bytes of a stamp field's value.
pub const STAMP_BYTES: usize = 16;

/// Where a federated event's stamp and origin sit in its encoding, found without decoding the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StampAt<'a> {
    pub stamp: Stamp,
    pub origin: &'a [u8],
    /// Byte position of the stamp's value (for the hook that fills it in).
    pub at: usize,
}

/// The stamp and origin of an encoded event, if it is federated (its first field is a stamp
/// and its second the origin); `None` for every other event.
pub fn stamp_of(buf: &[u8]) -> Option<StampAt<'_>> {
    // format, tag 13, length 16, 16 bytes, tag 5, origin length (one byte: ids are short), origin
    if buf.len() < 3 + STAMP_BYTES + 2 || buf[1] != tag::STAMP || buf[2] != STAMP_BYTES as u8 {
        return None;
    }
    let at = 3;
    let seq = u64::from_le_bytes(buf[at..at + 8].try_into().ok()?);
    let epoch = u64::from_le_bytes(buf[at + 8..at + 16].try_into().ok()?);
    let o = at + STAMP_BYTES;
    if buf[o] != tag::ORIGIN {
        return None;
    }
    let len = buf[o + 1] as usize;
    if len >= 0x80 {
        return None;
    }
    let origin = buf.get(o + 2..o + 2 + len)?;
    Some(StampAt {
        stamp: Stamp { seq, epoch },
        origin,
        at,
    })
}

/// Writes `stamp` into an encoded federated event at `at` (from [`stamp_of`]).
pub fn set_stamp(buf: &mut [u8], at: usize, stamp: Stamp) {
    buf[at..at + 8].copy_from_slice(&stamp.seq.to_le_bytes());
    buf[at + 8..at + 16].copy_from_slice(&stamp.epoch.to_le_bytes());
}

/// Why bytes are not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty event")]
    Empty,
    #[error("event format {0} is newer than this build reads (format {EVENT_FORMAT}); upgrade cachesync")]
    NewerFormat(u8),
    #[error("event format 0 is not valid")]
    ZeroFormat,
    #[error("truncated event at byte {0}")]
    Truncated(usize),
    #[error("malformed integer at byte {0}")]
    BadVarint(usize),
    #[error("field {tag} is not valid: {why}")]
    BadField { tag: u8, why: &'static str },
    #[error("required field {0} is missing")]
    Missing(&'static str),
}

mod tag {
    pub const KEYSPACE: u8 = 1;
    pub const KEY: u8 = 2;
    pub const OP: u8 = 3;
    pub const VALUE: u8 = 4;
    pub const ORIGIN: u8 = 5;
    pub const VERSION: u8 = 6;
    pub const SOURCE: u8 = 7;
    pub const SOURCE_POSITION: u8 = 8;
    pub const SOURCE_TIME: u8 = 9;
    pub const UNCHANGED: u8 = 10;
    pub const SOURCE_XID: u8 = 11;
    pub const WRITTEN: u8 = 12;
    pub const STAMP: u8 = 13;
}

/// Appends `v` as LEB128.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 integer at `*pos`, advancing it.
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let start = *pos;
    // Most varints (tags' lengths, small integers) are one byte.
    if let Some(&b) = buf.get(start)
        && b < 0x80
    {
        *pos = start + 1;
        return Ok(u64::from(b));
    }
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or(DecodeError::Truncated(*pos))?;
        *pos += 1;
        if i == 9 && b > 1 {
            return Err(DecodeError::BadVarint(start));
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::BadVarint(start))
}

/// The field at `*pos` (its tag and bytes), advancing past it.
fn next_field<'a>(buf: &'a [u8], pos: &mut usize) -> Result<(u8, &'a [u8]), DecodeError> {
    let tag = *buf.get(*pos).ok_or(DecodeError::Truncated(*pos))?;
    *pos += 1;
    let len = get_varint(buf, pos)?;
    let end = pos
        .checked_add(usize::try_from(len).map_err(|_| DecodeError::Truncated(*pos))?)
        .ok_or(DecodeError::Truncated(*pos))?;
    let field = buf.get(*pos..end).ok_or(DecodeError::Truncated(*pos))?;
    *pos = end;
    Ok((tag, field))
}

fn source_of_field(field: &[u8]) -> Result<Source, DecodeError> {
    match field {
        [1] => Ok(Source::Cdc),
        [2] => Ok(Source::Api),
        [3] => Ok(Source::Federation),
        _ => Err(DecodeError::BadField {
            tag: tag::SOURCE,
            why: "unknown source",
        }),
    }
}

fn put_field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_int_field(out: &mut Vec<u8>, tag: u8, v: u64) {
    let mut tmp = Vec::with_capacity(10);
    put_varint(&mut tmp, v);
    put_field(out, tag, &tmp);
}

impl ChangeEvent {
    fn new(op: Op, keyspace: impl Into<String>, key: impl Into<String>, value: Option<Bytes>) -> ChangeEvent {
        ChangeEvent {
            keyspace: keyspace.into(),
            key: key.into(),
            op,
            value,
            origin: String::new(),
            version: 0,
            source: Source::Api,
            source_position: 0,
            source_time_us: 0,
            unchanged: Vec::new(),
            source_xid: None,
            written: Vec::new(),
            stamp: None,
        }
    }

    /// The entry's new value is `value`. Stamp it with [`ChangeEvent::from_origin`].
    pub fn put(keyspace: impl Into<String>, key: impl Into<String>, value: Bytes) -> ChangeEvent {
        ChangeEvent::new(Op::Put, keyspace, key, Some(value))
    }

    /// The row is gone.
    pub fn delete(keyspace: impl Into<String>, key: impl Into<String>) -> ChangeEvent {
        ChangeEvent::new(Op::Delete, keyspace, key, None)
    }

    /// The entry changed to something this event does not carry.
    pub fn invalidate(keyspace: impl Into<String>, key: impl Into<String>) -> ChangeEvent {
        ChangeEvent::new(Op::Invalidate, keyspace, key, None)
    }

    /// Every entry of the keyspace is gone.
    pub fn clear(keyspace: impl Into<String>) -> ChangeEvent {
        ChangeEvent::new(Op::Clear, keyspace, String::new(), None)
    }

    /// An event of `op` (a put carries `value`, a rejection its dead letter; other ops ignore it).
    pub fn of(op: Op, keyspace: impl Into<String>, key: impl Into<String>, value: Option<Bytes>) -> ChangeEvent {
        let value = if matches!(op, Op::Put | Op::Rejected) {
            value
        } else {
            None
        };
        ChangeEvent::new(op, keyspace, key, value)
    }

    /// Where and when the change entered cachesync: the origin node, its HLC version, the path.
    pub fn from_origin(mut self, origin: impl Into<String>, version: u64, source: Source) -> ChangeEvent {
        self.origin = origin.into();
        self.version = version;
        self.source = source;
        self
    }

    /// The change's place in its source: position (the commit LSN for CDC), commit time in µs
    /// since the epoch, transaction id.
    pub fn at_source(mut self, position: u64, time_us: u64, xid: Option<u32>) -> ChangeEvent {
        self.source_position = position;
        self.source_time_us = time_us;
        self.source_xid = xid;
        self
    }

    /// Fields the source did not send (unchanged TOAST values).
    pub fn with_unchanged(mut self, unchanged: Vec<String>) -> ChangeEvent {
        self.unchanged = unchanged;
        self
    }

    /// Marks the event as federated: the log's admission hook gives it the next number of this
    /// node's sequence as it is appended (the origin must be this node's id, under 128 bytes).
    pub fn federated(mut self) -> ChangeEvent {
        self.stamp = Some(Stamp::default());
        self
    }

    /// The fields an API write named.
    pub fn with_written(mut self, written: Vec<String>) -> ChangeEvent {
        self.written = written;
        self
    }

    /// The encoded form, as stored in a log record's payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(32 + self.keyspace.len() + self.key.len() + self.value.as_ref().map_or(0, |v| v.len()));
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(EVENT_FORMAT);
        let mut origin_done = false;
        if let Some(st) = self.stamp
            && self.origin.len() < 0x80
        {
            let mut v = [0u8; STAMP_BYTES];
            v[..8].copy_from_slice(&st.seq.to_le_bytes());
            v[8..].copy_from_slice(&st.epoch.to_le_bytes());
            put_field(out, tag::STAMP, &v);
            put_field(out, tag::ORIGIN, self.origin.as_bytes());
            origin_done = true;
        }
        put_field(out, tag::KEYSPACE, self.keyspace.as_bytes());
        put_field(out, tag::KEY, self.key.as_bytes());
        put_field(out, tag::OP, &[self.op as u8]);
        if let Some(v) = &self.value {
            put_field(out, tag::VALUE, v);
        }
        if !self.origin.is_empty() && !origin_done {
            put_field(out, tag::ORIGIN, self.origin.as_bytes());
        }
        put_int_field(out, tag::VERSION, self.version);
        put_field(out, tag::SOURCE, &[self.source as u8]);
        if self.source_position != 0 {
            put_int_field(out, tag::SOURCE_POSITION, self.source_position);
        }
        if self.source_time_us != 0 {
            put_int_field(out, tag::SOURCE_TIME, self.source_time_us);
        }
        if !self.unchanged.is_empty() {
            put_field(out, tag::UNCHANGED, &encode_list(&self.unchanged));
        }
        if let Some(xid) = self.source_xid {
            put_int_field(out, tag::SOURCE_XID, xid as u64);
        }
        if !self.written.is_empty() {
            put_field(out, tag::WRITTEN, &encode_list(&self.written));
        }
    }

    /// Decodes an event. Fields this build does not know are skipped.
    /// Only the event's source, without decoding the rest (a relay filtering by source).
    pub fn source_of(buf: &[u8]) -> Result<Option<Source>, DecodeError> {
        match buf.first() {
            None => return Err(DecodeError::Empty),
            Some(0) => return Err(DecodeError::ZeroFormat),
            Some(&f) if f > EVENT_FORMAT => return Err(DecodeError::NewerFormat(f)),
            Some(_) => {}
        }
        let mut pos = 1;
        while pos < buf.len() {
            let (tag, field) = next_field(buf, &mut pos)?;
            if tag == tag::SOURCE {
                return source_of_field(field).map(Some);
            }
        }
        Ok(None)
    }

    pub fn decode(buf: &[u8]) -> Result<ChangeEvent, DecodeError> {
        EventView::of(buf).map(|v| v.to_event(Bytes::copy_from_slice))
    }

    /// [`ChangeEvent::decode`] of a shared buffer: the document is a slice of `buf`, not a copy.
    pub fn decode_shared(buf: &Bytes) -> Result<ChangeEvent, DecodeError> {
        EventView::of(buf).map(|v| v.to_event(|field| buf.slice_ref(field)))
    }
}

/// An encoded event read in place: every field checked as [`ChangeEvent::decode`] checks it,
/// nothing copied. A reader that needs a few fields of many events (the write-behind flusher)
/// takes them from here without allocating the rest.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub keyspace: &'a str,
    pub key: &'a str,
    pub op: Op,
    pub value: Option<&'a [u8]>,
    pub origin: &'a str,
    pub version: u64,
    pub source: Source,
    pub source_position: u64,
    pub source_time_us: u64,
    /// Encoded field lists (see [`EventView::unchanged`], [`EventView::written`]); checked.
    unchanged: &'a [u8],
    written: &'a [u8],
    pub source_xid: Option<u32>,
    pub stamp: Option<Stamp>,
}

impl<'a> EventView<'a> {
    pub fn of(buf: &'a [u8]) -> Result<EventView<'a>, DecodeError> {
        let format = *buf.first().ok_or(DecodeError::Empty)?;
        if format == 0 {
            return Err(DecodeError::ZeroFormat);
        }
        if format > EVENT_FORMAT {
            return Err(DecodeError::NewerFormat(format));
        }
        let mut pos = 1;
        let (mut keyspace, mut key, mut op, mut value, mut origin, mut version, mut source) =
            (None, None, None, None, "", None, None);
        let (mut source_position, mut source_time_us, mut unchanged, mut written) = (0, 0, &[][..], &[][..]);
        let (mut source_xid, mut stamp) = (None, None);
        while pos < buf.len() {
            let (tag, field) = next_field(buf, &mut pos)?;
            let text = |why| std::str::from_utf8(field).map_err(|_| DecodeError::BadField { tag, why });
            let int = || {
                let mut p = 0;
                let v = get_varint(field, &mut p)?;
                if p != field.len() {
                    return Err(DecodeError::BadField {
                        tag,
                        why: "trailing bytes after an integer",
                    });
                }
                Ok(v)
            };
            let list = || {
                if !field.is_empty() && list_items(field).is_some_and(|mut items| items.all(|i| i.is_some())) {
                    Ok(field)
                } else {
                    Err(DecodeError::BadField {
                        tag,
                        why: "malformed field list",
                    })
                }
            };
            match tag {
                tag::KEYSPACE => keyspace = Some(text("keyspace is not UTF-8")?),
                tag::KEY => key = Some(text("key is not UTF-8")?),
                tag::OP => {
                    op = Some(match field {
                        [1] => Op::Put,
                        [2] => Op::Delete,
                        [3] => Op::Invalidate,
                        [4] => Op::Clear,
                        [5] => Op::Rejected,
                        _ => {
                            return Err(DecodeError::BadField { tag, why: "unknown op" });
                        }
                    })
                }
                tag::VALUE => value = Some(field),
                tag::ORIGIN => origin = text("origin is not UTF-8")?,
                tag::VERSION => version = Some(int()?),
                tag::SOURCE => source = Some(source_of_field(field)?),
                tag::SOURCE_POSITION => source_position = int()?,
                tag::SOURCE_TIME => source_time_us = int()?,
                tag::UNCHANGED => unchanged = list()?,
                tag::WRITTEN => written = list()?,
                tag::STAMP => {
                    let v: [u8; STAMP_BYTES] = field.try_into().map_err(|_| DecodeError::BadField {
                        tag,
                        why: "a stamp is 16 bytes",
                    })?;
                    stamp = Some(Stamp {
                        seq: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
                        epoch: u64::from_le_bytes(v[8..].try_into().expect("8 bytes")),
                    });
                }
                tag::SOURCE_XID => {
                    let v = int()?;
                    source_xid = Some(u32::try_from(v).map_err(|_| DecodeError::BadField {
                        tag,
                        why: "xid out of range",
                    })?)
                }
                _ => {} // a field from a later build
            }
        }
        Ok(EventView {
            keyspace: keyspace.ok_or(DecodeError::Missing("keyspace"))?,
            key: key.ok_or(DecodeError::Missing("key"))?,
            op: op.ok_or(DecodeError::Missing("op"))?,
            value,
            origin,
            version: version.ok_or(DecodeError::Missing("version"))?,
            source: source.ok_or(DecodeError::Missing("source"))?,
            source_position,
            source_time_us,
            unchanged,
            written,
            source_xid,
            stamp,
        })
    }

    /// The fields the source did not send ([`ChangeEvent::unchanged`]).
    pub fn unchanged(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        list_items(self.unchanged).into_iter().flatten().map_while(|i| i)
    }

    /// The fields an API write named ([`ChangeEvent::written`]).
    pub fn written(&self) -> impl Iterator<Item = &'a str> + Clone + use<'a> {
        list_items(self.written).into_iter().flatten().map_while(|i| i)
    }

    /// The event, owned; `value_of` makes the document's bytes.
    pub fn to_event(&self, value_of: impl Fn(&'a [u8]) -> Bytes) -> ChangeEvent {
        ChangeEvent {
            keyspace: self.keyspace.to_string(),
            key: self.key.to_string(),
            op: self.op,
            value: self.value.map(value_of),
            origin: self.origin.to_string(),
            version: self.version,
            source: self.source,
            source_position: self.source_position,
            source_time_us: self.source_time_us,
            unchanged: self.unchanged().map(str::to_string).collect(),
            source_xid: self.source_xid,
            written: self.written().map(str::to_string).collect(),
            stamp: self.stamp,
        }
    }
}

/// The items of an encoded list: `None` if its count is malformed, else each item, `None` for
/// one that is malformed or not UTF-8, or for bytes left over after the last.
fn list_items(buf: &[u8]) -> Option<impl Iterator<Item = Option<&str>> + Clone> {
    if buf.is_empty() {
        // An absent list (`EventView` holds it so) is empty.
        return Some(ListItems { buf, pos: 0, left: 0 });
    }
    let mut pos = 0;
    let n = get_varint(buf, &mut pos).ok()?;
    Some(ListItems { buf, pos, left: n })
}

#[derive(Clone)]
struct ListItems<'a> {
    buf: &'a [u8],
    pos: usize,
    left: u64,
}

impl<'a> Iterator for ListItems<'a> {
    type Item = Option<&'a str>;

    fn next(&mut self) -> Option<Option<&'a str>> {
        if self.left == 0 {
            // Trailing bytes after the last item make the list malformed.
            return (self.pos < self.buf.len()).then(|| {
                self.pos = self.buf.len();
                None
            });
        }
        self.left -= 1;
        let item = (|| {
            let len = usize::try_from(get_varint(self.buf, &mut self.pos).ok()?).ok()?;
            let end = self.pos.checked_add(len)?;
            let s = std::str::from_utf8(self.buf.get(self.pos..end)?).ok()?;
            self.pos = end;
            Some(s)
        })();
        if item.is_none() {
            self.left = 0;
            self.pos = self.buf.len();
        }
        Some(item)
    }
}

/// A LEB128 count followed by that many length-prefixed UTF-8 strings.
fn encode_list(items: &[String]) -> Vec<u8> {
    let mut list = Vec::new();
    put_varint(&mut list, items.len() as u64);
    for f in items {
        put_varint(&mut list, f.len() as u64);
        list.extend_from_slice(f.as_bytes());
    }
    list
}

/// A LEB128 count followed by that many length-prefixed UTF-8 strings.
#[cfg(test)]
pub mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn arb_event() -> impl Strategy<Value = ChangeEvent> {
        (
            "[a-z_]{1,12}",
            ".{0,40}",
            prop_oneof![
                Just(Op::Put),
                Just(Op::Delete),
                Just(Op::Invalidate),
                Just(Op::Clear),
                Just(Op::Rejected)
            ],
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            "[a-z0-9-]{0,10}",
            any::<u64>(),
            prop_oneof![Just(Source::Cdc), Just(Source::Api), Just(Source::Federation)],
            any::<u64>(),
            any::<u64>(),
            (
                proptest::collection::vec("[a-z_]{1,10}", 0..3),
                proptest::option::of(any::<u32>()),
                proptest::collection::vec("[a-z_]{1,10}", 0..3),
                proptest::option::of((any::<u64>(), any::<u64>())),
            ),
        )
            .prop_map(
                |(
                    keyspace,
                    key,
                    op,
                    value,
                    origin,
                    version,
                    source,
                    source_position,
                    source_time_us,
                    (unchanged, source_xid, written, stamp),
                )| {
                    ChangeEvent {
                        keyspace,
                        key,
                        op,
                        value: value.map(Bytes::from),
                        origin,
                        version,
                        source,
                        source_position,
                        source_time_us,
                        unchanged,
                        source_xid,
                        written,
                        stamp: stamp.map(|(seq, epoch)| Stamp { seq, epoch }),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trips(e in arb_event()) {
            prop_assert_eq!(ChangeEvent::decode(&e.encode()).unwrap(), e);
        }

        #[test]
        fn a_view_reads_the_fields_in_place(e in arb_event()) {
            let b = e.encode();
            let v = EventView::of(&b).unwrap();
            prop_assert_eq!(v.keyspace, e.keyspace.as_str());
            prop_assert_eq!(v.key, e.key.as_str());
            prop_assert_eq!(v.value, e.value.as_deref());
            prop_assert_eq!(v.origin, e.origin.as_str());
            prop_assert_eq!(v.written().collect::<Vec<_>>(), e.written.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(v.unchanged().collect::<Vec<_>>(), e.unchanged.iter().map(String::as_str).collect::<Vec<_>>());
        }

        #[test]
        fn a_list_is_read_as_the_owned_decoder_read_it(
            items in proptest::collection::vec(".{0,6}", 0..4),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            // The decoder before views, kept as the reference: a count, then each item, nothing after.
            fn owned(buf: &[u8]) -> Option<Vec<String>> {
                let mut pos = 0;
                let n = get_varint(buf, &mut pos).ok()?;
                let mut out = Vec::new();
                for _ in 0..n {
                    let len = usize::try_from(get_varint(buf, &mut pos).ok()?).ok()?;
                    let end = pos.checked_add(len)?;
                    out.push(std::str::from_utf8(buf.get(pos..end)?).ok()?.to_string());
                    pos = end;
                }
                (pos == buf.len()).then_some(out)
            }
            let good = encode_list(&items);
            let mut bad = good.clone();
            let i = at.index(bad.len());
            bad[i] = byte;
            let mut short = good.clone();
            short.truncate(cut.index(good.len() + 1));
            let mut long = good.clone();
            long.push(byte);
            for buf in [good, bad, short, long] {
                let mut e = ChangeEvent::of(Op::Put, "ks", "k", None).encode();
                put_field(&mut e, tag::WRITTEN, &buf);
                let view = EventView::of(&e);
                match owned(&buf) {
                    Some(list) => {
                        let v = view.expect("a list the owned decoder read");
                        prop_assert_eq!(v.written().collect::<Vec<_>>(), list.iter().map(String::as_str).collect::<Vec<_>>());
                    }
                    None => prop_assert!(view.is_err(), "a list the owned decoder refused: {:?}", buf),
                }
            }
        }

        #[test]
        fn a_shared_decode_is_the_same_event_borrowing_its_document(e in arb_event()) {
            let b = Bytes::from(e.encode());
            let shared = ChangeEvent::decode_shared(&b).unwrap();
            if let Some(v) = &shared.value {
                let range = b.as_ptr() as usize..b.as_ptr() as usize + b.len();
                prop_assert!(v.is_empty() || range.contains(&(v.as_ptr() as usize)), "the document is a slice of the buffer");
            }
            prop_assert_eq!(shared, e);
        }

        #[test]
        fn the_source_alone_is_the_decoded_source(e in arb_event()) {
            prop_assert_eq!(ChangeEvent::source_of(&e.encode()).unwrap(), Some(e.source));
        }

        #[test]
        fn a_stamp_is_found_without_decoding(e in arb_event(), seq in any::<u64>(), epoch in any::<u64>()) {
            let mut b = e.encode();
            match stamp_of(&b) {
                Some(s) => {
                    prop_assert_eq!(Some(s.stamp), e.stamp);
                    prop_assert_eq!(s.origin, e.origin.as_bytes());
                    let at = s.at;
                    set_stamp(&mut b, at, Stamp { seq, epoch });
                    prop_assert_eq!(ChangeEvent::decode(&b).unwrap().stamp, Some(Stamp { seq, epoch }));
                }
                None => prop_assert!(e.stamp.is_none()),
            }
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ChangeEvent::decode(&bytes);
            let _ = ChangeEvent::source_of(&bytes);
            let _ = stamp_of(&bytes);
        }

        #[test]
        fn never_panics_on_mutations(e in arb_event(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut b = e.encode();
            let i = at.index(b.len());
            b[i] = byte;
            let _ = ChangeEvent::decode(&b);
            b.truncate(i);
            let _ = ChangeEvent::decode(&b);
        }

        #[test]
        fn varints_round_trip(v in any::<u64>()) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut p = 0;
            prop_assert_eq!(get_varint(&out, &mut p).unwrap(), v);
            prop_assert_eq!(p, out.len());
        }
    }

    #[test]
    fn small_varints_are_one_byte_and_round_trip() {
        for v in (0..300).chain([u64::MAX - 1, u64::MAX]) {
            let mut out = vec![0xff];
            put_varint(&mut out, v);
            assert_eq!(out.len() == 2, v < 0x80, "{v}");
            let mut p = 1;
            assert_eq!(get_varint(&out, &mut p).unwrap(), v);
            assert_eq!(p, out.len());
        }
        // A continuation byte with nothing after it is truncated, not read as a short value.
        assert!(get_varint(&[0x80], &mut 0).is_err());
    }

    #[test]
    fn unknown_fields_are_skipped_and_newer_formats_refused() {
        let e = ChangeEvent::put("users", "1", Bytes::from_static(b"{}")).from_origin("n1", 7, Source::Api);
        let mut b = e.encode();
        put_field(&mut b, 200, b"from the future");
        assert_eq!(ChangeEvent::decode(&b).unwrap(), e);
        b[0] = EVENT_FORMAT + 1;
        assert_eq!(ChangeEvent::decode(&b), Err(DecodeError::NewerFormat(EVENT_FORMAT + 1)));
        assert_eq!(ChangeEvent::decode(&[]), Err(DecodeError::Empty));
    }
}
