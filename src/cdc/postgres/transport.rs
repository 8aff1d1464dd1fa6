//! The replication transport: `pgwire-replication` behind [`ReplicationSource`].
//!
//! Why this crate: it lets us set the confirmed position ourselves (nothing is acknowledged
//! behind our back), its worker answers keepalives while we are busy appending, and a *gated*
//! session can run `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` on the very connection that
//! later streams — the exported snapshot and the slot's consistent point come from one session.
//! It decodes only Begin, Commit and Message; everything else arrives raw and is decoded by
//! `protocol`/`decoder`.

use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};

use crate::cdc::{CdcError, ReplicationSource, StreamEvent, pg_time_to_unix_us};
use crate::lsn::Lsn;
use crate::source::postgres::config::PostgresConfig;
use crate::source::postgres::sql::quote_ident;

/// How often confirmed positions reach the server.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// Events buffered between the worker and the stream.
const BUFFER_EVENTS: usize = 8192;

/// Session settings that make values print the same way as on the pooled connections.
pub const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=1";

/// One replication session.
pub struct PgwireSource {
    client: ReplicationClient,
    slot: String,
    started: bool,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The server was told (Terminate, or CopyDone after the last confirmed position).
    Cleanly,
    /// The worker did not finish within [`CLOSE_TIMEOUT`]; it was left to end in the background.
    TimedOut,
}

/// Longest wait for a streaming session to send its last position and end.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `publication_names` option value for a publication named exactly `name`.
///
/// Postgres splits the option as a list of SQL identifiers, folding unquoted ones to lower
/// case, so `MyPub` unquoted would name `mypub`. The name is therefore sent double-quoted, the
/// same way `CREATE PUBLICATION` and `ALTER PUBLICATION` quote it (the transport escapes the
/// single quotes of the surrounding literal).
pub fn publication_option(name: &str) -> String {
    quote_ident(name)
}

/// The `application_name` of this process's replication sessions: it names the node and the
/// process instance, so a slot held by another live process with the same node id can be told
/// apart from a session of this process (see `catalog::slot_holder`).
pub fn application_name(node: &str, instance: &str) -> String {
    let mut name = format!("{APPLICATION_PREFIX}{node}/{instance}");
    // Postgres truncates application_name to 63 bytes; keep it on a character boundary.
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Prefix of every cachesync replication session's `application_name`.
pub const APPLICATION_PREFIX: &str = "cachesync-cdc/";

fn replication_config(
    pg: &PostgresConfig,
    slot: &str,
    publication: &str,
    app: &str,
) -> Result<ReplicationConfig, CdcError> {
    let cfg: tokio_postgres::Config = pg
        .url
        .expose()
        .parse()
        .map_err(|_| CdcError::Setup("postgres.url is not a valid connection string".into()))?;
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".into(),
    };
    let user = cfg.get_user().unwrap_or("postgres").to_string();
    let password = cfg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = cfg.get_dbname().map(str::to_string).unwrap_or_else(|| user.clone());
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication_option(publication))
            .with_port(cfg.get_ports().first().copied().unwrap_or(5432))
            .with_options(SESSION_OPTIONS)
            .with_application_name(app)
            .with_status_interval(STATUS_INTERVAL)
            .with_wakeup_interval(Duration::from_secs(5))
            .with_buffer_size(BUFFER_EVENTS),
    )
}

/// Classifies a transport error: a missing or invalidated slot needs a resnapshot, anything
/// else a reconnect.
fn classify(slot: &str, e: PgWireError) -> CdcError {
    let text = e.to_string();
    let lost = (text.contains("replication slot") && text.contains("does not exist"))
        || text.contains("can no longer get changes from replication slot")
        || text.contains("has been invalidated");
    if lost {
        CdcError::SlotLost {
            slot: slot.to_string(),
            detail: text,
        }
    } else {
        CdcError::Connection(text)
    }
}

