//! The L2 record: what one key holds in Redis — its state (a document, "no such row", or
//! "changed, state unknown") and the version of that state — in one compact binary string, and
//! the change notices the invalidation stream carries.
//!
//! The version is the one L1 orders by (see `cache`): the source position (`lsn`), the
//! transaction that made the state (`xid`) and, for state read by a load, what the load's
//! snapshot could not see. The compare-and-set script (`l2::script`) decodes the same header and
//! applies the same rule as [`Entry::supersedes`], so Redis and every node agree on which of two
//! states is newer.
//!
//! Layout (big-endian): `kind u8 · flags u8 · lsn u64 · xid u32 · xmax u32 · n u16 · xip u32×n ·
//! value`. 20 bytes plus 4 per in-progress transaction, then the JSON document as it is served.

use bytes::Bytes;

use crate::cache::{Entry, Snapshot};
use crate::lsn::Lsn;

/// Header bytes before the in-progress list.
pub const HEADER: usize = 20;

const FLAG_XID: u8 = 1;
const FLAG_SNAPSHOT: u8 = 2;

/// What a record says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The row's document.
    Value,
    /// No such row (a delete's tombstone, or a load that found nothing).
    Absent,
    /// The row changed and its new state is not known here (an invalidation): a read must load.
    Unknown,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Value => b'V',
            Kind::Absent => b'N',
            Kind::Unknown => b'U',
        }
    }

    fn of(b: u8) -> Option<Kind> {
        match b {
            b'V' => Some(Kind::Value),
            b'N' => Some(Kind::Absent),
            b'U' => Some(Kind::Unknown),
            _ => None,
        }
    }
}

/// One key's record in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub lsn: Lsn,
    pub xid: Option<u32>,
    pub snapshot: Option<Snapshot>,
    pub value: Option<Bytes>,
}

impl Record {
    /// The record of an L1 entry's state.
    pub fn of_entry(e: &Entry) -> Record {
        Record {
            kind: if e.value.is_some() { Kind::Value } else { Kind::Absent },
            lsn: e.lsn,
            xid: e.xid,
            snapshot: e.snapshot.as_deref().cloned(),
            value: e.value.clone(),
        }
    }

