//! Consistent warm start: load whole tables from a snapshot exported when a replication slot
//! was created, so the cache starts complete and the stream continues exactly where the snapshot
//! ends.
//!
//! The snapshot sees precisely the transactions committed before the slot's consistent point
//! `cp`; the stream delivers precisely those committed at or after it. Every loaded row is
//! installed at version `cp`, so a streamed change (version ≥ `cp`) always wins over the row it
//! supersedes, in whichever order the two reach the cache. Rows are read with `COPY … TO
//! STDOUT` in text format — the same output-function text pgoutput sends — and rendered by the
//! same renderer as loads and CDC; a large table by two COPY streams at once, each in the same
//! snapshot over its own range of the table's pages, and parsed, rendered and installed by one
//! worker per core.
//!
//! [`reload`] reloads one keyspace while the stream runs (its table changed shape): from an
//! ordinary repeatable-read snapshot, each row installed with that snapshot's visibility
//! (`pg_current_snapshot()`), which orders it against every streamed change exactly as a load's
//! row is ordered (see `cache`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio_postgres::NoTls;

use crate::cache::{Entry, Snapshot};
use crate::cdc::CdcError;
use crate::hlc::Hlc;
use crate::key;
use crate::keyspace::{Blocker, Keyspace};
use crate::lifecycle::Tasks;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::source::postgres::config::PostgresConfig;
use crate::source::postgres::sql::{qualified, quote_ident};
use crate::source::postgres::{classify, connection_config};

/// How often progress is logged during a load.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Loads every keyspace in `keyspaces` from the exported snapshot `snapshot`, at version `cp`,
/// each row through the keyspace's door ([`Keyspace::mutate`]): a load in flight for a key the
/// snapshot installs will not install its own (older) result afterwards. Workers run under
/// `tasks`. Returns the number of rows loaded.
#[allow(clippy::too_many_arguments)]
pub async fn warm(
    pg: &PostgresConfig,
    snapshot: &str,
    cp: Lsn,
    keyspaces: &[Arc<Keyspace>],
    hlc: &Arc<Hlc>,
    metrics: &Metrics,
    max_key_bytes: usize,
    tasks: &Tasks,
) -> Result<u64, CdcError> {
    if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(CdcError::Protocol(format!("unexpected snapshot name {snapshot:?}")));
    }
    let read_at = tokio::time::Instant::now();
    let begin = format!("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'");
    // One transaction per COPY stream, every one in the same exported snapshot (see
    // `warm_one`).
    let mut txs = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        match ReadOnly::begin(pg, tasks, &begin).await {
            Ok(tx) => txs.push(tx),
            Err(e) => {
                for tx in txs {
                    let _ = tx.end(Ok(())).await;
                }
                return Err(e);
            }
        }
    }
    let result = async {
        let version = Version {
            lsn: cp,
            snapshot: None,
            read_at,
            blocker: Blocker::Cdc,
        };
        let clients: Vec<&tokio_postgres::Client> = txs.iter().map(|t| &t.client).collect();
        let mut total = 0;
        for ks in keyspaces {
            total += warm_one(&clients, ks, &version, hlc, metrics, max_key_bytes, tasks).await?;
        }
        Ok(total)
    }
    .await;
    let mut txs = txs.into_iter();
    let first = txs.next().expect("at least one stream");
    for tx in txs {
        // Read-only: whether the others commit changes nothing; the first one's answer is the load's.
        let _ = tx.end(Ok(())).await;
    }
    first.end(result).await
}

