//! The data commands, and how a key finds its keyspace.
//!
//! Routing: `keyspace:key` goes to the keyspace when the part before the first `:` names one,
//! any other key (whole) to the default keyspace; the key part is read like a URL's (composite
//! keys `a,b`, `%`-escapes), so a key names the same entry over RESP and HTTP.
//!
//! Values: a table's keyspace (and a federated one) takes and gives JSON documents through
//! its pipeline, exactly as HTTP does — write-through, write-behind, read-only and home rules
//! included. An in-memory keyspace stores any bytes byte for byte, with a per-key expiry;
//! commands that read and change a value in one step (`SET … GET`/`NX`/`KEEPTTL`, `GETDEL`,
//! `INCR`, `APPEND`, `EXPIRE`…) run under the key's write lock there. On a table's keyspace
//! `SET … GET` and `GETDEL` are a read then a write (Postgres decides the write, the read is
//! the cache's), and per-key expiry does not exist: a row lives until it is deleted.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use super::Front;
use super::reply::Reply;
use super::session::Session;
use crate::api::error::ApiError;
use crate::cache::{Condition, Entry, Tags};
use crate::key::Key;
use crate::patterns::{PatternError, Pipeline, Removed, Update};
use crate::source::SourceError;

/// A key resolved to its keyspace.
pub struct Target<'a> {
    pub pipeline: &'a Pipeline,
    pub key: Key,
}

/// The error for a value that is not a decimal integer (Redis's wording).
pub const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
pub const SYNTAX: &str = "ERR syntax error";

