//! The key-value routes. Keys are taken from the raw (still percent-encoded) request path so a
//! composite key's separating commas can be told from escaped ones (`%2C`); see `key`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use crate::cache::{Condition, Entry, Tags};
use crate::key::Key;
use crate::keyspace::{Lag, Origin, Read};
use crate::metrics::UNKNOWN_KEYSPACE;
use crate::patterns::write_behind::Accepted;
use crate::patterns::{Pipeline, Removed, Written};

/// `X-Cache`: where the answer came from.
const X_CACHE: header::HeaderName = header::HeaderName::from_static("x-cache");

/// Splits `/v1/kv/{keyspace}/{key...}` into the decoded keyspace name and the raw key.
fn split_path(uri: &Uri) -> (std::borrow::Cow<'_, str>, &str) {
    split_key_path(uri.path())
}

/// [`split_path`] of a path alone.
fn split_key_path(path: &str) -> (std::borrow::Cow<'_, str>, &str) {
    let rest = path.strip_prefix("/v1/kv/").unwrap_or_default();
    let (ks, key) = rest.split_once('/').unwrap_or((rest, ""));
    let ks = if ks.contains('%') {
        percent_decode_str(ks).decode_utf8_lossy()
    } else {
        std::borrow::Cow::Borrowed(ks)
    };
    (ks, key)
}

/// Records the request in the metrics and returns the response.
fn finish(st: &AppState, ks: &str, op: &str, started: Instant, resp: Response) -> Response {
    record(st, ks, op, resp.status(), started);
    resp
}

/// Counts a request answered `status` and observes its duration.
fn record(st: &AppState, ks: &str, op: &str, status: StatusCode, started: Instant) {
    if let Some((count, seconds)) = st.hot.of(ks, op, status.as_u16()) {
        count.inc();
        seconds.observe(started.elapsed().as_secs_f64());
        return;
    }
    let label = if st.pipelines.contains_key(ks) {
        ks
    } else {
        UNKNOWN_KEYSPACE
    };
    st.metrics
        .http_requests
        .with_label_values(&[label, op, status.as_str()])
        .inc();
    st.metrics
        .http_duration
        .with_label_values(&[op])
        .observe(started.elapsed().as_secs_f64());
}

fn lookup<'a>(st: &'a AppState, ks: &str, raw_key: &str) -> Result<(&'a Pipeline, Key), ApiError> {
    let pipeline = st.pipeline(ks)?;
    let key = pipeline.parse_key(raw_key)?;
    Ok((pipeline, key))
}

/// The entry's `ETag`: the tag of its document's bytes (see [`crate::cache::etag`]).
fn etag(entry: &Entry) -> HeaderValue {
    match entry.value.as_deref() {
        Some(doc) => HeaderValue::from_bytes(&crate::cache::etag_bytes(doc))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\"")),
        None => HeaderValue::from_static(""),
    }
}

/// The write's precondition from `If-Match` / `If-None-Match` (see [`precondition`]).
fn condition(headers: &HeaderMap) -> Result<Condition, ApiError> {
    let get = |name| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| ApiError::bad_request("If-Match / If-None-Match must be ASCII entity tags"))
            })
            .transpose()
    };
    precondition(get(header::IF_MATCH)?, get(header::IF_NONE_MATCH)?)
}

/// A write's precondition from its `If-Match` and `If-None-Match` values (headers, or a bulk
/// item's `if_match` / `if_none_match`); both at once is refused as ambiguous.
fn precondition(if_match: Option<&str>, if_none_match: Option<&str>) -> Result<Condition, ApiError> {
    match (if_match, if_none_match) {
        (None, None) => Ok(Condition::Always),
        (Some(t), None) => Ok(Condition::IfMatch(Tags::parse(t))),
        (None, Some(t)) => Ok(Condition::IfNoneMatch(Tags::parse(t))),
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give If-Match (if_match) or If-None-Match (if_none_match), not both",
        )),
    }
}

