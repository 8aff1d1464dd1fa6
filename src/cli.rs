//! The command line: `serve`, `check`, `log stat`/`log dump`. Parsing is clap's; each command is a short function
//! that returns the process exit code. `main.rs` only calls [`main`], which also sets the
//! process's memory policy first ([`without_huge_pages`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::server::{Drain, Server};
use crate::source::postgres::schema::{Binding, TableMeta};
use crate::source::postgres::{PgPool, classify};

const EXAMPLES: &str = "\
Examples:
  cachesync serve                                   in-memory cache on 127.0.0.1:7070, keyspace `default`
  cachesync serve --config patterns/read-through.toml
  CACHESYNC_POSTGRES_URL=postgres://app@127.0.0.1/app cachesync serve --config cachesync.toml
  cachesync check --config cachesync.toml           validate the file, report every problem
  cachesync check --config cachesync.toml --connect also verify tables, keys, columns, privileges

  cachesync log stat --dir /var/lib/cachesync/log     segments, offsets, cursors of a log
  cachesync log dump --dir /var/lib/cachesync/log --from 100 --limit 10   records as JSON lines

  curl -X PUT localhost:7070/v1/kv/default/a -d '{\"x\":1}'
  curl -i localhost:7070/v1/kv/default/a";

#[derive(Parser, Debug)]
#[command(name = "cachesync", version, about = "A cache-synchronization sidecar: a local JSON cache kept fresh from Postgres.", after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the sidecar. Without --config it runs an in-memory cache with one keyspace, `default`.
    #[command(after_help = EXAMPLES)]
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short, env = "CACHESYNC_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and report every problem at once; exits non-zero on any.
    #[command(after_help = EXAMPLES)]
    Check {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to Postgres and verify each keyspace's table, key, columns and privileges.
        #[arg(long)]
        connect: bool,
    },
    /// Inspect a commit log directory (read-only; safe beside a running sidecar).
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Segments, offsets, sizes and cursors, as JSON.
    #[command(after_help = EXAMPLES)]
    Stat {
        /// The log directory (`[log] dir`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Records as JSON lines: offset, timestamp and the decoded change event.
    #[command(after_help = EXAMPLES)]
    Dump {
        /// The log directory (`[log] dir`).
        #[arg(long)]
        dir: PathBuf,
        /// First offset to print (default: the log's start).
        #[arg(long)]
        from: Option<u64>,
        /// Most records to print.
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    without_huge_pages();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cachesync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config } => runtime.block_on(serve(config.as_deref())),
        Command::Check { config, connect } => runtime.block_on(check(&config, connect)),
        Command::Log(cmd) => log_command(cmd),
    }
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`), unless
/// `MIMALLOC_ALLOW_THP` is set, mimalloc's own switch for them, which then decides.
///
/// mimalloc asks for huge pages (`madvise(MADV_HUGEPAGE)`) on the memory it maps, so under
/// THP `always` or `madvise` the first touch of each 2 MiB region faults in and clears the
/// whole 2 MiB at once. The sidecar's batch-sized buffers (a flush's ops and its `COPY` text,
/// log reads) and a growing cache keep touching fresh regions: in a write-behind drain
/// clearing huge pages was 13 % of the samples over the drain, and with huge pages off the
/// sidecar's CPU per 100k-row drain fell from 0.56 to 0.49 s (medians of twelve drains each),
/// its resident set by ~20 MB (README, "Measured"). Lookups in a large cache pay some TLB
/// misses instead, small beside a request's cost.
pub fn without_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off for this process");
    }
}

fn log_command(cmd: LogCommand) -> ExitCode {
    use crate::commitlog::{Offset, inspect};
    use std::io::Write;
    let result = match cmd {
        LogCommand::Stat { dir } => inspect::stat(&dir).map(|st| {
            println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
        }),
        LogCommand::Dump { dir, from, limit } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let r = inspect::dump(&dir, from.map(Offset), limit, |rec| {
                let _ = writeln!(out, "{}", inspect::record_json(rec));
            });
            let _ = out.flush();
            r.map(|_| ())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cachesync: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHESYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(path: Option<&Path>) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cachesync: {e}");
            return ExitCode::from(2);
        }
    };
    if path.is_none() {
        tracing::info!("no --config given: running the embedded in-memory default (keyspace `default`)");
    }
    let server = match Server::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cachesync: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A machine-readable line on stdout: tests and scripts read the bound address from it.
    // The RESP line first: a supervisor reading the HTTP line knows both once it has it.
    if let Some(resp) = server.resp_addr() {
        println!("cachesync RESP listening on redis://{resp}");
    }
    println!("cachesync listening on http://{}", server.local_addr());
    wait_for_signal().await;
    tracing::info!("shutdown requested: no new connections; draining in-flight requests");
    match server.shutdown().await {
        Drain::Complete => {
            tracing::info!("shutdown complete: every in-flight request finished");
            ExitCode::SUCCESS
        }
        Drain::TimedOut => {
            tracing::warn!("shutdown grace period ran out; remaining requests were cut off");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn check(path: &Path, connect: bool) -> ExitCode {
    let config = match Config::load(Some(path)) {
        Ok(c) => c,
        Err(e) => {
            println!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if !connect {
        println!("{}: ok ({} keyspace(s))", path.display(), config.keyspaces.len());
        return ExitCode::SUCCESS;
    }
    let problems = check_connect(&config).await;
    if problems.is_empty() {
        println!(
            "{}: ok ({} keyspace(s); tables, keys, columns and privileges verified)",
            path.display(),
            config.keyspaces.len()
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "{} problem(s) in {} against the database:",
            problems.len(),
            path.display()
        );
        for p in &problems {
            println!("  {p}");
        }
        ExitCode::FAILURE
    }
}

/// Verifies every sourced keyspace against the live database; returns all problems found.
pub async fn check_connect(config: &Config) -> Vec<String> {
    let Some(pg) = &config.postgres else {
        return Vec::new();
    };
    let pool = match PgPool::new(pg) {
        Ok(p) => Arc::new(p),
        Err(e) => return vec![format!("postgres: {e}")],
    };
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => return vec![format!("postgres: cannot connect: {e}")],
    };
    let mut problems = crate::cdc::postgres::prerequisites::prerequisites(
        &client,
        &config.cdc,
        &config.server.node_id,
        &config.keyspaces,
    )
    .await;
    for ks in config.keyspaces.iter() {
        let Some(table) = &ks.table else { continue };
        match TableMeta::load(&**client, table).await {
            Err(e) => problems.push(format!(
                "keyspace[{}]: cannot read the catalog: {}",
                ks.name,
                classify(&e)
            )),
            Ok(meta) => {
                if let Err(ps) = Binding::resolve(ks, meta.as_ref()) {
                    problems.extend(ps.into_iter().map(|p| format!("keyspace[{}]: {p}", ks.name)));
                }
            }
        }
    }
    problems
}
