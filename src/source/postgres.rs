//! Postgres as a source: the connection pool, and [`TableSource`], which loads, upserts and
//! deletes one keyspace's rows with prepared statements.
//!
//! Sessions are opened with `TimeZone=UTC` and `DateStyle=ISO` so values print the same way on
//! every connection, and with the configured `statement_timeout`. Errors are classified once,
//! here, into [`SourceError`]; when Postgres rejects a row's data without naming the column
//! (`invalid input syntax for type integer`), each field is probed on its own to name it.

pub mod config;
pub mod copy;
pub mod fields;
pub mod render;
pub mod schema;
pub mod sql;
pub mod sqlstate;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use bytes::Bytes;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use serde_json::{Map, Value};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::SourceError;
use crate::cache::{Condition, Tags};
use crate::lsn::Lsn;
use crate::source::postgres::config::PostgresConfig;
use fields::{FieldValue, Fields};
use schema::Binding;
use sqlstate::Fault;

/// Most distinct upsert column sets whose SQL is kept per keyspace; others are built per call.
const MAX_CACHED_UPSERTS: usize = 64;

/// Fewest rows of a batch upsert that are `COPY`ed into a staging table; fewer go as one JSON
/// array bound to the statement, one round trip instead of three.
pub const COPY_MIN_ROWS: usize = 32;

/// Most batches an insert-first ([`TableSource::upsert_rows`]) is skipped for after a
/// conflict: the skip doubles with each conflict in a row, up to this.
const INSERT_FIRST_MAX_SKIP: u32 = 64;

/// The savepoint an insert-first rolls back to when a key exists already.
const INSERT_FIRST_SAVEPOINT: &str = "SAVEPOINT cachesync_insert_first";
const INSERT_FIRST_ROLLBACK: &str = "ROLLBACK TO SAVEPOINT cachesync_insert_first";

/// Builds the driver's connection settings from the configuration, with the session options
/// every cachesync connection uses.
pub fn connection_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, SourceError> {
    let mut pg: tokio_postgres::Config = cfg
        .url
        .expose()
        .parse()
        .map_err(|_| SourceError::Unavailable("postgres.url is not a valid connection string".into()))?;
    let mut options = pg.get_options().map(|o| format!("{o} ")).unwrap_or_default();
    options.push_str(&format!(
        "-c TimeZone=UTC -c DateStyle=ISO -c statement_timeout={}",
        cfg.statement_timeout.as_millis()
    ));
    pg.options(&options);
    pg.connect_timeout(cfg.connect_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name("cachesync");
    }
    Ok(pg)
}

/// The pool of ordinary (non-replication) connections.
pub struct PgPool {
    pool: Pool,
    acquire_timeout: std::time::Duration,
}

impl PgPool {
    /// Builds the pool. No connection is opened until one is needed.
    pub fn new(cfg: &PostgresConfig) -> Result<PgPool, SourceError> {
        let pg = connection_config(cfg)?;
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.acquire_timeout))
            .create_timeout(Some(cfg.connect_timeout))
            .recycle_timeout(Some(cfg.connect_timeout))
            .build()
            .map_err(|e| SourceError::Unavailable(format!("cannot build the connection pool: {e}")))?;
        Ok(PgPool {
            pool,
            acquire_timeout: cfg.acquire_timeout,
        })
    }

    /// A pooled connection, or `Unavailable` when none can be had in time.
    pub async fn get(&self) -> Result<deadpool_postgres::Object, SourceError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Timeout(_) => SourceError::Unavailable(format!(
                "no database connection became available within {}",
                humantime::format_duration(self.acquire_timeout)
            )),
            PoolError::Backend(e) => classify(&e),
            other => SourceError::Unavailable(other.to_string()),
        })
    }

    pub fn status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }
}

/// Maps a driver error to what the caller can act on, by the one SQLSTATE classification
/// ([`sqlstate`]).
pub fn classify(e: &tokio_postgres::Error) -> SourceError {
    let Some(db) = e.as_db_error() else {
        // No server response: the connection is gone or could not be made.
        return SourceError::Unavailable(e.to_string());
    };
    let code = db.code().code();
    let message = match db.detail() {
        Some(d) => format!("{} ({d})", db.message()),
        None => db.message().to_string(),
    };
    match sqlstate::fault_of(code) {
        Fault::Data if sqlstate::is_constraint(code) => SourceError::Conflict {
            message,
            constraint: db.constraint().map(str::to_string),
        },
        Fault::Data => SourceError::Rejected(format!("{message} [SQLSTATE {code}]")),
        Fault::Transient => SourceError::Unavailable(message),
        Fault::Schema => SourceError::SchemaChanged(format!("{message} [SQLSTATE {code}]")),
        Fault::Server if code == "42P01" => SourceError::SchemaChanged(format!("{message} [SQLSTATE {code}]")),
        Fault::Server => SourceError::Database(format!("{message} [SQLSTATE {code}]")),
    }
}

/// Why one write failed: its precondition, or the database.
enum Failed {
    Precondition(String),
    Db(tokio_postgres::Error),
}

/// One item of a batch write.
enum BatchOp<'a> {
    Upsert(&'a [String], &'a Map<String, Value>, &'a Condition),
    Delete(&'a [String], &'a Condition),
}

/// What one item of a batch did.
enum Done {
    Written(Written),
    Deleted(Option<Deleted>),
}

/// Why one item of a batch failed.
enum ItemError {
    /// Refused before any statement ran (validation).
    Refused(SourceError),
    /// A statement failed; what to probe to name the cause once its savepoint is rolled back.
    Failed(Failed, Explain),
}

/// What a failed statement's error is pinned to.
enum Explain {
    /// A field of this row (a value that does not fit its column).
    Row(Map<String, Value>),
    /// A component of this key.
    Key(Vec<String>),
}

/// Whether `cond` must be checked against the locked row (a create-only write is checked by its
/// insert).
fn needs_lock(cond: &Condition) -> bool {
    !matches!(cond, Condition::Always | Condition::IfNoneMatch(Tags::Any))
}

/// Why `cond` failed for `current`, in the client's terms.
pub fn describe(cond: &Condition, current: Option<&[u8]>) -> String {
    match (cond, current) {
        (Condition::IfMatch(_), None) => "there is no entry to match (If-Match)".into(),
        (Condition::IfMatch(_), Some(d)) => format!("the entry's ETag is {} (If-Match)", crate::cache::etag(d)),
        (Condition::IfNoneMatch(Tags::Any), _) => "the key exists (If-None-Match: *)".into(),
        (_, Some(d)) => format!("the entry's ETag {} matches (If-None-Match)", crate::cache::etag(d)),
        _ => "the precondition does not hold".into(),
    }
}

