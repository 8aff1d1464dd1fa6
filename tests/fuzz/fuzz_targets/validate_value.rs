//! Any JSON value checked against every column kind the write paths validate: no panic, and
//! what the check accepts for an integer column as a plain decimal string is in the column's
//! range (the check never lets through what Postgres certainly refuses, for the cases it can
//! decide exactly).
#![no_main]

use cachesync::source::postgres::render::TypeKind;
use cachesync::source::postgres::schema::ColumnMeta;
use cachesync::source::postgres::validate::check;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn col(type_sql: &str, kind: TypeKind, type_oid: u32, not_null: bool) -> ColumnMeta {
    ColumnMeta {
        name: "c".into(),
        type_sql: type_sql.into(),
        kind,
        not_null,
        has_default: false,
        generated: false,
        identity_always: false,
        type_oid,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let columns = [
        col("smallint", TypeKind::Integer, 21, true),
        col("integer", TypeKind::Integer, 23, false),
        col("bigint", TypeKind::Integer, 20, false),
        col("numeric", TypeKind::Numeric, 1700, false),
        col("double precision", TypeKind::Float, 701, false),
        col("boolean", TypeKind::Bool, 16, false),
        col("text", TypeKind::Text, 25, false),
        col("character varying(8)", TypeKind::Text, 1043, false),
        col("uuid", TypeKind::Text, 2950, false),
        col("timestamp with time zone", TypeKind::Timestamptz, 1184, false),
        col("jsonb", TypeKind::Json, 3802, false),
        col("integer[]", TypeKind::Array(Box::new(TypeKind::Integer)), 1007, false),
    ];
    for c in &columns {
        let ok = check(c, &value).is_ok();
        if ok
            && c.kind == TypeKind::Integer
            && let Value::String(s) = &value
        {
            let t = s.trim();
            let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                let v: i128 = t.parse().expect("accepted decimal text parses");
                let (lo, hi) = match c.type_oid {
                    21 => (i16::MIN as i128, i16::MAX as i128),
                    23 => (i32::MIN as i128, i32::MAX as i128),
                    _ => (i64::MIN as i128, i64::MAX as i128),
                };
                assert!(v >= lo && v <= hi, "{s:?} accepted for {}", c.type_sql);
            }
        }
        if ok && let Value::String(s) = &value {
            assert!(!s.contains('\0'), "a NUL was accepted");
        }
    }
});
