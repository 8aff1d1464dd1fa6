//! Rendering Postgres values, in their text output form, as JSON.
//!
//! Both paths that bring rows into the cache see values as Postgres's *output function* prints
//! them: the loader selects `format('%s', col)` (which calls the output function, unlike `::text`,
//! which prints booleans as `true`), and pgoutput sends the same text. One renderer for both means
//! an entry looks the same whether it came from a load or from CDC.
//!
//! | Postgres type | JSON |
//! |---|---|
//! | `bool` | `true` / `false` |
//! | `int2`, `int4`, `int8`, `oid` | number |
//! | `float4`, `float8`, `numeric` | number, exact digits kept; `NaN`/`Infinity` as strings |
//! | `json`, `jsonb` | the document itself |
//! | `timestamptz` | RFC 3339 string in UTC, `2024-03-01T12:34:56.500Z` |
//! | `timestamp` | ISO 8601 string without offset, `2024-03-01T12:34:56.5` |
//! | arrays of the above | arrays, nested for more dimensions, `NULL` elements as `null` |
//! | anything else (`text`, `uuid`, `date`, `interval`, enums, ...) | string, as Postgres prints it |
//! | SQL `NULL` | `null` |

use chrono::{DateTime, SecondsFormat, Utc};

/// How a column's values become JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    Bool,
    Integer,
    Float,
    Numeric,
    Json,
    Timestamptz,
    Timestamp,
    Text,
    Array(Box<TypeKind>),
}

impl TypeKind {
    /// Classifies a (domain-resolved) base type. `elem` is the element type of an array type.
    pub fn from_oid(base_oid: u32, elem_oid: Option<u32>) -> TypeKind {
        if let Some(elem) = elem_oid.filter(|&e| e != 0) {
            return TypeKind::Array(Box::new(TypeKind::from_oid(elem, None)));
        }
        match base_oid {
            16 => TypeKind::Bool,
            20 | 21 | 23 | 26 => TypeKind::Integer,
            700 | 701 => TypeKind::Float,
            1700 => TypeKind::Numeric,
            114 | 3802 => TypeKind::Json,
            1184 => TypeKind::Timestamptz,
            1114 => TypeKind::Timestamp,
            _ => TypeKind::Text,
        }
    }
}

/// Appends the JSON form of one value (`None` = SQL NULL) to `out`.
pub fn render_value(kind: &TypeKind, text: Option<&str>, out: &mut Vec<u8>) {
    let Some(text) = text else {
        out.extend_from_slice(b"null");
        return;
    };
    match kind {
        TypeKind::Bool => match text {
            "t" | "true" => out.extend_from_slice(b"true"),
            "f" | "false" => out.extend_from_slice(b"false"),
            other => push_string(other, out),
        },
        TypeKind::Integer | TypeKind::Float | TypeKind::Numeric => {
            if is_json_number(text) {
                out.extend_from_slice(text.as_bytes());
            } else {
                // NaN, Infinity, -Infinity: not JSON numbers.
                push_string(text, out);
            }
        }
        TypeKind::Json => out.extend_from_slice(text.as_bytes()),
        TypeKind::Timestamptz => {
            if !push_utc_timestamptz(text, out) {
                push_string(&normalize_timestamptz(text), out);
            }
        }
        TypeKind::Timestamp => push_string(&text.replacen(' ', "T", 1), out),
        TypeKind::Text => push_string(text, out),
        TypeKind::Array(elem) => render_array(elem, text, out),
    }
}

/// Appends a JSON object of `(field key, kind, text)` triples to `out`.
pub fn render_object<'a>(
    fields: impl IntoIterator<Item = (&'a FieldKey, &'a TypeKind, Option<&'a str>)>,
    out: &mut Vec<u8>,
) {
    let mut obj = ObjectWriter::new(out);
    for (key, kind, text) in fields {
        render_value(kind, text, obj.keyed(key));
    }
    obj.finish();
}

/// A field's `"name":` as JSON, rendered once (see [`ObjectWriter::keyed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldKey(Box<[u8]>);

/// The [`FieldKey`] of a field named `name`.
pub fn field_key(name: &str) -> FieldKey {
    let mut out = Vec::with_capacity(name.len() + 3);
    push_string(name, &mut out);
    out.push(b':');
    FieldKey(out.into_boxed_slice())
}

