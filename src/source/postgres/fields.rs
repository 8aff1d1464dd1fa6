//! The fields a write sets, as the upsert paths read them ([`Fields`]): most writes' fields
//! stay where the commit log holds them — spans of the record's document, read in place — so a
//! flush builds no JSON map per row; writes coalesced over one another, and values that need
//! decoding (an escaped string, an object, an array), keep a parsed map instead.

use std::ops::Range;

use bytes::Bytes;
use bytestring::ByteString;
use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// One field's value: a scalar read in place, or a parsed JSON value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    Null,
    Bool(bool),
    /// A number's JSON text.
    Number(&'a str),
    /// A string's content.
    Str(&'a str),
    /// Anything else (an object or an array).
    Value(&'a Value),
}

impl<'a> From<&'a Value> for FieldValue<'a> {
    fn from(v: &'a Value) -> FieldValue<'a> {
        match v {
            Value::Null => FieldValue::Null,
            Value::Bool(b) => FieldValue::Bool(*b),
            Value::Number(n) => FieldValue::Number(n.as_str()),
            Value::String(s) => FieldValue::Str(s),
            other => FieldValue::Value(other),
        }
    }
}

impl FieldValue<'_> {
    /// The value, owned.
    pub fn to_value(&self) -> Value {
        match *self {
            FieldValue::Null => Value::Null,
            FieldValue::Bool(b) => Value::Bool(b),
            // The text of a number serde_json read: it reads again.
            FieldValue::Number(n) => serde_json::from_str(n).unwrap_or(Value::Null),
            FieldValue::Str(s) => Value::String(s.to_string()),
            FieldValue::Value(v) => v.clone(),
        }
    }

    /// Appends the value's JSON text.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            FieldValue::Null => out.extend_from_slice(b"null"),
            FieldValue::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            FieldValue::Number(n) => out.extend_from_slice(n.as_bytes()),
            FieldValue::Str(s) => {
                serde_json::to_writer(&mut *out, s).expect("writing to a Vec does not fail");
            }
            FieldValue::Value(v) => serde_json::to_writer(&mut *out, v).expect("writing to a Vec does not fail"),
        }
    }
}

/// The fields one key's coalesced writes set, in the order the (first) write's document has them.
#[derive(Debug, Clone)]
pub enum Fields {
    /// One write's fields, read in place: the document (a slice of the record that holds it,
    /// checked as UTF-8 once, so reading a field is slicing it), and per field the byte ranges
    /// (in the document) of its name and of its value's JSON text — each name without escapes,
    /// each value `null`, a boolean, a number or a string without escapes.
    Spans {
        doc: ByteString,
        spans: Vec<(Range<u32>, Range<u32>)>,
    },
    /// Parsed fields.
    Map(Map<String, Value>),
}

impl Default for Fields {
    fn default() -> Fields {
        Fields::Map(Map::new())
    }
}

impl From<Map<String, Value>> for Fields {
    fn from(m: Map<String, Value>) -> Fields {
        Fields::Map(m)
    }
}