/// Why a batch statement failed.
#[derive(Debug)]
pub enum BatchError {
    Db(tokio_postgres::Error),
    /// The rows do not fit the keyspace any more (a field no longer mapped).
    Invalid(String),
}

/// One row as the cache stores it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The rendered document, `None` when there is no such row.
    pub value: Option<Bytes>,
    /// WAL insert position read just after the load's snapshot was taken.
    pub lsn: Lsn,
    /// What the load's snapshot could not see (`pg_current_snapshot()`).
    pub snapshot: Option<crate::cache::Snapshot>,
}

/// The stored row after a write.
#[derive(Debug, Clone)]
pub struct Written {
    pub value: Bytes,
    /// WAL insert position read inside the writing statement, after the row was locked: for two
    /// writes of one row, the later-committed one has the larger position.
    pub lsn: Lsn,
    /// The writing transaction's id (low 32 bits, as pgoutput reports it).
    pub xid: Option<u32>,
}

/// What a delete did.
#[derive(Debug, Clone, Copy)]
pub struct Deleted {
    pub lsn: Lsn,
    pub xid: Option<u32>,
}

fn parse_lsn(text: Option<&str>) -> Lsn {
    text.and_then(|t| t.parse().ok()).unwrap_or(Lsn::ZERO)
}

/// `pg_current_xact_id()` text (a 64-bit xid) as the 32-bit xid pgoutput uses.
fn parse_xid(text: Option<&str>) -> Option<u32> {
    text.and_then(|t| t.parse::<u64>().ok()).map(|x| x as u32)
}

/// Where a transaction's upserts as written ([`TableSource::upsert_rows`]) stand, read in the
/// transaction after them: the WAL insert position and the transaction id their rows take, and
/// which of `tables` (OIDs) store rows other than as written after all — a rewriting trigger
/// created since their bindings were read ([`sql::written_stamp`]).
pub async fn written_stamp(
    tx: &impl GenericClient,
    tables: &[u32],
) -> Result<(Lsn, Option<u32>, Vec<u32>), tokio_postgres::Error> {
    let oids: Vec<i64> = tables.iter().map(|&t| i64::from(t)).collect();
    static STAMP: std::sync::LazyLock<String> = std::sync::LazyLock::new(sql::written_stamp);
    let stmt = tx.prepare_cached(&STAMP).await?;
    let row = tx.query_one(&stmt, &[&oids]).await?;
    let rewriting = row.get::<_, Vec<i64>>(2).into_iter().map(|o| o as u32).collect();
    Ok((parse_lsn(row.get(0)), parse_xid(row.get(1)), rewriting))
}

/// One keyspace's table, ready to load and write rows.
pub struct TableSource {
    pool: Arc<PgPool>,
    binding: Binding,
    select: String,
    delete: String,
    delete_rows: String,
    probe: String,
    ensure_stage: String,
    upserts: Mutex<HashMap<String, Arc<str>>>,
    /// Each output field's `"name":`, rendered once for every row this source renders.
    keys: Vec<render::FieldKey>,
    /// For each output field, its position in the key when its column is a key column.
    key_part: Vec<Option<usize>>,
    /// Whether the next upsert as written is tried as a plain `COPY` into the table first.
    insert_first: InsertFirst,
}

/// One row of a set-based upsert: its key components and the fields it writes.
pub type UpsertRow<'a> = (&'a [String], &'a Fields);

/// The rows of one set-based upsert as `COPY` text, in chunks: rendered ahead of the
/// transaction that sends them ([`TableSource::copy_text`]), so the flusher renders the next
/// batch while Postgres stores this one.
#[derive(Debug)]
pub struct CopyText {
    chunks: Vec<Bytes>,
    rows: usize,
}

impl CopyText {
    /// The rows it holds.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Size of the chunks `COPY` text is sent in: small enough that Postgres parses the first
/// while the next are on their way.
const COPY_CHUNK: usize = 8 * 1024;

/// How an upsert of many rows ([`TableSource::upsert_rows`]) went.
#[derive(Debug)]
pub enum Upsert {
    /// Postgres sent back the rows it stored.
    Returned(Vec<tokio_postgres::Row>),
    /// The rows are stored exactly as written; nothing was sent back. `inserted_first`: `None`
    /// when no plain insert was tried, `Some(true)` when every row was new and went in by
    /// `COPY` straight into the table, `Some(false)` when a key existed and the upsert ran after.
    AsWritten { inserted_first: Option<bool> },
}

/// When to try an upsert as written as a plain `COPY` into the table first — half of
/// Postgres's work for rows whose keys are all new (no staging table, no `ON CONFLICT`
/// probe), wasted up to the first existing key otherwise. After a conflict it is skipped for
/// a number of batches that doubles with each conflict in a row (up to
/// [`INSERT_FIRST_MAX_SKIP`]), so a table whose writes are mostly updates pays for it rarely.
#[derive(Debug, Default)]
struct InsertFirst {
    /// Batches still to skip.
    skip: std::sync::atomic::AtomicU32,
    /// The skip after the last conflict (0: the last try inserted).
    penalty: std::sync::atomic::AtomicU32,
}

impl InsertFirst {
    /// Whether to try now (counting a skipped batch when not).
    fn try_now(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.skip.fetch_update(Relaxed, Relaxed, |s| s.checked_sub(1)).is_err()
    }

    fn inserted(&self) {
        self.penalty.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn conflicted(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let penalty = (self.penalty.load(Relaxed) * 2).clamp(1, INSERT_FIRST_MAX_SKIP);
        self.penalty.store(penalty, Relaxed);
        self.skip.store(penalty, Relaxed);
    }
}

impl TableSource {
    /// The pool the source queries through.
    pub fn pool(&self) -> &Arc<PgPool> {
        &self.pool
    }

    pub fn new(pool: Arc<PgPool>, binding: Binding) -> TableSource {
        TableSource {
            select: sql::select_by_key(&binding),
            delete_rows: sql::delete_rows(&binding),
            delete: sql::delete_by_key(&binding),
            probe: sql::probe_column(&binding),
            ensure_stage: sql::ensure_stage_table(&binding),
            upserts: Mutex::new(HashMap::new()),
            keys: binding.fields.iter().map(|f| render::field_key(&f.name)).collect(),
            key_part: binding
                .fields
                .iter()
                .map(|f| binding.key.iter().position(|k| k.name == f.column.name))
                .collect(),
            insert_first: InsertFirst::default(),
            pool,
            binding,
        }
    }