/// Writes a JSON object straight into a buffer, one field at a time, without building a map:
/// the one object writer behind rendered rows, CDC documents and write-behind documents.
pub struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> ObjectWriter<'a> {
    /// Opens the object (`{`).
    pub fn new(out: &'a mut Vec<u8>) -> ObjectWriter<'a> {
        out.push(b'{');
        ObjectWriter { out, first: true }
    }

    /// Writes the separator and `"name":`, and returns the buffer for the field's value, which
    /// the caller must write (as one JSON value) before the next field.
    pub fn field(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        push_string(name, self.out);
        self.out.push(b':');
        self.out
    }

    /// [`ObjectWriter::field`] with the name already rendered by [`field_key`]: a row rendered
    /// many times (a load, a change stream) escapes its field names once.
    pub fn keyed(&mut self, key: &FieldKey) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.extend_from_slice(&key.0);
        self.out
    }

    /// A field whose value is any serializable JSON value.
    pub fn value(&mut self, name: &str, v: &serde_json::Value) {
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(self.field(name), v);
    }

    /// Closes the object (`}`).
    pub fn finish(self) {
        self.out.push(b'}');
    }
}

fn push_string(s: &str, out: &mut Vec<u8>) {
    // Most strings (field names, most values) need no escape: copied in one piece, as
    // serde_json would write them.
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Whether `b` holds a byte JSON escapes in a string (a control character, `"` or `\\`).
fn needs_escape(b: &[u8]) -> bool {
    any_byte(b, 0x20, b"\"\\")
}

/// Whether `b` holds a byte below `below` or equal to one of `equal`, eight bytes at a time: a
/// byte-wise test cost ~7 instructions per byte of every string rendered or `COPY`-escaped.
/// Exact, for `below` up to 128.
pub(crate) fn any_byte(b: &[u8], below: u8, equal: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // No false positives for "some byte is below n" (n <= 128) as a whole: a borrow into a
    // byte's high bit happens only below a byte that qualifies. "Some byte is zero" is the
    // same test with n = 1, after an xor with the byte looked for.
    let below_n = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let x = u64::from_ne_bytes(c.try_into().expect("eight bytes"));
        if below_n(x, below) || equal.iter().any(|&e| below_n(x ^ (ONES * u64::from(e)), 1)) {
            return true;
        }
    }
    chunks.remainder().iter().any(|&c| c < below || equal.contains(&c))
}

/// Whether `s` is a number in JSON's grammar (so it can be copied through verbatim).
pub fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    i == b.len()
}

/// Whether `y-mo-d` is a day of the proleptic Gregorian calendar (what chrono's `from_ymd_opt`
/// accepts for a four-digit year), without building a date.
fn valid_date(y: u32, mo: u32, d: u32) -> bool {
    let leap = y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
    let days = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

/// [`normalize_timestamptz`] of a value Postgres printed in UTC (`2024-03-01 12:34:56.5+00`,
/// what every session of ours prints: `TimeZone=UTC`), appended as a JSON string without
/// parsing it into a date and formatting it back; `false` (nothing appended) for any other form.
fn push_utc_timestamptz(text: &str, out: &mut Vec<u8>) -> bool {
    let b = text.as_bytes();
    let Some(body) = b.strip_suffix(b"+00") else {
        return false;
    };
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = body.get(r)?;
        d.iter()
            .try_fold(0u32, |n, c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
    };
    // `YYYY-MM-DD HH:MM:SS`, then an optional fraction of 1–6 digits.
    let shape = body.len() >= 19
        && body[4] == b'-'
        && body[7] == b'-'
        && body[10] == b' '
        && body[13] == b':'
        && body[16] == b':';
    if !shape {
        return false;
    }
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) =
        (num(0..4), num(5..7), num(8..10), num(11..13), num(14..16), num(17..19))
    else {
        return false;
    };
    if !valid_date(y, mo, d) || h > 23 || mi > 59 || sec > 59 {
        return false;
    }
    let frac = &body[19..];
    let digits = match frac {
        [] => &[][..],
        [b'.', rest @ ..] if (1..=6).contains(&rest.len()) && rest.iter().all(u8::is_ascii_digit) => rest,
        _ => return false,
    };
    out.push(b'"');
    out.extend_from_slice(&body[..10]);
    out.push(b'T');
    out.extend_from_slice(&body[11..19]);
    // As chrono's `SecondsFormat::AutoSi`: no fraction, or milliseconds when they hold every
    // non-zero digit, else microseconds.
    let significant = digits.iter().rposition(|&c| c != b'0').map_or(0, |i| i + 1);
    if significant > 0 {
        let width = if significant <= 3 { 3 } else { 6 };
        out.push(b'.');
        out.extend_from_slice(&digits[..digits.len().min(width)]);
        out.extend(std::iter::repeat_n(b'0', width.saturating_sub(digits.len())));
    }
    out.extend_from_slice(b"Z\"");
    true
}

