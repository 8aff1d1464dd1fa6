//! Schema changes of CDC tables: no entry is ever served in a shape, or with a value, Postgres
//! no longer holds.
//!
//! A change is seen two ways: pgoutput sends a Relation message before the first row change of
//! a table after its schema changed (the stream builds its row mappings with
//! [`Reshaper::mappings`], which rechecks a keyspace its relation no longer fits, at that
//! transaction's position), and a catalog check every `[cdc] schema_check` re-reads each CDC
//! table ([`watch`]), so a table that changed and then stays quiet — or was dropped — is noticed
//! too. Either way the keyspace's binding is re-read from the catalog:
//!
//! - **Same shape** (a column the keyspace does not map was added or dropped, say): nothing is
//!   cached wrongly; the mapping is rebuilt.
//! - **New shape** (a mapped column added under `*`, dropped, renamed or retyped; the table
//!   dropped and recreated): the keyspace is reset at the change's position — emptied, with a
//!   floor below which no state is accepted again, so events captured under the old shape and
//!   loads started before cannot put old documents back — and, if it warms, reloaded from a
//!   new snapshot (not ready meanwhile). Read-through keyspaces load the new shape on demand.
//! - **Unfit** (a mapped or key column gone, the table renamed or dropped, the key out of the
//!   replica identity): the keyspace is reset and not ready, with the reason, until the table
//!   fits again — then it is reset and reloaded once more.
//!
//! Each outcome is logged and counted in `cachesync_cdc_schema_changes_total{keyspace,action}`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::decoder::RelationInfo;
use super::mapping::TableMapping;
use super::snapshot;
use crate::hlc::Hlc;
use crate::keyspace::config::TableRef;
use crate::keyspace::{BindError, Blocker, Keyspace};
use crate::lifecycle::{Backoff, Tasks};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::source::postgres::config::PostgresConfig;
use crate::source::postgres::{PgPool, classify};

/// What a recheck found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reshaped {
    /// The documents keep their shape.
    Same,
    /// The shape changed: the keyspace was reset (and is reloading if it warms).
    Reset,
    /// The keyspace cannot follow its table any more.
    Unfit(String),
}

/// Where a change happened, for the reset's floor.
#[derive(Debug, Clone, Copy)]
pub enum At {
    /// In the transaction at this commit position (a Relation message).
    Txn(Lsn),
    /// Some time before now (the catalog check): the server's flush position is read after the
    /// catalog, so it is past the change.
    Now,
}

/// Handles the schema changes of CDC tables.
pub struct Reshaper {
    pub pool: Arc<PgPool>,
    pub pg: PostgresConfig,
    pub hlc: Arc<Hlc>,
    pub metrics: Arc<Metrics>,
    pub max_key_bytes: usize,
    pub tasks: Tasks,
    /// Keyspaces found unfit, by name.
    unfit: Mutex<HashSet<String>>,
    /// The latest reload of each keyspace (a reset during a reload starts another; only the
    /// latest lifts the keyspace's blocker).
    reloads: Mutex<HashMap<String, u64>>,
}

impl Reshaper {
    pub fn new(
        pool: Arc<PgPool>,
        pg: PostgresConfig,
        hlc: Arc<Hlc>,
        metrics: Arc<Metrics>,
        max_key_bytes: usize,
        tasks: Tasks,
    ) -> Reshaper {
        Reshaper {
            pool,
            pg,
            hlc,
            metrics,
            max_key_bytes,
            tasks,
            unfit: Mutex::default(),
            reloads: Mutex::default(),
        }
    }

    /// Whether `ks` was found unfit and has not fitted since.
    pub fn is_unfit(&self, ks: &Keyspace) -> bool {
        self.unfit.lock().unwrap_or_else(|p| p.into_inner()).contains(ks.name())
    }

    fn count(&self, ks: &Keyspace, action: &str) {
        self.metrics
            .cdc_schema_changes
            .with_label_values(&[ks.name(), action])
            .inc();
    }