/// Whether a GET's `If-None-Match` value names the document (`*`, or a tag compared weakly). A
/// value that is not visible ASCII (what `HeaderValue::to_str` takes) names nothing, on both
/// HTTP paths.
fn etag_matches(header: &[u8], doc: &[u8]) -> bool {
    let visible = header.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
    let Some(text) = visible.then(|| std::str::from_utf8(header).ok()).flatten() else {
        return false;
    };
    !Condition::IfNoneMatch(Tags::parse(text)).holds(Some(doc))
}

fn x_cache(origin: Origin) -> HeaderValue {
    HeaderValue::from_static(x_cache_text(origin))
}

/// [`x_cache`]'s text.
fn x_cache_text(origin: Origin) -> &'static str {
    match origin {
        // A pending write-behind write is this node's own state: a hit.
        Origin::Hit | Origin::Pending => "hit",
        Origin::Miss => "miss",
        Origin::L2 => "hit-l2",
        Origin::Refreshing => "stale-refreshing",
    }
}

/// `X-Cache-Lag-Ms`: milliseconds the answer may be behind the database, or `unknown` while the
/// change stream has not caught up since the start.
fn lag_header(lag: Lag) -> HeaderValue {
    match lag {
        Lag::Behind(d) => HeaderValue::from(d.as_millis() as u64),
        Lag::Unknown => HeaderValue::from_static("unknown"),
    }
}

/// The `Age` header for `secs`: an hour's worth of values is made once (a key read's hot path
/// would otherwise format and allocate one per answer); beyond that, formatted.
fn age(secs: u64) -> HeaderValue {
    match small_number(secs) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(secs),
    }
}

/// `n`'s decimal text for `n` under 3,600, made once.
fn small_number(n: u64) -> Option<&'static str> {
    static SMALL: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
        (0..3600u64)
            .map(|n| &*Box::leak(n.to_string().into_boxed_str()))
            .collect()
    });
    SMALL.get(usize::try_from(n).ok()?).copied()
}

/// A 200 carrying a JSON document with its entry's headers.
fn document(value: Bytes, entry: &Entry) -> Response {
    let mut resp = Response::new(Body::from(value));
    let h = resp.headers_mut();
    // Room for every header a key read's answer carries, in one allocation.
    h.reserve(6);
    // Bytes written over RESP to an in-memory keyspace need not be JSON.
    let kind = if entry.raw {
        "application/octet-stream"
    } else {
        "application/json"
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::ETAG, etag(entry));
    resp
}