/// `2024-03-01 12:34:56.5+05:30` → `2024-03-01T07:04:56.500Z`; anything unparseable (infinity,
/// BC dates, second-precision offsets) is kept as Postgres printed it.
pub fn normalize_timestamptz(text: &str) -> String {
    let mut s = text.replacen(' ', "T", 1);
    if let Some(t) = s.find('T')
        && let Some(rel) = s[t..].rfind(['+', '-'])
    {
        let off = t + rel;
        if s.len() - off == 3 {
            s.push_str(":00");
        }
    }
    match DateTime::parse_from_rfc3339(&s) {
        Ok(dt) => dt.with_timezone(&Utc).to_rfc3339_opts(SecondsFormat::AutoSi, true),
        Err(_) => text.to_string(),
    }
}

/// Renders a Postgres array literal (`{1,2,NULL}`, `{{1,2},{3,4}}`, `[0:1]={"a b",c}`).
fn render_array(elem: &TypeKind, text: &str, out: &mut Vec<u8>) {
    let body = match text.find('=') {
        Some(eq) if text.starts_with('[') => &text[eq + 1..],
        _ => text,
    };
    let mut p = ArrayParser {
        s: body.as_bytes(),
        i: 0,
    };
    let start = out.len();
    if p.parse(elem, out).is_err() || p.i != p.s.len() {
        // Not a literal we understand: keep the text rather than emit broken JSON.
        out.truncate(start);
        push_string(text, out);
    }
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl ArrayParser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn parse(&mut self, elem: &TypeKind, out: &mut Vec<u8>) -> Result<(), ()> {
        self.skip_ws();
        if self.s.get(self.i) != Some(&b'{') {
            return Err(());
        }
        self.i += 1;
        out.push(b'[');
        self.skip_ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            out.push(b']');
            return Ok(());
        }
        let mut first = true;
        loop {
            if !first {
                out.push(b',');
            }
            first = false;
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b'{') => self.parse(elem, out)?,
                Some(b'"') => {
                    let v = self.quoted()?;
                    render_value(elem, Some(&v), out);
                }
                Some(_) => {
                    let start = self.i;
                    while let Some(&c) = self.s.get(self.i) {
                        if c == b',' || c == b'}' {
                            break;
                        }
                        self.i += 1;
                    }
                    let raw = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| ())?.trim();
                    if raw.eq_ignore_ascii_case("NULL") {
                        out.extend_from_slice(b"null");
                    } else {
                        render_value(elem, Some(raw), out);
                    }
                }
                None => return Err(()),
            }
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return Ok(());
                }
                _ => return Err(()),
            }
        }
    }

    fn quoted(&mut self) -> Result<String, ()> {
        self.i += 1;
        let mut v = Vec::new();
        loop {
            match self.s.get(self.i) {
                Some(b'\\') => {
                    v.push(*self.s.get(self.i + 1).ok_or(())?);
                    self.i += 2;
                }
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(v).map_err(|_| ());
                }
                Some(&c) => {
                    v.push(c);
                    self.i += 1;
                }
                None => return Err(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_date_is_valid_exactly_when_chrono_says_so() {
        for y in (0..=9999u32).filter(|y| y % 4 == 0 || y % 97 == 1 || *y < 30) {
            for mo in 0..=13 {
                for d in 0..=32 {
                    assert_eq!(
                        valid_date(y, mo, d),
                        chrono::NaiveDate::from_ymd_opt(y as i32, mo, d).is_some(),
                        "{y}-{mo}-{d}"
                    );
                }
            }
        }
    }

    fn r(kind: TypeKind, text: Option<&str>) -> String {
        let mut out = Vec::new();
        render_value(&kind, text, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn an_escape_is_found_at_every_position() {
        for len in 0..20 {
            let clean = "a".repeat(len);
            assert!(!needs_escape(clean.as_bytes()), "{len}");
            assert!(!needs_escape("é~\u{7f}x".repeat(len).as_bytes()));
            for at in 0..len {
                for bad in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    let mut v = clean.clone().into_bytes();
                    v[at] = bad;
                    assert!(needs_escape(&v), "{len} {at} {bad}");
                }
                // Neighbours of the escaped bytes are not escaped.
                for fine in [b' ', b'!', b'#', b'[', b']', 0x7f] {
                    let mut v = clean.clone().into_bytes();
                    v[at] = fine;
                    assert!(!needs_escape(&v), "{len} {at} {fine}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn a_string_is_written_as_serde_json_writes_it(s in any::<String>(), ascii in "[ -~\\t\\n\\x00\\x7f]{0,40}") {
            for s in [s, ascii] {
                let mut out = Vec::new();
                push_string(&s, &mut out);
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
            }
        }
    }

    #[test]
    fn a_keyed_field_writes_what_a_named_field_writes() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let names = ["id", "na\"me", "\u{1}x", "pår"];
        let mut obj = ObjectWriter::new(&mut a);
        for n in names {
            obj.field(n).extend_from_slice(b"1");
        }
        obj.finish();
        let keys: Vec<FieldKey> = names.iter().map(|n| field_key(n)).collect();
        let mut obj = ObjectWriter::new(&mut b);
        for k in &keys {
            obj.keyed(k).extend_from_slice(b"1");
        }
        obj.finish();
        assert_eq!(a, b);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["na\"me"], 1);
    }

    /// The slow path: parse with chrono, format back.
    fn via_chrono(text: &str) -> String {
        let mut out = Vec::new();
        push_string(&normalize_timestamptz(text), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_utc_timestamptz_renders_as_chrono_would_and_other_forms_take_the_slow_path() {
        for text in [
            "2024-03-01 12:34:56+00",
            "2024-03-01 12:34:56.5+00",
            "2024-03-01 12:34:56.123+00",
            "2024-03-01 12:34:56.1234+00",
            "2024-03-01 12:34:56.000001+00",
            "0001-01-01 00:00:00+00",
            "2024-02-29 23:59:59.999999+00",
        ] {
            let mut out = Vec::new();
            assert!(push_utc_timestamptz(text, &mut out), "{text}");
            assert_eq!(String::from_utf8(out).unwrap(), via_chrono(text), "{text}");
        }
        assert_eq!(
            r(TypeKind::Timestamptz, Some("2024-03-01 12:34:56.5+00")),
            "\"2024-03-01T12:34:56.500Z\""
        );
        for text in [
            "2024-03-01 12:34:56.5+05:30",
            "2024-03-01 12:34:56-07",
            "infinity",
            "-infinity",
            "2024-02-30 00:00:00+00",
            "2024-03-01 24:00:00+00",
            "12024-03-01 00:00:00+00",
            "0044-03-15 12:00:00+00 BC",
            "2024-03-01 12:34:56.1234567+00",
            "2024-03-01 12:34:56.+00",
            "2024-03-01T12:34:56+00",
        ] {
            let mut out = Vec::new();
            assert!(!push_utc_timestamptz(text, &mut out), "{text}");
            assert!(out.is_empty());
            // Rendering still gives the slow path's answer.
            assert_eq!(r(TypeKind::Timestamptz, Some(text)), via_chrono(text), "{text}");
        }
    }

    proptest! {
        #[test]
        fn any_utc_timestamp_postgres_prints_renders_as_chrono_would(
            days in 0i64..3_652_058, secs in 0u32..86_400, micros in 0u32..1_000_000
        ) {
            let date = chrono::NaiveDate::from_ymd_opt(1, 1, 1).unwrap() + chrono::Duration::days(days);
            let time = chrono::NaiveTime::from_num_seconds_from_midnight_opt(secs, 0).unwrap();
            // As Postgres prints it: microseconds with trailing zeros dropped, none when zero.
            let frac = if micros == 0 {
                String::new()
            } else {
                format!(".{micros:06}").trim_end_matches('0').to_string()
            };
            let text = format!("{} {}{frac}+00", date.format("%Y-%m-%d"), time.format("%H:%M:%S"));
            let mut out = Vec::new();
            prop_assert!(push_utc_timestamptz(&text, &mut out), "{}", text);
            prop_assert_eq!(String::from_utf8(out).unwrap(), via_chrono(&text));
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(r(TypeKind::Bool, Some("t")), "true");
        assert_eq!(r(TypeKind::Bool, Some("f")), "false");
        assert_eq!(r(TypeKind::Integer, Some("-42")), "-42");
        assert_eq!(
            r(TypeKind::Numeric, Some("12345678901234567890.000100")),
            "12345678901234567890.000100"
        );
        assert_eq!(r(TypeKind::Numeric, Some("NaN")), "\"NaN\"");
        assert_eq!(r(TypeKind::Float, Some("-Infinity")), "\"-Infinity\"");
        assert_eq!(r(TypeKind::Float, Some("1.5e+300")), "1.5e+300");
        assert_eq!(r(TypeKind::Json, Some("{\"a\": [1, 2]}")), "{\"a\": [1, 2]}");
        assert_eq!(r(TypeKind::Text, Some("say \"hi\"\n")), "\"say \\\"hi\\\"\\n\"");
        assert_eq!(r(TypeKind::Text, None), "null");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            r(TypeKind::Timestamptz, Some("2024-03-01 12:34:56.5+05:30")),
            "\"2024-03-01T07:04:56.500Z\""
        );
        assert_eq!(
            r(TypeKind::Timestamptz, Some("2024-03-01 12:34:56+00")),
            "\"2024-03-01T12:34:56Z\""
        );
        assert_eq!(
            r(TypeKind::Timestamptz, Some("2024-03-01 12:34:56.123456-03")),
            "\"2024-03-01T15:34:56.123456Z\""
        );
        assert_eq!(r(TypeKind::Timestamptz, Some("infinity")), "\"infinity\"");
        assert_eq!(
            r(TypeKind::Timestamp, Some("2024-03-01 12:34:56")),
            "\"2024-03-01T12:34:56\""
        );
    }

    #[test]
    fn arrays() {
        let ints = TypeKind::Array(Box::new(TypeKind::Integer));
        assert_eq!(r(ints.clone(), Some("{1,2,NULL}")), "[1,2,null]");
        assert_eq!(r(ints.clone(), Some("{{1,2},{3,4}}")), "[[1,2],[3,4]]");
        assert_eq!(r(ints.clone(), Some("[0:1]={5,6}")), "[5,6]");
        assert_eq!(r(ints, Some("{}")), "[]");
        let texts = TypeKind::Array(Box::new(TypeKind::Text));
        assert_eq!(
            r(
                texts.clone(),
                Some(r#"{plain,"with space","q\"uote","back\\slash","NULL",NULL}"#)
            ),
            r#"["plain","with space","q\"uote","back\\slash","NULL",null]"#
        );
        assert_eq!(r(texts, Some("{broken")), "\"{broken\"");
        let bools = TypeKind::Array(Box::new(TypeKind::Bool));
        assert_eq!(r(bools, Some("{t,f}")), "[true,false]");
    }

    #[test]
    fn objects() {
        let mut out = Vec::new();
        let (id, name) = (field_key("id"), field_key("name"));
        render_object(
            [(&id, &TypeKind::Integer, Some("1")), (&name, &TypeKind::Text, None)],
            &mut out,
        );
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"id":1,"name":null}"#);
    }

    /// Renders an array of texts as Postgres's array output would quote them.
    fn pg_text_array(items: &[Option<String>]) -> String {
        let parts: Vec<String> = items
            .iter()
            .map(|i| match i {
                None => "NULL".to_string(),
                Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    proptest! {
        #[test]
        fn any_rendered_value_is_valid_json(text in ".*", kind in 0usize..8) {
            let kinds = [TypeKind::Bool, TypeKind::Integer, TypeKind::Float, TypeKind::Numeric, TypeKind::Timestamptz, TypeKind::Timestamp, TypeKind::Text, TypeKind::Array(Box::new(TypeKind::Integer))];
            let out = r(kinds[kind].clone(), Some(&text));
            prop_assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{out}");
        }

        #[test]
        fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of(".*"), 0..8)) {
            let out = r(TypeKind::Array(Box::new(TypeKind::Text)), Some(&pg_text_array(&items)));
            let back: Vec<Option<String>> = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(back, items);
        }

        #[test]
        fn json_numbers_agree_with_serde(s in "-?[0-9]{0,3}(\\.[0-9]{0,2})?([eE][+-]?[0-9]{0,2})?") {
            let ours = is_json_number(&s);
            let serde = serde_json::from_str::<serde_json::Number>(&s).is_ok();
            prop_assert_eq!(ours, serde, "{}", s);
        }
    }
}