    pub fn binding(&self) -> &Binding {
        &self.binding
    }

    /// Appends the keyspace's document for a row given the text of its output fields, in the
    /// binding's order (a returned row's columns, a COPY line's fields).
    pub fn render_texts<'a>(&self, texts: impl IntoIterator<Item = Option<&'a str>>, out: &mut Vec<u8>) {
        let fields = self.binding.fields.iter().zip(&self.keys).zip(texts);
        render::render_object(fields.map(|((f, key), text)| (key, &f.column.kind, text)), out);
    }

    fn render_row(&self, row: &tokio_postgres::Row, first: usize) -> Bytes {
        let mut out = Vec::with_capacity(128);
        let texts = (0..self.binding.fields.len()).map(|i| row.get::<_, Option<&str>>(first + i));
        self.render_texts(texts, &mut out);
        Bytes::from(out)
    }

    /// Loads the row with this key (components already normalized, in key order).
    pub async fn load(&self, key: &[String]) -> Result<Loaded, SourceError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(&self.select).await.map_err(|e| classify(&e))?;
        let params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        match client.query(&stmt, &params).await {
            Ok(rows) => match rows.as_slice() {
                [row] => Ok(Loaded {
                    lsn: parse_lsn(row.get(0)),
                    snapshot: row.get::<_, Option<&str>>(1).and_then(crate::cache::Snapshot::parse),
                    value: row.get::<_, Option<bool>>(2).is_some().then(|| self.render_row(row, 3)),
                }),
                // Only a view can do this: a table's key is checked to be unique at binding.
                _ => Err(SourceError::Database(format!(
                    "{} rows of {} have this key; a keyspace key must identify one row",
                    rows.len(),
                    self.binding.table
                ))),
            },
            Err(e) if sqlstate::is_value_error(&e) => Err(self.blame_key(&client, key).await),
            Err(e) => Err(classify(&e)),
        }
    }

    /// Deletes the row with this key if `cond` holds for it (checked under the row's lock);
    /// `None` when there was none.
    pub async fn delete(&self, key: &[String], cond: &Condition) -> Result<Option<Deleted>, SourceError> {
        let mut client = self.pool.get().await?;
        let deleted = if needs_lock(cond) {
            let tx = client.transaction().await.map_err(|e| classify(&e))?;
            match self.delete_on(&tx, key, cond).await {
                Ok(r) => tx.commit().await.map(|_| r).map_err(Failed::Db),
                Err(e) => Err(e),
            }
        } else {
            self.delete_on(&client, key, cond).await
        };
        match deleted {
            Ok(d) => Ok(d),
            Err(f) => Err(self.key_failure(&client, f, key).await),
        }
    }

    /// Deletes many rows in one transaction, each under its own savepoint and precondition (see
    /// [`TableSource::upsert_many`]). One result per item, in order.
    pub async fn delete_many(&self, items: &[(Vec<String>, Condition)]) -> Vec<Result<Option<Deleted>, SourceError>> {
        let ops: Vec<BatchOp<'_>> = items.iter().map(|(k, c)| BatchOp::Delete(k, c)).collect();
        self.per_item(&ops)
            .await
            .into_iter()
            .map(|r| {
                r.and_then(|done| match done {
                    Done::Deleted(d) => Ok(d),
                    Done::Written(_) => Err(SourceError::Database("a delete answered as an upsert".into())),
                })
            })
            .collect()
    }

    async fn delete_on(
        &self,
        client: &impl GenericClient,
        key: &[String],
        cond: &Condition,
    ) -> Result<Option<Deleted>, Failed> {
        if needs_lock(cond) {
            let current = self.locked(client, key).await.map_err(Failed::Db)?;
            if !cond.holds(current.as_deref()) {
                return Err(Failed::Precondition(describe(cond, current.as_deref())));
            }
        }
        let params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        let stmt = client.prepare_cached(&self.delete).await.map_err(Failed::Db)?;
        let row = client.query_opt(&stmt, &params).await.map_err(Failed::Db)?;
        Ok(row.map(|r| Deleted {
            lsn: parse_lsn(r.get(0)),
            xid: parse_xid(r.get(1)),
        }))
    }

    /// What a failed delete answers: a precondition as such, a key that does not fit its column
    /// pinned to the component.
    async fn key_failure(&self, client: &impl GenericClient, f: Failed, key: &[String]) -> SourceError {
        match f {
            Failed::Precondition(why) => SourceError::PreconditionFailed(why),
            Failed::Db(e) if sqlstate::is_value_error(&e) => self.blame_key(client, key).await,
            Failed::Db(e) => classify(&e),
        }
    }

    /// Upserts the row with this key from a JSON object of fields (key fields optional), if
    /// `cond` holds for the row as stored (checked under the row's lock, or for a create-only
    /// write by the insert itself, so no other write slips in between). Returns what Postgres
    /// stored.
    pub async fn upsert(
        &self,
        key: &[String],
        body: &Map<String, Value>,
        cond: &Condition,
    ) -> Result<Written, SourceError> {
        let row = self.columns_of(key, body)?;
        self.check_values(body)?;
        let mut client = self.pool.get().await?;
        let stored = if needs_lock(cond) {
            let tx = client.transaction().await.map_err(|e| classify(&e))?;
            match self.upsert_on(&tx, key, &row, cond).await {
                Ok(r) => tx.commit().await.map(|_| r).map_err(Failed::Db),
                Err(e) => Err(e),
            }
        } else {
            self.upsert_on(&client, key, &row, cond).await
        };
        match stored {
            Ok(r) => Ok(self.written(&r)),
            Err(f) => Err(self.failure(&client, f, &row).await),
        }
    }

    /// Upserts many rows in one transaction — each item validated and conditioned like a
    /// single write, and run under its own savepoint, so an item Postgres refuses is answered
    /// on its own and the others still commit. One result per item, in order.
    pub async fn upsert_many(
        &self,
        items: &[(Vec<String>, Map<String, Value>, Condition)],
    ) -> Vec<Result<Written, SourceError>> {
        let ops: Vec<BatchOp<'_>> = items.iter().map(|(k, b, c)| BatchOp::Upsert(k, b, c)).collect();
        self.per_item(&ops)
            .await
            .into_iter()
            .map(|r| {
                r.and_then(|done| match done {
                    Done::Written(w) => Ok(w),
                    Done::Deleted(_) => Err(SourceError::Database("an upsert answered as a delete".into())),
                })
            })
            .collect()
    }