/// Finds the keyspace and key that `raw` names.
pub fn route<'a>(front: &'a Front, raw: &[u8]) -> Result<Target<'a>, Reply> {
    let text = std::str::from_utf8(raw).map_err(|_| Reply::err("ERR keys must be UTF-8 text"))?;
    let (pipeline, rest) = match text
        .split_once(':')
        .and_then(|(ks, rest)| front.pipeline(ks).map(|p| (p, rest)))
    {
        Some(found) => found,
        None => match front.default_keyspace.as_deref().and_then(|d| front.pipeline(d)) {
            Some(p) => (p, text),
            None => {
                return Err(Reply::err(format!(
                    "ERR key names no keyspace: write it as <keyspace>:<key> (keyspaces: {}), or set [resp] default_keyspace",
                    front.state.pipelines.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        },
    };
    let key = pipeline.parse_key(rest).map_err(pattern_error)?;
    Ok(Target { pipeline, key })
}

/// A pipeline's error as a Redis error (the HTTP API's classification and wording).
pub fn pattern_error(e: PatternError) -> Reply {
    let api = ApiError::from(e);
    Reply::err(format!("ERR {}", api.detail))
}

fn is_precondition(e: &PatternError) -> bool {
    matches!(
        e,
        PatternError::Keyspace(crate::keyspace::KeyspaceError::Source(SourceError::PreconditionFailed(
            _
        )))
    )
}

/// Whether bytes are one JSON document (else an in-memory value is stored as opaque bytes).
fn is_json(v: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(v).is_ok()
}

/// Reads a key through its pipeline (the HTTP GET path), remembering it for tracking.
async fn read(front: &Front, s: &Session, raw: &Bytes) -> Result<Option<Arc<Entry>>, Reply> {
    read_target(front, s, raw).await.map(|(_, e)| e)
}

/// [`read`], with the keyspace the key routed to.
async fn read_target<'a>(
    front: &'a Front,
    s: &Session,
    raw: &Bytes,
) -> Result<(Target<'a>, Option<Arc<Entry>>), Reply> {
    let t = route(front, raw)?;
    // Tracked before it is read: a change that lands after the read is then always told (its
    // invalidation is written after this reply); tracking after the read could miss a change
    // between the two and leave the client's copy stale.
    if s.tracks_reads() {
        front
            .tracking
            .track(s.id, t.pipeline.keyspace().name(), &t.key.cache_key, raw);
    }
    let read = t.pipeline.get(&t.key).await.map_err(pattern_error)?;
    Ok((t, read.entry.value.is_some().then_some(read.entry)))
}

pub async fn get(front: &Front, s: &Session, args: &[Bytes]) -> Reply {
    match read(front, s, &args[1]).await {
        Ok(Some(e)) => Reply::Doc(e),
        Ok(None) => Reply::Nil,
        Err(r) => r,
    }
}

pub async fn strlen(front: &Front, s: &Session, args: &[Bytes]) -> Reply {
    match read(front, s, &args[1]).await {
        Ok(e) => Reply::Int(e.and_then(|e| e.value.as_ref().map(|v| v.len() as i64)).unwrap_or(0)),
        Err(r) => r,
    }
}

pub async fn mget(front: &Front, s: &Session, args: &[Bytes]) -> Reply {
    let mut out = Vec::with_capacity(args.len() - 1);
    for raw in &args[1..] {
        match read(front, s, raw).await {
            Ok(Some(e)) => out.push(Reply::Doc(e)),
            Ok(None) => out.push(Reply::Nil),
            Err(r) => return r,
        }
    }
    Reply::Array(out)
}

pub async fn exists(front: &Front, s: &Session, args: &[Bytes]) -> Reply {
    let mut n = 0;
    for raw in &args[1..] {
        match read(front, s, raw).await {
            Ok(Some(_)) => n += 1,
            Ok(None) => {}
            Err(r) => return r,
        }
    }
    Reply::Int(n)
}

pub async fn type_of(front: &Front, s: &Session, args: &[Bytes]) -> Reply {
    match read(front, s, &args[1]).await {
        Ok(Some(_)) => Reply::Simple("string"),
        Ok(None) => Reply::Simple("none"),
        Err(r) => r,
    }
}

/// A key's remaining life in milliseconds: -2 absent, -1 never expires.
pub async fn pttl_of(front: &Front, s: &Session, raw: &Bytes) -> Result<i64, Reply> {
    let (t, entry) = read_target(front, s, raw).await?;
    let Some(e) = entry else { return Ok(-2) };
    if !t.pipeline.is_in_memory() {
        // A row lives until it is deleted; the cache's copy is refreshed, not expired.
        return Ok(-1);
    }
    let deadline = match e.expires_at {
        Some(at) => at,
        None => e.stored_at + t.pipeline.keyspace().lifetime(&e),
    };
    Ok(deadline.saturating_duration_since(Instant::now()).as_millis() as i64)
}

pub async fn ttl(front: &Front, s: &Session, args: &[Bytes], millis: bool) -> Reply {
    match pttl_of(front, s, &args[1]).await {
        Ok(ms) if ms < 0 || millis => Reply::Int(ms),
        Ok(ms) => Reply::Int((ms + 500) / 1000),
        Err(r) => r,
    }
}

/// Parses a decimal integer argument.
pub fn int_arg(b: &[u8]) -> Result<i64, Reply> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|t| t.parse::<i64>().ok())
        .ok_or_else(|| Reply::err(NOT_AN_INTEGER))
}

/// A unix time in milliseconds as a point on the tokio clock.
fn at_unix_ms(ms: i64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let now = Instant::now();
    if ms <= now_ms {
        now
    } else {
        now + Duration::from_millis((ms - now_ms) as u64)
    }
}

/// An expiry given as `EX`/`PX`/`EXAT`/`PXAT` with its number; `cmd` names the command in the
/// error. Zero or negative relative times are refused, as Redis's `SET` does.
fn deadline(unit: &str, n: i64, cmd: &str) -> Result<Instant, Reply> {
    let bad = || Reply::err(format!("ERR invalid expire time in '{cmd}' command"));
    if n <= 0 {
        return Err(bad());
    }
    let ms = match unit {
        "ex" | "exat" => n.checked_mul(1000).ok_or_else(bad)?,
        _ => n,
    };
    Ok(match unit {
        "ex" | "px" => Instant::now() + Duration::from_millis(ms as u64),
        _ => at_unix_ms(ms),
    })
}

/// `SET`'s options.
#[derive(Default)]
struct SetOptions {
    nx: bool,
    xx: bool,
    get: bool,
    keepttl: bool,
    deadline: Option<Instant>,
}

