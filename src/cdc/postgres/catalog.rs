//! The catalog side of CDC: the publication that must cover every CDC table, the replication
//! slot's state in `pg_replication_slots`, dropping a lost slot, and the heartbeat that keeps an
//! idle database's slot moving; and the probe of the server's flush position that the freshness
//! contract is measured against. Plain SQL over the ordinary pool, with bound parameters and
//! quoted identifiers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cdc::CdcError;
use crate::cdc::config::CdcConfig;
use crate::keyspace::Keyspace;
use crate::keyspace::config::TableRef;
use crate::keyspace::freshness::Freshness;
use crate::lifecycle::Tasks;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::source::postgres::config::PostgresConfig;
use crate::source::postgres::sql::{qualified, quote_ident};
use crate::source::postgres::{PgPool, classify, connection_config};

/// What `pg_replication_slots` says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Missing,
    Lost,
    /// Usable, with the position its last consumer confirmed.
    Present {
        confirmed: Lsn,
    },
    /// Held by a live session.
    InUse(Holder),
}

/// The session holding a slot, from `pg_stat_activity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub application_name: String,
    pub client: String,
}

impl Holder {
    /// Why this session holding `slot` keeps a node (`node`, whose own sessions are named
    /// `app`) from streaming; `true` when it is another live process with the same node id.
    pub fn conflict(&self, slot: &str, node: &str, app: &str) -> (bool, String) {
        let same_node = format!("{}{node}/", super::transport::APPLICATION_PREFIX);
        if self.application_name.starts_with(&same_node) && self.application_name != app {
            (
                true,
                format!(
                    "two live nodes share node_id {node}: replication slot {slot} is held by another cachesync process \
                     (pid {} on the server, client {}, application_name {}); give each node its own [server] node_id",
                    self.pid, self.client, self.application_name
                ),
            )
        } else {
            (
                false,
                format!(
                    "replication slot {slot} is in use by another connection (pid {}, client {}, application_name {:?})",
                    self.pid, self.client, self.application_name
                ),
            )
        }
    }
}

/// Creates or extends the publication so it covers every CDC table.
pub async fn ensure_publication(
    pool: &PgPool,
    config: &CdcConfig,
    keyspaces: &[Arc<Keyspace>],
) -> Result<(), CdcError> {
    let client = pool.get().await?;
    let name = &config.publication;
    let exists = client
        .query_opt("SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1", &[name])
        .await
        .map_err(|e| CdcError::Source(classify(&e)))?
        .is_some();
    let listed: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
            &[name],
        )
        .await
        .map_err(|e| CdcError::Source(classify(&e)))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut missing: Vec<&TableRef> = Vec::new();
    for ks in keyspaces {
        let t = ks.config.table.as_ref().expect("CDC keyspaces have tables");
        if !listed.iter().any(|(s, n)| s == &t.schema && n == &t.name) && !missing.contains(&t) {
            missing.push(t);
        }
    }
    if exists && missing.is_empty() {
        return Ok(());
    }
    let list = missing.iter().map(|t| qualified(t)).collect::<Vec<_>>().join(", ");
    if !config.create_publication {
        return Err(CdcError::Setup(if exists {
            format!(
                "publication {name} does not include {list}; add them (ALTER PUBLICATION {} ADD TABLE {list}) or set [cdc] create_publication = true",
                quote_ident(name)
            )
        } else {
            format!(
                "publication {name} does not exist; create it (CREATE PUBLICATION {} FOR TABLE {list}) or set [cdc] create_publication = true",
                quote_ident(name)
            )
        }));
    }
    let sql = if exists {
        format!("ALTER PUBLICATION {} ADD TABLE {list}", quote_ident(name))
    } else {
        format!("CREATE PUBLICATION {} FOR TABLE {list}", quote_ident(name))
    };
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| CdcError::Setup(format!("{sql}: {}", classify(&e))))?;
    tracing::info!(publication = %name, tables = %list, "publication updated");
    Ok(())
}