impl PgwireSource {
    /// Connects and authenticates without starting to stream.
    pub async fn connect_gated(
        pg: &PostgresConfig,
        slot: &str,
        publication: &str,
        app: &str,
    ) -> Result<PgwireSource, CdcError> {
        let cfg = replication_config(pg, slot, publication, app)?;
        let client = ReplicationClient::connect_gated(cfg)
            .await
            .map_err(|e| classify(slot, e))?;
        Ok(PgwireSource {
            client,
            slot: slot.to_string(),
            started: false,
        })
    }

    /// `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')`: the slot's consistent
    /// point and the name of the snapshot that sees exactly what was committed before it. The
    /// snapshot stays importable until this session runs another command.
    pub async fn create_slot(&mut self, name: &str, temporary: bool) -> Result<(Lsn, String), CdcError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT \"{name}\" {}LOGICAL pgoutput (SNAPSHOT 'export')",
            if temporary { "TEMPORARY " } else { "" }
        );
        let rows = self.client.simple_query(&sql).await.map_err(|e| classify(name, e))?;
        let row = rows
            .first()
            .ok_or_else(|| CdcError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let text = |i: usize| {
            row.get(i)
                .and_then(|v| v.as_ref())
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let cp: Lsn = text(1)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| CdcError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into()))?;
        let snapshot =
            text(2).ok_or_else(|| CdcError::Protocol("CREATE_REPLICATION_SLOT returned no snapshot".into()))?;
        Ok((cp, snapshot))
    }

    /// Sends `START_REPLICATION` and waits until the server holds the slot for this session.
    pub async fn start(&mut self) -> Result<(), CdcError> {
        self.client.start().await.map_err(|e| classify(&self.slot, e))?;
        self.started = true;
        self.client.wait_started().await.map_err(|e| classify(&self.slot, e))
    }

    /// Ends the session. A session that never started streaming (the temporary slot of a warm
    /// start) has nothing to flush: dropping its client closes the command gate, and the worker
    /// sends Terminate at once, which also drops a temporary slot. (Asking such a worker to stop
    /// and waiting for it, as a streaming session is ended, waits for a stop it never looks at.)
    pub async fn close(mut self) -> Closed {
        if !self.started {
            drop(self);
            return Closed::Cleanly;
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, self.client.shutdown()).await {
            Ok(_) => Closed::Cleanly,
            Err(_) => Closed::TimedOut,
        }
    }
}

impl ReplicationSource for PgwireSource {
    async fn recv(&mut self) -> Result<Option<StreamEvent>, CdcError> {
        loop {
            let ev = match self.client.recv().await {
                Ok(Some(ev)) => ev,
                Ok(None) => return Ok(None),
                Err(e) => return Err(classify(&self.slot, e)),
            };
            return Ok(Some(match ev {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => StreamEvent::Begin {
                    final_lsn: Lsn(final_lsn.0),
                    xid,
                    commit_time_us: pg_time_to_unix_us(commit_time_micros),
                },
                ReplicationEvent::XLogData { data, .. } => StreamEvent::Data(data),
                ReplicationEvent::Commit { end_lsn, .. } => StreamEvent::Commit {
                    end_lsn: Lsn(end_lsn.0),
                },
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => StreamEvent::Message {
                    transactional,
                    lsn: Lsn(lsn.0),
                    prefix,
                    content,
                },
                ReplicationEvent::KeepAlive { wal_end, .. } => StreamEvent::KeepAlive {
                    wal_end: Lsn(wal_end.0),
                },
                ReplicationEvent::StoppedAt { .. } => continue,
            }));
        }
    }

    fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
    }

    fn server_wal_end(&self) -> Lsn {
        Lsn(self.client.metrics().last_wal_end().0)
    }

    async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.client.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_names_are_sent_as_quoted_identifiers() {
        // Unquoted, Postgres would fold MyPub to mypub.
        assert_eq!(publication_option("MyPub"), "\"MyPub\"");
        assert_eq!(publication_option("my pub, 2"), "\"my pub, 2\"");
        assert_eq!(publication_option("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn application_names_fit_postgres_and_name_the_node() {
        let app = application_name("api-7", "0000abcd");
        assert_eq!(app, "cachesync-cdc/api-7/0000abcd");
        let long = application_name(&"é".repeat(60), "0000abcd");
        assert!(long.len() <= 63 && long.starts_with(APPLICATION_PREFIX));
    }
}