fn set_options(args: &[Bytes]) -> Result<SetOptions, Reply> {
    let mut o = SetOptions::default();
    let mut expiry = false;
    let mut i = 0;
    while i < args.len() {
        let opt = String::from_utf8_lossy(&args[i]).to_ascii_lowercase();
        match opt.as_str() {
            "nx" if !o.xx => o.nx = true,
            "xx" if !o.nx => o.xx = true,
            "get" => o.get = true,
            "keepttl" if !expiry => o.keepttl = true,
            "ex" | "px" | "exat" | "pxat" if !expiry && !o.keepttl && i + 1 < args.len() => {
                let n = int_arg(&args[i + 1])?;
                o.deadline = Some(deadline(&opt, n, "set")?);
                expiry = true;
                i += 1;
            }
            _ => return Err(Reply::err(SYNTAX)),
        }
        i += 1;
    }
    Ok(o)
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT t|PXAT t|KEEPTTL]`
pub async fn set(front: &Front, args: &[Bytes]) -> Reply {
    let o = match set_options(&args[3..]) {
        Ok(o) => o,
        Err(r) => return r,
    };
    set_value(front, &args[1], &args[2], o).await
}

async fn set_value(front: &Front, raw: &Bytes, value: &Bytes, o: SetOptions) -> Reply {
    let t = match route(front, raw) {
        Ok(t) => t,
        Err(r) => return r,
    };
    // Stored values are copied out of the connection's read buffer, which they would pin.
    let value = Bytes::copy_from_slice(value);
    if t.pipeline.is_in_memory() {
        let raw_bytes = !is_json(&value);
        if !(o.nx || o.xx || o.get || o.keepttl) {
            return match t.pipeline.store(&t.key, "SET", value, raw_bytes, o.deadline).await {
                Ok(()) => Reply::Ok,
                Err(e) => pattern_error(e),
            };
        }
        let r = t
            .pipeline
            .update(&t.key, "SET", |cur| {
                let old = cur.and_then(|e| e.value.clone());
                let answer = if o.get {
                    old.clone().map_or(Reply::Nil, Reply::Bulk)
                } else {
                    Reply::Ok
                };
                if (o.nx && cur.is_some()) || (o.xx && cur.is_none()) {
                    let answer = if o.get { answer } else { Reply::Nil };
                    return Ok((Update::Keep, answer));
                }
                let deadline = if o.keepttl {
                    cur.and_then(|e| e.expires_at)
                } else {
                    o.deadline
                };
                Ok((
                    Update::Set {
                        value,
                        raw: raw_bytes,
                        deadline,
                    },
                    answer,
                ))
            })
            .await;
        return r.unwrap_or_else(pattern_error);
    }
    if o.deadline.is_some() {
        return pattern_error(PatternError::NotInMemory(
            t.pipeline.keyspace().name().to_string(),
            "a per-key expiry (EX/PX/EXAT/PXAT)",
        ));
    }
    let old = if o.get {
        match t.pipeline.get(&t.key).await {
            Ok(r) => r.entry.value.clone().map_or(Reply::Nil, Reply::Bulk),
            Err(e) => return pattern_error(e),
        }
    } else {
        Reply::Ok
    };
    let cond = if o.nx {
        Condition::IfNoneMatch(Tags::Any)
    } else if o.xx {
        Condition::IfMatch(Tags::Any)
    } else {
        Condition::Always
    };
    match t.pipeline.put(&t.key, &value, &cond).await {
        Ok(_) => old,
        Err(e) if is_precondition(&e) => {
            if o.get {
                old
            } else {
                Reply::Nil
            }
        }
        Err(e) => pattern_error(e),
    }
}

/// `SETNX`, `SETEX`, `PSETEX`, `GETSET`: `SET` with options.
pub async fn set_variant(front: &Front, cmd: &str, args: &[Bytes]) -> Reply {
    let mut o = SetOptions::default();
    let (key, value) = match cmd {
        "setnx" => {
            o.nx = true;
            (&args[1], &args[2])
        }
        "getset" => {
            o.get = true;
            (&args[1], &args[2])
        }
        _ => {
            let n = match int_arg(&args[2]) {
                Ok(n) => n,
                Err(r) => return r,
            };
            let unit = if cmd == "setex" { "ex" } else { "px" };
            o.deadline = match deadline(unit, n, cmd) {
                Ok(d) => Some(d),
                Err(r) => return r,
            };
            (&args[1], &args[3])
        }
    };
    let reply = set_value(front, key, value, o).await;
    match (cmd, reply) {
        ("setnx", Reply::Ok) => Reply::Int(1),
        ("setnx", Reply::Nil) => Reply::Int(0),
        (_, r) => r,
    }
}

/// One write of a batch: key, document, precondition.
type Put = (Key, Bytes, Condition);

/// `MSET k v [k v …]`: a table's keyspace writes its pairs with one batch (one Postgres
/// transaction for write-through, one log append for write-behind); in-memory pairs one by one.
pub async fn mset(front: &Front, args: &[Bytes]) -> Reply {
    if args.len().is_multiple_of(2) {
        return Reply::err("ERR wrong number of arguments for 'mset' command");
    }
    let mut batches: std::collections::BTreeMap<&str, (&Pipeline, Vec<Put>)> = std::collections::BTreeMap::new();
    for pair in args[1..].chunks(2) {
        let t = match route(front, &pair[0]) {
            Ok(t) => t,
            Err(r) => return r,
        };
        if t.pipeline.is_in_memory() {
            let r = set_value(front, &pair[0], &pair[1], SetOptions::default()).await;
            if r.is_error() {
                return r;
            }
            continue;
        }
        batches
            .entry(t.pipeline.keyspace().name())
            .or_insert_with(|| (t.pipeline, Vec::new()))
            .1
            .push((t.key, Bytes::copy_from_slice(&pair[1]), Condition::Always));
    }
    for (_, (pipeline, items)) in batches {
        for r in pipeline.put_many(items).await {
            if let Err(e) = r {
                return pattern_error(e);
            }
        }
    }
    Reply::Ok
}

/// `DEL`/`UNLINK`: how many of the keys existed (a write-behind delete counts as one: it is
/// durable, and Postgres decides later).
pub async fn del(front: &Front, args: &[Bytes]) -> Reply {
    let mut n = 0;
    for raw in &args[1..] {
        let t = match route(front, raw) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let removed = if t.pipeline.is_in_memory() {
            t.pipeline
                .update(&t.key, "DEL", |cur| Ok((Update::Delete, cur.is_some())))
                .await
        } else {
            t.pipeline
                .delete(&t.key, &Condition::Always)
                .await
                .map(|r| !matches!(r, Removed::Absent))
        };
        match removed {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => return pattern_error(e),
        }
    }
    Reply::Int(n)
}

/// `GETDEL key`
pub async fn getdel(front: &Front, args: &[Bytes]) -> Reply {
    let t = match route(front, &args[1]) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if t.pipeline.is_in_memory() {
        return t
            .pipeline
            .update(&t.key, "GETDEL", |cur| {
                let old = cur.and_then(|e| e.value.clone()).map_or(Reply::Nil, Reply::Bulk);
                Ok((Update::Delete, old))
            })
            .await
            .unwrap_or_else(pattern_error);
    }
    let old = match t.pipeline.get(&t.key).await {
        Ok(r) if r.entry.value.is_some() => Reply::Doc(r.entry),
        Ok(_) => return Reply::Nil,
        Err(e) => return pattern_error(e),
    };
    match t.pipeline.delete(&t.key, &Condition::Always).await {
        Ok(_) => old,
        Err(e) => pattern_error(e),
    }
}

/// `GETEX key [EX s|PX ms|EXAT t|PXAT t|PERSIST]`
pub async fn getex(front: &Front, s: &Session, args: &[Bytes]) -> Reply {
    if args.len() == 2 {
        return get(front, s, args).await;
    }
    let opt = String::from_utf8_lossy(&args[2]).to_ascii_lowercase();
    let new_deadline = match (opt.as_str(), args.len()) {
        ("persist", 3) => None,
        ("ex" | "px" | "exat" | "pxat", 4) => match int_arg(&args[3]).and_then(|n| deadline(&opt, n, "getex")) {
            Ok(d) => Some(d),
            Err(r) => return r,
        },
        _ => return Reply::err(SYNTAX),
    };
    update_key(front, &args[1], "GETEX with an expiry", |cur| match cur {
        Some(e) => (
            redeadline(e, new_deadline),
            Reply::Bulk(e.value.clone().unwrap_or_default()),
        ),
        None => (Update::Keep, Reply::Nil),
    })
    .await
}

/// Runs a read-modify-write of the key `raw` names (in-memory keyspaces; see
/// [`Pipeline::update`]) and answers what `f` says.
async fn update_key(
    front: &Front,
    raw: &Bytes,
    what: &'static str,
    f: impl FnOnce(Option<&Arc<Entry>>) -> (Update, Reply),
) -> Reply {
    match route(front, raw) {
        Ok(t) => t
            .pipeline
            .update(&t.key, what, |cur| Ok(f(cur)))
            .await
            .unwrap_or_else(pattern_error),
        Err(r) => r,
    }
}

/// The same value under a new expiry (`None`: the keyspace's `ttl`, from now).
fn redeadline(e: &Entry, deadline: Option<Instant>) -> Update {
    Update::Set {
        value: e.value.clone().unwrap_or_default(),
        raw: e.raw,
        deadline,
    }
}

/// `INCR`, `DECR`, `INCRBY`, `DECRBY` (in-memory keyspaces): the value as a decimal integer,
/// its expiry kept.
pub async fn incr(front: &Front, args: &[Bytes], by: Option<i64>) -> Reply {
    let delta = match by {
        Some(d) => d,
        None => match int_arg(&args[2]) {
            Ok(n) => n,
            Err(r) => return r,
        },
    };
    let delta = if String::from_utf8_lossy(&args[0]).eq_ignore_ascii_case("decrby") {
        match delta.checked_neg() {
            Some(d) => d,
            None => return Reply::err("ERR decrement would overflow"),
        }
    } else {
        delta
    };
    update_key(front, &args[1], "INCR/DECR", |cur| {
        let n = match cur.and_then(|e| e.value.as_ref()).map(|v| int_arg(v)) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(r)) => return (Update::Keep, r),
        };
        let Some(next) = n.checked_add(delta) else {
            return (Update::Keep, Reply::err("ERR increment or decrement would overflow"));
        };
        let value = Bytes::from(next.to_string());
        let deadline = cur.and_then(|e| e.expires_at);
        (
            Update::Set {
                value,
                raw: false,
                deadline,
            },
            Reply::Int(next),
        )
    })
    .await
}

/// `APPEND key value` (in-memory keyspaces): the new length.
pub async fn append(front: &Front, args: &[Bytes]) -> Reply {
    update_key(front, &args[1], "APPEND", |cur| {
        let mut v = cur
            .and_then(|e| e.value.as_ref())
            .map(|v| v.to_vec())
            .unwrap_or_default();
        v.extend_from_slice(&args[2]);
        let (len, raw) = (v.len() as i64, !is_json(&v));
        let deadline = cur.and_then(|e| e.expires_at);
        let value = Bytes::from(v);
        (Update::Set { value, raw, deadline }, Reply::Int(len))
    })
    .await
}

/// `EXPIRE`/`PEXPIRE`/`EXPIREAT`/`PEXPIREAT key n [NX|XX|GT|LT]` (in-memory keyspaces): 1 when
/// the expiry was set; a time in the past deletes the key, as in Redis.
pub async fn expire(front: &Front, cmd: &str, args: &[Bytes]) -> Reply {
    let n = match int_arg(&args[2]) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let flag = args.get(3).map(|f| String::from_utf8_lossy(f).to_ascii_lowercase());
    if args.len() > 4 || flag.as_deref().is_some_and(|f| !matches!(f, "nx" | "xx" | "gt" | "lt")) {
        return Reply::err(format!("ERR Unsupported option {}", flag.unwrap_or_default()));
    }
    let at = match cmd {
        "expire" => n.checked_mul(1000).map(|ms| (ms, false)),
        "pexpire" => Some((n, false)),
        "expireat" => n.checked_mul(1000).map(|ms| (ms, true)),
        _ => Some((n, true)),
    };
    let Some((ms, absolute)) = at else {
        return Reply::err(format!("ERR invalid expire time in '{cmd}' command"));
    };
    let (past, when) = if absolute {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (ms <= now_ms, at_unix_ms(ms))
    } else {
        (ms <= 0, Instant::now() + Duration::from_millis(ms.max(0) as u64))
    };
    update_key(front, &args[1], "EXPIRE", |cur| {
        let Some(e) = cur else {
            return (Update::Keep, Reply::Int(0));
        };
        let allowed = match flag.as_deref() {
            Some("nx") => e.expires_at.is_none(),
            Some("xx") => e.expires_at.is_some(),
            // No expiry counts as infinite.
            Some("gt") => e.expires_at.is_some_and(|c| when > c),
            Some("lt") => e.expires_at.is_none_or(|c| when < c),
            _ => true,
        };
        match (allowed, past) {
            (false, _) => (Update::Keep, Reply::Int(0)),
            (true, true) => (Update::Delete, Reply::Int(1)),
            (true, false) => (redeadline(e, Some(when)), Reply::Int(1)),
        }
    })
    .await
}

/// `PERSIST key` (in-memory keyspaces): drops the key's own expiry (it lives the keyspace's
/// `ttl` again, counted from now); 1 when it had one.
pub async fn persist(front: &Front, args: &[Bytes]) -> Reply {
    update_key(front, &args[1], "PERSIST", |cur| match cur {
        Some(e) if e.expires_at.is_some() => (redeadline(e, None), Reply::Int(1)),
        _ => (Update::Keep, Reply::Int(0)),
    })
    .await
}

/// Every live key of the in-memory keyspaces, by public name, with a stable 64-bit position
/// for `SCAN` cursors.
fn names(front: &Front) -> Vec<(u64, String)> {
    let hasher = ahash::RandomState::with_seeds(1, 2, 3, 4);
    let mut out = Vec::new();
    for p in front.state.pipelines.values().filter(|p| p.is_in_memory()) {
        let ks = p.keyspace();
        for (key, e) in ks.entries().0 {
            if e.value.is_some() {
                let name = super::public_name(front.default_keyspace.as_deref(), ks.name(), &key);
                out.push((hasher.hash_one(&name), name));
            }
        }
    }
    out
}

/// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE t]` over the in-memory keyspaces. The cursor
/// is a position in a fixed hash order of the names, so a key present for the whole scan is
/// returned at least once, as Redis promises. Each call walks every key (no index to resume
/// from), so a call returns at least 1/64 of the keys whatever `COUNT` says: a whole scan
/// costs at most ~64 walks.
pub async fn scan(front: &Front, args: &[Bytes]) -> Reply {
    let Ok(cursor) = std::str::from_utf8(&args[1]).unwrap_or("x").parse::<u64>() else {
        return Reply::err("ERR invalid cursor");
    };
    let (mut pattern, mut count, mut only_strings) = (None, 10usize, true);
    let mut i = 2;
    while i < args.len() {
        let opt = String::from_utf8_lossy(&args[i]).to_ascii_lowercase();
        let Some(v) = args.get(i + 1) else {
            return Reply::err(SYNTAX);
        };
        match opt.as_str() {
            "match" => pattern = Some(v.clone()),
            "count" => match int_arg(v) {
                Ok(n) if n >= 1 => count = n as usize,
                Ok(_) => return Reply::err(SYNTAX),
                Err(r) => return r,
            },
            "type" => only_strings = v.eq_ignore_ascii_case(b"string"),
            _ => return Reply::err(SYNTAX),
        }
        i += 2;
    }
    let mut all = names(front);
    let total = all.len();
    all.retain(|(h, _)| *h >= cursor);
    all.sort_unstable();
    let batch = count.max(total / 64).max(1);
    let mut end = batch.min(all.len());
    // Never split names of one position across two calls.
    while end < all.len() && all[end].0 == all[end - 1].0 {
        end += 1;
    }
    let next = all.get(end).map_or(0, |(h, _)| *h);
    let keys = all[..end]
        .iter()
        .filter(|(_, n)| only_strings && pattern.as_ref().is_none_or(|p| glob(p, n.as_bytes())))
        .map(|(_, n)| Reply::bulk(n))
        .collect();
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(keys)])
}

