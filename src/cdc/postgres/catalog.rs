//! The catalog side of CDC: the publication that must cover every CDC table, the replication
//! slot's state in `pg_replication_slots`, dropping a lost slot, and the heartbeat that keeps an
//! idle database's slot moving. Plain SQL over the ordinary pool, with bound parameters and
//! quoted identifiers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cdc::CdcError;
use crate::cdc::config::CdcConfig;
use crate::keyspace::Keyspace;
use crate::keyspace::config::TableRef;
use crate::source::postgres::sql::{qualified, quote_ident};
use crate::source::postgres::{PgPool, classify};

/// What `pg_replication_slots` says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Missing,
    Lost,
    Present,
    InUse(i32),
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
            "SELECT coalesce(wal_status, ''), coalesce(plugin, ''), coalesce(database::text, ''), active_pid, current_database()::text \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| CdcError::Source(classify(&e)))?;
    let Some(r) = row else { return Ok(SlotState::Missing) };
    let (wal_status, plugin, database, pid, current): (String, String, String, Option<i32>, String) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
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
        Some(pid) => SlotState::InUse(pid),
        None => SlotState::Present,
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