/// `GET /v1/kv/{keyspace}/{key}`
pub async fn get(State(st): State<Arc<AppState>>, uri: Uri, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let (ks, raw_key) = split_path(&uri);
    let resp = async {
        let (pipeline, key) = lookup(&st, &ks, raw_key)?;
        let read = pipeline.get(&key).await?;
        Ok::<_, ApiError>(answer(&ks, &key, &read, &headers))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    finish(&st, &ks, "get", started, resp)
}

/// [`get`] when the answer needs no waiting — the key's pending write or a live L1 entry served
/// as it is — answered in place, with the same response and metrics; else `None`, and the
/// caller runs [`get`] (which also answers every error).
pub fn get_now(st: &AppState, uri: &Uri, headers: &HeaderMap) -> Option<Response> {
    let started = Instant::now();
    let (ks, raw_key) = split_path(uri);
    let (pipeline, key) = lookup(st, &ks, raw_key).ok()?;
    let read = pipeline.get_now(&key)?;
    let resp = answer(&ks, &key, &read, headers);
    Some(finish(st, &ks, "get", started, resp))
}

/// [`get_now`] for the listener's own HTTP/1 path (`api::fast`): when memory answers the read of
/// `path` with its document or a 304, appends the whole HTTP/1.1 response to `out` — the same
/// status, headers and body [`answer`] gives, and `Date` — records the metrics [`get_now`]
/// records, and returns `true`. Anything else (a miss, a tombstone's 404, an unknown keyspace,
/// a key that does not parse) appends nothing and returns `false`: the caller runs the request
/// through [`get`], which answers it, errors included. `started` (the caller's one clock
/// reading, which also gave `date`) serves the duration and `Age` (clock reads were the largest
/// user-space item left).
pub fn write_now(
    st: &AppState,
    started: Instant,
    date: &[u8],
    path: &str,
    if_none_match: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> bool {
    let (ks, raw_key) = split_key_path(path);
    let Ok((pipeline, key)) = lookup(st, &ks, raw_key) else {
        return false;
    };
    let Some(read) = pipeline.get_now(&key) else {
        return false;
    };
    let entry = &read.entry;
    let Some(doc) = entry.value.as_ref() else {
        return false;
    };
    let tag = crate::cache::etag_bytes(doc);
    let not_modified = if_none_match.is_some_and(|v| etag_matches(v, doc));
    let status = if not_modified {
        out.extend_from_slice(b"HTTP/1.1 304 Not Modified\r\n");
        StatusCode::NOT_MODIFIED
    } else {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: ");
        out.extend_from_slice(if entry.raw {
            b"application/octet-stream"
        } else {
            b"application/json"
        });
        out.extend_from_slice(b"\r\n");
        StatusCode::OK
    };
    out.extend_from_slice(b"etag: ");
    out.extend_from_slice(&tag);
    out.extend_from_slice(b"\r\nx-cache: ");
    out.extend_from_slice(x_cache_text(read.origin).as_bytes());
    out.extend_from_slice(b"\r\nage: ");
    let age = tokio::time::Instant::from_std(started)
        .saturating_duration_since(entry.stored_at)
        .as_secs();
    match small_number(age) {
        Some(text) => out.extend_from_slice(text.as_bytes()),
        None => out.extend_from_slice(itoa::Buffer::new().format(age).as_bytes()),
    }
    if let Some(lag) = read.lag {
        out.extend_from_slice(b"\r\nx-cache-lag-ms: ");
        out.extend_from_slice(lag_header(lag).as_bytes());
    }
    if !not_modified {
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(doc.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n\r\n");
    if !not_modified {
        out.extend_from_slice(doc);
    }
    record(st, &ks, "get", status, started);
    true
}

/// A key read's answer: the document (or 304, or 404) with its headers.
fn answer(ks: &str, key: &Key, read: &Read, headers: &HeaderMap) -> Response {
    let entry = &read.entry;
    let mut resp = match &entry.value {
        None => ApiError::not_found(ks, &key.cache_key).into_response(),
        Some(_)
            if headers
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| etag_matches(v.as_bytes(), entry.value.as_deref().unwrap_or_default())) =>
        {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().insert(header::ETAG, etag(entry));
            r
        }
        Some(v) => document(v.clone(), entry),
    };
    let h = resp.headers_mut();
    h.insert(X_CACHE, x_cache(read.origin));
    h.insert(header::AGE, age(entry.stored_at.elapsed().as_secs()));
    if let Some(lag) = read.lag {
        // Outside the freshness contract: say how far behind the database this may be.
        h.insert("x-cache-lag-ms", lag_header(lag));
    }
    resp
}

/// Reads a body up to the configured limit; larger bodies are refused with 413.
async fn read_body(st: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = st.server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(body, limit as usize).await.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("cannot read the body: {e}"))
        }
    })
}

