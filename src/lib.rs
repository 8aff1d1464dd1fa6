//! cachesync: a cache-synchronization sidecar. It serves a JSON cache on localhost, loads misses
//! from Postgres, writes back to Postgres (through, or behind via the log), keeps entries fresh
//! from logical replication through a local durable change log, and refreshes hot entries ahead
//! of their expiry.
//!
//! # Layout
//!
//! The data path reads one way, top to bottom; nothing below calls back up.
//!
//! ```text
//!  cli        serve / check / log stat|dump
//!  server     assembly: metrics, pool, log, keyspaces, pipelines, tasks; ordered shutdown
//!  config     the whole file: composes every section below, env overrides, cross-section checks
//!   │
//!  resp       the Redis protocol (RESP2/3) over the same pipelines: resp::frame (bounded
//!   │         request framing) · resp::reply · resp::conn (pipelined batches, pushes) ·
//!   │         resp::session (a connection's state) · resp::commands (routing, data commands) ·
//!   │         resp::admin (HELLO, AUTH, CLIENT, INFO, CONFIG, COMMAND; the command table) ·
//!   │         resp::tracking (CLIENT TRACKING fed by every change the keyspaces' door lets
//!   │         through); [resp]
//!  api        HTTP (axum; api::Api sends key reads straight to their handler, the rest through
//!   │         the router): api::kv GET/PUT/DELETE/_mget/_mput/_mdelete · api::admin /v1/keyspaces
//!   │         /v1/deadletters /metrics /healthz /readyz · api::error the one error → status
//!   │         mapping · api::listener connections, timeouts, the connection bound, hyper for
//!   │         all but key reads and writes · api::fast key requests parsed, hits written and
//!   │         writes' bodies handed over whole on the listener's own HTTP/1.1 path ·
//!   │         api::config [server]
//!   ▼
//!  patterns   one Pipeline per keyspace, assembled at start: a reader and a writer
//!   │         read_through   miss → single-flight load → lease-checked fill
//!   │         refresh_ahead  a hit late in its life → bounded background reload
//!   │         write_through  Postgres first, then cache what RETURNING gave
//!   │         write_behind   commit log first (202), overlay, coalescing flusher, dead letters,
//!   │                        [write_behind]
//!  replication the replicated log: replication::serve (log server: frames, snapshots, retention
//!   │         holds) · replication::follow (an upstream's log → this log → the applier) ·
//!   │         wire (frames) · position (a follower's durable place) · tls (acceptor, trusted
//!   │         certificates); [replication] [[upstream]]
//!  federation event federation between regions: the sequencer (the log's admission hook:
//!   │         gap-free per-origin numbers, at-most-once), the version vector and its checkpoint,
//!   │         the conflict rule's applier, tombstones, gossip; federation::link follows a
//!   │         [[peer]], federation::serve answers peers (routes the log server serves beside
//!   │         its own); [federation] [[peer]]
//!   ▼
//!  cdc        change data capture: cdc::postgres (pgoutput protocol → decoder → mapping → stream
//!   │         with catalog, slot and its ownership, warm start, feedback, freshness probes;
//!   │         reshape = schema changes; prerequisites for check) and cdc::applier
//!   │         (log → keyspaces); [cdc]
//!   ▼
//!  keyspace   one named cache's state and the one door every change goes through: lookup,
//!   │         load (L2, then the source; single flight + lease), mutate / invalidate / clear /
//!   │         reset_below, revalidation, the pending-write overlay (keyspace::overlay), the
//!   │         freshness contract (keyspace::freshness); [[keyspace]] (keyspace::config)
//!   ▼
//!  l2         the shared Redis tier: versioned records and their compare-and-set scripts
//!   │         (l2::record, l2::script), the connection with deadline and circuit breaker
//!   │         (l2::client), the publisher of changes, the per-keyspace invalidation stream
//!   │         reader (gaps, epochs, suspicion) and reconciler; [redis]
//!   ▼
//!  key        URL key encoding, composite keys, per-type normalization
//!  source     Postgres: pool, catalog binding (schema), SQL text (sql), rendering (render),
//!             COPY text for bulk upserts (copy), a write's fields read in place from its log
//!             record (fields), value checks (validate), the one SQLSTATE classification
//!             (sqlstate); [postgres]
//!  cache      L1 with versioned installs, in one of two stores (a bounded moka cache, or the
//!             compact store: one allocation per entry); flights = single flight + load leases
//!  commitlog  the durable log of change events: segments (framing, sparse index, recovery),
//!             group-commit writer, tailing readers, durable cursors, retention, inspection; [log]
//!  event      the change event, its constructors and its versioned binary encoding
//!  lifecycle  phases (serve → capture → drain → log), the spawn handle every task uses, Backoff
//!  credential bearer tokens: token files, constant-time checks, the loopback-only rule
//!  section    the TOML section reader every `*/config.rs` uses: every problem, with its line
//!  metrics    Prometheus registry, bounded labels
//!  hlc, lsn   version clocks: hybrid logical clock, Postgres WAL positions
//! ```
//!
//! Each subsystem's configuration section lives beside it (`<subsystem>/config.rs`, with its
//! `DEFAULT_*` constants); test support is the dev-only crate `tests/testkit`.
#![forbid(unsafe_code)]

pub mod api;
pub mod cache;
pub mod cdc;
pub mod cli;
pub mod commitlog;
pub mod config;
pub mod credential;
pub mod event;
pub mod federation;
pub mod hlc;
pub mod key;
pub mod keyspace;
pub mod l2;
pub mod lifecycle;
pub mod lsn;
pub mod metrics;
pub mod patterns;
pub mod replication;
pub mod resp;
pub mod section;
pub mod server;
pub mod source;
