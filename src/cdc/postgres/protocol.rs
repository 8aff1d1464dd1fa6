//! pgoutput protocol messages (version 1), parsed one-to-one from the Postgres documentation,
//! "Logical Replication Message Formats". Pure: bytes in, [`Message`] out, and an encoder for
//! tests and fuzzing. Nothing here keeps state; the relation map lives in `decoder`.
//!
//! | Byte1 | Message | Fields (all integers big-endian; strings NUL-terminated) |
//! |---|---|---|
//! | `B` | Begin | Int64 final LSN, Int64 commit time (µs since 2000-01-01), Int32 xid |
//! | `C` | Commit | Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit time |
//! | `O` | Origin | Int64 commit LSN on the origin, String origin name |
//! | `R` | Relation | Int32 OID, String namespace, String name, Int8 replica identity, Int16 n, n × (Int8 flags (1 = key), String name, Int32 type OID, Int32 type modifier) |
//! | `Y` | Type | Int32 OID, String namespace, String name |
//! | `I` | Insert | Int32 relation OID, `N`, TupleData |
//! | `U` | Update | Int32 relation OID, optionally (`K` or `O`, TupleData), `N`, TupleData |
//! | `D` | Delete | Int32 relation OID, `K` or `O`, TupleData |
//! | `T` | Truncate | Int32 n, Int8 options (1 cascade, 2 restart identity), n × Int32 relation OID |
//! | `M` | Message | Int8 flags (1 = transactional), Int64 LSN, String prefix, Int32 length, Byte[n] content |
//!
//! TupleData: Int16 n, then per column Byte1 kind — `n` NULL, `u` unchanged TOASTed value (not
//! sent), `t` text (Int32 length + bytes), `b` binary (Int32 length + bytes).

use bytes::Bytes;

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change; pgoutput does not send it.
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

/// The column values of one row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

/// The old row of an update or delete: its replica identity columns (`K`), or every column
/// (`O`, with `REPLICA IDENTITY FULL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    Key(Tuple),
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// 1 when the column is part of the replica identity.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// A pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        flags: u8,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

/// Why bytes are not a pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("pgoutput: message ends early ({0})")]
    Truncated(&'static str),
    #[error("pgoutput: unknown message type {0:?}")]
    UnknownType(char),
    #[error("pgoutput: unexpected byte {got:?} where {want} was expected")]
    Unexpected { got: char, want: &'static str },
    #[error("pgoutput: {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("pgoutput: {0} trailing bytes")]
    Trailing(usize),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(ProtocolError::Truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, ProtocolError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, ProtocolError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }
    fn string(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Truncated(what))?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| ProtocolError::NotUtf8(what))?
            .to_string();
        self.pos += nul + 1;
        Ok(s)
    }
    fn bytes(&mut self, what: &'static str) -> Result<Bytes, ProtocolError> {
        let len = self.i32(what)?;
        let len = usize::try_from(len).map_err(|_| ProtocolError::Truncated(what))?;
        Ok(Bytes::copy_from_slice(self.take(len, what)?))
    }
    fn tuple(&mut self) -> Result<Tuple, ProtocolError> {
        let n = self.i16("tuple column count")?;
        let mut values = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n.max(0) {
            values.push(match self.u8("tuple column kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => Value::Text(self.bytes("text value")?),
                b'b' => Value::Binary(self.bytes("binary value")?),
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other as char,
                        want: "a column kind (n, u, t, b)",
                    });
                }
            });
        }
        Ok(Tuple(values))
    }
}