/// 202: durable here, Postgres later. The body is the document reads now see (for a delete,
/// `{"deleted": true}`); `ETag` the write's version, `X-Log-Offset` its place in the log.
fn accepted_response(a: &Accepted) -> Response {
    let body = a
        .doc
        .clone()
        .unwrap_or_else(|| Bytes::from_static(b"{\"deleted\":true}"));
    let mut resp = (StatusCode::ACCEPTED, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(v) = a
        .doc
        .as_deref()
        .and_then(|d| HeaderValue::from_bytes(&crate::cache::etag_bytes(d)).ok())
    {
        h.insert(header::ETAG, v);
    }
    h.insert("x-log-offset", HeaderValue::from(a.offset.0));
    resp
}

/// `PUT /v1/kv/{keyspace}/{key}`
pub async fn put(State(st): State<Arc<AppState>>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let (ks, raw_key) = split_path(&uri);
    let resp = async {
        let (pipeline, key) = lookup(&st, &ks, raw_key)?;
        let cond = condition(&headers)?;
        let body = read_body(&st, &headers, body).await?;
        Ok::<_, ApiError>(match pipeline.put(&key, &body, &cond).await? {
            Written::Stored(entry) => document(entry.value.clone().unwrap_or_default(), &entry),
            Written::Accepted(accepted) => accepted_response(&accepted),
        })
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    finish(&st, &ks, "put", started, resp)
}

/// `DELETE /v1/kv/{keyspace}/{key}`
pub async fn delete(State(st): State<Arc<AppState>>, uri: Uri, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let (ks, raw_key) = split_path(&uri);
    let resp = async {
        let (pipeline, key) = lookup(&st, &ks, raw_key)?;
        let cond = condition(&headers)?;
        match pipeline.delete(&key, &cond).await? {
            Removed::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
            Removed::Absent => Err(ApiError::not_found(&ks, &key.cache_key)),
            Removed::Accepted(accepted) => Ok(accepted_response(&accepted)),
        }
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    finish(&st, &ks, "delete", started, resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MgetRequest {
    keys: Vec<String>,
}

/// `POST /v1/kv/{keyspace}/_mget` with `{"keys": [...]}`. Answers
/// `{"items": [{"key", "found", "value"?, "version"?, "error"?}, ...]}` in request order; a bad
/// or failed key is reported in its item and does not fail the others.
pub async fn mget(State(st): State<Arc<AppState>>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let (ks, _) = split_path(&uri);
    let resp = async {
        let pipeline = st.pipeline(&ks)?;
        let body = read_body(&st, &headers, body).await?;
        let req: MgetRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("expected {{\"keys\": [\"k1\", ...]}}: {e}")))?;
        if req.keys.len() > st.server.max_mget_keys {
            return Err(ApiError::bad_request(format!(
                "{} keys asked for; the limit is {} (server.max_mget_keys)",
                req.keys.len(),
                st.server.max_mget_keys
            )));
        }
        let items = futures::future::join_all(req.keys.iter().map(|raw| mget_one(pipeline, raw))).await;
        let mut out = Vec::with_capacity(64 * items.len());
        out.extend_from_slice(b"{\"items\":[");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(item.as_bytes());
        }
        out.extend_from_slice(b"]}");
        let mut resp = (StatusCode::OK, out).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(resp)
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    finish(&st, &ks, "mget", started, resp)
}

/// One `_mget` item as JSON text, the cached document spliced in without re-parsing (stored
/// values are always valid JSON: rendered from a row, or parsed on `PUT`). Keys use the same
/// encoding as in URLs.
async fn mget_one(pipeline: &Pipeline, raw: &str) -> String {
    let key_json = serde_json::to_string(raw).unwrap_or_default();
    let read = match pipeline.parse_key(raw) {
        Ok(key) => pipeline.get(&key).await.map_err(ApiError::from),
        Err(e) => Err(ApiError::from(e)),
    };
    match read {
        Ok(r) => match &r.entry.value {
            // Opaque bytes (written over RESP) are not JSON: given as a string, lossily.
            Some(v) if r.entry.raw => serde_json::json!({
                "key": raw, "found": true, "version": r.entry.version.to_string(), "raw": true,
                "value": String::from_utf8_lossy(v),
            })
            .to_string(),
            Some(v) => format!(
                "{{\"key\":{key_json},\"found\":true,\"version\":\"{}\",\"value\":{}}}",
                r.entry.version,
                String::from_utf8_lossy(v)
            ),
            None => format!("{{\"key\":{key_json},\"found\":false}}"),
        },
        Err(e) => serde_json::json!({"key": raw, "found": false, "error": e.code, "detail": e.detail}).to_string(),
    }
}

/// One `_mput` item.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MputItem {
    key: String,
    value: Box<serde_json::value::RawValue>,
    #[serde(default)]
    if_match: Option<String>,
    #[serde(default)]
    if_none_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MputRequest {
    items: Vec<MputItem>,
}

/// One `_mdelete` item.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MdeleteItem {
    key: String,
    #[serde(default)]
    if_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MdeleteRequest {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    items: Vec<MdeleteItem>,
}

/// The body of a bulk request, with the item bound.
async fn bulk_body<T: serde::de::DeserializeOwned>(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
    expected: &str,
    count: impl Fn(&T) -> usize,
) -> Result<T, ApiError> {
    let body = read_body(st, headers, body).await?;
    let req: T =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("expected {expected}: {e}")))?;
    let n = count(&req);
    if n > st.server.max_mget_keys {
        return Err(ApiError::bad_request(format!(
            "{n} items; the limit is {} (server.max_mget_keys)",
            st.server.max_mget_keys
        )));
    }
    Ok(req)
}

/// One bulk item's answer as JSON.
fn item_json(key: &str, result: Result<(u16, Option<&Bytes>), ApiError>) -> serde_json::Value {
    match result {
        Ok((status, doc)) => {
            let mut item = serde_json::json!({ "key": key, "status": status });
            if let Some(doc) = doc {
                item["etag"] = crate::cache::etag(doc).into();
                item["value"] = serde_json::from_slice(doc).unwrap_or(serde_json::Value::Null);
            }
            item
        }
        Err(e) => serde_json::json!({ "key": key, "status": e.status.as_u16(), "error": e.code, "detail": e.detail }),
    }
}

/// A bulk item's key, for its answer.
trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for MputItem {
    fn key(&self) -> &str {
        &self.key
    }
}

impl Keyed for MdeleteItem {
    fn key(&self) -> &str {
        &self.key
    }
}

/// Prepares each bulk item: those that fail (a bad key, a bad precondition) are answered at
/// once; the rest go to the batch, with their item index.
type Split<P> = (Vec<Option<serde_json::Value>>, Vec<P>, Vec<usize>);

fn split_items<I: Keyed, P>(items: &[I], prepare: impl Fn(&I) -> Result<P, ApiError>) -> Split<P> {
    let mut answers = Vec::with_capacity(items.len());
    let mut batch = Vec::with_capacity(items.len());
    let mut index = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match prepare(item) {
            Ok(p) => {
                answers.push(None);
                batch.push(p);
                index.push(i);
            }
            Err(e) => answers.push(Some(item_json(item.key(), Err(e)))),
        }
    }
    (answers, batch, index)
}

