//! From row changes to change events: one [`TableMapping`] per (keyspace, relation), built from
//! the keyspace's binding (field names, column types, key) and the relation as pgoutput
//! describes it (column positions, replica identity).
//!
//! - `update` mode: an insert or update puts the new row (rendered exactly as a load would
//!   render it), a delete deletes; an update that changes the key deletes the old key too.
//! - `invalidate` mode: every change invalidates the key(s) it touches.
//! - A column pgoutput did not send (an unchanged TOASTed value) is left out of the value and
//!   named in the event's `unchanged` list; the applier merges it from the cached entry or drops
//!   the entry — never a wrong value.
//! - TRUNCATE clears the keyspace.
//!
//! A mapped column pgoutput does not send at all (a generated column before Postgres 18, or one
//! left out of the publication's column list), or sends with another type than the table has
//! now (changes replayed from before an `ALTER TABLE`), cannot be rendered in the keyspace's
//! current shape; such a mapping invalidates — at the change's position, so a newer entry is
//! kept — instead of putting rows it cannot complete.
//!
//! Old-row tuples carry only the replica identity columns, so a keyspace's key must be among
//! them (primary key = key, `REPLICA IDENTITY USING INDEX` on the key, or `REPLICA IDENTITY
//! FULL`); otherwise a delete could not name the entry to drop. Building the mapping refuses
//! such a keyspace with a message that says how to fix it.

use std::sync::Arc;

use bytes::Bytes;

use super::decoder::{Change, RelationInfo};
use super::protocol::{Tuple, Value};
use crate::event::{ChangeEvent, Op, Source};
use crate::key;
use crate::keyspace::Keyspace;
use crate::keyspace::config::CdcMode;
use crate::source::postgres::render::{FieldKey, ObjectWriter, TypeKind, field_key, render_value};
use crate::source::postgres::schema::{Binding, ColumnMeta};

/// The transaction an event belongs to.
#[derive(Debug, Clone)]
pub struct TxnInfo {
    /// Commit LSN: the version of everything the transaction changed.
    pub lsn: u64,
    pub xid: u32,
    /// Commit time, µs since the Unix epoch.
    pub commit_time_us: u64,
    /// HLC stamp given to the transaction's events.
    pub version: u64,
    /// Where the change entered cachesync: this node, or the node a write-behind flush names.
    pub origin: Arc<str>,
    /// The node capturing it (a federated event's origin: its sequence is this node's).
    pub node: Arc<str>,
}

struct Field {
    name: String,
    /// `"name":`, rendered once.
    key: FieldKey,
    index: usize,
    kind: TypeKind,
}

/// How one keyspace maps one relation.
pub struct TableMapping {
    pub keyspace: Arc<Keyspace>,
    mode: CdcMode,
    /// Why puts degrade to invalidations, if they do.
    degraded: Option<String>,
    fields: Vec<Field>,
    key: Vec<(usize, ColumnMeta)>,
    max_key_bytes: usize,
}

/// Which keys a change touched, before they become events.
enum KeyOf {
    /// The cache key.
    Known(Arc<str>),
    /// The key cannot be read from the tuple (not sent, or not valid for its type).
    Unknown(String),
}

impl TableMapping {
    /// Builds the mapping, or says why the keyspace cannot follow this relation.
    pub fn build(
        keyspace: Arc<Keyspace>,
        binding: &Binding,
        rel: &RelationInfo,
        max_key_bytes: usize,
    ) -> Result<TableMapping, String> {
        let mode = keyspace.config.cdc;
        let mut fields = Vec::with_capacity(binding.fields.len());
        let mut degraded = None;
        for f in &binding.fields {
            match rel.index_of(&f.column.name) {
                // The relation was written under another schema than the table has now (a
                // change replayed from before an ALTER): its rows cannot be rendered in the
                // current shape, so they only invalidate — by position, so a newer entry stays.
                Some(index) if rel.columns[index].type_oid != f.column.type_oid => {
                    degraded = Some(format!(
                        "column `{}` had another type when these changes were written",
                        f.column.name
                    ));
                }
                Some(index) => fields.push(Field {
                    name: f.name.clone(),
                    key: field_key(&f.name),
                    index,
                    kind: f.column.kind.clone(),
                }),
                None => {
                    degraded = Some(format!(
                        "column `{}` is not replicated (generated, or not in the publication's column list), so changes invalidate instead of update",
                        f.column.name
                    ));
                }
            }
        }
        if let Some(why) = &degraded
            && mode == CdcMode::Update
        {
            tracing::warn!(keyspace = %binding.keyspace, reason = %why, "CDC keyspace degrades to invalidation");
        }
        let mut key = Vec::with_capacity(binding.key.len());
        for k in &binding.key {
            let index = rel.index_of(&k.name).ok_or_else(|| {
                format!(
                    "key column `{}` is not in the replicated table {}.{}",
                    k.name, rel.schema, rel.name
                )
            })?;
            if rel.replica_identity != b'f' && !rel.columns[index].identity {
                return Err(format!(
                    "key column `{}` of keyspace {} is not part of the replica identity of {}.{}, so deletes cannot name their entry; \
                     make the key the primary key, or run ALTER TABLE {}.{} REPLICA IDENTITY FULL (or USING INDEX on a unique index of the key)",
                    k.name, binding.keyspace, rel.schema, rel.name, rel.schema, rel.name
                ));
            }
            key.push((index, k.clone()));
        }
        Ok(TableMapping {
            keyspace,
            mode,
            degraded,
            fields,
            key,
            max_key_bytes,
        })
    }

