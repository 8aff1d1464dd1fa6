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
//! - **The L2 tier.** With `l2 = true` a miss asks Redis before the table (`Keyspace::load`),
//!   and an L1 hit the invalidation channel cannot vouch for is revalidated by version first
//!   (`Keyspace::revalidate`; see `l2`).
//! - **Errors are not cached.** A failed load answers its waiters with the error; the next read
//!   tries again.
//! - **The freshness contract.** In a CDC keyspace, a cached entry that may be further behind
//!   the database than `[cdc] max_staleness` (the change stream is down, reconnecting or
//!   catching up — see `keyspace::freshness`) is reloaded like a miss; if the load fails, or the
//!   keyspace does not read through, the entry is served with its lag reported.

use std::sync::Arc;

use super::refresh_ahead::{self, Refresher};
use crate::cache::Entry;
use crate::key::Key;
use crate::keyspace::{Keyspace, KeyspaceError, Origin, Read};
use crate::lifecycle::Tasks;
use crate::lsn::Lsn;

/// Reads `key`: the pending write or the live L1 entry when there is one, else (read-through
/// keyspaces) the table. An L1 hit late in the entry's life may schedule a background refresh
/// ([`refresh_ahead`]) under `tasks`.
pub async fn get(
    ks: &Arc<Keyspace>,
    refresher: Option<&Arc<Refresher>>,
    tasks: &Tasks,
    key: &Key,
) -> Result<Read, KeyspaceError> {
    match hit(ks, refresher, tasks, key) {
        Hit::Served(read) => return Ok(read),
        Hit::Stale(read) => return outside_contract(ks, key, read).await,
        // The L2 tier's channel cannot vouch for it (see `l2`): check it by version first.
        Hit::Unvouched(read) => return ks.revalidate(key, read).await,
        Hit::Absent => {}
    }
    ks.m.misses.inc();
    if !ks.config.read_through {
        // Nothing to load from: an absent key is absent — as far as the stream has told.
        let entry = Arc::new(Entry::new(None, Lsn::ZERO, 0));
        let fresh = ks.is_fresh_read(None);
        if !fresh {
            ks.m.stale_served.inc();
        }
        return Ok(Read {
            entry,
            origin: Origin::Miss,
            lag: (!fresh).then(|| ks.lag()),
        });
    }
    let loaded = ks.load(key).await?;
    Ok(Read {
        entry: loaded.entry,
        origin: if loaded.from_l2 { Origin::L2 } else { Origin::Miss },
        lag: None,
    })
}

/// What this node holds for a key, before any waiting.
enum Hit {
    /// The pending write or a live L1 entry that can be served as it is.
    Served(Read),
    /// An L1 entry outside the freshness contract.
    Stale(Read),
    /// An L1 entry the L2 tier's invalidation channel cannot vouch for.
    Unvouched(Read),
    /// Nothing held: a miss.
    Absent,
}

fn hit(ks: &Arc<Keyspace>, refresher: Option<&Arc<Refresher>>, tasks: &Tasks, key: &Key) -> Hit {
    let Some(mut read) = ks.lookup(&key.cache_key) else {
        return Hit::Absent;
    };
    if read.origin == Origin::Hit && !ks.is_fresh(&read.entry) {
        return Hit::Stale(read);
    }
    if read.origin == Origin::Hit && !ks.trusts(&read.entry) {
        return Hit::Unvouched(read);
    }
    ks.m.hits_l1.inc();
    if let (Some(r), Origin::Hit) = (refresher, read.origin) {
        read.origin = refresh_ahead::on_hit(r, ks, tasks, key, &read.entry);
    }
    Hit::Served(read)
}

/// [`get`] when the answer needs no waiting — the pending write or a live L1 entry that can be
/// served as it is — else `None` (and nothing counted): the caller takes the async path.
pub fn get_now(ks: &Arc<Keyspace>, refresher: Option<&Arc<Refresher>>, tasks: &Tasks, key: &Key) -> Option<Read> {
    match hit(ks, refresher, tasks, key) {
        Hit::Served(read) => Some(read),
        _ => None,
    }
}

/// A cached entry that may be further behind the database than the contract allows: reload it
/// (read-through keyspaces), or serve it saying how far behind it may be.
async fn outside_contract(ks: &Arc<Keyspace>, key: &Key, mut cached: Read) -> Result<Read, KeyspaceError> {
    if ks.config.read_through {
        match ks.reload(key).await {
            Ok((entry, _)) => {
                ks.m.stale_reloaded.inc();
                return Ok(Read {
                    entry,
                    origin: Origin::Miss,
                    lag: None,
                });
            }
            Err(e) => {
                tracing::debug!(keyspace = ks.name(), error = %e, "reload outside the freshness contract failed; serving the cached entry")
            }
        }
    }
    ks.m.stale_served.inc();
    cached.lag = Some(ks.lag());
    Ok(cached)
}
