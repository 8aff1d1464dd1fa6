//! Rows as `COPY … FROM STDIN` text: the bulk path of the write-behind flush.
//!
//! Each JSON field value becomes the text the column type's input function reads — the same
//! text `jsonb_populate_record` hands it, so a staged row is stored exactly as the JSON path
//! stores it:
//! - a JSON string: its content (`"abc"` → `abc`), except into a `json`/`jsonb` column, which
//!   takes the JSON text itself (`"abc"`);
//! - `null`: SQL NULL (`\N`);
//! - a JSON array into an array column: an array literal (`{1,2,"a b",NULL}`), nested for more
//!   dimensions;
//! - anything else (numbers, booleans, objects, arrays into other columns): its JSON text.
//!
//! Then the text is escaped for `COPY`'s text format (backslash, tab, newline, carriage return).

use serde_json::Value;

use super::fields::FieldValue;
use super::render::TypeKind;

/// One field of a row: a written field's value, or text standing for a JSON string (a key's
/// text from the URL, written without building a `Value` for it).
#[derive(Clone, Copy)]
pub enum Cell<'a> {
    Field(FieldValue<'a>),
    Str(&'a str),
}

/// Appends one written field, escaped, for a column of `kind`.
pub fn field_value(kind: &TypeKind, value: FieldValue<'_>, out: &mut Vec<u8>) {
    match value {
        FieldValue::Null => out.extend_from_slice(b"\\N"),
        FieldValue::Str(s) => string(kind, s, out),
        // A number's or a boolean's JSON text needs no escape: written as is, without a string.
        FieldValue::Number(n) => out.extend_from_slice(n.as_bytes()),
        FieldValue::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        FieldValue::Value(v) => match (kind, v) {
            (TypeKind::Array(_), Value::Array(items)) => {
                let mut lit = String::with_capacity(16 * items.len());
                array_literal(items, &mut lit);
                escaped(&lit, out);
            }
            // Into `json`/`jsonb` and any other column: the JSON text.
            (_, v) => escaped(&v.to_string(), out),
        },
    }
}

/// Appends a JSON string's field: its content, or its JSON text into a `json`/`jsonb` column.
fn string(kind: &TypeKind, s: &str, out: &mut Vec<u8>) {
    match kind {
        TypeKind::Json => escaped(&Value::from(s).to_string(), out),
        _ => escaped(s, out),
    }
}

/// Appends one row: the fields tab-separated, then a newline.
pub fn row<'a>(fields: impl IntoIterator<Item = (&'a TypeKind, Cell<'a>)>, out: &mut Vec<u8>) {
    for (i, (kind, cell)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match cell {
            Cell::Field(v) => field_value(kind, v, out),
            Cell::Str(s) => string(kind, s, out),
        }
    }
    out.push(b'\n');
}

/// A Postgres array literal of JSON items: nested arrays are sub-arrays, `null` is `NULL`,
/// every other item is double-quoted (strings by content, others by JSON text).
fn array_literal(items: &[Value], out: &mut String) {
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => array_literal(inner, out),
            Value::String(s) => quoted_element(s, out),
            other => quoted_element(&other.to_string(), out),
        }
    }
    out.push('}');
}