    fn key_of(&self, t: &Tuple) -> KeyOf {
        let mut texts = Vec::with_capacity(self.key.len());
        for (i, col) in &self.key {
            texts.push(match t.0.get(*i) {
                Some(Value::Text(b)) => String::from_utf8_lossy(b),
                Some(Value::Null) => return KeyOf::Unknown(format!("key column `{}` is NULL", col.name)),
                _ => return KeyOf::Unknown(format!("key column `{}` was not sent", col.name)),
            });
        }
        let components = self.key.iter().zip(&texts).map(|((_, col), text)| (col, &**text));
        match key::cache_key_of_row(components, self.max_key_bytes) {
            Ok(k) => KeyOf::Known(k),
            Err(e) => KeyOf::Unknown(e.to_string()),
        }
    }

    /// The row as the keyspace's JSON document, and the fields pgoutput did not send.
    fn render(&self, t: &Tuple) -> (Bytes, Vec<String>) {
        let mut out = Vec::with_capacity(128);
        let mut unchanged = Vec::new();
        let mut obj = ObjectWriter::new(&mut out);
        for f in &self.fields {
            let text = match t.0.get(f.index) {
                Some(Value::Text(b)) => Some(std::str::from_utf8(b).unwrap_or_default()),
                Some(Value::Null) => None,
                // Unchanged TOAST (or a binary value, which this stream never asks for).
                _ => {
                    unchanged.push(f.name.clone());
                    continue;
                }
            };
            render_value(&f.kind, text, obj.keyed(&f.key));
        }
        obj.finish();
        (Bytes::from(out), unchanged)
    }

    fn event(&self, txn: &TxnInfo, op: Op, key: String, value: Option<Bytes>, unchanged: Vec<String>) -> ChangeEvent {
        let origin = if self.keyspace.config.federate {
            &*txn.node
        } else {
            &*txn.origin
        };
        let e = ChangeEvent::of(op, self.keyspace.name(), key, value)
            .from_origin(origin, txn.version, Source::Cdc)
            .at_source(txn.lsn, txn.commit_time_us, Some(txn.xid))
            .with_unchanged(unchanged);
        // A federated table's changes are this node's federated events: the log numbers them.
        if self.keyspace.config.federate {
            e.federated()
        } else {
            e
        }
    }

    /// The event for a key whose row is now `new` (`None` = gone).
    fn set(&self, txn: &TxnInfo, key: Arc<str>, new: Option<&Tuple>, out: &mut Vec<ChangeEvent>) {
        let k = key.to_string();
        match (self.mode, new) {
            (CdcMode::Invalidate, _) => out.push(self.event(txn, Op::Invalidate, k, None, Vec::new())),
            (_, Some(_)) if self.degraded.is_some() => out.push(self.event(txn, Op::Invalidate, k, None, Vec::new())),
            (_, Some(t)) => {
                let (value, unchanged) = self.render(t);
                out.push(self.event(txn, Op::Put, k, Some(value), unchanged));
            }
            (_, None) => out.push(self.event(txn, Op::Delete, k, None, Vec::new())),
        }
    }

    /// A key could not be determined: dropping the whole keyspace is the only safe answer.
    fn unknown(&self, txn: &TxnInfo, why: String, out: &mut Vec<ChangeEvent>) {
        tracing::warn!(keyspace = self.keyspace.name(), reason = %why, "cannot tell which entry a change touched; clearing the keyspace");
        out.push(self.event(txn, Op::Clear, String::new(), None, Vec::new()));
    }

    /// Appends the events `change` means for this keyspace.
    pub fn events(&self, change: &Change, txn: &TxnInfo, out: &mut Vec<ChangeEvent>) {
        match change {
            Change::Insert { new, .. } => match self.key_of(new) {
                KeyOf::Known(k) => self.set(txn, k, Some(new), out),
                KeyOf::Unknown(why) => self.unknown(txn, why, out),
            },
            Change::Update { old, new, .. } => {
                // An unchanged key column is not resent in `new`; the old-key tuple has it.
                let new_key = match (self.key_of(new), old) {
                    (KeyOf::Unknown(_), Some(o)) => self.key_of(&merge_key(new, o.tuple(), &self.key)),
                    (k, _) => k,
                };
                let old_key = old.as_ref().map(|o| self.key_of(o.tuple()));
                match (new_key, old_key) {
                    (KeyOf::Known(nk), Some(KeyOf::Known(ok))) if ok != nk => {
                        self.set(txn, ok, None, out);
                        self.set(txn, nk, Some(new), out);
                    }
                    (KeyOf::Known(nk), None | Some(KeyOf::Known(_))) => self.set(txn, nk, Some(new), out),
                    // Whether the key changed cannot be told: the old entry might be left behind.
                    (KeyOf::Known(_), Some(KeyOf::Unknown(why))) | (KeyOf::Unknown(why), _) => {
                        self.unknown(txn, why, out)
                    }
                }
            }
            Change::Delete { old, .. } => match self.key_of(old.tuple()) {
                KeyOf::Known(k) => self.set(txn, k, None, out),
                KeyOf::Unknown(why) => self.unknown(txn, why, out),
            },
            Change::Truncate { .. } => out.push(self.event(txn, Op::Clear, String::new(), None, Vec::new())),
            Change::Relation { .. } | Change::Other => {}
        }
    }
}

/// `new` with its unsent key columns taken from the old-key tuple.
fn merge_key(new: &Tuple, old: &Tuple, key: &[(usize, ColumnMeta)]) -> Tuple {
    let mut t = new.clone();
    for (i, _) in key {
        if matches!(t.0.get(*i), Some(Value::Unchanged))
            && let Some(v) = old.0.get(*i)
        {
            t.0[*i] = v.clone();
        }
    }
    t
}
