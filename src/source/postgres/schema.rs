//! What the catalog says about a keyspace's table, and the binding of a keyspace to it.
//!
//! [`TableMeta`] is read from `pg_catalog` with names passed as bound parameters. [`Binding`]
//! checks a keyspace's configuration against it — table present, key and mapped columns present,
//! a unique index on exactly the key columns, the privileges the configured patterns need — and
//! returns every problem at once; `cachesync check --connect` prints them and the server refuses to
//! serve a keyspace that has any.

use tokio_postgres::GenericClient;

use super::fields::FieldValue;
use super::render::TypeKind;
use crate::keyspace::config::{CdcMode, KeyspaceConfig, TableRef, WriteMode};

/// How a message names a relation of this `pg_class.relkind`.
fn relkind_name(relkind: char) -> &'static str {
    match relkind {
        'v' => "a view",
        'm' => "a materialized view",
        'f' => "a foreign table",
        _ => "not a plain table",
    }
}

/// One column as the catalog describes it.
#[derive(Debug, Clone)]
pub struct ColumnMeta {
    pub name: String,
    /// The type as SQL (`character varying(40)`, `bigint`), from `format_type`; used in casts.
    pub type_sql: String,
    pub kind: TypeKind,
    pub not_null: bool,
    pub has_default: bool,
    /// A generated column: it cannot be written.
    pub generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: it cannot be written without `OVERRIDING SYSTEM VALUE`.
    pub identity_always: bool,
    /// The column's type OID (as pgoutput's Relation message reports it).
    pub type_oid: u32,
}

/// The text Postgres stores — and outputs unchanged — for a value written to a column, when the
/// writer can know it without asking ([`ColumnMeta::stored_text`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredText<'a> {
    Null,
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

impl<'a> StoredText<'a> {
    /// As the column's output function writes it (`None`: SQL NULL); an integer is written
    /// into `digits`, so no string is allocated.
    pub fn text<'b>(&self, digits: &'b mut itoa::Buffer) -> Option<&'b str>
    where
        'a: 'b,
    {
        match *self {
            StoredText::Null => None,
            StoredText::Str(s) => Some(s),
            StoredText::Int(n) => Some(digits.format(n)),
            StoredText::Bool(b) => Some(if b { "t" } else { "f" }),
        }
    }
}

impl ColumnMeta {
    /// What Postgres stores for the JSON `value` written to this column, when its output is
    /// knowable here: NULL for `null`; for `text` and unbounded `varchar` a string's content;
    /// for `smallint`, `integer`, `bigint` an integer (a JSON integer, or a string holding one
    /// in the form Postgres outputs); for `boolean` a JSON boolean. `None` for anything else —
    /// other types (domains included) normalize or round what they are given, so the stored
    /// form has to come back from Postgres.
    pub fn stored_text<'a>(&self, value: FieldValue<'a>) -> Option<StoredText<'a>> {
        match (value, self.type_oid) {
            (FieldValue::Null, _) => Some(StoredText::Null),
            (FieldValue::Str(s), _) => self.key_text(s),
            // As `serde_json::Number::as_i64` reads a number's text.
            (FieldValue::Number(n), 20 | 21 | 23) => n.parse().ok().map(StoredText::Int),
            (FieldValue::Bool(b), 16) => Some(StoredText::Bool(b)),
            _ => None,
        }
    }

    /// What Postgres stores for this text (a key's component from the URL, a JSON string's
    /// content) written to this column, when it is knowable here (see [`Self::stored_text`]).
    pub fn key_text<'a>(&self, text: &'a str) -> Option<StoredText<'a>> {
        match self.type_oid {
            25 => Some(StoredText::Str(text)),
            1043 if self.type_sql == "character varying" => Some(StoredText::Str(text)),
            20 | 21 | 23 => canonical_int(text).map(StoredText::Int),
            _ => None,
        }
    }
}

#[cfg(test)]
impl ColumnMeta {
    /// A nullable column of this type with no default (for unit tests).
    pub(crate) fn plain(name: &str, type_oid: u32, type_sql: &str) -> ColumnMeta {
        ColumnMeta {
            name: name.into(),
            type_sql: type_sql.into(),
            kind: TypeKind::from_oid(type_oid, None),
            not_null: false,
            has_default: false,
            generated: false,
            identity_always: false,
            type_oid,
        }
    }
}