    /// Re-reads `ks`'s table and acts on what changed (see the module docs).
    pub async fn recheck(self: &Arc<Self>, ks: &Arc<Keyspace>, at: At, cause: &str) -> Reshaped {
        let bound = ks.bind(&self.pool).await;
        let lsn = match at {
            At::Txn(l) => Ok(Lsn(l.0 + 1)),
            At::Now => self.flush_position().await,
        };
        let lsn = match lsn {
            Ok(l) => l,
            // Postgres went away between the two reads: the next check tries again.
            Err(_) => return Reshaped::Same,
        };
        match bound {
            // Postgres could not be asked: nothing is known; the next check tries again.
            Err(BindError::Unavailable(_)) => Reshaped::Same,
            Err(BindError::Unfit(why)) => {
                let why = format!("table {} no longer fits the keyspace: {why}", table_of(ks));
                self.make_unfit(ks, lsn, why.clone());
                Reshaped::Unfit(why)
            }
            Ok(changed) => {
                let was_unfit = self.unfit.lock().unwrap_or_else(|p| p.into_inner()).remove(ks.name());
                if changed || was_unfit {
                    self.reset(ks, lsn, cause);
                    Reshaped::Reset
                } else {
                    self.count(ks, "rebound");
                    Reshaped::Same
                }
            }
        }
    }