impl Fields {
    /// The fields named in `written` of the JSON object `doc`, a slice of `bytes` (the record
    /// that holds it). A document that is not an object sets no field.
    pub fn of_write<'w>(bytes: &Bytes, doc: &[u8], written: impl Iterator<Item = &'w str> + Clone) -> Fields {
        if let Some(doc) = shared_text(bytes, doc)
            && let Some(spans) = spans_of(&doc, written.clone())
        {
            return Fields::Spans { doc, spans };
        }
        let mut map: Map<String, Value> = serde_json::from_slice(doc).unwrap_or_default();
        map.retain(|f, _| written.clone().any(|w| w == f));
        Fields::Map(map)
    }

    /// The parsed fields (a write in place is parsed here).
    pub fn into_map(self) -> Map<String, Value> {
        match self {
            Fields::Map(m) => m,
            Fields::Spans { .. } => self.iter().map(|(k, v)| (k.to_string(), v.to_value())).collect(),
        }
    }

    /// These fields with `later`'s set over them (a later write of the same key).
    pub fn extend(self, later: Fields) -> Fields {
        let mut map = self.into_map();
        map.extend(later.into_map());
        Fields::Map(map)
    }

    pub fn len(&self) -> usize {
        match self {
            Fields::Spans { spans, .. } => spans.len(),
            Fields::Map(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each field's name and value, in order. A plain iterator over either form (a chain of
    /// the two forms' iterators cost a branch per adapter per field: ~2 % of a drain).
    pub fn iter(&self) -> Iter<'_> {
        match self {
            Fields::Spans { doc, spans } => Iter::Spans(doc, spans.iter()),
            Fields::Map(m) => Iter::Map(m.iter()),
        }
    }

    /// Each field's name, in order (its value is not looked at).
    pub fn names(&self) -> Names<'_> {
        Names(self.iter())
    }

    pub fn get(&self, name: &str) -> Option<FieldValue<'_>> {
        match self {
            Fields::Map(m) => m.get(name).map(FieldValue::from),
            Fields::Spans { .. } => self.iter().find(|(n, _)| *n == name).map(|(_, v)| v),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// The fields of a [`Fields`], in order ([`Fields::iter`]).
pub enum Iter<'a> {
    Spans(&'a str, std::slice::Iter<'a, (Range<u32>, Range<u32>)>),
    Map(serde_json::map::Iter<'a>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, FieldValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Spans(doc, spans) => spans
                .next()
                .map(|(name, value)| (text(doc, name), scalar(text(doc, value)))),
            Iter::Map(m) => m.next().map(|(k, v)| (k.as_str(), FieldValue::from(v))),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Iter::Spans(_, spans) => spans.size_hint(),
            Iter::Map(m) => m.size_hint(),
        }
    }
}

/// The names of a [`Fields`], in order ([`Fields::names`]).
pub struct Names<'a>(Iter<'a>);

impl<'a> Iterator for Names<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        match &mut self.0 {
            Iter::Spans(doc, spans) => spans.next().map(|(name, _)| text(doc, name)),
            Iter::Map(m) => m.next().map(|(k, _)| k.as_str()),
        }
    }
}

/// The text of a span of the document (taken from `&str`s serde_json borrowed from it, so on
/// character boundaries).
fn text<'a>(doc: &'a str, span: &Range<u32>) -> &'a str {
    doc.get(span.start as usize..span.end as usize).unwrap_or_default()
}

/// A value's JSON text as a scalar (the span holds only what [`spans_of`] accepted).
fn scalar(json: &str) -> FieldValue<'_> {
    match json.as_bytes().first() {
        Some(b'n') => FieldValue::Null,
        Some(b't') => FieldValue::Bool(true),
        Some(b'f') => FieldValue::Bool(false),
        Some(b'"') => FieldValue::Str(&json[1..json.len() - 1]),
        _ => FieldValue::Number(json),
    }
}

/// `doc`, a slice of `bytes`, as a shared slice of it known to be UTF-8; `None` when it is not
/// UTF-8 (or not a slice of `bytes`).
fn shared_text(bytes: &Bytes, doc: &[u8]) -> Option<ByteString> {
    let start = (doc.as_ptr() as usize).checked_sub(bytes.as_ptr() as usize)?;
    let end = start.checked_add(doc.len()).filter(|e| *e <= bytes.len())?;
    // Ranges of the document are kept as `u32`s.
    u32::try_from(doc.len()).ok()?;
    ByteString::try_from(bytes.slice(start..end)).ok()
}

/// Ranges of `doc_text` for its written fields: `None` when it is not a JSON object, or a
/// written field's name or value needs decoding, or a name is written twice.
fn spans_of<'w>(
    doc_text: &str,
    written: impl Iterator<Item = &'w str> + Clone,
) -> Option<Vec<(Range<u32>, Range<u32>)>> {
    // The written names, read from the record's list once (most writes name a few fields).
    let mut few = [""; 16];
    let mut n = 0;
    for w in written.clone() {
        if n == few.len() {
            n = usize::MAX;
            break;
        }
        few[n] = w;
        n += 1;
    }
    let is_written = |name: &str| match few.get(..n) {
        Some(few) => few.contains(&name),
        None => written.clone().any(|w| w == name),
    };
    compact_spans(doc_text, is_written).or_else(|| parser_spans(doc_text, is_written))
}

