//! A reader over a spanned TOML document that collects *every* problem instead of stopping at
//! the first one.
//!
//! serde's `deny_unknown_fields` aborts on the first unknown key, and a typed deserialize aborts on
//! the first bad value, so `cachesync check` would make a user fix one mistake per run. Here each
//! section is read field by field: every field read is remembered as known, a value that does not
//! deserialize is recorded with its line and the reader moves on, and `finish` reports the keys
//! nobody asked for, naming the known ones. The typed structs in `config` stay plain data.

use std::cell::RefCell;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One thing wrong with a configuration, with where it is when that is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file, when the problem has a place in it.
    pub line: Option<usize>,
    /// Where in the configuration: `server.listen`, `keyspace[users].ttl`.
    pub path: String,
    /// What is wrong and, where it helps, how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Shared state of one read: the source's line starts and the problems found so far.
pub struct Ctx {
    line_starts: Vec<usize>,
    problems: RefCell<Vec<Problem>>,
}

impl Ctx {
    pub fn new(source: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(source.match_indices('\n').map(|(i, _)| i + 1));
        Ctx {
            line_starts,
            problems: RefCell::new(Vec::new()),
        }
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        match self.line_starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }

    pub fn problem(&self, span: Option<&Range<usize>>, path: impl Into<String>, message: impl Into<String>) {
        self.problems.borrow_mut().push(Problem {
            line: span.map(|s| self.line_of(s.start)),
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn into_problems(self) -> Vec<Problem> {
        self.problems.into_inner()
    }
}

/// One TOML table being read.
pub struct Section<'a, 'i> {
    ctx: &'a Ctx,
    table: &'a DeTable<'i>,
    path: String,
    span: Range<usize>,
    known: Vec<&'static str>,
}

impl<'a, 'i> Section<'a, 'i> {
    pub fn new(ctx: &'a Ctx, table: &'a DeTable<'i>, path: impl Into<String>, span: Range<usize>) -> Self {
        Section {
            ctx,
            table,
            path: path.into(),
            span,
            known: Vec::new(),
        }
    }

    pub fn ctx(&self) -> &'a Ctx {
        self.ctx
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Renames the section in later messages (e.g. once a keyspace's name is known).
    pub fn set_path(&mut self, path: String) {
        self.path = path;
    }

    fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.known.push(key);
        self.table.get(key)
    }

    /// The span of a field's value, for problems found after it was read.
    pub fn span_of(&self, key: &str) -> Option<Range<usize>> {
        self.table.get(key).map(|v| v.span())
    }

    /// Reports a problem about a field found after reading it (e.g. a cross-field check).
    pub fn problem_at(&self, key: &str, message: impl Into<String>) {
        let span = self.span_of(key).unwrap_or_else(|| self.span.clone());
        self.ctx.problem(Some(&span), self.field_path(key), message);
    }

    /// Reports a problem about the section as a whole.
    pub fn problem(&self, message: impl Into<String>) {
        self.ctx.problem(Some(&self.span), self.path.clone(), message);
    }

    /// Reads an optional field; a value of the wrong shape is recorded and read as absent.
    pub fn get<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        let value = self.raw(key)?;
        match T::deserialize(value.clone().into_deserializer()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.ctx
                    .problem(Some(&value.span()), self.field_path(key), e.message().to_string());
                None
            }
        }
    }

    /// Reads a field that must be present.
    pub fn required<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        if self.table.get(key).is_none() {
            self.known.push(key);
            self.problem(format!("missing required field `{key}`"));
            return None;
        }
        self.get(key)
    }