    /// The keyspace cannot follow its table: emptied and not ready with `why`.
    pub fn make_unfit(&self, ks: &Arc<Keyspace>, floor: Lsn, why: String) {
        let first = self
            .unfit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ks.name().to_string());
        ks.reset_below(floor);
        ks.set_blocker(Blocker::Schema, Some(why.clone()));
        if first {
            tracing::error!(keyspace = ks.name(), reason = %why, "keyspace cannot follow its table; emptied and not ready until it fits again");
            self.count(ks, "unfit");
        }
    }

    /// Empties `ks` below `floor` and reloads it if it warms.
    fn reset(self: &Arc<Self>, ks: &Arc<Keyspace>, floor: Lsn, cause: &str) {
        tracing::warn!(keyspace = ks.name(), table = %table_of(ks), cause, floor = %floor, "table changed shape: emptying the keyspace and reloading it");
        self.count(ks, "reloaded");
        ks.reset_below(floor);
        if !ks.config.warm {
            ks.set_blocker(Blocker::Schema, None);
            return;
        }
        ks.set_blocker(
            Blocker::Schema,
            Some(format!("reloading after table {} changed", table_of(ks))),
        );
        // A reload already running read an older snapshot: its rows are below the new floor and
        // refused, so it is simply superseded.
        let generation = {
            let mut reloads = self.reloads.lock().unwrap_or_else(|p| p.into_inner());
            let g = reloads.entry(ks.name().to_string()).or_default();
            *g += 1;
            *g
        };
        let this = self.clone();
        let ks = ks.clone();
        let stop = self.tasks.child_token();
        self.tasks.spawn(async move { this.reload(ks, generation, stop).await });
    }

    /// Reloads `ks` until it succeeds (or the capture stops, or a newer reload supersedes it).
    async fn reload(self: Arc<Self>, ks: Arc<Keyspace>, generation: u64, stop: CancellationToken) {
        let current =
            |this: &Self| this.reloads.lock().unwrap_or_else(|p| p.into_inner()).get(ks.name()) == Some(&generation);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        while current(&self) {
            let started = std::time::Instant::now();
            match snapshot::reload(&self.pg, &ks, &self.hlc, &self.metrics, self.max_key_bytes, &self.tasks).await {
                Ok(rows) => {
                    tracing::info!(
                        keyspace = ks.name(),
                        rows,
                        seconds = started.elapsed().as_secs_f64(),
                        "keyspace reloaded after its table changed"
                    );
                    if current(&self) && !self.is_unfit(&ks) {
                        ks.set_blocker(Blocker::Schema, None);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(keyspace = ks.name(), error = %e, "reloading after a table change failed; retrying")
                }
            }
            if !backoff.wait(&stop).await {
                return;
            }
        }
    }

    /// (Re)builds the mappings of the keyspaces that follow `rel`, re-reading the table of a
    /// keyspace whose binding no longer describes it: a keyspace whose documents
    /// change shape is reset at this transaction and reloaded; one that no longer fits is
    /// emptied and not ready. A keyspace bound to this relation under another name (the table
    /// was renamed) is rechecked too.
    pub async fn mappings(
        self: &Arc<Self>,
        keyspaces: &[Arc<Keyspace>],
        rel: &Arc<RelationInfo>,
        txn: Lsn,
        max_key_bytes: usize,
    ) -> Vec<TableMapping> {
        let mut out = Vec::new();
        let at = At::Txn(txn);
        for ks in keyspaces {
            let named = ks
                .config
                .table
                .as_ref()
                .is_some_and(|t| t.schema == rel.schema && t.name == rel.name);
            let bound_oid = ks.source().ok().map(|s| s.binding().table_oid);
            if !named {
                if bound_oid == Some(rel.oid) {
                    // Its table now goes by another name.
                    self.recheck(ks, at, &format!("table renamed to {}.{}", rel.schema, rel.name))
                        .await;
                }
                continue;
            }
            let stale = match ks.source() {
                Ok(s) => s.binding().table_oid != rel.oid || !fits(&s.binding().columns, rel),
                Err(_) => true,
            };
            if stale || self.is_unfit(ks) {
                tracing::info!(keyspace = ks.name(), table = %rel.name, "the table changed; re-reading its columns");
                if let Reshaped::Unfit(_) = self.recheck(ks, at, "the stream sent a new shape of the table").await {
                    continue;
                }
            }
            let Ok(source) = ks.source() else { continue };
            match TableMapping::build(ks.clone(), source.binding(), rel, max_key_bytes) {
                Ok(m) => {
                    ks.set_followed(true);
                    out.push(m);
                }
                Err(why) => self.make_unfit(ks, Lsn(txn.0 + 1), why),
            }
        }
        out
    }

    /// The table's OID and its columns (name, type OID) in order, as the catalog has them now;
    /// `None` when there is no such table.
    async fn catalog_columns(&self, table: &TableRef) -> Result<Option<(u32, Vec<(String, u32)>)>, ()> {
        let client = self.pool.get().await.map_err(|_| ())?;
        let row = client
            .query_opt(
                "SELECT c.oid, array_remove(array_agg(a.attname::text ORDER BY a.attnum), NULL), \
                        array_remove(array_agg(a.atttypid ORDER BY a.attnum), NULL) \
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 WHERE n.nspname = $1 AND c.relname = $2 GROUP BY c.oid",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(|e| tracing::debug!(error = %classify(&e), "the catalog check failed"))?;
        Ok(row.map(|r| {
            let (oid, names, types): (u32, Vec<String>, Vec<u32>) = (r.get(0), r.get(1), r.get(2));
            (oid, names.into_iter().zip(types).collect())
        }))
    }

    async fn flush_position(&self) -> Result<Lsn, ()> {
        let client = self.pool.get().await.map_err(|_| ())?;
        let row = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(|e| tracing::debug!(error = %classify(&e), "reading the flush position failed"))?;
        row.get::<_, String>(0).parse().map_err(|_| ())
    }
}

fn table_of(ks: &Keyspace) -> String {
    ks.config.table.as_ref().map(|t| t.to_string()).unwrap_or_default()
}

/// Compares every CDC keyspace's table with the catalog every `every`, until `stop`: one small
/// query per table (its OID and its columns' names and types), and the full re-read of
/// [`Reshaper::recheck`] only when that differs from the keyspace's binding.
pub async fn watch(reshaper: Arc<Reshaper>, keyspaces: Vec<Arc<Keyspace>>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        for ks in &keyspaces {
            // Not bound yet: the capture's session binds it first.
            let Ok(source) = ks.source() else { continue };
            let b = source.binding();
            let unchanged = match reshaper.catalog_columns(&b.table).await {
                // Postgres could not be asked: the next check tries again.
                Err(()) => continue,
                Ok(Some((oid, columns))) => oid == b.table_oid && columns == b.columns,
                Ok(None) => false,
            };
            if !unchanged || reshaper.is_unfit(ks) {
                reshaper
                    .recheck(ks, At::Now, "the catalog check found the table changed")
                    .await;
            }
        }
    }
}

/// Whether a binding read from the catalog still describes the relation pgoutput sent: every
/// replicated column present with the same type.
fn fits(columns: &[(String, u32)], rel: &RelationInfo) -> bool {
    rel.columns
        .iter()
        .all(|c| columns.iter().any(|(n, t)| n == &c.name && *t == c.type_oid))
}