/// [`spans_of`] through serde_json, for any document.
fn parser_spans(doc_text: &str, is_written: impl Fn(&str) -> bool) -> Option<Vec<(Range<u32>, Range<u32>)>> {
    struct Spans<'d, W> {
        doc: &'d str,
        written: W,
    }
    impl<W> Spans<'_, W> {
        /// Where `s`, borrowed from the document, sits in it.
        fn span(&self, s: &str) -> Option<Range<u32>> {
            let start = (s.as_ptr() as usize).checked_sub(self.doc.as_ptr() as usize)?;
            let end = start.checked_add(s.len()).filter(|e| *e <= self.doc.len())?;
            Some(u32::try_from(start).ok()?..u32::try_from(end).ok()?)
        }
    }
    impl<'de, W: Fn(&str) -> bool> Visitor<'de> for Spans<'_, W> {
        type Value = Option<Vec<(Range<u32>, Range<u32>)>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut spans: Vec<(Range<u32>, Range<u32>)> = Vec::with_capacity(map.size_hint().unwrap_or(8));
            // A name with escapes cannot be borrowed: an error, and the parsed form is used.
            while let Some(name) = map.next_key::<&'de str>()? {
                if !(self.written)(name) {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                let json = map.next_value::<&'de RawValue>()?.get();
                let plain = match json.as_bytes().first() {
                    Some(b'"') => !json.contains('\\'),
                    Some(b'{' | b'[') | None => false,
                    Some(_) => true,
                };
                let twice = spans.iter().any(|(seen, _)| text(self.doc, seen) == name);
                match (self.span(name), self.span(json)) {
                    (Some(n), Some(v)) if plain && !twice => spans.push((n, v)),
                    _ => return Ok(None),
                }
            }
            Ok(Some(spans))
        }
    }
    let mut de = serde_json::Deserializer::from_str(doc_text);
    let spans = (&mut de)
        .deserialize_map(Spans {
            doc: doc_text,
            written: is_written,
        })
        .ok()??;
    de.end().ok()?;
    Some(spans)
}

/// [`spans_of`] for a document as [`crate::source::postgres::render::ObjectWriter`] writes a
/// write-behind write — `{"name":value,…}`, no whitespace, every value `null`, a boolean, a
/// number or a string without escapes — read without a parser. `None` at anything else
/// (whitespace, an escape, a control character, an object or array, a malformed number, a
/// written name seen twice): the parser decides then. What it accepts the parser reads the
/// same (`compact_documents_read_as_the_parser_reads_them`); through serde_json the spans of
/// a three-field document cost ~2,400 instructions, most of a drained row's reading.
fn compact_spans(doc: &str, is_written: impl Fn(&str) -> bool) -> Option<Vec<(Range<u32>, Range<u32>)>> {
    let b = doc.as_bytes();
    u32::try_from(b.len()).ok()?;
    if b.len() < 2 || b[0] != b'{' || b[b.len() - 1] != b'}' {
        return None;
    }
    let close = b.len() - 1;
    let mut spans: Vec<(Range<u32>, Range<u32>)> = Vec::new();
    let mut i = 1;
    if i == close {
        return Some(spans);
    }
    loop {
        let name = plain_string(b, i)?;
        i = name.end + 1;
        if b.get(i) != Some(&b':') {
            return None;
        }
        let value = plain_value(doc, i + 1)?;
        i = value.end;
        let name_text = doc.get(name.clone())?;
        if is_written(name_text) {
            if spans.iter().any(|(seen, _)| text(doc, seen) == name_text) {
                return None;
            }
            spans.push((name.start as u32..name.end as u32, value.start as u32..value.end as u32));
        }
        match b.get(i) {
            Some(b'}') if i == close => return Some(spans),
            Some(b',') if i < close => i += 1,
            _ => return None,
        }
    }
}

/// The content of the string opening at `b[at]` (between its quotes), if it has no escape and
/// no control character.
fn plain_string(b: &[u8], at: usize) -> Option<Range<usize>> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let len = b
        .get(at + 1..)?
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    let end = at + 1 + len;
    (b[end] == b'"').then_some(at + 1..end)
}