/// The integer `text` spells when it is spelled as Postgres outputs integers: an optional `-`,
/// then digits without a leading zero (`0` itself aside), and no `-0`.
fn canonical_int(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|c| c.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    if canonical { text.parse().ok() } else { None }
}

/// What the sidecar's role may do with the table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Privileges {
    pub select: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
}

/// One table.
#[derive(Debug, Clone)]
pub struct TableMeta {
    pub oid: u32,
    pub table: TableRef,
    /// `r` table, `p` partitioned table, `v` view, `m` materialized view, `f` foreign table.
    pub relkind: char,
    pub columns: Vec<ColumnMeta>,
    /// Column lists of the table's unique, non-partial, plain-column indexes.
    pub unique_keys: Vec<Vec<String>>,
    pub privileges: Privileges,
    /// Whether the table may store a written row other than as written (rules, children or
    /// partitions, a row trigger before insert or update: [`rewrites_rows`]).
    pub rewrites_rows: bool,
}

impl TableMeta {
    pub fn column(&self, name: &str) -> Option<&ColumnMeta> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Reads the table's metadata; `Ok(None)` when no such relation exists.
    pub async fn load(
        client: &impl GenericClient,
        table: &TableRef,
    ) -> Result<Option<TableMeta>, tokio_postgres::Error> {
        let rel = client
            .query_opt(
                "SELECT c.oid::int8, c.relkind::text FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r','p','v','m','f')",
                &[&table.schema, &table.name],
            )
            .await?;
        let Some(rel) = rel else { return Ok(None) };
        let oid = rel.get::<_, i64>(0);
        let relkind: String = rel.get(1);
        let cols = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), bt.oid::int8, \
                        COALESCE(et.oid, 0)::int8, a.attnotnull, a.atthasdef, \
                        a.attgenerated <> '', a.attidentity = 'a', a.atttypid::int8 \
                 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
                 LEFT JOIN pg_catalog.pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A' \
                 WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let columns = cols
            .iter()
            .map(|r| {
                let base = r.get::<_, i64>(2) as u32;
                let elem = r.get::<_, i64>(3) as u32;
                ColumnMeta {
                    name: r.get(0),
                    type_sql: r.get(1),
                    kind: TypeKind::from_oid(base, Some(elem)),
                    not_null: r.get(4),
                    has_default: r.get(5),
                    generated: r.get(6),
                    identity_always: r.get(7),
                    type_oid: r.get::<_, i64>(8) as u32,
                }
            })
            .collect();
        let keys = client
            .query(
                "SELECT ARRAY(SELECT a.attname::text \
                              FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                              JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                              ORDER BY k.ord) \
                 FROM pg_catalog.pg_index i \
                 WHERE i.indrelid = $1::int8::oid AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL",
                &[&oid],
            )
            .await?;
        let unique_keys = keys.iter().map(|r| r.get::<_, Vec<String>>(0)).collect();
        let p = client
            .query_one(
                &format!(
                    "SELECT has_table_privilege($1::int8::oid, 'SELECT'), has_table_privilege($1::int8::oid, 'INSERT'), \
                            has_table_privilege($1::int8::oid, 'UPDATE'), has_table_privilege($1::int8::oid, 'DELETE'), {} \
                     FROM pg_catalog.pg_class c WHERE c.oid = $1::int8::oid",
                    rewrites_rows("c")
                ),
                &[&oid],
            )
            .await?;
        Ok(Some(TableMeta {
            oid: oid as u32,
            table: table.clone(),
            relkind: relkind.chars().next().unwrap_or('r'),
            columns,
            unique_keys,
            privileges: Privileges {
                select: p.get(0),
                insert: p.get(1),
                update: p.get(2),
                delete: p.get(3),
            },
            rewrites_rows: p.get(4),
        }))
    }
}

/// One output field of a binding.
#[derive(Debug, Clone)]
pub struct Field {
    /// Name in the JSON document.
    pub name: String,
    pub column: ColumnMeta,
}

