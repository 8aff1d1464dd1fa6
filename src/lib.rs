//! cachesync: a cache-synchronization sidecar. It serves a JSON cache on localhost, loads misses
//! from Postgres, writes back to Postgres (through, or behind via the log), keeps entries fresh
//! from logical replication through a local durable change log, and refreshes hot entries ahead
//! of their expiry.
//!
//! # Layout
//!
//! ```text
//!  HTTP (axum) ─ api ──────────────┐  api::kv      GET/PUT/DELETE/_mget on keys
//!                                  │  api::admin   /v1/keyspaces /metrics /healthz /readyz
//!                                  │  api::error   the one error → status mapping
//!                                  ▼
//!  keyspace  one named cache: config + L1 + in-flight loads + binding to its table
//!     │  patterns::read_through   miss → single-flight load → lease-checked fill
//!     │  patterns::write_through  Postgres first, then cache what RETURNING gave
//!     │  patterns::write_behind   commit log first (202), overlay, coalescing flusher, dead letters
//!     │  patterns::refresh_ahead  a hit late in its life → bounded background reload
//!     ▼
//!  cache     L1 (moka) with versioned installs; flights = single flight + load leases
//!  key       URL key encoding, composite keys, per-type normalization
//!  source    Postgres: pool, catalog binding (schema), SQL text (sql), value rendering (render)
//!  cdc       change data capture: cdc::postgres (pgoutput protocol → decoder → mapping →
//!            stream with slot, publication, warm start, feedback) and cdc::applier (log →
//!            keyspaces)
//!  commitlog the durable log of change events: segments (record framing, sparse index,
//!            recovery), group-commit writer, tailing readers, durable cursors, retention,
//!            read-only inspection
//!  event     the change event and its versioned binary encoding
//!  config    TOML + env overrides; reader reports every problem with its line
//!  server    assembly, background binding, ordered shutdown
//!  cli       serve / check
//!  metrics   Prometheus registry, bounded labels
//!  hlc, lsn  version clocks: hybrid logical clock, Postgres WAL positions
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod cache;
pub mod cdc;
pub mod cli;
pub mod commitlog;
pub mod config;
pub mod event;
pub mod hlc;
pub mod key;
pub mod keyspace;
pub mod lifecycle;
pub mod lsn;
pub mod metrics;
pub mod patterns;
pub mod server;
pub mod source;
