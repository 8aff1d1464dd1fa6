//! Any text given to the HTTP key decoder, as an opaque key and as a key of typed columns: no
//! panic; a malformed percent-escape is always `BadEscape`; a key that parses, written back in
//! URL form (each component with `%` and `,` escaped), parses to the same key.
#![no_main]

use cachesync::key::{KeyError, parse_columns, parse_opaque};
use cachesync::source::postgres::render::TypeKind;
use cachesync::source::postgres::schema::ColumnMeta;
use libfuzzer_sys::fuzz_target;

fn col(name: &str, type_sql: &str, kind: TypeKind, type_oid: u32) -> ColumnMeta {
    ColumnMeta {
        name: name.into(),
        type_sql: type_sql.into(),
        kind,
        not_null: true,
        has_default: false,
        generated: false,
        identity_always: false,
        type_oid,
    }
}

fn well_formed(raw: &str) -> bool {
    let b = raw.as_bytes();
    b.iter().enumerate().filter(|(_, c)| **c == b'%').all(|(i, _)| {
        b.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let opaque = parse_opaque(raw, 1024);
    assert_eq!(matches!(opaque, Err(KeyError::BadEscape { .. })), !well_formed(raw), "{raw:?}");
    let cols = [
        col("tenant", "integer", TypeKind::Integer, 23),
        col("code", "text", TypeKind::Text, 25),
        col("id", "uuid", TypeKind::Text, 2950),
    ];
    for cols in [&cols[..1], &cols[1..2], &cols[..]] {
        if let Ok(k) = parse_columns(raw, "ks", cols, 1024) {
            let url: Vec<String> = k.parts.iter().map(|p| p.replace('%', "%25").replace(',', "%2C")).collect();
            let again = parse_columns(&url.join(","), "ks", cols, 4096).expect("a key's URL form parses");
            assert_eq!(again.cache_key, k.cache_key);
            assert_eq!(again.parts, k.parts);
        }
    }
});