    /// "Changed at `lsn` by `xid`, new state not known."
    pub fn unknown(lsn: Lsn, xid: Option<u32>) -> Record {
        Record {
            kind: Kind::Unknown,
            lsn,
            xid,
            snapshot: None,
            value: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let xip: &[u32] = self.snapshot.as_ref().map_or(&[], |s| &s.xip);
        let n = xip.len().min(u16::MAX as usize);
        let value = self.value.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + 4 * n + value.len());
        out.push(self.kind.byte());
        let mut flags = 0;
        if self.xid.is_some() {
            flags |= FLAG_XID;
        }
        if self.snapshot.is_some() {
            flags |= FLAG_SNAPSHOT;
        }
        out.push(flags);
        out.extend_from_slice(&self.lsn.0.to_be_bytes());
        out.extend_from_slice(&self.xid.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.snapshot.as_ref().map_or(0, |s| s.xmax).to_be_bytes());
        out.extend_from_slice(&(n as u16).to_be_bytes());
        for x in &xip[..n] {
            out.extend_from_slice(&x.to_be_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    pub fn decode(b: &[u8]) -> Option<Record> {
        if b.len() < HEADER {
            return None;
        }
        let kind = Kind::of(b[0])?;
        let flags = b[1];
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let lsn = Lsn(u64::from_be_bytes(b[2..10].try_into().ok()?));
        let xid = (flags & FLAG_XID != 0).then(|| u32_at(10));
        let xmax = u32_at(14);
        let n = u16::from_be_bytes([b[18], b[19]]) as usize;
        let end = HEADER + 4 * n;
        if b.len() < end {
            return None;
        }
        let snapshot = (flags & FLAG_SNAPSHOT != 0).then(|| Snapshot {
            xmax,
            xip: (0..n).map(|i| u32_at(HEADER + 4 * i)).collect(),
        });
        let value = (kind == Kind::Value).then(|| Bytes::copy_from_slice(&b[end..]));
        Some(Record {
            kind,
            lsn,
            xid,
            snapshot,
            value,
        })
    }

    /// The record as an entry's version (and state), for comparisons and installs.
    pub fn to_entry(&self, version: u64) -> Entry {
        Entry::new(self.value.clone(), self.lsn, version)
            .with_xid(self.xid)
            .with_snapshot(self.snapshot.clone())
    }

    /// Whether this record holds a key's state (a document or "no such row").
    pub fn is_state(&self) -> bool {
        self.kind != Kind::Unknown
    }

    /// Whether this state is at least as new as `other`'s (the rule of [`Entry::supersedes`]).
    pub fn supersedes(&self, other: &Record) -> bool {
        self.to_entry(0).supersedes(&other.to_entry(0))
    }
}

/// One change as the invalidation stream carries it: which key, at which version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub key: String,
    pub lsn: Lsn,
    pub xid: Option<u32>,
}

/// Encodes notices for one stream entry: `lsn u64 · xid u32 (0: none; flagged) · flag u8 · key
/// length u32 · key`, repeated.
pub fn encode_notices(notices: &[Notice]) -> Vec<u8> {
    let mut out = Vec::with_capacity(notices.iter().map(|n| 17 + n.key.len()).sum());
    for n in notices {
        out.extend_from_slice(&n.lsn.0.to_be_bytes());
        out.extend_from_slice(&n.xid.unwrap_or(0).to_be_bytes());
        out.push(n.xid.is_some() as u8);
        out.extend_from_slice(&(n.key.len() as u32).to_be_bytes());
        out.extend_from_slice(n.key.as_bytes());
    }
    out
}

pub fn decode_notices(mut b: &[u8]) -> Option<Vec<Notice>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 17 {
            return None;
        }
        let lsn = Lsn(u64::from_be_bytes(b[0..8].try_into().ok()?));
        let xid = u32::from_be_bytes(b[8..12].try_into().ok()?);
        let has_xid = b[12] != 0;
        let len = u32::from_be_bytes(b[13..17].try_into().ok()?) as usize;
        let key = std::str::from_utf8(b.get(17..17 + len)?).ok()?.to_string();
        out.push(Notice {
            key,
            lsn,
            xid: has_xid.then_some(xid),
        });
        b = &b[17 + len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: Kind, lsn: u64, xid: Option<u32>, snap: Option<&str>, value: Option<&str>) -> Record {
        Record {
            kind,
            lsn: Lsn(lsn),
            xid,
            snapshot: snap.and_then(Snapshot::parse),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        }
    }

    #[test]
    fn records_round_trip_compactly() {
        for r in [
            rec(Kind::Value, 0x0102_0304_0506_0708, Some(77), None, Some(r#"{"id":1}"#)),
            rec(Kind::Value, 9, None, Some("90:100:95,97"), Some("{}")),
            rec(Kind::Absent, 5, Some(3), None, None),
            rec(Kind::Absent, 5, None, Some("7:7:"), None),
            rec(Kind::Unknown, u64::MAX, Some(u32::MAX), None, None),
        ] {
            let b = r.encode();
            assert_eq!(Record::decode(&b).as_ref(), Some(&r), "{r:?}");
        }
        let doc = r#"{"id":1,"name":"a"}"#;
        let b = rec(Kind::Value, 1, Some(2), None, Some(doc)).encode();
        assert_eq!(b.len(), HEADER + doc.len(), "20 bytes beside the document");
        assert!(Record::decode(&b[..10]).is_none());
        assert!(Record::decode(b"X123456789012345678901").is_none(), "unknown kind");
    }

    #[test]
    fn the_order_is_the_l1_order() {
        let loaded = rec(Kind::Value, 500, None, Some("90:100:95"), Some("{}"));
        let unseen = rec(Kind::Value, 400, Some(95), None, Some("{}"));
        let seen = rec(Kind::Value, 400, Some(94), None, Some("{}"));
        assert!(unseen.supersedes(&loaded), "a change the load could not see is newer");
        assert!(!seen.supersedes(&loaded));
        assert!(!loaded.supersedes(&unseen), "and the load does not replace it");
        let gone = rec(Kind::Absent, 600, Some(99), None, None);
        let slow_fill = rec(Kind::Value, 550, None, Some("98:99:"), Some("{}"));
        assert!(!slow_fill.supersedes(&gone), "a fill that could not see the delete");
    }

    #[test]
    fn notices_round_trip() {
        let n = vec![
            Notice {
                key: "1".into(),
                lsn: Lsn(10),
                xid: Some(4),
            },
            Notice {
                key: "tenant,é".into(),
                lsn: Lsn(11),
                xid: None,
            },
        ];
        assert_eq!(decode_notices(&encode_notices(&n)), Some(n));
        assert_eq!(decode_notices(&[]), Some(vec![]));
        assert!(decode_notices(&[1, 2, 3]).is_none());
    }
}
