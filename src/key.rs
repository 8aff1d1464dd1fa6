//! Keys as they appear in URLs, and their canonical form in the cache.
//!
//! Encoding (also in the README): a key is one URL path segment, percent-decoded. A composite key
//! lists its components in the keyspace's `key` order joined by commas — `/v1/kv/orders/7,1001` —
//! and a comma or percent sign *inside* a component is written `%2C` / `%25`. An in-memory keyspace
//! treats the whole (decoded) rest of the path as one opaque key.
//!
//! Components are normalized by their column's type so one row has one cache key: integers lose
//! leading zeros and `+` signs (`042` → `42`), uuids are lower-cased. The cache key of a composite
//! key is its canonical encoding (components re-escaped and joined with commas), which is also
//! how CDC names a row it has changed.

use std::sync::Arc;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use crate::source::postgres::render::TypeKind;
use crate::source::postgres::schema::ColumnMeta;

/// Characters escaped inside a composite key's component.
const COMPONENT: &AsciiSet = &CONTROLS.add(b'%').add(b',');

/// A parsed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The canonical form, used as the cache key.
    pub cache_key: Arc<str>,
    /// Normalized components in key-column order (one for a single-column or in-memory key).
    pub parts: Vec<String>,
}

/// Why a key was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the key is empty")]
    Empty,
    #[error("the key is {len} bytes; the limit is {max} (server.max_key_bytes)")]
    TooLong { len: usize, max: usize },
    #[error("the key is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    #[error(
        "the key has an invalid percent-escape at byte {at}: `%` must be followed by two hex digits (write a literal % as %25)"
    )]
    BadEscape { at: usize },
    #[error(
        "the key has {got} component(s) but keyspace {keyspace} has a key of {want} column(s) ({columns}); join components with ',' and write a comma inside one as %2C"
    )]
    WrongArity {
        keyspace: String,
        got: usize,
        want: usize,
        columns: String,
    },
    #[error("key component {value:?} is not a valid {type_sql} for key column `{column}`")]
    BadComponent {
        column: String,
        type_sql: String,
        value: String,
    },
}

/// Checks that every `%` starts a two-hex-digit escape: `50%` and `%zz` are refused rather than
/// taken literally, so two spellings can never name one key.
fn check_escapes(raw: &str) -> Result<(), KeyError> {
    let b = raw.as_bytes();
    for (at, _) in b.iter().enumerate().filter(|(_, c)| **c == b'%') {
        let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
        if !hex(at + 1) || !hex(at + 2) {
            return Err(KeyError::BadEscape { at });
        }
    }
    Ok(())
}

fn decode(raw: &str) -> Result<String, KeyError> {
    if !raw.contains('%') {
        return Ok(raw.to_string());
    }
    check_escapes(raw)?;
    percent_decode_str(raw)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| KeyError::NotUtf8)
}

/// Parses an in-memory keyspace's key: the whole decoded string.
pub fn parse_opaque(raw: &str, max: usize) -> Result<Key, KeyError> {
    let k = decode(raw)?;
    check_len(&k, max)?;
    Ok(Key {
        cache_key: k.as_str().into(),
        parts: vec![k],
    })
}

fn check_len(k: &str, max: usize) -> Result<(), KeyError> {
    if k.is_empty() {
        return Err(KeyError::Empty);
    }
    if k.len() > max {
        return Err(KeyError::TooLong { len: k.len(), max });
    }
    Ok(())
}

/// Parses a sourced keyspace's key against its key columns: its components and cache key.
pub fn parse_columns(raw: &str, keyspace: &str, columns: &[ColumnMeta], max: usize) -> Result<Key, KeyError> {
    key_from_parts(parse_parts(raw, keyspace, columns, max)?, max)
}

