//! Checks, before anything is written, that a JSON value can be stored in its column — for
//! writes that are acknowledged before Postgres sees them (write-behind), so a value Postgres
//! would certainly reject gets a 400 now instead of a dead letter later.
//!
//! The checks mirror how `jsonb_populate_record` feeds a JSON value to the column type's input
//! function, and reject only what that input function is certain to refuse: JSON `null` in a
//! `NOT NULL` column, booleans/objects/arrays in numeric, boolean or timestamp columns, scalars
//! in array columns, fractions and out-of-range numbers in integer columns. Anything
//! uncertain (strings, which every input function parses in its own way) is left to Postgres;
//! what it then rejects becomes a dead letter.

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
    check_kind(&column.kind, column.type_oid, value)
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
        (TypeKind::Json | TypeKind::Text, _) | (_, Value::String(_)) => Ok(()),
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
            let (lo, hi): (i128, i128) = match type_oid {
                21 => (i16::MIN.into(), i16::MAX.into()),
                23 => (i32::MIN.into(), i32::MAX.into()),
                26 => (0, u32::MAX.into()),
                _ => (i64::MIN.into(), i64::MAX.into()),
            };
            let whole = n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
            match whole {
                Some(v) if v < lo || v > hi => Err(format!("{v} is out of range ({lo} to {hi})")),
                Some(_) => Ok(()),
                None if n.as_f64().is_some_and(|f| f.fract() != 0.0) => Err(format!("expected an integer, got {n}")),
                None => Ok(()),
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
        ColumnMeta {
            name: "c".into(),
            type_sql: "t".into(),
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
}
