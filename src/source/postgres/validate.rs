//! Checks, before anything is written, that a JSON value can be stored in its column — for
//! writes that are acknowledged before Postgres sees them (write-behind), so a value Postgres
//! would certainly reject gets a 400 now instead of a dead letter later.
//!
//! Write-through runs the same check before its statement, so both write modes answer a value
//! Postgres would certainly refuse with the same 400 (`invalid_value`) and the same words.
//!
//! The checks mirror how `jsonb_populate_record` feeds a JSON value to the column type's input
//! function, and reject only what that input function is certain to refuse, in every supported
//! Postgres version: JSON `null` in a `NOT NULL` column; a NUL character anywhere (jsonb cannot
//! hold `\u0000`); booleans/objects/arrays in numeric, boolean or timestamp columns; scalars in
//! array columns; fractions and out-of-range numbers in integer columns, as numbers or as
//! decimal strings; strings that are no integer, number or boolean in any spelling Postgres
//! reads; a uuid without 32 hex digits; a timestamp string with no digit that is not one of
//! its special words; a `varchar(n)`/`char(n)` value longer than `n` (beyond trailing spaces,
//! which Postgres cuts). Anything uncertain is left to Postgres; what it then rejects becomes a
//! dead letter (write-behind) or a 400 from its own message (write-through).

use serde_json::Value;

use super::render::TypeKind;
use super::schema::ColumnMeta;

/// Why `value` cannot be stored in `column`; `Ok` when it may be.
pub fn check(column: &ColumnMeta, value: &Value) -> Result<(), String> {
    if value.is_null() {
        return if column.not_null {
            Err("null in a NOT NULL column".into())
        } else {
            Ok(())
        };
    }
    if has_nul(value) {
        return Err("a NUL character (\\u0000) cannot be stored".into());
    }
    check_kind(&column.kind, column.type_oid, value)?;
    if let (Value::String(text), Some(max)) = (value, char_limit(&column.type_sql)) {
        let len = text.chars().count();
        if len > max && text.chars().skip(max).any(|c| c != ' ') {
            return Err(format!("{len} characters is longer than {max}"));
        }
    }
    Ok(())
}

/// Whether a NUL appears in any string (or object key) of the value.
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// `n` of `character varying(n)` / `character(n)` (as `format_type` prints them).
fn char_limit(type_sql: &str) -> Option<usize> {
    let rest = type_sql
        .strip_prefix("character varying(")
        .or_else(|| type_sql.strip_prefix("character("))?;
    rest.strip_suffix(')')?.parse().ok()
}

/// Postgres's type oids the string checks need.
mod oid {
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const UUID: u32 = 2950;
}

/// The range of an integer column.
fn int_range(type_oid: u32) -> (i128, i128) {
    match type_oid {
        oid::INT2 => (i16::MIN.into(), i16::MAX.into()),
        oid::INT4 => (i32::MIN.into(), i32::MAX.into()),
        oid::OID => (0, u32::MAX.into()),
        _ => (i64::MIN.into(), i64::MAX.into()),
    }
}

/// A string an integer column's input function certainly refuses. Postgres 16 also reads `_`
/// between digits and `0x`/`0o`/`0b` prefixes, so those spellings are left to it.
fn check_int_text(text: &str, type_oid: u32) -> Result<(), String> {
    let t = text.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    let lower = digits.to_ascii_lowercase();
    let prefixed = ["0x", "0o", "0b"].iter().any(|p| lower.starts_with(p)) && lower.len() > 2;
    if prefixed {
        return if lower[2..].chars().all(|c| c.is_ascii_hexdigit() || c == '_') {
            Ok(())
        } else {
            Err(format!("{text:?} is not an integer"))
        };
    }
    if digits.is_empty()
        || !digits.starts_with(|c: char| c.is_ascii_digit())
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '_')
    {
        return Err(format!("{text:?} is not an integer"));
    }
    if !digits.contains('_') {
        let (lo, hi) = int_range(type_oid);
        match t.parse::<i128>() {
            Ok(v) if v < lo || v > hi => return Err(format!("{v} is out of range ({lo} to {hi})")),
            Ok(_) => {}
            Err(_) => return Err(format!("{text:?} is out of range ({lo} to {hi})")),
        }
    }
    Ok(())
}

