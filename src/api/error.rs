//! The one place errors become HTTP statuses. Every error body is
//! `{"error": "<code>", "detail": "<what happened and how to fix it>"}`, where `code` is a short
//! stable identifier a client can branch on.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::commitlog::LogError;
use crate::key::KeyError;
use crate::keyspace::KeyspaceError;
use crate::patterns::PatternError;
use crate::patterns::write_behind::deadletters::DeadLetterError;
use crate::source::SourceError;

/// Seconds a 503 asks the client to wait before retrying.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub fn unknown_keyspace(name: &str, known: &[&str]) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_keyspace",
            format!("no keyspace named {name:?}; configured keyspaces: {}", known.join(", ")),
        )
    }

    pub fn not_found(keyspace: &str, key: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no entry for key {key:?} in keyspace {keyspace}"),
        )
    }

    pub fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes (server.max_body_bytes)"),
        )
    }

    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
}

impl From<SourceError> for ApiError {
    fn from(e: SourceError) -> ApiError {
        let (status, code) = match &e {
            SourceError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            SourceError::NotReady { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            SourceError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            SourceError::InvalidValue { .. } | SourceError::InvalidRow { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_value")
            }
            SourceError::InvalidKey { .. } => (StatusCode::BAD_REQUEST, "invalid_key"),
            SourceError::UnknownField { .. } => (StatusCode::BAD_REQUEST, "unknown_field"),
            SourceError::KeyMismatch { .. } => (StatusCode::BAD_REQUEST, "key_mismatch"),
            SourceError::NotWritable { .. } => (StatusCode::BAD_REQUEST, "not_writable"),
            SourceError::BadBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            SourceError::Rejected(_) => (StatusCode::BAD_REQUEST, "rejected"),
            SourceError::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            SourceError::SchemaChanged(_) => (StatusCode::SERVICE_UNAVAILABLE, "schema_changed"),
            SourceError::Database(_) => (StatusCode::INTERNAL_SERVER_ERROR, "database_error"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_key", e.to_string())
    }
}

impl From<KeyspaceError> for ApiError {
    fn from(e: KeyspaceError) -> ApiError {
        match e {
            KeyspaceError::Source(e) => e.into(),
            KeyspaceError::Key(e) => e.into(),
        }
    }
}

impl From<PatternError> for ApiError {
    fn from(e: PatternError) -> ApiError {
        match e {
            PatternError::Keyspace(e) => e.into(),
            PatternError::ReadOnly(_) => ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "read_only", e.to_string()),
            PatternError::HomedElsewhere { .. } => {
                ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "homed_elsewhere", e.to_string())
            }
            PatternError::Conditional(_) => ApiError::new(
                StatusCode::PRECONDITION_REQUIRED,
                "conditional_elsewhere",
                e.to_string(),
            ),
            PatternError::Federation(crate::federation::FederationError::Log(log)) => log.into(),
            PatternError::BadJson(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()),
            PatternError::BacklogFull { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backlog_full", e.to_string())
            }
            PatternError::Log(log) => log.into(),
            PatternError::DeadLetters(d) => d.into(),
            PatternError::NotInMemory(..) => ApiError::new(StatusCode::BAD_REQUEST, "not_in_memory", e.to_string()),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> ApiError {
        if let LogError::DiskFull { .. } = e {
            return ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", e.to_string());
        }
        // The write could not be made durable here: nothing was acknowledged or changed.
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "log_unavailable",
            format!("the commit log refused the write: {e}"),
        )
    }
}

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "deadletter_store", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "detail": self.detail });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}