    /// One item of a batch, in the batch's transaction.
    async fn run_item(&self, tx: &deadpool_postgres::Transaction<'_>, op: &BatchOp<'_>) -> Result<Done, ItemError> {
        match *op {
            BatchOp::Upsert(key, body, cond) => {
                let row = self
                    .columns_of(key, body)
                    .and_then(|r| self.check_values(body).map(|_| r))
                    .map_err(ItemError::Refused)?;
                match self.upsert_on(tx, key, &row, cond).await {
                    Ok(r) => Ok(Done::Written(self.written(&r))),
                    Err(f) => Err(ItemError::Failed(f, Explain::Row(row))),
                }
            }
            BatchOp::Delete(key, cond) => self
                .delete_on(tx, key, cond)
                .await
                .map(Done::Deleted)
                .map_err(|f| ItemError::Failed(f, Explain::Key(key.to_vec()))),
        }
    }

    /// Runs each item in one transaction under its own savepoint: an item that fails is rolled
    /// back alone (then explained: a value pinned to its field, a key to its component) and the
    /// others commit together. One result per item, in order; if the transaction itself fails,
    /// every item fails with it.
    async fn per_item(&self, items: &[BatchOp<'_>]) -> Vec<Result<Done, SourceError>> {
        let all = |e: SourceError| items.iter().map(|_| Err(e.clone())).collect();
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => return all(e),
        };
        let tx = match client.transaction().await {
            Ok(t) => t,
            Err(e) => return all(classify(&e)),
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Err(e) = tx.batch_execute("SAVEPOINT cachesync_item").await {
                return all(classify(&e));
            }
            let result = match self.run_item(&tx, item).await {
                Ok(v) => Ok(v),
                Err(ItemError::Refused(e)) => Err(e),
                Err(ItemError::Failed(f, what)) => {
                    // The failed statement aborted the savepoint: roll it back before probing.
                    if let Err(e) = tx.batch_execute("ROLLBACK TO SAVEPOINT cachesync_item").await {
                        return all(classify(&e));
                    }
                    Err(match what {
                        Explain::Row(row) => self.failure(&tx, f, &row).await,
                        Explain::Key(key) => self.key_failure(&tx, f, &key).await,
                    })
                }
            };
            out.push(result);
        }
        if let Err(e) = tx.commit().await {
            return all(classify(&e));
        }
        out
    }

    /// One upsert on `client` (a connection, or a transaction when `cond` needs the row's
    /// lock), returning the stored row.
    async fn upsert_on(
        &self,
        client: &impl GenericClient,
        key: &[String],
        row: &Map<String, Value>,
        cond: &Condition,
    ) -> Result<tokio_postgres::Row, Failed> {
        let columns: Vec<&str> = self
            .binding
            .fields
            .iter()
            .map(|f| f.column.name.as_str())
            .filter(|c| row.contains_key(*c))
            .collect();
        let json = Value::Object(row.clone()).to_string();
        if let Condition::IfNoneMatch(Tags::Any) = cond {
            let stmt = client
                .prepare_cached(&sql::insert_if_absent(&self.binding, &columns))
                .await
                .map_err(Failed::Db)?;
            return match client.query_opt(&stmt, &[&json]).await.map_err(Failed::Db)? {
                Some(r) => Ok(r),
                None => Err(Failed::Precondition("the key exists (If-None-Match: *)".into())),
            };
        }
        if needs_lock(cond) {
            let current = self.locked(client, key).await.map_err(Failed::Db)?;
            if !cond.holds(current.as_deref()) {
                return Err(Failed::Precondition(describe(cond, current.as_deref())));
            }
        }
        let stmt = client
            .prepare_cached(&self.upsert_sql(&columns, sql::Rows::One, false))
            .await
            .map_err(Failed::Db)?;
        client.query_one(&stmt, &[&json]).await.map_err(Failed::Db)
    }

    fn written(&self, r: &tokio_postgres::Row) -> Written {
        Written {
            lsn: parse_lsn(r.get(0)),
            xid: parse_xid(r.get(1)),
            value: self.render_row(r, 2),
        }
    }

    /// What a failed write answers: a precondition as such, a value error pinned to its field.
    async fn failure(&self, client: &impl GenericClient, f: Failed, row: &Map<String, Value>) -> SourceError {
        match f {
            Failed::Precondition(why) => SourceError::PreconditionFailed(why),
            Failed::Db(e) if sqlstate::is_value_error(&e) => self.blame_field(client, row, &e).await,
            Failed::Db(e) => classify(&e),
        }
    }

    /// The row with this key as stored, locked until `tx` ends; `None` when there is none.
    async fn locked(&self, tx: &impl GenericClient, key: &[String]) -> Result<Option<Bytes>, tokio_postgres::Error> {
        let stmt = tx.prepare_cached(&sql::select_for_update(&self.binding)).await?;
        let params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        let row = tx.query_opt(&stmt, &params).await?;
        Ok(row.map(|r| self.render_row(&r, 0)))
    }

    /// Checks a write's body against the binding (unknown fields, key fields that differ from
    /// the URL, generated columns) without writing anything.
    /// Also rejects values their column's type certainly refuses ([`validate`]).
    pub fn check_body(&self, key: &[String], body: &Map<String, Value>) -> Result<(), SourceError> {
        for (name, value) in body {
            self.writable_field(key, name, value)?;
        }
        self.check_values(body)
    }

    /// Rejects values their column's type certainly refuses ([`validate`]): the one check both
    /// write modes run before anything is written.
    fn check_values(&self, body: &Map<String, Value>) -> Result<(), SourceError> {
        for (name, value) in body {
            if let Some(f) = self.binding.field(name) {
                validate::check(&f.column, value).map_err(|message| SourceError::InvalidValue {
                    field: name.clone(),
                    column: f.column.name.clone(),
                    type_sql: f.column.type_sql.clone(),
                    message,
                })?;
            }
        }
        Ok(())
    }

    /// The text of a stored row's key columns (`None` when one is NULL, which a key never is).
    fn key_texts(texts: &[Option<&str>]) -> Option<Vec<String>> {
        texts.iter().map(|t| t.map(str::to_string)).collect()
    }