/// A keyspace resolved against its table: ready to build statements and render rows.
#[derive(Debug, Clone)]
pub struct Binding {
    pub keyspace: String,
    pub table: TableRef,
    pub table_oid: u32,
    /// Key columns in key order.
    pub key: Vec<ColumnMeta>,
    /// Output fields in document order.
    pub fields: Vec<Field>,
    /// Every column of the table as (name, type OID), to notice schema changes.
    pub columns: Vec<(String, u32)>,
    /// Every column of the table, to know which ones an insert must set.
    pub all_columns: Vec<ColumnMeta>,
    /// The table may store a written row other than as written ([`TableMeta::rewrites_rows`]).
    pub rewrites_rows: bool,
}

impl Binding {
    /// Whether documents made under `other` have the same shape as under this binding: the same
    /// table (by OID), the same fields from the same columns of the same types, the same key.
    pub fn same_shape(&self, other: &Binding) -> bool {
        let fields = |b: &Binding| -> Vec<(String, String, u32)> {
            b.fields
                .iter()
                .map(|f| (f.name.clone(), f.column.name.clone(), f.column.type_oid))
                .collect()
        };
        let key = |b: &Binding| -> Vec<(String, u32)> { b.key.iter().map(|k| (k.name.clone(), k.type_oid)).collect() };
        self.table_oid == other.table_oid && fields(self) == fields(other) && key(self) == key(other)
    }

    /// Checks `ks` against the table's metadata (`None` = table missing), returning every problem.
    pub fn resolve(ks: &KeyspaceConfig, meta: Option<&TableMeta>) -> Result<Binding, Vec<String>> {
        let table = ks.table.clone().expect("resolve is only called for sourced keyspaces");
        let Some(meta) = meta else {
            return Err(vec![format!(
                "table {table} does not exist (or is not visible to this role)"
            )]);
        };
        let mut problems = Vec::new();
        let mut key = Vec::new();
        for k in &ks.key {
            match meta.column(k) {
                Some(c) => key.push(c.clone()),
                None => problems.push(format!("key column `{k}` does not exist in table {table}")),
            }
        }
        let mut fields = Vec::new();
        match &ks.columns {
            None => fields.extend(meta.columns.iter().map(|c| Field {
                name: c.name.clone(),
                column: c.clone(),
            })),
            Some(mapping) => {
                for m in mapping {
                    match meta.column(&m.column) {
                        Some(c) => fields.push(Field {
                            name: m.field.clone(),
                            column: c.clone(),
                        }),
                        None => problems.push(format!("column `{}` does not exist in table {table}", m.column)),
                    }
                }
            }
        }
        // A view cannot declare a unique key: its key is taken on trust, and a load that finds
        // more than one row for a key fails naming the view.
        if key.len() == ks.key.len() && meta.relkind != 'v' {
            let mut want: Vec<&str> = ks.key.iter().map(String::as_str).collect();
            want.sort_unstable();
            let unique = meta.unique_keys.iter().any(|u| {
                let mut have: Vec<&str> = u.iter().map(String::as_str).collect();
                have.sort_unstable();
                have == want
            });
            if !unique {
                problems.push(format!(
                    "no primary key or unique index on exactly ({}) in table {table}; a key must identify one row (create one with: CREATE UNIQUE INDEX ON {table} ({}))",
                    ks.key.join(", "),
                    ks.key.join(", ")
                ));
            }
        }
        if ks.cdc != CdcMode::Off && !matches!(meta.relkind, 'r' | 'p') {
            problems.push(format!(
                "{table} is {}; logical replication carries only the changes of tables, so cdc cannot follow it: \
                 set cdc = \"off\" and keep it fresh with ttl and refresh_ahead",
                relkind_name(meta.relkind)
            ));
        }
        let p = meta.privileges;
        if !p.select {
            problems.push(format!("this role lacks SELECT on {table}"));
        }
        if ks.write != WriteMode::None {
            let write = format!("write = \"{}\"", ks.write.as_str());
            if !matches!(meta.relkind, 'r' | 'p') {
                problems.push(format!(
                    "{table} is {}; {write} needs a table",
                    relkind_name(meta.relkind)
                ));
            }
            for (ok, what) in [(p.insert, "INSERT"), (p.update, "UPDATE"), (p.delete, "DELETE")] {
                if !ok {
                    problems.push(format!("this role lacks {what} on {table}, which {write} needs"));
                }
            }
            for c in &key {
                if c.generated || c.identity_always {
                    problems.push(format!("key column `{}` is generated by the database and cannot be written; {write} needs a key the client supplies", c.name));
                }
            }
        }
        if problems.is_empty() {
            Ok(Binding {
                keyspace: ks.name.clone(),
                table,
                table_oid: meta.oid,
                key,
                fields,
                columns: meta.columns.iter().map(|c| (c.name.clone(), c.type_oid)).collect(),
                all_columns: meta.columns.clone(),
                rewrites_rows: meta.rewrites_rows,
            })
        } else {
            Err(problems)
        }
    }

