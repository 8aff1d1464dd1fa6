//! Black-box integration tests: the real server over real sockets, against real Postgres and
//! Redis servers started by `cachesync_testkit` (one of each per run of this binary; each test
//! has its own database or key prefix).

mod common;

mod cdc;
mod check;
mod commitlog_crash;
mod deploy;
mod embedded;
mod federation;
mod front_door;
mod harness;
mod l2;
mod memory;
mod read_through;
mod refresh_ahead;
mod replication;
mod resp;
mod under_change;
mod write_behind;
mod write_through;