/// Parses one message.
pub fn parse(buf: &[u8]) -> Result<Message, ProtocolError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8("message type")?;
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.i64("final LSN")? as u64,
            commit_time: r.i64("commit time")?,
            xid: r.i32("xid")? as u32,
        },
        b'C' => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.i64("commit LSN")? as u64,
            end_lsn: r.i64("end LSN")? as u64,
            commit_time: r.i64("commit time")?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.i64("origin LSN")? as u64,
            name: r.string("origin name")?,
        },
        b'R' => {
            let oid = r.i32("relation OID")? as u32;
            let namespace = r.string("namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n.max(0) {
                columns.push(Column {
                    flags: r.u8("column flags")?,
                    name: r.string("column name")?,
                    type_oid: r.i32("type OID")? as u32,
                    type_modifier: r.i32("type modifier")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.i32("type OID")? as u32,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let relation = r.i32("relation OID")? as u32;
            match r.u8("new tuple marker")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other as char,
                        want: "N",
                    });
                }
            }
        }
        b'U' => {
            let relation = r.i32("relation OID")? as u32;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                let t = r.tuple()?;
                old = Some(if marker == b'K' {
                    OldTuple::Key(t)
                } else {
                    OldTuple::Full(t)
                });
                marker = r.u8("new tuple marker")?;
            }
            if marker != b'N' {
                return Err(ProtocolError::Unexpected {
                    got: marker as char,
                    want: "N",
                });
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.i32("relation OID")? as u32;
            let old = match r.u8("old tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other as char,
                        want: "K or O",
                    });
                }
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let n = r.i32("relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n.max(0) {
                relations.push(r.i32("relation OID")? as u32);
            }
            Message::Truncate { options, relations }
        }
        b'M' => Message::Message {
            flags: r.u8("message flags")?,
            lsn: r.i64("message LSN")? as u64,
            prefix: r.string("message prefix")?,
            content: r.bytes("message content")?,
        },
        other => return Err(ProtocolError::UnknownType(other as char)),
    };
    if r.pos != buf.len() {
        return Err(ProtocolError::Trailing(buf.len() - r.pos));
    }
    Ok(msg)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn put_tuple(out: &mut Vec<u8>, t: &Tuple) {
    out.extend_from_slice(&(t.0.len() as i16).to_be_bytes());
    for v in &t.0 {
        match v {
            Value::Null => out.push(b'n'),
            Value::Unchanged => out.push(b'u'),
            Value::Text(b) | Value::Binary(b) => {
                out.push(if matches!(v, Value::Text(_)) { b't' } else { b'b' });
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

/// Encodes a message as the server would send it (tests, fuzzing, the benchmark's fixtures).
pub fn encode(m: &Message, out: &mut Vec<u8>) {
    match m {
        Message::Begin {
            final_lsn,
            commit_time,
            xid,
        } => {
            out.push(b'B');
            out.extend_from_slice(&final_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            out.push(b'C');
            out.push(*flags);
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time.to_be_bytes());
        }
        Message::Origin { commit_lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            put_str(out, name);
        }
        Message::Relation(r) => {
            out.push(b'R');
            out.extend_from_slice(&r.oid.to_be_bytes());
            put_str(out, &r.namespace);
            put_str(out, &r.name);
            out.push(r.replica_identity);
            out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
            for c in &r.columns {
                out.push(c.flags);
                put_str(out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        Message::Type { oid, namespace, name } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            put_str(out, namespace);
            put_str(out, name);
        }
        Message::Insert { relation, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'N');
            put_tuple(out, new);
        }
        Message::Update { relation, old, new } => {
            out.push(b'U');
            out.extend_from_slice(&relation.to_be_bytes());
            match old {
                Some(OldTuple::Key(t)) => {
                    out.push(b'K');
                    put_tuple(out, t);
                }
                Some(OldTuple::Full(t)) => {
                    out.push(b'O');
                    put_tuple(out, t);
                }
                None => {}
            }
            out.push(b'N');
            put_tuple(out, new);
        }
        Message::Delete { relation, old } => {
            out.push(b'D');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(if matches!(old, OldTuple::Key(_)) { b'K' } else { b'O' });
            put_tuple(out, old.tuple());
        }
        Message::Truncate { options, relations } => {
            out.push(b'T');
            out.extend_from_slice(&(relations.len() as i32).to_be_bytes());
            out.push(*options);
            for r in relations {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        Message::Message {
            flags,
            lsn,
            prefix,
            content,
        } => {
            out.push(b'M');
            out.push(*flags);
            out.extend_from_slice(&lsn.to_be_bytes());
            put_str(out, prefix);
            out.extend_from_slice(&(content.len() as i32).to_be_bytes());
            out.extend_from_slice(content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_ ]{0,12}"
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(Value::Unchanged),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| Value::Text(Bytes::from(b))),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| Value::Binary(Bytes::from(b))),
        ]
    }

    fn tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(value(), 0..6).prop_map(Tuple)
    }

    fn old() -> impl Strategy<Value = OldTuple> {
        prop_oneof![tuple().prop_map(OldTuple::Key), tuple().prop_map(OldTuple::Full)]
    }

    pub fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| Message::Begin {
                final_lsn,
                commit_time,
                xid
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time)| {
                    Message::Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    }
                }
            ),
            (any::<u64>(), name()).prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            (
                any::<u32>(),
                name(),
                name(),
                prop_oneof![Just(b'd'), Just(b'f'), Just(b'i'), Just(b'n')],
                proptest::collection::vec((0u8..2, name(), any::<u32>(), any::<i32>()), 0..6)
            )
                .prop_map(
                    |(oid, namespace, name, replica_identity, cols)| Message::Relation(Relation {
                        oid,
                        namespace,
                        name,
                        replica_identity,
                        columns: cols
                            .into_iter()
                            .map(|(flags, name, type_oid, type_modifier)| Column {
                                flags,
                                name,
                                type_oid,
                                type_modifier
                            })
                            .collect(),
                    })
                ),
            (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| Message::Type { oid, namespace, name }),
            (any::<u32>(), tuple()).prop_map(|(relation, new)| Message::Insert { relation, new }),
            (any::<u32>(), proptest::option::of(old()), tuple()).prop_map(|(relation, old, new)| Message::Update {
                relation,
                old,
                new
            }),
            (any::<u32>(), old()).prop_map(|(relation, old)| Message::Delete { relation, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..5))
                .prop_map(|(options, relations)| Message::Truncate { options, relations }),
            (
                any::<u8>(),
                any::<u64>(),
                name(),
                proptest::collection::vec(any::<u8>(), 0..50)
            )
                .prop_map(|(flags, lsn, prefix, c)| {
                    Message::Message {
                        flags,
                        lsn,
                        prefix,
                        content: Bytes::from(c),
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(m in message()) {
            let mut buf = Vec::new();
            encode(&m, &mut buf);
            prop_assert_eq!(parse(&buf).unwrap(), m);
        }

        #[test]
        fn truncated_or_damaged_messages_are_errors_not_panics(m in message(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut buf = Vec::new();
            encode(&m, &mut buf);
            let i = cut.index(buf.len());
            prop_assert!(parse(&buf[..i]).is_err(), "a prefix of {} bytes parsed", i);
            buf[i] = byte;
            let _ = parse(&buf);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = parse(&bytes);
        }
    }

    #[test]
    fn parses_a_real_insert_message() {
        // `INSERT INTO t VALUES (1, 'a', NULL)` as pgoutput sends it (relation OID 16385).
        let raw = b"I\x00\x00\x40\x01N\x00\x03t\x00\x00\x00\x011t\x00\x00\x00\x01an";
        assert_eq!(
            parse(raw).unwrap(),
            Message::Insert {
                relation: 16385,
                new: Tuple(vec![
                    Value::Text(Bytes::from_static(b"1")),
                    Value::Text(Bytes::from_static(b"a")),
                    Value::Null
                ]),
            }
        );
    }
}