    /// The field that renders a column, if the column is mapped.
    pub fn field_of_column(&self, column: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.column.name == column)
    }

    /// The field with a JSON name.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// SQL truth value: whether the table aliased `c` (a `pg_class` row) may store a written row
/// other than as written — it has rules, inheritance children or partitions (whose own
/// triggers would run), or an enabled row trigger that runs before (or instead of) an insert or
/// an update and so can change the row.
pub fn rewrites_rows(c: &str) -> String {
    format!(
        "({c}.relhasrules OR {c}.relhassubclass OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t \
          WHERE t.tgrelid = {c}.oid AND NOT t.tgisinternal AND t.tgenabled <> 'D' \
          AND (t.tgtype & 1) = 1 AND (t.tgtype & 66) <> 0 AND (t.tgtype & 20) <> 0))"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn column(type_oid: u32, type_sql: &str) -> ColumnMeta {
        ColumnMeta::plain("c", type_oid, type_sql)
    }

    #[test]
    fn only_integers_spelled_as_postgres_spells_them_are_canonical() {
        for (text, want) in [
            ("0", Some(0)),
            ("42", Some(42)),
            ("-42", Some(-42)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("042", None),
            ("-0", None),
            ("+1", None),
            (" 1", None),
            ("1 ", None),
            ("", None),
            ("-", None),
            ("1.0", None),
            ("1e3", None),
            ("9223372036854775808", None),
        ] {
            assert_eq!(canonical_int(text), want, "{text:?}");
        }
    }

    #[test]
    fn a_stored_text_is_known_only_where_postgres_stores_what_it_is_given() {
        let text = column(25, "text");
        let varchar = column(1043, "character varying");
        let bounded = column(1043, "character varying(10)");
        let int = column(23, "integer");
        let boolean = column(16, "boolean");
        let numeric = column(1700, "numeric");
        let domain = column(16_384, "my_domain");
        let s = json!("a\tb");
        assert_eq!(text.stored_text((&s).into()), Some(StoredText::Str("a\tb")));
        assert_eq!(varchar.stored_text((&s).into()), Some(StoredText::Str("a\tb")));
        // varchar(n) may cut trailing spaces; other types normalize what they read.
        assert_eq!(bounded.stored_text((&s).into()), None);
        assert_eq!(numeric.stored_text((&json!(1.5)).into()), None);
        assert_eq!(numeric.stored_text((&json!("1.50")).into()), None);
        assert_eq!(domain.stored_text((&json!(true)).into()), None);
        assert_eq!(int.stored_text((&json!(-7)).into()), Some(StoredText::Int(-7)));
        assert_eq!(int.stored_text((&json!("-7")).into()), Some(StoredText::Int(-7)));
        assert_eq!(int.stored_text((&json!("007")).into()), None);
        assert_eq!(int.stored_text((&json!(7.0)).into()), None);
        assert_eq!(int.stored_text((&json!(true)).into()), None);
        assert_eq!(
            text.stored_text((&json!(7)).into()),
            None,
            "a number into text is stored as its JSON text"
        );
        assert_eq!(
            boolean.stored_text((&json!(false)).into()),
            Some(StoredText::Bool(false))
        );
        assert_eq!(boolean.stored_text((&json!("false")).into()), None);
        for c in [&text, &int, &boolean, &numeric, &domain] {
            assert_eq!(c.stored_text((&json!(null)).into()), Some(StoredText::Null));
        }
        assert_eq!(int.key_text("12"), Some(StoredText::Int(12)));
        assert_eq!(int.key_text("012"), None);
        let mut digits = itoa::Buffer::new();
        assert_eq!(StoredText::Bool(true).text(&mut digits), Some("t"));
        assert_eq!(StoredText::Int(-3).text(&mut digits), Some("-3"));
        assert_eq!(StoredText::Null.text(&mut digits), None);
    }
}
