//! What CDC needs from Postgres, checked up front for `cachesync check --connect`: `wal_level`,
//! the REPLICATION attribute, a usable slot (or room for one), replica identities that cover the
//! keys, and a publication that covers the tables (or the right to extend it). Every problem is
//! reported at once, each saying how to fix it.

use crate::cdc::config::CdcConfig;
use crate::keyspace::config::{CdcMode, KeyspaceConfig};
use crate::source::postgres::classify;
use crate::source::postgres::sql::{qualified, quote_ident};

/// Checks what CDC needs from Postgres, for `cachesync check --connect`: every problem found.
pub async fn prerequisites(
    client: &tokio_postgres::Client,
    cdc_config: &CdcConfig,
    node_id: &str,
    keyspaces: &[KeyspaceConfig],
) -> Vec<String> {
    let cdc: Vec<&KeyspaceConfig> = keyspaces.iter().filter(|k| k.cdc != CdcMode::Off).collect();
    if cdc.is_empty() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    let q = |e: tokio_postgres::Error| format!("cdc: cannot read the server's settings: {}", classify(&e));
    let row = match client
        .query_one(
            "SELECT current_setting('wal_level'), r.rolreplication OR r.rolsuper, r.rolsuper, current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_catalog.pg_replication_slots) \
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return vec![q(e)],
    };
    let (wal_level, replication, superuser, max_slots, slots): (String, bool, bool, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if wal_level != "logical" {
        problems.push(format!(
            "cdc: wal_level is {wal_level}; set wal_level = logical in postgresql.conf and restart Postgres"
        ));
    }
    if !replication {
        problems.push("cdc: this role lacks the REPLICATION attribute; run ALTER ROLE <role> REPLICATION".into());
    }
    let slot = cdc_config.slot_name(node_id);
    match client
        .query_opt(
            "SELECT plugin, database::text = current_database(), coalesce(wal_status, '') FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
    {
        Ok(Some(r)) => {
            let (plugin, same_db, wal_status): (Option<String>, Option<bool>, String) = (r.get(0), r.get(1), r.get(2));
            if plugin.as_deref() != Some("pgoutput") || same_db != Some(true) {
                problems.push(format!("cdc: replication slot {slot} exists for another plugin or database; choose another [cdc] slot"));
            }
            if wal_status == "lost" {
                problems.push(format!("cdc: replication slot {slot} is invalidated (wal_status = lost); cachesync will drop, recreate and reload it on start"));
            }
        }
        Ok(None) if slots >= max_slots => {
            problems.push(format!("cdc: all {max_slots} replication slots are in use; raise max_replication_slots or drop an unused slot"));
        }
        Ok(None) => {}
        Err(e) => problems.push(q(e)),
    }
    let publication = &cdc_config.publication;
    // The name is exact (it is quoted wherever it is used), so `MyPub` is not `mypub`.
    let exists = match client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
    {
        Ok(r) => r.is_some(),
        Err(e) => return [problems, vec![q(e)]].concat(),
    };
    if !exists && !cdc_config.create_publication {
        problems.push(format!(
            "cdc: publication {publication:?} does not exist (names are exact: case and spaces count); create it or set [cdc] create_publication = true"
        ));
    }
    let listed: Vec<(String, String)> = match client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
            &[publication],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        Err(e) => return [problems, vec![q(e)]].concat(),
    };
    for ks in cdc {
        let Some(t) = &ks.table else { continue };
        let name = format!("keyspace[{}]", ks.name);
        let info = client
            .query_opt(
                "SELECT c.relreplident::text, pg_has_role(c.relowner, 'USAGE'), \
                        ARRAY(SELECT a.attname::text FROM pg_catalog.pg_index i \
                              JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                              WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))) \
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&t.schema, &t.name],
            )
            .await;
        // A missing table, or a view, is reported by the binding check.
        let Ok(Some(r)) = info else { continue };
        let (identity, owner, identity_cols): (String, bool, Vec<String>) = (r.get(0), r.get(1), r.get(2));
        if identity != "f" {
            for k in &ks.key {
                if !identity_cols.contains(k) {
                    problems.push(format!(
                        "{name}: key column `{k}` is not in the replica identity of {t} (identity: {}), so CDC could not tell which entry a delete removes; \
                         make the key the primary key or run ALTER TABLE {} REPLICA IDENTITY FULL",
                        if identity_cols.is_empty() { "none".to_string() } else { identity_cols.join(", ") },
                        qualified(t)
                    ));
                }
            }
        }
        let in_publication = listed.iter().any(|(s, n)| s == &t.schema && n == &t.name);
        if !in_publication && exists {
            if !cdc_config.create_publication {
                problems.push(format!("{name}: publication {publication} does not include {t}; add it or set [cdc] create_publication = true"));
            } else if !owner && !superuser {
                problems.push(format!(
                    "{name}: publication {publication} does not include {t} and this role cannot add it (only the table's owner can); add it as the owner: ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(publication),
                    qualified(t)
                ));
            }
        }
    }
    problems
}
