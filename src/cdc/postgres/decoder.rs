//! The stateful half of decoding: the relation map. pgoutput sends a Relation message before the
//! first change to a table in a session and again whenever its schema changes; row changes name
//! the table only by OID. [`Decoder`] keeps the map and turns each XLogData payload into a
//! [`Change`] that carries its relation.

use std::collections::HashMap;
use std::sync::Arc;

use super::protocol::{self, Message, OldTuple, ProtocolError, Tuple};

/// One column of a relation as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    pub name: String,
    pub type_oid: u32,
    /// Part of the replica identity (the columns an old-key tuple carries).
    pub identity: bool,
}

/// A table as the stream knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationInfo {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `f` full, `i` index, `n` nothing.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

impl RelationInfo {
    pub fn index_of(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == column)
    }
}

/// A decoded change.
#[derive(Debug, Clone)]
pub enum Change {
    /// A relation was (re)described; `changed` when it differs from what was known.
    Relation {
        rel: Arc<RelationInfo>,
        changed: bool,
    },
    Insert {
        rel: Arc<RelationInfo>,
        new: Tuple,
    },
    Update {
        rel: Arc<RelationInfo>,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        rel: Arc<RelationInfo>,
        old: OldTuple,
    },
    Truncate {
        rels: Vec<Arc<RelationInfo>>,
    },
    /// Messages the stream does not act on here (Type, Origin, and the transaction frame that
    /// the transport already reports).
    Other,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("pgoutput: a change names relation {0}, which no Relation message described")]
    UnknownRelation(u32),
    #[error("pgoutput: a tuple of relation {relation} has {got} columns, its Relation message {want}")]
    TupleWidth { relation: u32, got: usize, want: usize },
}

/// The relation map of one replication session.
#[derive(Debug, Default)]
pub struct Decoder {
    relations: HashMap<u32, Arc<RelationInfo>>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    fn relation(&self, oid: u32) -> Result<Arc<RelationInfo>, DecodeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(oid))
    }

    fn check(rel: &RelationInfo, t: &Tuple) -> Result<(), DecodeError> {
        if t.0.len() != rel.columns.len() {
            return Err(DecodeError::TupleWidth {
                relation: rel.oid,
                got: t.0.len(),
                want: rel.columns.len(),
            });
        }
        Ok(())
    }

    /// Decodes one XLogData payload.
    pub fn decode(&mut self, data: &[u8]) -> Result<Change, DecodeError> {
        Ok(match protocol::parse(data)? {
            Message::Relation(r) => {
                let rel = Arc::new(RelationInfo {
                    oid: r.oid,
                    schema: if r.namespace.is_empty() {
                        "pg_catalog".into()
                    } else {
                        r.namespace
                    },
                    name: r.name,
                    replica_identity: r.replica_identity,
                    columns: r
                        .columns
                        .into_iter()
                        .map(|c| RelColumn {
                            name: c.name,
                            type_oid: c.type_oid,
                            identity: c.flags & 1 == 1,
                        })
                        .collect(),
                });
                let changed = self.relations.get(&rel.oid).is_none_or(|old| **old != *rel);
                self.relations.insert(rel.oid, rel.clone());
                Change::Relation { rel, changed }
            }
            Message::Insert { relation, new } => {
                let rel = self.relation(relation)?;
                Self::check(&rel, &new)?;
                Change::Insert { rel, new }
            }
            Message::Update { relation, old, new } => {
                let rel = self.relation(relation)?;
                Self::check(&rel, &new)?;
                if let Some(o) = &old {
                    Self::check(&rel, o.tuple())?;
                }
                Change::Update { rel, old, new }
            }
            Message::Delete { relation, old } => {
                let rel = self.relation(relation)?;
                Self::check(&rel, old.tuple())?;
                Change::Delete { rel, old }
            }
            Message::Truncate { relations, .. } => Change::Truncate {
                rels: relations
                    .iter()
                    .map(|oid| self.relation(*oid))
                    .collect::<Result<_, _>>()?,
            },
            _ => Change::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::postgres::protocol::{Column, Relation, Value, encode};
    use bytes::Bytes;

    fn relation(cols: &[(&str, u32, u8)]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            &Message::Relation(Relation {
                oid: 7,
                namespace: "public".into(),
                name: "users".into(),
                replica_identity: b'd',
                columns: cols
                    .iter()
                    .map(|(n, t, f)| Column {
                        flags: *f,
                        name: n.to_string(),
                        type_oid: *t,
                        type_modifier: -1,
                    })
                    .collect(),
            }),
            &mut out,
        );
        out
    }

    #[test]
    fn changes_carry_their_relation_and_schema_changes_are_noticed() {
        let mut d = Decoder::new();
        let mut ins = Vec::new();
        encode(
            &Message::Insert {
                relation: 7,
                new: Tuple(vec![Value::Text(Bytes::from_static(b"1")), Value::Null]),
            },
            &mut ins,
        );
        assert_eq!(d.decode(&ins).unwrap_err(), DecodeError::UnknownRelation(7));
        match d.decode(&relation(&[("id", 23, 1), ("name", 25, 0)])).unwrap() {
            Change::Relation { changed, rel } => {
                assert!(changed);
                assert_eq!(rel.index_of("name"), Some(1));
                assert!(rel.columns[0].identity);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            d.decode(&relation(&[("id", 23, 1), ("name", 25, 0)])).unwrap(),
            Change::Relation { changed: false, .. }
        ));
        match d.decode(&ins).unwrap() {
            Change::Insert { rel, new } => {
                assert_eq!(rel.name, "users");
                assert_eq!(new.0.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        // A column added: the relation changed, and old-width tuples are refused.
        assert!(matches!(
            d.decode(&relation(&[("id", 23, 1), ("name", 25, 0), ("age", 23, 0)]))
                .unwrap(),
            Change::Relation { changed: true, .. }
        ));
        assert!(matches!(
            d.decode(&ins),
            Err(DecodeError::TupleWidth { got: 2, want: 3, .. })
        ));
    }
}