/// A key's components, decoded and normalized, refused as [`parse_columns`] refuses the key,
/// without building its cache key (what a flush binds).
pub fn parse_parts(raw: &str, keyspace: &str, columns: &[ColumnMeta], max: usize) -> Result<Vec<String>, KeyError> {
    // The limit applies to the key as sent, before normalization could fail on it.
    check_escapes(raw)?;
    let len = if raw.contains('%') {
        percent_decode_str(raw).count()
    } else {
        raw.len()
    };
    if len > max {
        return Err(KeyError::TooLong { len, max });
    }
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    // A one-column key is the whole text, commas and all; a composite key's parts are
    // separated by commas. Counted first, so the parts need no list of their own.
    let got = if columns.len() == 1 {
        1
    } else {
        raw.bytes().filter(|&b| b == b',').count() + 1
    };
    if got != columns.len() {
        return Err(KeyError::WrongArity {
            keyspace: keyspace.into(),
            got,
            want: columns.len(),
            columns: columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
        });
    }
    let mut parts = Vec::with_capacity(columns.len());
    // With the count checked, `splitn` yields exactly those parts (one: the whole text).
    for (raw, col) in raw.splitn(columns.len(), ',').zip(columns) {
        let decoded = decode(raw)?;
        parts.push(normalize(col, decoded)?);
    }
    // And the limit applies to the cache key the parts make.
    if parts.len() == 1 {
        check_len(&parts[0], max)?;
    } else {
        // The length of their `join`, without building it (two or more parts: never empty).
        let len = parts
            .iter()
            .map(|p| utf8_percent_encode(p, COMPONENT).map(str::len).sum::<usize>())
            .sum::<usize>()
            + parts.len()
            - 1;
        if len > max {
            return Err(KeyError::TooLong { len, max });
        }
    }
    Ok(parts)
}

/// Builds a key from normalized components (how CDC names a changed row).
pub fn key_from_parts(parts: Vec<String>, max: usize) -> Result<Key, KeyError> {
    let cache_key = if parts.len() == 1 {
        parts[0].clone()
    } else {
        join(parts.iter().map(String::as_str))
    };
    check_len(&cache_key, max)?;
    Ok(Key {
        cache_key: cache_key.into(),
        parts,
    })
}

/// A composite key's canonical encoding: components re-escaped and joined with commas.
fn join<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, p) in parts.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.extend(utf8_percent_encode(p, COMPONENT));
    }
    out
}

/// The cache key of a row from Postgres's own text of its key columns (a COPY line, a change's
/// tuple), as [`key_from_parts`] of the [`normalize`]d components would give it, with one
/// allocation: Postgres prints integers and uuids in exactly the form `normalize` gives, so a
/// component already in that form is taken as it is, and only another goes through `normalize`.
pub fn cache_key_of_row<'a>(
    components: impl ExactSizeIterator<Item = (&'a ColumnMeta, &'a str)>,
    max: usize,
) -> Result<Arc<str>, KeyError> {
    let component = |(col, text): (&'a ColumnMeta, &'a str)| -> Result<std::borrow::Cow<'a, str>, KeyError> {
        Ok(if canonical(col, text) {
            std::borrow::Cow::Borrowed(text)
        } else {
            std::borrow::Cow::Owned(normalize(col, text.to_string())?)
        })
    };
    let cache_key: Arc<str> = if components.len() == 1 {
        let mut components = components;
        let Some(only) = components.next() else {
            return Err(KeyError::Empty);
        };
        Arc::from(&*component(only)?)
    } else {
        let parts = components.map(component).collect::<Result<Vec<_>, _>>()?;
        join(parts.iter().map(|p| &**p)).into()
    };
    check_len(&cache_key, max)?;
    Ok(cache_key)
}

/// Whether `text` is already what [`normalize`] makes of it for `col`.
fn canonical(col: &ColumnMeta, text: &str) -> bool {
    let b = text.as_bytes();
    match col.kind {
        TypeKind::Integer => {
            let digits = b.strip_prefix(b"-").unwrap_or(b);
            // At most 38 digits always fits the i128 `normalize` parses into.
            !digits.is_empty()
                && digits.len() <= 38
                && digits.iter().all(u8::is_ascii_digit)
                && (digits[0] != b'0' || (digits.len() == 1 && digits.len() == b.len()))
        }
        _ if col.type_sql == "uuid" => {
            b.len() == 36
                && b.iter().enumerate().all(|(i, &c)| match i {
                    8 | 13 | 18 | 23 => c == b'-',
                    _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
                })
        }
        _ => true,
    }
}

