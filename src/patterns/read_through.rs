//! Read-through: an L1 miss loads the row from the keyspace's table.
//!
//! - **Single flight.** Concurrent misses for one key join one [`Flight`](crate::cache::Flight):
//!   one query, one result for all of them.
//! - **Negative caching.** "No such row" is cached as a negative entry for `negative_ttl`, so a
//!   hot absent key does not turn into a query per request.
//! - **No stale fills.** The flight is registered *before* the query is sent and is the load's
//!   lease: a write or change of the key while the query runs marks it stale, and a stale result
//!   is returned to the callers already waiting (their reads overlapped the change) but never
//!   installed — the fill/invalidate race of look-aside caches cannot leave an old value behind.
//! - **Errors are not cached.** A failed load answers its waiters with the error; the next read
//!   tries again.

use std::sync::Arc;
use std::time::Instant;

use crate::cache::Lease;
use crate::cache::{Entry, Install, Installed};
use crate::key::Key;
use crate::keyspace::{Keyspace, KeyspaceError, LoadResult, Origin, Read};
use crate::lsn::Lsn;
use crate::patterns::refresh_ahead;

/// Reads `key`: from L1 when present and live, else (read-through keyspaces) from the table.
/// A hit late in the entry's life may schedule a background refresh ([`refresh_ahead`]).
pub async fn get(ks: &Arc<Keyspace>, key: &Key) -> Result<Read, KeyspaceError> {
    if let Some(entry) = ks.l1.get(&key.cache_key).await {
        ks.m.hits_l1.inc();
        let origin = refresh_ahead::on_hit(ks, key, &entry);
        return Ok(Read { entry, origin });
    }
    ks.m.misses.inc();
    if !ks.config.read_through {
        // Nothing to load from: an absent key is simply absent.
        let entry = Arc::new(Entry::new(None, Lsn::ZERO, 0));
        return Ok(Read {
            entry,
            origin: Origin::Miss,
        });
    }
    let entry = load(ks, key).await?;
    Ok(Read {
        entry,
        origin: Origin::Miss,
    })
}

/// Reloads `key` for a background refresh. `Ok(false)` when the result was not installed
/// because the key was written or changed while it loaded.
pub async fn reload(ks: &Keyspace, key: &Key) -> Result<bool, KeyspaceError> {
    load_leased(ks, key).await.map(|(_, held)| held)
}

/// Loads `key` through the keyspace's flight registry and installs the result if its lease
/// held. Shared by misses and background refreshes.
pub async fn load(ks: &Keyspace, key: &Key) -> Result<Arc<Entry>, KeyspaceError> {
    load_leased(ks, key).await.map(|(entry, _)| entry)
}

/// [`load`], also saying whether the flight's lease held (its result was installed).
async fn load_leased(ks: &Keyspace, key: &Key) -> Result<(Arc<Entry>, bool), KeyspaceError> {
    let source = ks.source()?;
    let (flight, _leader) = ks.flights.join(&key.cache_key);
    let lease = flight.clone();
    let result: LoadResult = flight
        .run(|| async move {
            let started = Instant::now();
            let loaded = source.load(&key.parts).await;
            ks.m.load_seconds.observe(started.elapsed().as_secs_f64());
            let loaded = match loaded {
                Ok(l) => l,
                Err(e) => {
                    ks.m.loads_error.inc();
                    return Err(e);
                }
            };
            if loaded.value.is_some() {
                ks.m.loads_found.inc();
            } else {
                ks.m.loads_absent.inc();
            }
            if let Some(hook) = ks.load_hook() {
                hook(key.cache_key.clone()).await;
            }
            let entry = Entry::new(loaded.value, loaded.lsn, ks.hlc.now()).with_snapshot(loaded.snapshot);
            if ks
                .l1
                .install(key.cache_key.clone(), entry.clone(), Install::Fill(lease))
                .await
                == Installed::Skipped
            {
                ks.m.fills_skipped.inc();
            }
            Ok(Arc::new(entry))
        })
        .await;
    ks.flights.finish(&key.cache_key, &flight);
    let held = flight.is_valid();
    Ok((result?, held))
}