    /// Reads a duration written as a human string ("250ms", "30s", "5m").
    /// A duration that `"0s"` turns off: `None` for zero (or an invalid value, which is
    /// reported), `default` when the key is absent.
    pub fn duration_or_off(&mut self, key: &'static str, default: Option<Duration>) -> Option<Duration> {
        match self.duration(key) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None if self.span_of(key).is_some() => None,
            None => default,
        }
    }

    pub fn duration(&mut self, key: &'static str) -> Option<Duration> {
        let text: String = self.get(key)?;
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem_at(
                    key,
                    format!("invalid duration {text:?} ({e}); write it like \"250ms\", \"30s\" or \"5m\""),
                );
                None
            }
        }
    }

    /// Reads a byte size written as an integer or a string with a unit ("64MiB", "512KB").
    pub fn byte_size(&mut self, key: &'static str) -> Option<u64> {
        let value = self.raw(key)?;
        let parsed = match value.get_ref() {
            DeValue::Integer(_) => u64::deserialize_from(value).map_err(|e| e.to_string()),
            DeValue::String(s) => parse_byte_size(s),
            _ => Err("expected an integer or a string such as \"64MiB\"".to_string()),
        };
        match parsed {
            Ok(n) => Some(n),
            Err(e) => {
                self.ctx.problem(Some(&value.span()), self.field_path(key), e);
                None
            }
        }
    }

    /// Opens a sub-table; absent gives `None`, a non-table value is a problem.
    pub fn table(&mut self, key: &'static str) -> Option<Section<'a, 'i>> {
        let value = self.raw(key)?;
        match value.get_ref() {
            DeValue::Table(t) => Some(Section::new(self.ctx, t, self.field_path(key), value.span())),
            _ => {
                self.ctx
                    .problem(Some(&value.span()), self.field_path(key), "expected a table");
                None
            }
        }
    }

    /// Opens an array of tables (`[[key]]`).
    pub fn tables(&mut self, key: &'static str) -> Vec<Section<'a, 'i>> {
        let Some(value) = self.raw(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = value.get_ref() else {
            self.ctx.problem(
                Some(&value.span()),
                self.field_path(key),
                format!("expected [[{key}]] tables"),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.get_ref() {
                DeValue::Table(t) => out.push(Section::new(
                    self.ctx,
                    t,
                    format!("{}[{i}]", self.field_path(key)),
                    item.span(),
                )),
                _ => self.ctx.problem(
                    Some(&item.span()),
                    format!("{}[{i}]", self.field_path(key)),
                    "expected a table",
                ),
            }
        }
        out
    }

    /// Reports every key nobody read, naming the known ones.
    pub fn finish(self) {
        for (key, _) in self.table.iter() {
            let name: &str = key.get_ref();
            if !self.known.contains(&name) {
                let mut known = self.known.clone();
                known.sort_unstable();
                known.dedup();
                self.ctx.problem(
                    Some(&key.span()),
                    self.field_path(name),
                    format!("unknown field `{name}`; expected one of: {}", known.join(", ")),
                );
            }
        }
    }
}

/// Deserializes one spanned value.
trait DeserializeFrom: Sized {
    fn deserialize_from(value: &Spanned<DeValue<'_>>) -> Result<Self, toml::de::Error>;
}

impl<T: DeserializeOwned> DeserializeFrom for T {
    fn deserialize_from(value: &Spanned<DeValue<'_>>) -> Result<Self, toml::de::Error> {
        T::deserialize(value.clone().into_deserializer())
    }
}

/// Parses "123", "64KiB", "64KB", "1.5GiB", "10MB" into bytes (KB = 1000, KiB = 1024).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {text:?}; write it like 1048576, \"512KiB\" or \"64MiB\""))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}; use B, KB, MB, GB, KiB, MiB or GiB"
            ));
        }
    };
    let bytes = n * mult;
    if !(0.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1024").unwrap(), 1024);
        assert_eq!(parse_byte_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_byte_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_byte_size("10 MB").unwrap(), 10_000_000);
        assert!(parse_byte_size("ten").is_err());
        assert!(parse_byte_size("5 parsecs").unwrap_err().contains("unknown size unit"));
    }

    #[test]
    fn lines() {
        let ctx = Ctx::new("a\nbb\nccc");
        assert_eq!(ctx.line_of(0), 1);
        assert_eq!(ctx.line_of(2), 2);
        assert_eq!(ctx.line_of(5), 3);
    }
}

/// Serializes durations as human strings ("5m") in `/v1/keyspaces` and `check` output.
pub mod humantime_serde_shim {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}