    /// Upserts many rows in one statement: each row its key components and the fields it writes
    /// (every row of one call writes the same fields). Returns the stored rows as Postgres sent
    /// them ([`TableSource::stored_entries`] makes them entries) — or, with `as_written` (rows
    /// [`TableSource::stores_as_written`] accepted and [`TableSource::written_doc`] rendered),
    /// nothing: Postgres is not asked to send back what the cache knows.
    ///
    /// With their `COPY` text ([`TableSource::copy_text`], for [`COPY_MIN_ROWS`] rows or more),
    /// the rows are `COPY`ed into the session's staging table and upserted from there:
    /// Postgres parses `COPY` text several times faster than a JSON array; without, they are
    /// bound as one JSON array. `staged` says whether the staging table already holds rows of
    /// this transaction (an earlier set of columns); it is emptied first then, and set when
    /// this call stages.
    ///
    /// Rows upserted as written are first `COPY`ed straight into the table, under a savepoint,
    /// when [`InsertFirst`] says so: if every key is new that is the whole upsert (an insert of
    /// a new key is what the upsert would do); if Postgres refuses any row (a key that exists,
    /// or anything else), the savepoint is rolled back and the upsert runs as above.
    pub async fn upsert_rows(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        rows: &[UpsertRow<'_>],
        copy: Option<&CopyText>,
        staged: &mut bool,
        as_written: bool,
    ) -> Result<Upsert, BatchError> {
        let Some((_, first)) = rows.first() else {
            return Ok(Upsert::Returned(Vec::new()));
        };
        let b = &self.binding;
        if let Some(name) = first.names().find(|name| b.field(name).is_none()) {
            return Err(BatchError::Invalid(format!(
                "field `{name}` is no longer mapped by keyspace {}",
                b.keyspace
            )));
        }
        let columns = self.upsert_columns(first);
        let mut inserted_first = None;
        if let Some(copy) = copy
            && as_written
            && self.insert_first.try_now()
        {
            if self.insert_new(tx, &columns, copy).await? {
                self.insert_first.inserted();
                return Ok(Upsert::AsWritten {
                    inserted_first: Some(true),
                });
            }
            self.insert_first.conflicted();
            inserted_first = Some(false);
        }
        let shape = if let Some(copy) = copy {
            self.stage(tx, &columns, copy, staged).await?;
            sql::Rows::Staged
        } else {
            sql::Rows::Many
        };
        let json = match shape {
            sql::Rows::Staged => None,
            _ => Some(self.rows_json(rows)?),
        };
        let params: Vec<&(dyn ToSql + Sync)> = json.iter().map(|j| j as &(dyn ToSql + Sync)).collect();
        let stmt = tx
            .prepare_cached(&self.upsert_sql(&columns, shape, as_written))
            .await
            .map_err(BatchError::Db)?;
        if !as_written {
            return Ok(Upsert::Returned(
                tx.query(&stmt, &params).await.map_err(BatchError::Db)?,
            ));
        }
        let n = tx.execute(&stmt, &params).await.map_err(BatchError::Db)?;
        self.check_stored(rows.len(), n)?;
        Ok(Upsert::AsWritten { inserted_first })
    }

    /// Every row of an `ON CONFLICT DO UPDATE` (or of a `COPY`) is stored; any other count
    /// means the table does not behave as the binding read it.
    fn check_stored(&self, rows: usize, stored: u64) -> Result<(), BatchError> {
        if stored == rows as u64 {
            return Ok(());
        }
        Err(BatchError::Invalid(format!(
            "an upsert of {rows} rows into {} stored {stored}",
            self.binding.table
        )))
    }

    /// `COPY`s the rows straight into the table under a savepoint: `true` if they are all
    /// stored (every key was new), `false` if Postgres refused them and the savepoint is rolled
    /// back (the transaction goes on as before). A lost connection is an error.
    async fn insert_new(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        columns: &[&str],
        copy: &CopyText,
    ) -> Result<bool, BatchError> {
        tx.batch_execute(INSERT_FIRST_SAVEPOINT).await.map_err(BatchError::Db)?;
        match Self::send_copy(tx, &sql::copy_into_table(&self.binding, columns), copy).await {
            Ok(n) => {
                self.check_stored(copy.rows(), n)?;
                Ok(true)
            }
            Err(e) if e.as_db_error().is_some() => {
                tx.batch_execute(INSERT_FIRST_ROLLBACK).await.map_err(BatchError::Db)?;
                Ok(false)
            }
            Err(e) => Err(BatchError::Db(e)),
        }
    }

    /// The table columns an upsert writing `fields` sets: the key's, then the written ones, in
    /// the binding's order.
    fn upsert_columns(&self, fields: &Fields) -> Vec<&str> {
        let b = &self.binding;
        b.fields
            .iter()
            .map(|f| f.column.name.as_str())
            .filter(|c| {
                b.key.iter().any(|k| k.name == *c)
                    || b.fields.iter().any(|f| f.column.name == *c && fields.contains(&f.name))
            })
            .collect()
    }

    /// Whether an upsert writing `fields` (the JSON fields every row of it writes) stores rows
    /// whose documents the cache can render without Postgres sending them back: the table
    /// stores rows as written (no rules, children or row triggers before insert or update, as
    /// the binding read it), the fields and the key cover every output field, and they set
    /// every column an insert needs — so no column of the document is left to a default or to
    /// the row's previous state. Each row must then also render ([`TableSource::written_doc`]).
    pub fn stores_as_written(&self, fields: &Fields) -> bool {
        let b = &self.binding;
        !b.rewrites_rows
            && b.fields
                .iter()
                .all(|f| fields.contains(&f.name) || b.key.iter().any(|k| k.name == f.column.name))
            && sql::complete(b, &self.upsert_columns(fields))
    }

    /// Each output field's written value, in the binding's order (`None`: not written; a key
    /// column's value is left out, as the key's text from the URL is what counts). A map read
    /// from a write's document holds its fields in the document's order, which is the
    /// binding's: it is walked in step, and looked up only for a field out of that order.
    fn values_in_order<'a>(&'a self, fields: &'a Fields) -> impl Iterator<Item = Option<FieldValue<'a>>> + 'a {
        let mut walk = fields.iter().peekable();
        self.binding
            .fields
            .iter()
            .zip(&self.key_part)
            .map(move |(f, key_part)| {
                let in_step = walk.next_if(|(name, _)| *name == f.name).map(|(_, v)| v);
                match key_part {
                    Some(_) => None,
                    None => in_step.or_else(|| fields.get(&f.name)),
                }
            })
    }

