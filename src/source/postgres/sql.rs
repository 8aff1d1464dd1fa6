//! SQL text for a binding. Identifiers come from the configuration and the catalog and are always
//! double-quoted; values are always bound parameters — nothing from a request is ever spliced
//! into SQL. Key values are bound as `text` and cast to the column's type (its `format_type`
//! spelling, from the catalog), so one statement serves every key type.
//!
//! Result columns are rendered with `format('%s', col)`, which calls the type's output function
//! (the same text pgoutput sends), not `col::text`, whose casts differ for a few types (`bool`
//! prints `true`, `inet` adds a netmask).

use super::schema::{self, Binding, ColumnMeta};
use crate::keyspace::config::TableRef;

/// `ident` as a quoted SQL identifier.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `"schema"."table"`.
pub fn qualified(t: &TableRef) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

/// The output-function text of a column, NULL kept NULL.
fn text_of(prefix: &str, col: &ColumnMeta) -> String {
    let q = format!("{prefix}{}", quote_ident(&col.name));
    format!("CASE WHEN {q} IS NULL THEN NULL ELSE format('%s', {q}) END")
}

/// `<text of field 0> AS c0, <text of field 1> AS c1, …`
fn output_list(prefix: &str, b: &Binding) -> String {
    b.fields
        .iter()
        .enumerate()
        .map(|(i, f)| format!("{} AS c{i}", text_of(prefix, &f.column)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `"k1" = CAST($1::text AS bigint) AND ...`, numbering parameters from `first`.
fn key_predicate(b: &Binding, first: usize) -> String {
    b.key
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{} = CAST(${}::text AS {})",
                quote_ident(&c.name),
                first + i,
                c.type_sql
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Loads one row by key, always answering exactly one row: column 0 the WAL insert position
/// and column 1 `pg_current_snapshot()` — both read after the statement's snapshot was taken —
/// column 2 `true` when the row exists (NULL when not), then one text column per output field.
pub fn select_by_key(b: &Binding) -> String {
    let fields = output_list("", b);
    let outer = (0..b.fields.len())
        .map(|i| format!("r.c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT pg_current_wal_insert_lsn()::text, pg_current_snapshot()::text, r.found, {outer} \
         FROM (SELECT 1) AS one LEFT JOIN (SELECT true AS found, {fields} FROM {} WHERE {}) AS r ON true",
        qualified(&b.table),
        key_predicate(b, 1)
    )
}

/// What every write statement returns per stored row: the WAL insert position, the transaction
/// id, the output fields, then the raw key columns (`k0`, `k1`, …).
fn returning(b: &Binding) -> String {
    let raw_keys = b
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{} AS k{i}", quote_ident(&k.name)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "pg_current_wal_insert_lsn()::text AS lsn, pg_current_xact_id()::text AS xid, {}, {raw_keys}",
        output_list("t.", b)
    )
}

/// Reads and locks one row by key (`FOR UPDATE`): a conditional write checks its precondition
/// against the row as stored, and no other write of it can commit in between.
pub fn select_for_update(b: &Binding) -> String {
    format!(
        "SELECT {} FROM {} WHERE {} FOR UPDATE",
        output_list("", b),
        qualified(&b.table),
        key_predicate(b, 1)
    )
}

/// Inserts one row from a JSON object bound as `$1` unless its key exists (a create-only
/// write): no row is returned then. Same result columns as [`upsert`].
pub fn insert_if_absent(b: &Binding, columns: &[&str]) -> String {
    let table = qualified(&b.table);
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let key: Vec<String> = b.key.iter().map(|c| quote_ident(&c.name)).collect();
    format!(
        "INSERT INTO {table} AS t ({cols}) SELECT {rcols} FROM jsonb_populate_record(NULL::{table}, $1::text::jsonb) AS r \
         ON CONFLICT ({keys}) DO NOTHING RETURNING {returning}",
        cols = cols.join(", "),
        rcols = cols.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
        keys = key.join(", "),
        returning = returning(b),
    )
}

/// Where an upsert's rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// One JSON object bound as `$1`.
    One,
    /// A JSON array of objects bound as `$1` (one per row, unique keys).
    Many,
    /// The connection's staging table ([`stage_table`]), filled by `COPY` in the same
    /// transaction (one row per key).
    Staged,
}

impl Rows {
    /// The rows as a relation aliased `r`, with the table's column names and types.
    fn relation(self, table: &str, b: &Binding) -> String {
        match self {
            Rows::One => format!("jsonb_populate_record(NULL::{table}, $1::text::jsonb) AS r"),
            Rows::Many => format!("jsonb_populate_recordset(NULL::{table}, $1::text::jsonb) AS r"),
            Rows::Staged => format!("pg_temp.{} AS r", quote_ident(&stage_table(b))),
        }
    }
}

/// The name of a binding's staging table: a temporary table of the session (so each pooled
/// connection has its own), emptied at every commit, with the table's columns and types but
/// none of its constraints. Named by a hash of the table's name, so it is a plain identifier.
pub fn stage_table(b: &Binding) -> String {
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let name = qualified(&b.table);
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
        (h ^ c as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("cachesync_stage_{h:016x}")
}

/// Creates the session's staging table if it is not there yet, without a notice when it is.
/// `CREATE TABLE … AS SELECT … WITH NO DATA` takes column names and types only: no `NOT NULL`,
/// defaults, keys or generated expressions, so a row that writes some columns is staged as is.
pub fn ensure_stage_table(b: &Binding) -> String {
    let stage = quote_ident(&stage_table(b));
    let create = format!(
        "CREATE TEMPORARY TABLE {stage} ON COMMIT DELETE ROWS AS SELECT * FROM {} WITH NO DATA",
        qualified(&b.table)
    );
    format!(
        "DO $cachesync$ BEGIN IF to_regclass('pg_temp.{stage}') IS NULL THEN EXECUTE {}; END IF; END $cachesync$",
        quote_literal(&create)
    )
}

/// `COPY` of the named columns into the staging table, in text format.
pub fn copy_into_stage(b: &Binding, columns: &[&str]) -> String {
    format!(
        "COPY pg_temp.{} ({}) FROM STDIN",
        quote_ident(&stage_table(b)),
        columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
    )
}

/// `COPY` of the named columns straight into the table, in text format (an insert of rows
/// whose keys are all new).
pub fn copy_into_table(b: &Binding, columns: &[&str]) -> String {
    format!(
        "COPY {} ({}) FROM STDIN",
        qualified(&b.table),
        columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
    )
}

/// Empties the staging table within the transaction (between two sets of columns).
pub fn clear_stage_table(b: &Binding) -> String {
    format!("DELETE FROM pg_temp.{}", quote_ident(&stage_table(b)))
}

/// `text` as a SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Upserts the columns in `columns` (table column names, key columns included) from `rows`.
/// Returns per stored row: the WAL insert position, the transaction id, the output
/// fields, then the raw key columns.
///
/// A plain `INSERT … ON CONFLICT DO UPDATE` cannot update only some fields of a row whose other
/// columns are `NOT NULL` without defaults: Postgres checks the *proposed insert* row first. So
/// existing rows are updated in place (only the named fields), and only rows not there are
/// inserted — with `ON CONFLICT` still there for a concurrent insert of the same key.
pub fn upsert(b: &Binding, columns: &[&str], rows: Rows) -> String {
    if complete(b, columns) {
        return insert_on_conflict(b, columns, rows, true);
    }
    let table = qualified(&b.table);
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let key: Vec<String> = b.key.iter().map(|c| quote_ident(&c.name)).collect();
    let non_key: Vec<&String> = cols.iter().filter(|c| !key.contains(c)).collect();
    let assign = |from: &str| -> String {
        if non_key.is_empty() {
            // Nothing but the key: still "update" so RETURNING yields the existing row.
            format!("{0} = {from}.{0}", key[0])
        } else {
            non_key
                .iter()
                .map(|c| format!("{c} = {from}.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let returning = returning(b);
    let key_match = key
        .iter()
        .map(|k| format!("t.{k} = r.{k}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let updated = key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("u.k{i} = r.{k}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let source = format!("SELECT * FROM {}", rows.relation(&table, b));
    format!(
        "WITH r AS ({source}), \
         upd AS (UPDATE {table} AS t SET {set_r} FROM r WHERE {key_match} RETURNING {returning}), \
         ins AS (INSERT INTO {table} AS t ({cols}) SELECT {rcols} FROM r WHERE NOT EXISTS (SELECT 1 FROM upd AS u WHERE {updated}) \
                 ON CONFLICT ({keys}) DO UPDATE SET {set_excluded} RETURNING {returning}) \
         SELECT * FROM upd UNION ALL SELECT * FROM ins",
        set_r = assign("r"),
        set_excluded = assign("EXCLUDED"),
        cols = cols.join(", "),
        rcols = cols.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
        keys = key.join(", "),
    )
}

/// The plain upsert of [`upsert`] returning nothing, for rows whose stored form the cache knows
/// already ([`crate::source::postgres::TableSource::stores_as_written`]); `columns` must be
/// [`complete`].
pub fn upsert_as_written(b: &Binding, columns: &[&str], rows: Rows) -> String {
    debug_assert!(complete(b, columns));
    insert_on_conflict(b, columns, rows, false)
}

/// Read after a transaction's upserts as written ([`upsert_as_written`]): the WAL insert
/// position and the transaction id, which those rows are stored at, and which of the tables
/// (OIDs bound as `$1`, `int8[]`) store rows other than as written ([`schema::rewrites_rows`]) — a
/// trigger created since the binding was read. Read in the same transaction, it sees every
/// trigger that ran on its rows: creating one waits for the transaction's lock on the table.
pub fn written_stamp() -> String {
    format!(
        "SELECT pg_current_wal_insert_lsn()::text, pg_current_xact_id()::text, \
         ARRAY(SELECT c.oid::int8 FROM pg_catalog.pg_class c WHERE c.oid = ANY($1::int8[]::oid[]) AND {})",
        schema::rewrites_rows("c")
    )
}

/// Whether `columns` sets every column an insert must set (not null, no default, not
/// generated): then the proposed insert row is valid and a plain upsert does the job.
pub fn complete(b: &Binding, columns: &[&str]) -> bool {
    b.all_columns
        .iter()
        .filter(|c| c.not_null && !c.has_default && !c.generated && !c.identity_always)
        .all(|c| columns.contains(&c.name.as_str()))
}

/// `INSERT … SELECT … ON CONFLICT (key) DO UPDATE`: half the work of the update-then-insert form
/// when the rows are complete. Same result columns as [`upsert`], or none.
fn insert_on_conflict(b: &Binding, columns: &[&str], rows: Rows, returning: bool) -> String {
    let table = qualified(&b.table);
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let key: Vec<String> = b.key.iter().map(|c| quote_ident(&c.name)).collect();
    let non_key: Vec<&String> = cols.iter().filter(|c| !key.contains(c)).collect();
    let set = if non_key.is_empty() {
        format!("{0} = EXCLUDED.{0}", key[0])
    } else {
        non_key
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let returning = if returning {
        format!(" RETURNING {}", self::returning(b))
    } else {
        String::new()
    };
    format!(
        "INSERT INTO {table} AS t ({cols}) SELECT {rcols} FROM {from} \
         ON CONFLICT ({keys}) DO UPDATE SET {set}{returning}",
        cols = cols.join(", "),
        rcols = cols.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
        keys = key.join(", "),
        from = rows.relation(&table, b),
    )
}

/// Deletes the rows whose keys are in a JSON array of objects bound as `$1`; returns per deleted
/// row the WAL insert position, the transaction id and the key columns' text.
pub fn delete_rows(b: &Binding) -> String {
    let table = qualified(&b.table);
    let key_match = b
        .key
        .iter()
        .map(|c| format!("t.{0} = r.{0}", quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let keys = b.key.iter().map(|c| text_of("t.", c)).collect::<Vec<_>>().join(", ");
    format!(
        "DELETE FROM {table} AS t USING jsonb_populate_recordset(NULL::{table}, $1::text::jsonb) AS r WHERE {key_match} \
         RETURNING pg_current_wal_insert_lsn()::text, pg_current_xact_id()::text, {keys}"
    )
}

/// Deletes one row by key, returning the WAL insert position and the transaction id when a row
/// was deleted.
pub fn delete_by_key(b: &Binding) -> String {
    format!(
        "DELETE FROM {} WHERE {} RETURNING pg_current_wal_insert_lsn()::text, pg_current_xact_id()::text",
        qualified(&b.table),
        key_predicate(b, 1)
    )
}

/// Tries one field's value against its column type, to name the column a data error came from.
pub fn probe_column(b: &Binding) -> String {
    format!(
        "SELECT jsonb_populate_record(NULL::{}, $1::text::jsonb) IS NULL",
        qualified(&b.table)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::render::TypeKind;
    use crate::source::postgres::schema::Field;

    fn col(name: &str, ty: &str) -> ColumnMeta {
        ColumnMeta {
            name: name.into(),
            type_sql: ty.into(),
            kind: TypeKind::Text,
            not_null: false,
            has_default: false,
            generated: false,
            identity_always: false,
            type_oid: 25,
        }
    }

    fn binding() -> Binding {
        Binding {
            keyspace: "ks".into(),
            table: TableRef {
                schema: "public".into(),
                name: "we\"ird".into(),
            },
            table_oid: 1,
            key: vec![col("tenant", "integer"), col("id", "uuid")],
            fields: vec![
                Field {
                    name: "tenant".into(),
                    column: col("tenant", "integer"),
                },
                Field {
                    name: "id".into(),
                    column: col("id", "uuid"),
                },
                Field {
                    name: "n".into(),
                    column: col("name", "text"),
                },
            ],
            columns: vec![],
            // Two required columns: writing both makes a row complete.
            all_columns: ["name", "extra"]
                .iter()
                .map(|n| {
                    let mut c = col(n, "text");
                    c.not_null = true;
                    c
                })
                .collect(),
            rewrites_rows: false,
        }
    }

    #[test]
    fn identifiers_are_quoted_and_keys_bound() {
        let s = select_by_key(&binding());
        assert!(s.contains(r#"FROM "public"."we""ird""#), "{s}");
        assert!(
            s.contains(r#""tenant" = CAST($1::text AS integer) AND "id" = CAST($2::text AS uuid)"#),
            "{s}"
        );
        assert!(s.contains(r#"format('%s', "name")"#), "{s}");
    }

    #[test]
    fn complete_rows_use_a_plain_insert_on_conflict() {
        let s = upsert(&binding(), &["tenant", "id", "name", "extra"], Rows::Many);
        assert!(s.starts_with("INSERT INTO"), "{s}");
        assert!(s.contains("jsonb_populate_recordset"), "{s}");
        assert!(
            s.contains(
                r#"ON CONFLICT ("tenant", "id") DO UPDATE SET "name" = EXCLUDED."name", "extra" = EXCLUDED."extra""#
            ),
            "{s}"
        );
        assert!(
            upsert(&binding(), &["tenant", "id", "name"], Rows::Many).starts_with("WITH"),
            "a partial row keeps the update-then-insert form"
        );
    }

    #[test]
    fn upsert_updates_only_named_non_key_columns() {
        let s = upsert(&binding(), &["tenant", "id", "name"], Rows::One);
        assert!(
            s.contains(r#"SET "name" = r."name" FROM r WHERE t."tenant" = r."tenant" AND t."id" = r."id""#),
            "{s}"
        );
        assert!(
            s.contains(r#"ON CONFLICT ("tenant", "id") DO UPDATE SET "name" = EXCLUDED."name" RETURNING"#),
            "{s}"
        );
        let only_key = upsert(&binding(), &["tenant", "id"], Rows::One);
        assert!(
            only_key.contains(r#"DO UPDATE SET "tenant" = EXCLUDED."tenant""#),
            "{only_key}"
        );
    }

    #[test]
    fn an_upsert_as_written_asks_for_nothing_back() {
        let cols = ["tenant", "id", "name", "extra"];
        let returned = upsert(&binding(), &cols, Rows::Staged);
        let written = upsert_as_written(&binding(), &cols, Rows::Staged);
        assert!(returned.contains(" RETURNING "), "{returned}");
        assert!(!written.contains("RETURNING"), "{written}");
        assert_eq!(
            written,
            returned[..returned.find(" RETURNING ").unwrap()],
            "the same upsert otherwise"
        );
        let stamp = written_stamp();
        assert!(
            stamp.contains("pg_current_wal_insert_lsn()") && stamp.contains("$1::int8[]"),
            "{stamp}"
        );
        assert!(schema::rewrites_rows("c").contains("c.relhasrules"));
    }
}
