//! Sources: where a keyspace's data lives. Today that is Postgres ([`postgres`]): a loader that
//! reads one row by key and a writer that upserts or deletes one, both through a connection pool.
//!
//! [`SourceError`] says what went wrong in terms the HTTP layer can map to a status without
//! looking inside: a conflict (409), a value or key that does not fit (400), the database being
//! unreachable (503), or an internal failure (500). Messages never carry connection strings.

pub mod postgres;

/// What went wrong talking to a source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The database cannot be reached, a connection could not be had in time, or it is shutting
    /// down. Retrying later may work.
    #[error("postgres is unavailable: {0}")]
    Unavailable(String),
    /// The write violated a constraint (unique, foreign key, not null, check).
    #[error("{message}")]
    Conflict {
        message: String,
        constraint: Option<String>,
    },
    /// A field's value cannot be stored in its column.
    #[error("field `{field}` does not fit column `{column}` ({type_sql}): {message}")]
    InvalidValue {
        field: String,
        column: String,
        type_sql: String,
        message: String,
    },
    /// The data was rejected but no single field could be blamed.
    #[error("the row does not fit table {table}: {message}")]
    InvalidRow { table: String, message: String },
    /// A key component cannot be a value of its key column.
    #[error("key component {value:?} does not fit key column `{column}` ({type_sql})")]
    InvalidKey {
        column: String,
        type_sql: String,
        value: String,
    },
    /// The body names a field the keyspace does not map.
    #[error("unknown field `{field}`: keyspace {keyspace} maps only {known}")]
    UnknownField {
        field: String,
        keyspace: String,
        known: String,
    },
    /// A key field in the body differs from the key in the URL.
    #[error("field `{field}` is {body} in the body but {url:?} in the URL; leave key fields out or make them match")]
    KeyMismatch { field: String, url: String, body: String },
    /// A field that maps to a column the database computes.
    #[error("field `{field}` maps to column `{column}`, which the database generates; leave it out")]
    NotWritable { field: String, column: String },
    /// The body is not a JSON object of fields.
    #[error("the body must be a JSON object of fields: {0}")]
    BadBody(String),
    /// The keyspace's table has not been resolved yet (database unreachable at start) or its
    /// configuration does not match the table.
    #[error("keyspace {keyspace} is not ready: {reason}")]
    NotReady { keyspace: String, reason: String },
    /// A conditional write's precondition (`If-Match`, `If-None-Match`) does not hold for the
    /// row as stored; nothing was written.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The database refused the data for a reason no single field explains (a trigger's
    /// exception, a view's check option).
    #[error("the database rejected the write: {0}")]
    Rejected(String),
    /// The table no longer has a column the keyspace maps, or no longer exists under its name
    /// (SQLSTATE 42703, 42P01): the keyspace's binding is out of date and is being re-read.
    #[error("the table changed: {0}")]
    SchemaChanged(String),
    /// Anything else the database reported.
    #[error("postgres error: {0}")]
    Database(String),
}