    /// The stored text of each output field of a row written as `key` and `fields`, in the
    /// binding's order (`None`: not knowable here).
    fn written_texts<'a>(
        &'a self,
        key: &'a [String],
        fields: &'a Fields,
    ) -> impl Iterator<Item = Option<schema::StoredText<'a>>> + 'a {
        self.values_in_order(fields)
            .zip(self.binding.fields.iter().zip(&self.key_part))
            .map(move |(value, (f, key_part))| match key_part {
                Some(k) => f.column.key_text(key.get(*k)?),
                None => f.column.stored_text(value?),
            })
    }

    /// The document Postgres stores for a row written as `key` and `fields` by an upsert as
    /// written (see [`TableSource::upsert_rows`]): rendered from the texts Postgres stores,
    /// exactly as from a returned row. `None` when a text is not knowable here
    /// ([`schema::ColumnMeta::stored_text`]; the key's columns take the key's text) — then
    /// Postgres must send the row back.
    ///
    /// The flusher renders each row when it plans its flush: the same pass decides whether the
    /// row is known and renders it, and settling only stamps it with the transaction's WAL
    /// position. Rendered in `scratch` (the caller's, reused row after row) and copied out at
    /// its exact size: one allocation a row.
    pub fn written_doc(&self, key: &[String], fields_of_row: &Fields, scratch: &mut Vec<u8>) -> Option<Bytes> {
        scratch.clear();
        let mut obj = render::ObjectWriter::new(scratch);
        let mut digits = itoa::Buffer::new();
        let fields = self.binding.fields.iter().zip(&self.keys);
        for (text, (f, name)) in self.written_texts(key, fields_of_row).zip(fields) {
            // As `render_texts` renders a returned row's text.
            render::render_value(&f.column.kind, text?.text(&mut digits), obj.keyed(name));
        }
        obj.finish();
        Some(Bytes::copy_from_slice(scratch))
    }

    /// The rows an upsert ([`TableSource::upsert_rows`]) returned, as entries (their version
    /// left for the caller), each with the text of its key columns. Kept apart from the upsert
    /// so the flusher renders them while Postgres runs its next batch.
    pub fn stored_entries(&self, rows: &[tokio_postgres::Row]) -> Vec<(Arc<str>, crate::cache::Entry)> {
        let b = &self.binding;
        // Where each key column is among the output fields; a key column that is not one
        // leaves its rows without a key (they are not installed).
        let key_fields: Vec<Option<usize>> = b
            .key
            .iter()
            .map(|k| b.fields.iter().position(|f| f.column.name == k.name))
            .collect();
        let stored_at = tokio::time::Instant::now();
        rows.iter()
            .filter_map(|r| {
                let mut texts = Vec::with_capacity(key_fields.len());
                for i in &key_fields {
                    texts.push(r.get::<_, Option<&str>>(2 + (*i)?)?);
                }
                let key = crate::key::cache_key_of_row(b.key.iter().zip(texts), usize::MAX).ok()?;
                let entry = crate::cache::Entry::stored(Some(self.render_row(r, 2)), parse_lsn(r.get(0)), 0, stored_at)
                    .with_xid(parse_xid(r.get(1)));
                Some((key, entry))
            })
            .collect()
    }

    /// The rows as a JSON array of objects by column name, written out directly.
    fn rows_json(&self, rows: &[UpsertRow<'_>]) -> Result<String, BatchError> {
        let b = &self.binding;
        let mut json = Vec::with_capacity(rows.len() * 128);
        json.push(b'[');
        for (i, (key, fields)) in rows.iter().enumerate() {
            json.extend_from_slice(if i == 0 { b"{" } else { b",{" });
            for (k, v) in b.key.iter().zip(key.iter()) {
                serde_json::to_writer(&mut json, &k.name).map_err(|e| BatchError::Invalid(e.to_string()))?;
                json.push(b':');
                serde_json::to_writer(&mut json, v).map_err(|e| BatchError::Invalid(e.to_string()))?;
                json.push(b',');
            }
            for (name, value) in fields.iter() {
                let f = b.field(name).ok_or_else(|| {
                    BatchError::Invalid(format!("field `{name}` is no longer mapped by keyspace {}", b.keyspace))
                })?;
                if b.key.iter().any(|k| k.name == f.column.name) {
                    continue; // the key's text from the URL is what counts
                }
                serde_json::to_writer(&mut json, &f.column.name).map_err(|e| BatchError::Invalid(e.to_string()))?;
                json.push(b':');
                value.write_json(&mut json);
                json.push(b',');
            }
            *json.last_mut().expect("a key column was written") = b'}';
        }
        json.push(b']');
        String::from_utf8(json).map_err(|e| BatchError::Invalid(e.to_string()))
    }

    /// `COPY`s the rows' `columns` into the session's staging table (created on first use,
    /// emptied first if this transaction staged rows already).
    async fn stage(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        columns: &[&str],
        copy: &CopyText,
        staged: &mut bool,
    ) -> Result<(), BatchError> {
        let b = &self.binding;
        if *staged {
            tx.batch_execute(&sql::clear_stage_table(b))
                .await
                .map_err(BatchError::Db)?;
        } else {
            tx.batch_execute(&self.ensure_stage).await.map_err(BatchError::Db)?;
        }
        Self::send_copy(tx, &sql::copy_into_stage(b, columns), copy)
            .await
            .map_err(BatchError::Db)?;
        *staged = true;
        Ok(())
    }

    /// The rows as `COPY` text of their upsert's columns, rendered ahead of the transaction
    /// ([`TableSource::upsert_rows`] takes it); `None` for fewer than [`COPY_MIN_ROWS`] rows,
    /// which go as JSON.
    /// The text holds the upsert's columns ([`TableSource::upsert_columns`]), in chunks; a key
    /// column takes the key's text from the URL, as on the JSON path.
    pub fn copy_text(&self, rows: &[UpsertRow<'_>]) -> Option<CopyText> {
        let (_, first) = rows.first().filter(|_| rows.len() >= COPY_MIN_ROWS)?;
        let columns = self.upsert_columns(first);
        let b = &self.binding;
        enum Source {
            Key(usize),
            /// The output field at this position.
            Field(usize),
        }
        let plan: Vec<(&render::TypeKind, Source)> = columns
            .iter()
            .filter_map(|c| {
                let i = b.fields.iter().position(|f| f.column.name == *c)?;
                let source = match b.key.iter().position(|k| k.name == *c) {
                    Some(k) => Source::Key(k),
                    None => Source::Field(i),
                };
                Some((&b.fields[i].column.kind, source))
            })
            .collect();
        let mut values: Vec<Option<FieldValue>> = Vec::with_capacity(b.fields.len());
        let mut chunks = Vec::new();
        let mut buf = Vec::with_capacity(COPY_CHUNK + 4096);
        for (key, fields) in rows {
            values.clear();
            values.extend(self.values_in_order(fields));
            copy::row(
                plan.iter().map(|(kind, source)| {
                    let cell = match source {
                        Source::Key(i) => copy::Cell::Str(&key[*i]),
                        Source::Field(i) => copy::Cell::Field(values[*i].unwrap_or(FieldValue::Null)),
                    };
                    (*kind, cell)
                }),
                &mut buf,
            );
            if buf.len() >= COPY_CHUNK {
                chunks.push(Bytes::from(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(COPY_CHUNK + 4096),
                )));
            }
        }
        if !buf.is_empty() {
            chunks.push(Bytes::from(buf));
        }
        Some(CopyText {
            chunks,
            rows: rows.len(),
        })
    }

    /// Runs `copy` (a `COPY … FROM STDIN`) with the rendered text. Returns the rows Postgres
    /// stored.
    async fn send_copy(
        tx: &deadpool_postgres::Transaction<'_>,
        copy: &str,
        text: &CopyText,
    ) -> Result<u64, tokio_postgres::Error> {
        use futures::SinkExt;
        let sink = tx.copy_in(copy).await?;
        futures::pin_mut!(sink);
        for chunk in &text.chunks {
            sink.feed(chunk.clone()).await?;
        }
        sink.finish().await
    }

    /// Deletes many rows by key in one statement; returns an absent entry per deleted row.
    pub async fn delete_rows(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        keys: &[Vec<String>],
    ) -> Result<Vec<(Vec<String>, crate::cache::Entry)>, BatchError> {
        let b = &self.binding;
        let array: Vec<Value> = keys
            .iter()
            .map(|key| {
                Value::Object(
                    b.key
                        .iter()
                        .zip(key)
                        .map(|(k, v)| (k.name.clone(), Value::String(v.clone())))
                        .collect(),
                )
            })
            .collect();
        let stmt = client.prepare_cached(&self.delete_rows).await.map_err(BatchError::Db)?;
        let out = client
            .query(&stmt, &[&Value::Array(array).to_string()])
            .await
            .map_err(BatchError::Db)?;
        Ok(out
            .iter()
            .filter_map(|r| {
                let texts: Vec<Option<&str>> = (0..b.key.len()).map(|i| r.get::<_, Option<&str>>(2 + i)).collect();
                let key = Self::key_texts(&texts)?;
                Some((
                    key,
                    crate::cache::Entry::new(None, parse_lsn(r.get(0)), 0).with_xid(parse_xid(r.get(1))),
                ))
            })
            .collect())
    }

    /// Checks the body against the binding and returns it keyed by column name, key filled in.
    fn columns_of(&self, key: &[String], body: &Map<String, Value>) -> Result<Map<String, Value>, SourceError> {
        let b = &self.binding;
        let mut row = Map::new();
        for (name, value) in body {
            let field = self.writable_field(key, name, value)?;
            row.insert(field.column.name.clone(), value.clone());
        }
        for (k, v) in b.key.iter().zip(key) {
            row.insert(k.name.clone(), Value::String(v.clone()));
        }
        Ok(row)
    }

    /// The field `name` of a body for the key `key`, if the body may write it with `value`: a
    /// field of the keyspace, not generated, and — for a key column — naming the URL's key.
    fn writable_field(&self, key: &[String], name: &str, value: &Value) -> Result<&schema::Field, SourceError> {
        let b = &self.binding;
        let Some(field) = b.field(name) else {
            return Err(SourceError::UnknownField {
                field: name.to_string(),
                keyspace: b.keyspace.clone(),
                known: b
                    .fields
                    .iter()
                    .map(|f| format!("`{}`", f.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if field.column.generated || field.column.identity_always {
            return Err(SourceError::NotWritable {
                field: name.to_string(),
                column: field.column.name.clone(),
            });
        }
        if let Some(i) = b.key.iter().position(|k| k.name == field.column.name)
            && !key_matches(&key[i], value)
        {
            return Err(SourceError::KeyMismatch {
                field: name.to_string(),
                url: key[i].clone(),
                body: value.to_string(),
            });
        }
        Ok(field)
    }

    fn upsert_sql(&self, columns: &[&str], rows: sql::Rows, as_written: bool) -> Arc<str> {
        let id = format!("{rows:?}{as_written}\u{1f}{}", columns.join("\u{1f}"));
        let mut cache = self.upserts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(&id) {
            return s.clone();
        }
        let s: Arc<str> = if as_written {
            sql::upsert_as_written(&self.binding, columns, rows).into()
        } else {
            sql::upsert(&self.binding, columns, rows).into()
        };
        if cache.len() < MAX_CACHED_UPSERTS {
            cache.insert(id, s.clone());
        }
        s
    }

    /// Names the field whose value Postgres rejected by trying each one alone.
    async fn blame_field(
        &self,
        client: &impl GenericClient,
        row: &Map<String, Value>,
        original: &tokio_postgres::Error,
    ) -> SourceError {
        for (column, value) in row {
            let one = Value::Object(Map::from_iter([(column.clone(), value.clone())])).to_string();
            if let Err(e) = client.query_one(&self.probe, &[&one]).await
                && let (Some(db), Some(field)) = (e.as_db_error(), self.binding.field_of_column(column))
            {
                return SourceError::InvalidValue {
                    field: field.name.clone(),
                    column: column.clone(),
                    type_sql: field.column.type_sql.clone(),
                    message: db.message().to_string(),
                };
            }
        }
        SourceError::InvalidRow {
            table: self.binding.table.to_string(),
            message: original
                .as_db_error()
                .map_or_else(|| original.to_string(), |d| d.message().to_string()),
        }
    }

    /// Names the key component Postgres could not cast to its column's type.
    async fn blame_key(&self, client: &impl GenericClient, key: &[String]) -> SourceError {
        for (col, value) in self.binding.key.iter().zip(key) {
            let probe = format!("SELECT CAST($1::text AS {}) IS NULL", col.type_sql);
            if client.query_one(&probe, &[value]).await.is_err() {
                return SourceError::InvalidKey {
                    column: col.name.clone(),
                    type_sql: col.type_sql.clone(),
                    value: value.clone(),
                };
            }
        }
        SourceError::InvalidKey {
            column: self
                .binding
                .key
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            type_sql: self
                .binding
                .key
                .iter()
                .map(|c| c.type_sql.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            value: key.join(","),
        }
    }
}

/// Whether a body's key field holds the same value as the URL's (already normalized) component.
fn key_matches(url: &str, body: &Value) -> bool {
    match body {
        Value::String(s) => s == url || s.eq_ignore_ascii_case(url) && looks_like_uuid(url),
        Value::Number(n) => {
            let t = n.to_string();
            t == url
                || t.parse::<i128>()
                    .ok()
                    .zip(url.parse::<i128>().ok())
                    .is_some_and(|(a, b)| a == b)
        }
        Value::Bool(b) => url == if *b { "true" } else { "false" },
        _ => false,
    }
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::keyspace::config::TableRef;
    use crate::source::postgres::config::Secret;
    use crate::source::postgres::schema::{ColumnMeta, Field};
    use std::time::Duration;

    /// A source over `(id bigint key, name text, n int, flag bool, amount numeric)`; no
    /// connection is opened.
    fn source() -> TableSource {
        let columns = vec![
            ColumnMeta::plain("id", 20, "bigint"),
            ColumnMeta::plain("name", 25, "text"),
            ColumnMeta::plain("n", 23, "integer"),
            ColumnMeta::plain("flag", 16, "boolean"),
            ColumnMeta::plain("amount", 1700, "numeric"),
        ];
        let binding = Binding {
            keyspace: "ks".into(),
            table: TableRef {
                schema: "public".into(),
                name: "t".into(),
            },
            table_oid: 1,
            key: vec![columns[0].clone()],
            fields: columns
                .iter()
                .map(|c| Field {
                    name: c.name.clone(),
                    column: c.clone(),
                })
                .collect(),
            columns: columns.iter().map(|c| (c.name.clone(), c.type_oid)).collect(),
            all_columns: columns,
            rewrites_rows: false,
        };
        let pool = PgPool::new(&PostgresConfig {
            url: Secret::new("postgres://nobody@127.0.0.1:1/none"),
            pool_size: 1,
            connect_timeout: Duration::from_secs(1),
            acquire_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(1),
        })
        .expect("a pool builds without connecting");
        TableSource::new(Arc::new(pool), binding)
    }

    /// A JSON object's fields both ways a flush holds them: read in place, and parsed.
    fn both(v: &Value) -> [Fields; 2] {
        let in_place = Fields::in_place(v);
        assert!(matches!(in_place, Fields::Spans { .. }), "{v} is read in place");
        [in_place, Fields::from(v.as_object().unwrap().clone())]
    }

    #[test]
    fn written_values_are_read_in_the_bindings_order_whatever_the_maps_order() {
        let src = source();
        let in_order = json!({"name": "a", "n": 1, "flag": true, "amount": null});
        let shuffled = json!({"flag": true, "id": 99, "amount": null, "extra": 0, "n": 1, "name": "a"});
        let some = json!({"n": 1});
        let values =
            |f: &Fields| -> Vec<Option<Value>> { src.values_in_order(f).map(|v| v.map(|v| v.to_value())).collect() };
        let want = vec![
            None,
            Some(json!("a")),
            Some(json!(1)),
            Some(json!(true)),
            Some(json!(null)),
        ];
        for form in 0..2 {
            let [a, b, c] = [&in_order, &shuffled, &some].map(|v| both(v).into_iter().nth(form).unwrap());
            assert_eq!(values(&a), want);
            assert_eq!(values(&b), want, "the key's own field is left to the key's text");
            assert_eq!(values(&c), vec![None, None, Some(json!(1)), None, None]);
        }
    }

    #[test]
    fn a_row_written_as_known_texts_renders_as_the_same_row_returned() {
        let src = source();
        let key = vec!["7".to_string()];
        // One buffer for every row, as the flusher renders them: each document is exactly its
        // own row's, whatever the buffer held before.
        let mut scratch = Vec::new();
        for (fields, texts) in [
            (
                json!({"name": "tab\there \"q\" ✓", "n": "-3", "flag": true, "amount": null}),
                [Some("7"), Some("tab\there \"q\" ✓"), Some("-3"), Some("t"), None],
            ),
            (
                json!({"amount": null, "flag": false, "n": 2147483647, "name": "plain ✓"}),
                [Some("7"), Some("plain ✓"), Some("2147483647"), Some("f"), None],
            ),
        ] {
            let parsed = Fields::from(fields.as_object().unwrap().clone());
            // The first has escaped strings: it is only ever held parsed.
            let forms = if fields["name"] == "plain ✓" {
                both(&fields).to_vec()
            } else {
                vec![parsed]
            };
            for fields in forms {
                let doc = src.written_doc(&key, &fields, &mut scratch).expect("known");
                let mut returned = Vec::new();
                src.render_texts(texts, &mut returned);
                assert_eq!(&doc[..], &returned[..], "{fields:?}");
            }
        }
        // Postgres normalizes numerics, and a key spelled otherwise than it outputs it.
        for numeric in both(&json!({"name": "a", "n": 1, "flag": true, "amount": 1.5})) {
            assert!(src.written_doc(&key, &numeric, &mut scratch).is_none());
        }
        let [fields, parsed] = both(&json!({"name": "a", "n": 1, "flag": true, "amount": null}));
        for fields in [&fields, &parsed] {
            assert!(src.written_doc(&["07".to_string()], fields, &mut scratch).is_none());
            assert!(src.stores_as_written(fields));
        }
        // A field not written is the row's previous value or a default: not known.
        for partial in both(&json!({"name": "a", "n": 1, "flag": true})) {
            assert!(src.written_doc(&key, &partial, &mut scratch).is_none());
            assert!(!src.stores_as_written(&partial));
        }
    }

    #[test]
    fn key_fields_match_by_value() {
        assert!(key_matches("42", &json!(42)));
        assert!(key_matches("42", &json!("42")));
        assert!(!key_matches("42", &json!(43)));
        assert!(!key_matches("42", &json!({"id": 42})));
        assert!(key_matches(
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            &json!("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11")
        ));
    }
}