/// One component in the form Postgres would print for its column.
pub fn normalize(col: &ColumnMeta, value: String) -> Result<String, KeyError> {
    if canonical(col, &value) {
        return Ok(value);
    }
    let bad = || KeyError::BadComponent {
        column: col.name.clone(),
        type_sql: col.type_sql.clone(),
        value: value.clone(),
    };
    match col.kind {
        TypeKind::Integer => {
            let t = value.trim();
            let n: i128 = t.strip_prefix('+').unwrap_or(t).parse().map_err(|_| bad())?;
            Ok(n.to_string())
        }
        _ if col.type_sql == "uuid" => {
            let hex: String = value.chars().filter(|c| *c != '-').collect();
            if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let h = hex.to_ascii_lowercase();
            Ok(format!(
                "{}-{}-{}-{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            ))
        }
        _ => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn col(name: &str, ty: &str, kind: TypeKind) -> ColumnMeta {
        ColumnMeta {
            name: name.into(),
            type_sql: ty.into(),
            kind,
            not_null: true,
            has_default: false,
            generated: false,
            identity_always: false,
            type_oid: 25,
        }
    }

    #[test]
    fn single_keys_keep_commas() {
        let cols = [col("name", "text", TypeKind::Text)];
        let k = parse_columns("a,b%20c", "ks", &cols, 100).unwrap();
        assert_eq!(k.parts, vec!["a,b c"]);
        assert_eq!(&*k.cache_key, "a,b c");
    }

    #[test]
    fn composite_keys_split_and_normalize() {
        let cols = [
            col("tenant", "integer", TypeKind::Integer),
            col("code", "text", TypeKind::Text),
        ];
        let k = parse_columns("007,x%2Cy", "ks", &cols, 100).unwrap();
        assert_eq!(k.parts, vec!["7", "x,y"]);
        assert_eq!(&*k.cache_key, "7,x%2Cy");
        assert!(matches!(
            parse_columns("7", "ks", &cols, 100),
            Err(KeyError::WrongArity { got: 1, want: 2, .. })
        ));
        // Too many parts is refused too, never folded into the last one.
        assert!(matches!(
            parse_columns("7,x,y", "ks", &cols, 100),
            Err(KeyError::WrongArity { got: 3, want: 2, .. })
        ));
        assert!(matches!(
            parse_parts("7,x,", "ks", &cols, 100),
            Err(KeyError::WrongArity { got: 3, want: 2, .. })
        ));
        assert!(matches!(
            parse_columns("x,y", "ks", &cols, 100),
            Err(KeyError::BadComponent { .. })
        ));
    }

    #[test]
    fn a_row_key_from_postgres_text_is_the_normalized_key() {
        let int = col("id", "bigint", TypeKind::Integer);
        let uuid = col("u", "uuid", TypeKind::Text);
        let text = col("code", "text", TypeKind::Text);
        let cases: &[(&[&ColumnMeta], &[&str])] = &[
            (&[&int], &["42"]),
            (&[&int], &["0"]),
            (&[&int], &["-7"]),
            (&[&int], &["-0"]),
            (&[&int], &["007"]),
            (&[&int], &["+5"]),
            (&[&int], &["-9223372036854775808"]),
            (&[&uuid], &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
            (&[&uuid], &["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"]),
            (&[&text], &["a,b c%"]),
            (&[&int, &text], &["7", "x,y"]),
            (&[&int, &text], &["07", "50%"]),
            (&[&uuid, &int], &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "1"]),
        ];
        for (cols, texts) in cases {
            let parts = cols
                .iter()
                .zip(texts.iter())
                .map(|(c, t)| normalize(c, t.to_string()).unwrap())
                .collect();
            let want = key_from_parts(parts, 100).unwrap().cache_key;
            let got = cache_key_of_row(cols.iter().copied().zip(texts.iter().copied()), 100).unwrap();
            assert_eq!(got, want, "{texts:?}");
        }
        // What normalize refuses is refused, and the limit holds.
        assert!(matches!(
            cache_key_of_row([(&int, "x1")].into_iter(), 100),
            Err(KeyError::BadComponent { .. })
        ));
        assert!(matches!(
            cache_key_of_row([(&text, "abcdef")].into_iter(), 5),
            Err(KeyError::TooLong { len: 6, max: 5 })
        ));
    }

    #[test]
    fn parse_parts_takes_and_refuses_what_parse_columns_does() {
        let int = col("id", "bigint", TypeKind::Integer);
        let text = col("name", "text", TypeKind::Text);
        let uuid = col("u", "uuid", TypeKind::Text);
        let one_int = [int.clone()];
        let one_uuid = [uuid];
        let two = [int, text];
        let cases: [(&[ColumnMeta], &str, usize); 16] = [
            (&one_int, "42", 100),
            (&one_int, "007", 100),
            (&one_int, "+5", 100),
            (&one_int, "-0", 100),
            (&one_int, "x1", 100),
            (&one_int, "%34%32", 100),
            (&one_int, "50%", 100),
            (&one_int, "", 100),
            (&one_int, "123456", 5),
            (&one_uuid, "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", 100),
            (&two, "7,x%2Cy", 100),
            (&two, "07,a", 100),
            (&two, "7", 100),
            (&two, "7,abcdef", 5),
            (&two, "7,%FF", 100),
            (&two, "1,2,3", 100),
        ];
        for (cols, raw, max) in cases {
            let want = parse_columns(raw, "ks", cols, max).map(|k| k.parts);
            let got = parse_parts(raw, "ks", cols, max);
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{raw:?}");
        }
    }

    proptest! {
        #[test]
        fn any_integer_postgres_prints_is_already_normalized(n in any::<i64>()) {
            let int = col("id", "bigint", TypeKind::Integer);
            let text = n.to_string();
            let got = cache_key_of_row([(&int, text.as_str())].into_iter(), 100).unwrap();
            let want = normalize(&int, text.clone()).unwrap();
            prop_assert_eq!(&*got, want.as_str());
            prop_assert!(canonical(&int, &text));
        }
    }

    #[test]
    fn uuids_are_lowercased() {
        let cols = [col("id", "uuid", TypeKind::Text)];
        let k = parse_columns("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "ks", &cols, 100).unwrap();
        assert_eq!(&*k.cache_key, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }

    #[test]
    fn limits() {
        assert_eq!(parse_opaque("", 10), Err(KeyError::Empty));
        assert!(matches!(
            parse_opaque("abcdefghijk", 10),
            Err(KeyError::TooLong { len: 11, max: 10 })
        ));
        assert_eq!(parse_opaque("%FF", 10), Err(KeyError::NotUtf8));
    }

    #[test]
    fn malformed_percent_escapes_are_refused_not_taken_literally() {
        let cols = [col("name", "text", TypeKind::Text)];
        for (raw, at) in [("%zz", 0), ("50%", 2), ("a%2", 1), ("%%41", 0), ("x%g1", 1)] {
            assert_eq!(parse_opaque(raw, 100), Err(KeyError::BadEscape { at }), "{raw}");
            assert_eq!(
                parse_columns(raw, "ks", &cols, 100),
                Err(KeyError::BadEscape { at }),
                "{raw}"
            );
        }
        // `50%25` is the one spelling of "50%".
        assert_eq!(&*parse_opaque("50%25", 100).unwrap().cache_key, "50%");
    }

    proptest! {
        #[test]
        fn composite_cache_keys_parse_back(a in ".{1,20}", b in ".{1,20}") {
            let cols = [col("a", "text", TypeKind::Text), col("b", "text", TypeKind::Text)];
            let k = key_from_parts(vec![a.clone(), b.clone()], 1000).unwrap();
            let back = parse_columns(&k.cache_key, "ks", &cols, 1000).unwrap();
            prop_assert_eq!(back.parts, vec![a, b]);
            prop_assert_eq!(back.cache_key, k.cache_key);
        }

        #[test]
        fn decoding_any_text_never_panics_and_accepts_exactly_well_formed_escapes(raw in "[%0-9a-fA-Fgz,x ]{0,24}") {
            let well_formed = {
                let b = raw.as_bytes();
                b.iter().enumerate().filter(|(_, c)| **c == b'%').all(|(i, _)| {
                    b.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
                })
            };
            let r = parse_opaque(&raw, 1000);
            prop_assert_eq!(matches!(r, Err(KeyError::BadEscape { .. })), !well_formed);
        }
    }
}
