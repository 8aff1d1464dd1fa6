//! The caching patterns, one file each, each described for users in `patterns/*.md` at the top
//! of the repository:
//!
//! - [`read_through`]: a miss loads the row; concurrent misses share one load; "not found" is
//!   remembered for `negative_ttl`; a load never installs over a change made while it ran.
//! - [`write_through`]: Postgres first, then the cache holds exactly what Postgres stored.
//! - [`write_behind`]: durable in the commit log, acknowledged, flushed to Postgres in batches.
//! - [`refresh_ahead`]: a read late in an entry's life reloads it in the background.

pub mod read_through;
pub mod refresh_ahead;
pub mod write_behind;
pub mod write_through;