/// The JSON text of the scalar starting at `doc[at]`: `null`, `true`, `false`, a string without
/// escapes (with its quotes) or a number as JSON's grammar has it
/// ([`crate::source::postgres::render::is_json_number`]).
fn plain_value(doc: &str, at: usize) -> Option<Range<usize>> {
    let b = doc.as_bytes();
    let rest = b.get(at..)?;
    let word = |w: &[u8]| rest.starts_with(w).then_some(at..at + w.len());
    match rest.first()? {
        b'n' => word(b"null"),
        b't' => word(b"true"),
        b'f' => word(b"false"),
        b'"' => plain_string(b, at).map(|s| at..s.end + 1),
        b'-' | b'0'..=b'9' => {
            // The run of bytes a number can hold (all ASCII), then the grammar over all of it.
            let len = rest
                .iter()
                .take_while(|c| matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                .count();
            let number = at..at + len;
            super::render::is_json_number(doc.get(number.clone())?).then_some(number)
        }
        _ => None,
    }
}

#[cfg(test)]
impl Fields {
    /// Every field of a JSON object, read in place where it can be (for tests).
    pub(crate) fn in_place(v: &Value) -> Fields {
        let record = Bytes::from(serde_json::to_vec(v).expect("serializes"));
        let names: Vec<&str> = v
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        Fields::of_write(&record, &record, names.into_iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the flusher read before fields were read in place: the document parsed, then the
    /// written fields kept.
    fn parsed(doc: &[u8], written: &[&str]) -> Map<String, Value> {
        let mut m: Map<String, Value> = serde_json::from_slice(doc).unwrap_or_default();
        m.retain(|f, _| written.contains(&f.as_str()));
        m
    }

    #[test]
    fn fields_read_in_place_are_the_fields_parsed() {
        let cases: &[(&str, &[&str], bool)] = &[
            (
                r#"{"id":1,"name":"a b ✓","v":-2.5e3,"ok":true,"no":false,"x":null}"#,
                &["id", "name", "v", "ok", "no", "x"],
                true,
            ),
            (r#" { "name" : "a" , "v" : 10 } "#, &["v", "name"], true),
            (r#"{"name":"a","v":1,"extra":{"deep":[1,2]}}"#, &["name"], true),
            (r#"{"name":"a","v":1}"#, &["name", "missing"], true),
            (r#"{}"#, &["name"], true),
            // What needs decoding keeps the parsed form.
            (r#"{"name":"q\"t","v":1}"#, &["name", "v"], false),
            (r#"{"n\u0061me":"a"}"#, &["name"], false),
            (r#"{"tags":["a"],"v":1}"#, &["tags", "v"], false),
            (r#"{"obj":{"a":1}}"#, &["obj"], false),
            (r#"{"v":1,"v":2}"#, &["v"], false),
            (r#"[1,2]"#, &["v"], false),
            (r#"{"v":1} trailing"#, &["v"], false),
        ];
        for (doc, written, in_place) in cases {
            // The document inside a larger record, as the log holds it.
            let record = Bytes::from(format!("header{doc}footer").into_bytes());
            let at = &record[6..6 + doc.len()];
            let fields = Fields::of_write(&record, at, written.iter().copied());
            assert_eq!(matches!(fields, Fields::Spans { .. }), *in_place, "{doc}");
            let want = parsed(doc.as_bytes(), written);
            assert_eq!(fields.len(), want.len(), "{doc}");
            assert_eq!(
                fields.names().collect::<Vec<_>>(),
                want.keys().map(String::as_str).collect::<Vec<_>>(),
                "{doc}"
            );
            for (name, value) in &want {
                assert_eq!(
                    fields.get(name).map(|v| v.to_value()),
                    Some(value.clone()),
                    "{doc} {name}"
                );
                assert!(fields.contains(name));
                let mut json = Vec::new();
                fields.get(name).unwrap().write_json(&mut json);
                assert_eq!(serde_json::from_slice::<Value>(&json).unwrap(), *value, "{doc} {name}");
            }
            assert!(!fields.contains("absent"));
            assert_eq!(fields.clone().into_map(), want, "{doc}");
        }
    }

    /// Pieces of documents: names and values, plain and not, well-formed and not (the plain,
    /// well-formed ones first, so that the generator can favour them).
    const NAMES: &[&str] = &[
        r#""a""#,
        r#""name""#,
        r#""v""#,
        r#""✓""#,
        r#""""#,
        r#""n\u0061me""#,
        r#""q\"t""#,
        "\"t\tab\"",
    ];
    const PLAIN_NAMES: usize = 5;
    const VALUES: &[&str] = &[
        "1",
        "-0",
        "0",
        "1e+5",
        "2E-3",
        "0.0",
        "-1.25",
        "12345678901234567890",
        "1.5e3",
        r#""x""#,
        r#""✓ ok""#,
        r#""""#,
        "null",
        "true",
        "false",
        "01",
        "1.",
        ".5",
        "-",
        "1e",
        "--1",
        "+1",
        r#""a\"b""#,
        "\"a\tb\"",
        "nul",
        "fals",
        "{}",
        r#"{"a":1}"#,
        "[1,2]",
        "[]",
        r#""unterminated"#,
    ];
    const PLAIN_VALUES: usize = 15;
    const SEPARATORS: &[&str] = &[",", ", ", " ,", ",,", ""];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn compact_documents_read_as_the_parser_reads_them(
            fields in proptest::collection::vec(
                (
                    proptest::prop_oneof![3 => 0..PLAIN_NAMES, 1 => 0..NAMES.len()],
                    proptest::prop_oneof![3 => 0..PLAIN_VALUES, 1 => 0..VALUES.len()],
                    proptest::prop_oneof![6 => 0..1usize, 1 => 0..SEPARATORS.len()],
                ),
                0..6,
            ),
            colon in proptest::prop_oneof![4 => proptest::strategy::Just(":"), 1 => proptest::strategy::Just(" : ")],
            padded in proptest::prop_oneof![4 => proptest::strategy::Just(false), 1 => proptest::strategy::Just(true)],
            written_mask in 0u8..=255,
        ) {
            let mut doc = String::from(if padded { " {" } else { "{" });
            for (i, (n, v, sep)) in fields.iter().enumerate() {
                if i > 0 {
                    doc.push_str(SEPARATORS[*sep]);
                }
                doc.push_str(NAMES[*n]);
                doc.push_str(colon);
                doc.push_str(VALUES[*v]);
            }
            doc.push('}');
            let written: Vec<&str> = ["a", "name", "v", "q\"t", "✓", ""]
                .into_iter()
                .enumerate()
                .filter(|(i, _)| written_mask & (1 << i) != 0)
                .map(|(_, w)| w)
                .collect();
            let is_written = |name: &str| written.contains(&name);
            if let Some(fast) = compact_spans(&doc, is_written) {
                proptest::prop_assert_eq!(Some(fast), parser_spans(&doc, is_written), "{}", doc);
            }
        }
    }

    #[test]
    fn documents_as_the_object_writer_writes_them_are_read_without_the_parser() {
        for doc in [
            json!({}),
            json!({"name": "user 1", "email": "u1@example.com", "v": 1}),
            json!({"id": -7, "x": 1.5e-7, "ok": false, "none": null, "s": "✓ text", "e": ""}),
        ] {
            let text = serde_json::to_string(&doc).unwrap();
            let names: Vec<&str> = doc.as_object().unwrap().keys().map(String::as_str).collect();
            let fast = compact_spans(&text, |n| names.contains(&n)).expect("compact");
            assert_eq!(
                Some(fast.clone()),
                parser_spans(&text, |n| names.contains(&n)),
                "{text}"
            );
            assert_eq!(fast.len(), names.len());
        }
        // Not compact: the parser decides.
        for doc in [
            r#"{"a": 1}"#,
            r#"{"a":"q\"t"}"#,
            r#"{"a":{"b":1}}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":01}"#,
        ] {
            assert!(compact_spans(doc, |_| true).is_none(), "{doc}");
        }
    }

    #[test]
    fn a_write_of_many_fields_is_read_in_place_too() {
        let doc: Map<String, Value> = (0..20).map(|i| (format!("f{i}"), json!(i))).collect();
        let doc = Value::Object(doc);
        let record = Bytes::from(serde_json::to_vec(&doc).unwrap());
        let written: Vec<String> = (0..20).rev().filter(|i| i % 3 != 0).map(|i| format!("f{i}")).collect();
        let fields = Fields::of_write(&record, &record, written.iter().map(String::as_str));
        assert!(matches!(fields, Fields::Spans { .. }));
        let names: Vec<&str> = written.iter().map(String::as_str).collect();
        assert_eq!(fields.into_map(), parsed(&record, &names));
    }

    #[test]
    fn a_later_write_sets_its_fields_over_the_earlier() {
        let first = Fields::in_place(&json!({"name": "a", "v": 1}));
        let later = Fields::in_place(&json!({"v": 2, "email": "e"}));
        let both = first.extend(later);
        assert_eq!(
            both.into_map(),
            json!({"name": "a", "v": 2, "email": "e"}).as_object().unwrap().clone()
        );
    }
}