fn quoted_element(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// `COPY` text-format escaping: runs without a byte to escape are copied whole (a byte at a
/// time, each `push` checking the capacity, was ~800 instructions a row of a drain).
fn escaped(s: &str, out: &mut Vec<u8>) {
    if !may_need_escape(s.as_bytes()) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    let mut rest = s.as_bytes();
    while let Some(at) = rest.iter().position(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(match rest[at] {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            _ => b"\\r",
        });
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
}

/// Whether `b` may hold a byte `COPY` escapes: false only when it certainly holds none (no
/// byte below 0x0e, where tab, newline and carriage return are, and no backslash).
fn may_need_escape(b: &[u8]) -> bool {
    super::render::any_byte(b, 0x0e, b"\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(kind: TypeKind, v: Value) -> String {
        let mut out = Vec::new();
        field_value(&kind, (&v).into(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn scalars_are_their_text_and_null_is_backslash_n() {
        assert_eq!(one(TypeKind::Text, json!("user 1")), "user 1");
        assert_eq!(one(TypeKind::Integer, json!(42)), "42");
        assert_eq!(one(TypeKind::Numeric, json!(1.25)), "1.25");
        assert_eq!(one(TypeKind::Bool, json!(true)), "true");
        assert_eq!(one(TypeKind::Integer, json!("7")), "7");
        assert_eq!(one(TypeKind::Text, Value::Null), "\\N");
        assert_eq!(one(TypeKind::Json, Value::Null), "\\N");
        // A string that spells \N is data, not NULL.
        assert_eq!(one(TypeKind::Text, json!("\\N")), "\\\\N");
    }

    #[test]
    fn json_columns_take_json_text_and_other_columns_take_objects_as_json() {
        assert_eq!(one(TypeKind::Json, json!("abc")), "\"abc\"");
        assert_eq!(one(TypeKind::Json, json!({"a": [1, 2]})), r#"{"a":[1,2]}"#);
        assert_eq!(one(TypeKind::Text, json!({"a": 1})), r#"{"a":1}"#);
    }

    #[test]
    fn control_characters_and_backslashes_are_escaped() {
        assert_eq!(one(TypeKind::Text, json!("a\tb\nc\rd\\e")), "a\\tb\\nc\\rd\\\\e");
        assert_eq!(one(TypeKind::Json, json!("line\nbreak")), "\"line\\\\nbreak\"");
        // Escapes at either end, side by side, and none at all; multi-byte text kept whole.
        for (s, want) in [
            ("\\", "\\\\"),
            ("\t\n", "\\t\\n"),
            ("\rx\\", "\\rx\\\\"),
            ("plain ✓ text", "plain ✓ text"),
            ("", ""),
        ] {
            let mut out = Vec::new();
            escaped(s, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), want, "{s:?}");
        }
        // The eight-byte test against the byte-wise one, for every byte at every position of
        // a chunk and of the remainder.
        for len in [1, 7, 8, 9, 16, 21] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut v = vec![b'a'; len];
                    v[at] = b;
                    let bytewise = v.iter().any(|&c| matches!(c, b'\\' | b'\t' | b'\n' | b'\r'));
                    assert!(!bytewise || may_need_escape(&v), "{v:?}");
                    assert_eq!(may_need_escape(&v), b < 0x0e || b == b'\\', "{v:?}");
                }
            }
        }
    }

    #[test]
    fn arrays_become_array_literals_quoted_and_nested() {
        let ints = TypeKind::Array(Box::new(TypeKind::Integer));
        assert_eq!(one(ints.clone(), json!([1, 2, null])), r#"{"1","2",NULL}"#);
        assert_eq!(one(ints, json!([[1, 2], [3, 4]])), r#"{{"1","2"},{"3","4"}}"#);
        let texts = TypeKind::Array(Box::new(TypeKind::Text));
        // Quotes and backslashes inside elements are escaped for the array, then the
        // backslashes again for COPY.
        assert_eq!(
            one(texts, json!(["a b", "q\"t", "b\\s"])),
            r#"{"a b","q\\"t","b\\\\s"}"#
        );
    }

    #[test]
    fn a_row_is_tab_separated_and_ends_in_a_newline() {
        let (one, x) = (json!(1), json!("x"));
        let cells = [
            (&TypeKind::Integer, Cell::Field((&one).into())),
            (&TypeKind::Text, Cell::Field((&x).into())),
            (&TypeKind::Text, Cell::Field(FieldValue::Str("in place"))),
            (&TypeKind::Integer, Cell::Field(FieldValue::Number("-7"))),
            (&TypeKind::Bool, Cell::Field(FieldValue::Bool(false))),
            (&TypeKind::Text, Cell::Field(FieldValue::Null)),
            (&TypeKind::Text, Cell::Str("a\tb")),
            (&TypeKind::Json, Cell::Str("k")),
        ];
        let mut out = Vec::new();
        row(cells, &mut out);
        // Text stands for a JSON string: the same field as `Value::String` would give.
        assert_eq!(out, b"1\tx\tin place\t-7\tfalse\t\\N\ta\\tb\t\"k\"\n");
    }
}