/// A string a float or numeric column's input function certainly refuses.
fn check_number_text(text: &str) -> Result<(), String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let unsigned = lower.strip_prefix(['+', '-']).unwrap_or(&lower);
    if matches!(unsigned, "nan" | "infinity" | "inf") {
        return Ok(());
    }
    let plain = unsigned.replace('_', "");
    if !plain.is_empty() && plain.parse::<f64>().is_ok() && plain.starts_with(|c: char| c.is_ascii_digit() || c == '.')
    {
        return Ok(());
    }
    if ["0x", "0o", "0b"].iter().any(|p| unsigned.starts_with(p)) {
        return Ok(()); // numeric input of Postgres 16 and later
    }
    Err(format!("{text:?} is not a number"))
}

/// Whether Postgres's `boolin` reads the string: `t`/`true`, `f`/`false`, `y`/`yes`, `n`/`no`
/// and their prefixes, `on`, `off` (at least `of`), `1`, `0`, in any case, trimmed.
fn bool_text_ok(text: &str) -> bool {
    let t = text.trim().to_ascii_lowercase();
    if t.is_empty() {
        return false;
    }
    let prefix_of = |word: &str| word.starts_with(t.as_str());
    prefix_of("true")
        || prefix_of("false")
        || prefix_of("yes")
        || prefix_of("no")
        || (t.len() >= 2 && (prefix_of("on") || prefix_of("off")))
        || t == "1"
        || t == "0"
}

/// A timestamp string certainly refused: no digit, and not one of Postgres's special words.
fn check_timestamp_text(text: &str) -> Result<(), String> {
    let t = text.trim().to_ascii_lowercase();
    const SPECIAL: [&str; 7] = [
        "epoch",
        "infinity",
        "-infinity",
        "now",
        "today",
        "tomorrow",
        "yesterday",
    ];
    if SPECIAL.contains(&t.as_str()) || t.chars().any(|c| c.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!("{text:?} is not a timestamp"))
    }
}

/// A uuid string certainly refused: not 32 hex digits once braces and hyphens are taken out.
fn check_uuid_text(text: &str) -> Result<(), String> {
    let t = text.trim();
    let inner = t.strip_prefix('{').and_then(|r| r.strip_suffix('}')).unwrap_or(t);
    let hex: Vec<char> = inner.chars().filter(|c| *c != '-').collect();
    if hex.len() == 32 && hex.iter().all(char::is_ascii_hexdigit) {
        Ok(())
    } else {
        Err(format!("{text:?} is not a uuid"))
    }
}