/// Reloads one keyspace from a fresh repeatable-read snapshot while the stream runs; its rows
/// carry the snapshot's visibility, so each is installed only over changes it saw. The keyspace
/// is marked with `Blocker::Schema` while it loads. Returns the number of rows loaded.
pub async fn reload(
    pg: &PostgresConfig,
    ks: &Arc<Keyspace>,
    hlc: &Arc<Hlc>,
    metrics: &Metrics,
    max_key_bytes: usize,
    tasks: &Tasks,
) -> Result<u64, CdcError> {
    let read_at = tokio::time::Instant::now();
    let tx = ReadOnly::begin(pg, tasks, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
    let result = async {
        // The first statement takes the transaction's snapshot; the position is read inside it.
        let row = tx
            .client
            .query_one("SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| CdcError::Source(classify(&e)))?;
        let (snap, lsn): (String, String) = (row.get(0), row.get(1));
        let version = Version {
            lsn: lsn
                .parse()
                .map_err(|_| CdcError::Protocol(format!("unexpected WAL position {lsn:?}")))?,
            snapshot: Some(Arc::new(
                Snapshot::parse(&snap).ok_or_else(|| CdcError::Protocol(format!("unexpected snapshot {snap:?}")))?,
            )),
            read_at,
            blocker: Blocker::Schema,
        };
        warm_one(&[&tx.client], ks, &version, hlc, metrics, max_key_bytes, tasks).await
    }
    .await;
    tx.end(result).await
}

/// A read-only transaction on a connection of its own, for one load.
struct ReadOnly {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl ReadOnly {
    /// Connects and runs `begin` (the statements that open the transaction).
    async fn begin(pg: &PostgresConfig, tasks: &Tasks, begin: &str) -> Result<ReadOnly, CdcError> {
        let (client, conn) = connection_config(pg)?
            .connect(NoTls)
            .await
            .map_err(|e| CdcError::Source(classify(&e)))?;
        let tx = ReadOnly {
            client,
            driver: tasks.spawn(conn),
        };
        match tx.client.batch_execute(begin).await {
            Ok(()) => Ok(tx),
            Err(e) => tx.end(Err(CdcError::Source(classify(&e)))).await,
        }
    }

    /// Commits when the load succeeded, then closes the connection.
    async fn end<T>(self, result: Result<T, CdcError>) -> Result<T, CdcError> {
        let result = match result {
            Ok(v) => self
                .client
                .batch_execute("COMMIT")
                .await
                .map(|_| v)
                .map_err(|e| CdcError::Source(classify(&e))),
            e => e,
        };
        drop(self.client);
        let _ = self.driver.await;
        result
    }
}

/// The version every row of one load is installed at.
struct Version {
    /// The position the rows are at: a slot's consistent point, or a position read inside the
    /// snapshot.
    lsn: Lsn,
    /// For an ordinary snapshot: what it could not see.
    snapshot: Option<Arc<Snapshot>>,
    /// When the snapshot was taken: the rows are fresh as of then.
    read_at: tokio::time::Instant,
    /// What the keyspace reports while it loads.
    blocker: Blocker,
}

/// What every load worker of one keyspace needs.
struct Job {
    ks: Arc<Keyspace>,
    source: Arc<crate::source::postgres::TableSource>,
    key_index: Vec<usize>,
    cp: Lsn,
    snapshot: Option<Arc<Snapshot>>,
    read_at: tokio::time::Instant,
    hlc: Arc<Hlc>,
    max_key_bytes: usize,
    rows: std::sync::atomic::AtomicU64,
    rows_metric: prometheus::IntCounter,
}

impl Job {
    /// Parses, renders and installs every row of a batch of whole COPY lines.
    async fn install(&self, batch: &[u8]) -> Result<(), CdcError> {
        let b = self.source.binding();
        let mut fields: Vec<Option<Cow<'_, str>>> = Vec::with_capacity(b.fields.len());
        let mut value = Vec::with_capacity(256);
        let mut n = 0;
        // Every row starts its TTL life when the snapshot was read, the time it is fresh as of
        // (its `Age` counts from there): one time for the whole load, which the compact store
        // keeps without a box per row. Versions are taken row by row (see below).
        let stored_at = self.read_at;
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', batch).chain(std::iter::once(batch.len()));
        for end in ends {
            let line = &batch[start..end];
            start = end + 1;
            if line.is_empty() {
                continue;
            }
            parse_copy_line(line, &mut fields)
                .ok_or_else(|| CdcError::Protocol(format!("malformed COPY row from {}", b.table)))?;
            if fields.len() != b.fields.len() {
                return Err(CdcError::Protocol(format!(
                    "COPY row from {} has {} columns, expected {}",
                    b.table,
                    fields.len(),
                    b.fields.len()
                )));
            }
            if self.key_index.iter().any(|i| fields[*i].is_none()) {
                return Err(CdcError::Protocol(format!("NULL key in {}", b.table)));
            }
            let key = key::cache_key_of_row(
                b.key
                    .iter()
                    .zip(&self.key_index)
                    .map(|(k, i)| (k, fields[*i].as_deref().unwrap_or_default())),
                self.max_key_bytes,
            )
            .map_err(|e| CdcError::Protocol(e.to_string()))?;
            value.clear();
            self.source
                .render_texts(fields.iter().map(|v| v.as_deref()), &mut value);
            // A version of its own, taken as the row is installed: a change streamed meanwhile
            // (an earlier version) must never look newer than the row that supersedes it.
            let mut entry = Entry::stored(
                Some(bytes::Bytes::copy_from_slice(&value)),
                self.cp,
                self.hlc.now(),
                stored_at,
            )
            .read_at(stored_at);
            entry.snapshot = self.snapshot.clone();
            // Through the door: a change streamed or written meanwhile (newer) is never
            // overwritten, and a load in flight for the key will not install over this row. Not
            // a change: nothing to announce.
            self.ks.mutate_local(key, entry).await;
            n += 1;
        }
        self.rows.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.rows_metric.inc_by(n);
        Ok(())
    }
}

/// Bytes of whole COPY lines handed to a worker at a time.
const BATCH_BYTES: usize = 256 * 1024;
/// COPY streams a warm start reads a large table with (see `warm_one`).
const STREAMS: usize = 2;
/// Tables of fewer pages (8 KiB each) are read by one stream.
const SPLIT_PAGES: i64 = 1024;

async fn warm_one(
    clients: &[&tokio_postgres::Client],
    ks: &Arc<Keyspace>,
    version: &Version,
    hlc: &Arc<Hlc>,
    metrics: &Metrics,
    max_key_bytes: usize,
    tasks: &Tasks,
) -> Result<u64, CdcError> {
    let source = ks.source()?;
    let b = source.binding();
    let key_index: Vec<usize> = b
        .key
        .iter()
        .map(|k| {
            b.fields.iter().position(|f| f.column.name == k.name).ok_or_else(|| {
                CdcError::Setup(format!(
                    "keyspace {}: key column `{}` is not an output column",
                    b.keyspace, k.name
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let cols = b
        .fields
        .iter()
        .map(|f| quote_ident(&f.column.name))
        .collect::<Vec<_>>()
        .join(", ");
    let first = clients[0];
    // The planner's row estimate sizes the cache's tables once instead of growing them; the
    // table's size in pages and the server's version decide whether the load is split.
    let (pages, tid_ranges) = match first
        .query_one(
            "SELECT greatest(reltuples, 0)::float8, greatest(relpages, 0)::int8, \
                    current_setting('server_version_num')::int >= 140000 AND relkind IN ('r', 'm') \
             FROM pg_class WHERE oid = $1::text::regclass",
            &[&qualified(&b.table)],
        )
        .await
    {
        Ok(row) => {
            ks.reserve(row.get::<_, f64>(0) as usize);
            (row.get::<_, i64>(1), row.get::<_, bool>(2))
        }
        Err(_) => (0, false),
    };
    // A large table is read by several COPY streams at once, each over its own range of the
    // table's pages (a TID range scan, Postgres 14+), each in the same snapshot: every row the
    // snapshot sees lives in exactly one page, so each is read once. The last range is open, so
    // pages added since the estimate are read too. Only a plain table or a materialized view is
    // split (a view, a partitioned or a foreign table has no pages of its own to range over).
    let streams = if tid_ranges && pages >= SPLIT_PAGES {
        clients.len()
    } else {
        1
    };
    let select = format!("SELECT {cols} FROM {}", qualified(&b.table));
    let sqls: Vec<String> = (0..streams)
        .map(|i| {
            let from = pages * i as i64 / streams as i64;
            let to = pages * (i as i64 + 1) / streams as i64;
            match (i, streams) {
                (_, 1) => format!("COPY ({select}) TO STDOUT"),
                (0, _) => format!("COPY ({select} WHERE ctid < '({to},0)'::tid) TO STDOUT"),
                (i, n) if i + 1 == n => format!("COPY ({select} WHERE ctid >= '({from},0)'::tid) TO STDOUT"),
                _ => format!("COPY ({select} WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid) TO STDOUT"),
            }
        })
        .collect();
    ks.set_blocker(
        version.blocker,
        Some(match version.blocker {
            Blocker::Schema => "reloading from a new snapshot after its table changed".into(),
            _ => "warming from a consistent snapshot".into(),
        }),
    );

    // One worker per core parses, renders and installs; the streams' tasks only cut whole
    // lines. A consistent snapshot has one row per key, so batches can go to any worker.
    let job = Arc::new(Job {
        ks: ks.clone(),
        source: source.clone(),
        key_index,
        cp: version.lsn,
        snapshot: version.snapshot.clone(),
        read_at: version.read_at,
        hlc: hlc.clone(),
        max_key_bytes,
        rows: Default::default(),
        rows_metric: metrics.cdc_snapshot_rows.with_label_values(&[ks.name()]),
    });
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let mut senders = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let job = job.clone();
        senders.push(tx);
        handles.push(tasks.spawn(async move {
            while let Some(batch) = rx.recv().await {
                job.install(&batch).await?;
            }
            Ok::<(), CdcError>(())
        }));
    }

    let started = Instant::now();
    let readers = clients.iter().zip(&sqls).enumerate().map(|(i, (client, sql))| {
        let senders = &senders;
        let job = &job;
        async move {
            let stream = client
                .copy_out(sql.as_str())
                .await
                .map_err(|e| CdcError::Source(classify(&e)))?;
            // Each stream starts at another worker.
            cut_lines(stream, senders, i, || {
                // One stream reports for the load.
                if i == 0 {
                    let rows = job.rows.load(std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        keyspace = job.ks.name(),
                        rows,
                        rows_per_second = (rows as f64 / started.elapsed().as_secs_f64()) as u64,
                        "warm load in progress"
                    );
                }
            })
            .await
        }
    });
    let read = futures::future::try_join_all(readers).await;
    drop(senders);
    let mut worker_result = Ok(());
    for h in handles {
        let r = h
            .await
            .map_err(|e| CdcError::Setup(format!("warm load worker failed: {e}")))
            .and_then(|r| r);
        if worker_result.is_ok() {
            worker_result = r;
        }
    }
    // A worker's own error says more than the stream's "worker stopped early".
    worker_result?;
    read?;
    let rows = job.rows.load(std::sync::atomic::Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        keyspace = ks.name(),
        rows,
        streams,
        seconds = secs,
        rows_per_second = (rows as f64 / secs.max(1e-9)) as u64,
        "warm load done"
    );
    Ok(rows)
}

/// Reads one COPY stream and hands whole lines, about [`BATCH_BYTES`] at a time, to the
/// workers in turn, from worker `next` on; `progress` runs every [`PROGRESS_EVERY`] (the clock
/// is read once a batch).
async fn cut_lines(
    stream: tokio_postgres::CopyOutStream,
    senders: &[tokio::sync::mpsc::Sender<bytes::Bytes>],
    mut next: usize,
    progress: impl Fn(),
) -> Result<(), CdcError> {
    futures::pin_mut!(stream);
    let mut last_report = Instant::now();
    let mut pending = bytes::BytesMut::with_capacity(2 * BATCH_BYTES);
    loop {
        let chunk = stream.next().await;
        let done = chunk.is_none();
        if let Some(c) = chunk {
            pending.extend_from_slice(&c.map_err(|e| CdcError::Source(classify(&e)))?);
        }
        if pending.len() >= BATCH_BYTES || done {
            let cut = if done {
                pending.len()
            } else {
                memchr::memrchr(b'\n', &pending).map_or(0, |i| i + 1)
            };
            if cut > 0 {
                let batch = pending.split_to(cut).freeze();
                if senders[next % senders.len()].send(batch).await.is_err() {
                    return Err(CdcError::Setup("a warm load worker stopped early".into()));
                }
                next += 1;
            }
            // The clock is read once a batch, not once a row (each chunk is one row).
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                progress();
            }
        }
        if done {
            return Ok(());
        }
    }
}

/// Splits one line of COPY text output into fields (`None` for `\N`), undoing its escapes. A
/// field without escapes is borrowed from the line.
pub fn parse_copy_line<'a>(line: &'a [u8], out: &mut Vec<Option<Cow<'a, str>>>) -> Option<()> {
    out.clear();
    if memchr::memchr(b'\\', line).is_none() {
        // No escapes and no NULL (`\N`), the common line: every field borrowed, the line
        // checked as UTF-8 once (a tab never splits a character, so each field is a `str`).
        let text = std::str::from_utf8(line).ok()?;
        let mut start = 0;
        for tab in memchr::memchr_iter(b'\t', line) {
            out.push(Some(Cow::Borrowed(&text[start..tab])));
            start = tab + 1;
        }
        out.push(Some(Cow::Borrowed(&text[start..])));
        return Some(());
    }
    for field in line.split(|&c| c == b'\t') {
        if field == b"\\N" {
            out.push(None);
            continue;
        }
        if !field.contains(&b'\\') {
            out.push(Some(Cow::Borrowed(std::str::from_utf8(field).ok()?)));
            continue;
        }
        let mut v = Vec::with_capacity(field.len());
        let mut i = 0;
        while i < field.len() {
            let c = field[i];
            if c != b'\\' {
                v.push(c);
                i += 1;
                continue;
            }
            let e = *field.get(i + 1)?;
            i += 2;
            match e {
                b'b' => v.push(8),
                b'f' => v.push(12),
                b'n' => v.push(b'\n'),
                b'r' => v.push(b'\r'),
                b't' => v.push(b'\t'),
                b'v' => v.push(11),
                b'0'..=b'7' => {
                    let mut n = (e - b'0') as u32;
                    for _ in 0..2 {
                        match field.get(i) {
                            Some(d @ b'0'..=b'7') => {
                                n = n * 8 + (d - b'0') as u32;
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    v.push(n as u8);
                }
                b'x' => {
                    let mut n = 0u32;
                    let mut digits = 0;
                    while digits < 2 {
                        match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                            Some(d) => {
                                n = n * 16 + d;
                                i += 1;
                                digits += 1;
                            }
                            None => break,
                        }
                    }
                    v.push(n as u8);
                }
                other => v.push(other),
            }
        }
        out.push(Some(Cow::Owned(String::from_utf8(v).ok()?)));
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_unescape() {
        let mut out = Vec::new();
        parse_copy_line(b"1\t\\N\ta\\tb\\nc\\\\d\t\\101\\x42", &mut out).unwrap();
        assert_eq!(
            out,
            vec![Some("1".into()), None, Some("a\tb\nc\\d".into()), Some("AB".into())]
        );
        parse_copy_line(b"", &mut out).unwrap();
        assert_eq!(out, vec![Some(Cow::Borrowed(""))]);
        // A line with no backslash: every field borrowed, empty ones kept.
        parse_copy_line("7\t\tpår\t".as_bytes(), &mut out).unwrap();
        assert_eq!(
            out,
            vec![Some("7".into()), Some("".into()), Some("pår".into()), Some("".into())]
        );
        assert!(out.iter().all(|f| matches!(f, Some(Cow::Borrowed(_)))));
        // Bytes that are not UTF-8 are refused, with or without escapes in the line.
        assert!(parse_copy_line(b"1\t\xff", &mut out).is_none());
        assert!(parse_copy_line(b"\\N\t\xff", &mut out).is_none());
    }
}