/// A bulk item durable in the log (202), with its offset.
fn accepted_item(key: &str, a: &Accepted) -> serde_json::Value {
    let mut item = item_json(key, Ok((202, a.doc.as_ref())));
    item["offset"] = a.offset.0.into();
    item
}

fn items_response(items: Vec<serde_json::Value>) -> Response {
    let mut resp = (StatusCode::OK, axum::Json(serde_json::json!({ "items": items }))).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `POST /v1/kv/{keyspace}/_mput` with `{"items": [{"key", "value", "if_match"?,
/// "if_none_match"?}, ...]}`: each item validated and conditioned like a single `PUT` and answered
/// in its own item (`status` 200/202 with `etag` and `value`, or the error); write-through runs
/// them in one Postgres transaction, write-behind makes them durable with one log append.
pub async fn mput(State(st): State<Arc<AppState>>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let (ks, _) = split_path(&uri);
    let resp = async {
        let pipeline = st.pipeline(&ks)?;
        let req: MputRequest = bulk_body(
            &st,
            &headers,
            body,
            r#"{"items": [{"key": "k", "value": {...}}, ...]}"#,
            |r: &MputRequest| r.items.len(),
        )
        .await?;
        let (mut answers, batch, index) = split_items(&req.items, |item: &MputItem| {
            let key = pipeline.parse_key(&item.key)?;
            let cond = precondition(item.if_match.as_deref(), item.if_none_match.as_deref())?;
            Ok((key, Bytes::copy_from_slice(item.value.get().as_bytes()), cond))
        });
        for (i, r) in index.into_iter().zip(pipeline.put_many(batch).await) {
            let key = &req.items[i].key;
            answers[i] = Some(match r {
                Ok(Written::Stored(e)) => item_json(key, Ok((200, e.value.as_ref()))),
                Ok(Written::Accepted(a)) => accepted_item(key, &a),
                Err(e) => item_json(key, Err(e.into())),
            });
        }
        Ok::<_, ApiError>(items_response(answers.into_iter().flatten().collect()))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    finish(&st, &ks, "mput", started, resp)
}

/// `POST /v1/kv/{keyspace}/_mdelete` with `{"keys": [...]}` or `{"items": [{"key",
/// "if_match"?}, ...]}`: like `_mput`, each item answered on its own (`status` 204, 202, or the
/// error: 404 when there was nothing to delete).
pub async fn mdelete(State(st): State<Arc<AppState>>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let (ks, _) = split_path(&uri);
    let resp = async {
        let pipeline = st.pipeline(&ks)?;
        let req: MdeleteRequest = bulk_body(&st, &headers, body, r#"{"keys": ["k1", ...]}"#, |r: &MdeleteRequest| {
            r.keys.len() + r.items.len()
        })
        .await?;
        let items: Vec<MdeleteItem> = req
            .keys
            .into_iter()
            .map(|key| MdeleteItem { key, if_match: None })
            .chain(req.items)
            .collect();
        let (mut answers, batch, index) = split_items(&items, |item: &MdeleteItem| {
            Ok((
                pipeline.parse_key(&item.key)?,
                precondition(item.if_match.as_deref(), None)?,
            ))
        });
        for (i, r) in index.into_iter().zip(pipeline.delete_many(batch).await) {
            let key = &items[i].key;
            answers[i] = Some(match r {
                Ok(Removed::Deleted) => item_json(key, Ok((204, None))),
                Ok(Removed::Absent) => item_json(key, Err(ApiError::not_found(&ks, key))),
                Ok(Removed::Accepted(a)) => accepted_item(key, &a),
                Err(e) => item_json(key, Err(e.into())),
            });
        }
        Ok::<_, ApiError>(items_response(answers.into_iter().flatten().collect()))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    finish(&st, &ks, "mdelete", started, resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_names_the_document_only_in_visible_ascii() {
        let doc = br#"{"a":1}"#;
        let tag = crate::cache::etag(doc);
        assert!(etag_matches(tag.as_bytes(), doc));
        assert!(etag_matches(format!("W/{tag}, \"other\"").as_bytes(), doc));
        assert!(etag_matches(b"*", doc));
        assert!(!etag_matches(b"\"other\"", doc));
        // What `HeaderValue::to_str` refuses names nothing, on the own path as on hyper's.
        assert!(!etag_matches(format!("{tag}\u{e9}").as_bytes(), doc));
        assert!(!etag_matches(b"*\x01", doc));
    }

    #[test]
    fn an_age_header_is_its_seconds_in_decimal() {
        for n in [0u64, 1, 9, 10, 59, 600, 3599, 3600, 86_400, u64::MAX] {
            assert_eq!(age(n), HeaderValue::from(n), "{n}");
        }
    }
}