fn check_kind(kind: &TypeKind, type_oid: u32, value: &Value) -> Result<(), String> {
    let got = || match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    match (kind, value) {
        (TypeKind::Text, Value::String(t)) if type_oid == oid::UUID => check_uuid_text(t),
        (TypeKind::Json | TypeKind::Text, _) => Ok(()),
        (TypeKind::Integer, Value::String(t)) => check_int_text(t, type_oid),
        (TypeKind::Float | TypeKind::Numeric, Value::String(t)) => check_number_text(t),
        (TypeKind::Bool, Value::String(t)) if bool_text_ok(t) => Ok(()),
        (TypeKind::Bool, Value::String(t)) => Err(format!("{t:?} is not a boolean")),
        (TypeKind::Timestamptz | TypeKind::Timestamp, Value::String(t)) => check_timestamp_text(t),
        (TypeKind::Array(_), Value::String(_)) => Ok(()),
        (TypeKind::Array(elem), Value::Array(items)) => items.iter().enumerate().try_for_each(|(i, item)| {
            match item {
                Value::Null => Ok(()),
                // A nested array is a further dimension of the same element type.
                Value::Array(_) => check_kind(kind, 0, item),
                _ => check_kind(elem, 0, item),
            }
            .map_err(|e| format!("element {i}: {e}"))
        }),
        (TypeKind::Array(_), _) => Err(format!("expected an array, got {}", got())),
        (TypeKind::Integer, Value::Number(n)) => {
            let (lo, hi) = int_range(type_oid);
            let whole = n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
            match (whole, n.as_f64()) {
                (Some(v), _) if v < lo || v > hi => Err(format!("{v} is out of range ({lo} to {hi})")),
                (Some(_), _) => Ok(()),
                // A whole number written as a float (100.0, 1e2) Postgres reads if it is in range.
                (None, Some(f)) if f.fract() == 0.0 && f >= lo as f64 && f <= hi as f64 => Ok(()),
                (None, Some(f)) if f.is_finite() && f.fract() == 0.0 => {
                    Err(format!("{n} is out of range ({lo} to {hi})"))
                }
                _ if n.to_string().contains(['.', 'e', 'E']) && n.as_f64().is_some_and(f64::is_finite) => {
                    Err(format!("expected an integer, got {n}"))
                }
                _ => Err(format!("{n} is out of range ({lo} to {hi})")),
            }
        }
        (TypeKind::Bool, Value::Number(n)) => match n.as_u64() {
            Some(0 | 1) => Ok(()),
            _ => Err(format!("expected a boolean, got {n}")),
        },
        (TypeKind::Float | TypeKind::Numeric | TypeKind::Timestamptz | TypeKind::Timestamp, Value::Number(_))
        | (TypeKind::Bool, Value::Bool(_)) => Ok(()),
        (TypeKind::Integer, _) => Err(format!("expected an integer, got {}", got())),
        (TypeKind::Float | TypeKind::Numeric, _) => Err(format!("expected a number, got {}", got())),
        (TypeKind::Bool, _) => Err(format!("expected a boolean, got {}", got())),
        (TypeKind::Timestamptz | TypeKind::Timestamp, _) => Err(format!("expected a timestamp string, got {}", got())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(kind: TypeKind, oid: u32, not_null: bool) -> ColumnMeta {
        typed(kind, oid, not_null, "t")
    }

    fn typed(kind: TypeKind, oid: u32, not_null: bool, type_sql: &str) -> ColumnMeta {
        ColumnMeta {
            name: "c".into(),
            type_sql: type_sql.into(),
            kind,
            not_null,
            has_default: false,
            generated: false,
            identity_always: false,
            type_oid: oid,
        }
    }

    #[test]
    fn accepts_what_postgres_takes() {
        let int4 = col(TypeKind::Integer, 23, false);
        for v in [json!(5), json!(-5), json!("5"), json!(" 7 "), json!(100.0), json!(null)] {
            assert_eq!(check(&int4, &v), Ok(()), "{v}");
        }
        let b = col(TypeKind::Bool, 16, true);
        for v in [json!(true), json!(0), json!(1), json!("yes")] {
            assert_eq!(check(&b, &v), Ok(()), "{v}");
        }
        let arr = col(TypeKind::Array(Box::new(TypeKind::Integer)), 1007, false);
        for v in [json!([1, null, 3]), json!([[1, 2], [3, 4]]), json!("{1,2}")] {
            assert_eq!(check(&arr, &v), Ok(()), "{v}");
        }
        let ts = col(TypeKind::Timestamptz, 1184, false);
        assert_eq!(check(&ts, &json!(20260101)), Ok(()), "yyyymmdd is a date to Postgres");
        let text = col(TypeKind::Text, 25, false);
        for v in [json!({"a": 1}), json!([1]), json!(true), json!(1.5)] {
            assert_eq!(check(&text, &v), Ok(()), "{v}");
        }
        assert_eq!(check(&col(TypeKind::Json, 3802, true), &json!({"a": [1]})), Ok(()));
    }

    #[test]
    fn rejects_what_postgres_certainly_refuses() {
        let int2 = col(TypeKind::Integer, 21, true);
        assert!(check(&int2, &json!(null)).unwrap_err().contains("NOT NULL"));
        assert!(check(&int2, &json!(40000)).unwrap_err().contains("out of range"));
        assert!(check(&int2, &json!(5.5)).unwrap_err().contains("expected an integer"));
        assert!(check(&int2, &json!(true)).is_err());
        assert!(check(&int2, &json!({"a": 1})).is_err());
        assert!(check(&int2, &json!([1])).is_err());
        let int8 = col(TypeKind::Integer, 20, false);
        assert!(check(&int8, &json!(u64::MAX)).is_err());
        let n = col(TypeKind::Numeric, 1700, false);
        assert!(
            check(&n, &json!(true))
                .unwrap_err()
                .contains("expected a number, got true")
        );
        assert!(check(&n, &json!([1])).is_err());
        let b = col(TypeKind::Bool, 16, false);
        assert!(check(&b, &json!(2)).is_err());
        assert!(check(&b, &json!([true])).is_err());
        let ts = col(TypeKind::Timestamptz, 1184, false);
        assert!(check(&ts, &json!(true)).is_err());
        let arr = col(TypeKind::Array(Box::new(TypeKind::Integer)), 1007, false);
        assert!(check(&arr, &json!(5)).unwrap_err().contains("expected an array"));
        assert!(check(&arr, &json!([1, 1.5])).unwrap_err().contains("element 1"));
    }

    /// The values the front-door review found acknowledged by write-behind and then dead-lettered.
    #[test]
    fn rejects_the_strings_and_numbers_input_functions_refuse() {
        let int8 = col(TypeKind::Integer, 20, false);
        let int4 = col(TypeKind::Integer, 23, false);
        let two_to_64: Value = serde_json::from_str("18446744073709551616").unwrap();
        let huge: Value = serde_json::from_str("1e400").unwrap();
        assert!(check(&int8, &two_to_64).unwrap_err().contains("out of range"));
        assert!(check(&int4, &huge).unwrap_err().contains("out of range"));
        assert!(check(&int4, &json!("abc")).unwrap_err().contains("not an integer"));
        assert!(check(&int4, &json!("")).is_err());
        assert!(check(&int4, &json!("3000000000")).unwrap_err().contains("out of range"));
        assert!(check(&int4, &json!("12.5")).is_err());
        for ok in ["42", " -7 ", "+3", "1_000", "0x1F"] {
            assert_eq!(check(&int4, &json!(ok)), Ok(()), "{ok}: Postgres 16 reads it");
        }
        let b = col(TypeKind::Bool, 16, false);
        for bad in ["maybe", "", "2", "o", "yess"] {
            assert!(check(&b, &json!(bad)).is_err(), "{bad}");
        }
        for ok in ["t", "TRUE", " yes ", "of", "off", "on", "n", "1", "fal"] {
            assert_eq!(check(&b, &json!(ok)), Ok(()), "{ok}");
        }
        let num = col(TypeKind::Numeric, 1700, false);
        assert!(check(&num, &json!("abc")).is_err());
        for ok in ["1.5", "-2e3", "NaN", "Infinity", ".5", " 7 "] {
            assert_eq!(check(&num, &json!(ok)), Ok(()), "{ok}");
        }
        let text = col(TypeKind::Text, 25, false);
        assert!(check(&text, &json!("a\u{0}b")).unwrap_err().contains("NUL"));
        let jsonb = col(TypeKind::Json, 3802, false);
        assert!(check(&jsonb, &json!({"k": ["x\u{0}"]})).is_err());
        let vc = typed(TypeKind::Text, 1043, false, "character varying(5)");
        assert!(check(&vc, &json!("toolong")).unwrap_err().contains("longer than 5"));
        assert_eq!(check(&vc, &json!("héllo")), Ok(()), "characters, not bytes");
        assert_eq!(
            check(&vc, &json!("five    ")),
            Ok(()),
            "trailing spaces are cut, not refused"
        );
        let uuid = col(TypeKind::Text, 2950, false);
        assert!(check(&uuid, &json!("not-a-uuid")).is_err());
        for ok in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{A0EEBC999C0B4EF8BB6D6BB9BD380A11}",
        ] {
            assert_eq!(check(&uuid, &json!(ok)), Ok(()), "{ok}");
        }
        let ts = col(TypeKind::Timestamptz, 1184, false);
        assert!(check(&ts, &json!("yesterdayish")).is_err());
        for ok in ["2026-12-01 10:00:00+00", "now", "epoch", "Dec 1 2026"] {
            assert_eq!(check(&ts, &json!(ok)), Ok(()), "{ok}");
        }
    }
}