/// `KEYS pattern` over the in-memory keyspaces.
pub async fn keys(front: &Front, args: &[Bytes]) -> Reply {
    Reply::Array(
        names(front)
            .into_iter()
            .filter(|(_, n)| glob(&args[1], n.as_bytes()))
            .map(|(_, n)| Reply::bulk(n))
            .collect(),
    )
}

/// `DBSIZE`: entries cached across every keyspace.
pub async fn dbsize(front: &Front) -> Reply {
    let mut n = 0;
    for p in front.state.pipelines.values() {
        n += p.keyspace().stats().await.entries;
    }
    Reply::Int(n as i64)
}

/// Redis's glob (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a-z]`, `\x`.
pub fn glob(pattern: &[u8], s: &[u8]) -> bool {
    fn go(p: &[u8], s: &[u8], depth: usize) -> bool {
        if depth > 1000 {
            return false;
        }
        let (mut pi, mut si) = (0, 0);
        while pi < p.len() {
            match p[pi] {
                b'*' => {
                    while pi + 1 < p.len() && p[pi + 1] == b'*' {
                        pi += 1;
                    }
                    if pi + 1 == p.len() {
                        return true;
                    }
                    return (si..=s.len()).any(|k| go(&p[pi + 1..], &s[k..], depth + 1));
                }
                b'?' => {
                    if si >= s.len() {
                        return false;
                    }
                    si += 1;
                }
                b'[' => {
                    if si >= s.len() {
                        return false;
                    }
                    pi += 1;
                    let not = p.get(pi) == Some(&b'^');
                    if not {
                        pi += 1;
                    }
                    let mut matched = false;
                    while pi < p.len() && p[pi] != b']' {
                        if p[pi] == b'\\' && pi + 1 < p.len() {
                            pi += 1;
                            matched |= p[pi] == s[si];
                        } else if pi + 2 < p.len() && p[pi + 1] == b'-' {
                            let (a, b) = (p[pi].min(p[pi + 2]), p[pi].max(p[pi + 2]));
                            matched |= (a..=b).contains(&s[si]);
                            pi += 2;
                        } else {
                            matched |= p[pi] == s[si];
                        }
                        pi += 1;
                    }
                    if matched == not {
                        return false;
                    }
                    si += 1;
                }
                b'\\' if pi + 1 < p.len() => {
                    pi += 1;
                    if si >= s.len() || p[pi] != s[si] {
                        return false;
                    }
                    si += 1;
                }
                c => {
                    if si >= s.len() || c != s[si] {
                        return false;
                    }
                    si += 1;
                }
            }
            pi += 1;
        }
        si == s.len()
    }
    go(pattern, s, 0)
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_like_redis() {
        assert!(glob(b"*", b"anything"));
        assert!(glob(b"user:*", b"user:1"));
        assert!(!glob(b"user:*", b"users:1"));
        assert!(glob(b"h?llo", b"hello") && !glob(b"h?llo", b"hllo"));
        assert!(glob(b"h[ae]llo", b"hallo") && !glob(b"h[ae]llo", b"hillo"));
        assert!(glob(b"h[^e]llo", b"hallo") && !glob(b"h[^e]llo", b"hello"));
        assert!(glob(b"h[a-c]llo", b"hbllo"));
        assert!(glob(b"a\\*b", b"a*b") && !glob(b"a\\*b", b"axb"));
        assert!(glob(b"*a*b*", b"xxaxxbxx"));
    }
}