pub async fn slot_state(pool: &PgPool, slot: &str) -> Result<SlotState, CdcError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT coalesce(s.wal_status, ''), coalesce(s.plugin, ''), coalesce(s.database::text, ''), s.active_pid, current_database()::text, \
                    coalesce(s.confirmed_flush_lsn::text, '0/0'), coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local socket') \
             FROM pg_catalog.pg_replication_slots s LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| CdcError::Source(classify(&e)))?;
    let Some(r) = row else { return Ok(SlotState::Missing) };
    let (wal_status, plugin, database, pid, current): (String, String, String, Option<i32>, String) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    let (confirmed, application_name, client): (String, String, String) = (r.get(5), r.get(6), r.get(7));
    if plugin != "pgoutput" || database != current {
        return Err(CdcError::Setup(format!(
            "replication slot {} exists but is for plugin {plugin:?} in database {database:?}; choose another [cdc] slot name",
            slot
        )));
    }
    if wal_status == "lost" {
        return Ok(SlotState::Lost);
    }
    Ok(match pid {
        Some(pid) => SlotState::InUse(Holder {
            pid,
            application_name,
            client,
        }),
        None => SlotState::Present {
            confirmed: confirmed.parse().unwrap_or(Lsn::ZERO),
        },
    })
}

pub async fn drop_slot(pool: &PgPool, slot: &str) -> Result<(), CdcError> {
    let client = pool.get().await?;
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| CdcError::Source(classify(&e)))?;
    Ok(())
}

/// Emits a small non-transactional logical message now and then, so a slot on a database with
/// no writes of its own still moves with the server's WAL.
pub async fn heartbeat(pool: Arc<PgPool>, every: Duration, stop: CancellationToken) {
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let r = async {
            let c = pool.get().await?;
            c.execute("SELECT pg_logical_emit_message(false, 'cachesync.heartbeat', '')", &[])
                .await
                .map_err(|e| classify(&e))
        }
        .await;
        match r {
            Ok(_) => warned = false,
            Err(e) if !warned => {
                tracing::warn!(error = %e, "CDC heartbeat failed (it needs EXECUTE on pg_logical_emit_message); set [cdc] heartbeat = \"0s\" to turn it off");
                warned = true;
            }
            Err(_) => {}
        }
    }
}

/// Probes where the database stands for the freshness contract (see `keyspace::freshness`):
/// every quarter of `max_staleness`, the server's WAL flush position with the time it was asked.
/// On a connection of its own, so a pool busy with loads (as when many reads are outside the
/// contract) cannot hold the watermark back.
pub async fn probe(
    pg: PostgresConfig,
    freshness: Arc<Freshness>,
    metrics: Arc<Metrics>,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let every = freshness.probe_interval();
    let timeout = every.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = freshness.probe_requested() => {}
            _ = stop.cancelled() => return,
        }
        let at = freshness.now();
        let position = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                let config = connection_config(&pg).map_err(|e| e.to_string())?;
                let (c, conn) = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls))
                    .await
                    .map_err(|_| "connecting timed out".to_string())?
                    .map_err(|e| classify(&e).to_string())?;
                tasks.spawn(async move {
                    let _ = conn.await;
                });
                client = Some(c);
            }
            let c = client.as_ref().expect("connected above");
            let row = tokio::time::timeout(timeout, c.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]))
                .await
                .map_err(|_| "the probe timed out".to_string())?
                .map_err(|e| classify(&e).to_string())?;
            row.get::<_, String>(0)
                .parse::<Lsn>()
                .map_err(|_| "unexpected WAL position".to_string())
        }
        .await;
        match position {
            Ok(lsn) => freshness.probed(lsn, at),
            Err(e) => {
                tracing::debug!(error = %e, "freshness probe failed");
                client = None;
                freshness.unreachable();
            }
        }
        metrics
            .cdc_behind
            .set(freshness.behind().map_or(-1.0, |d| d.as_secs_f64()));
    }
}
