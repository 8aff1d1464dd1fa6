//! Helpers shared by the integration tests: a fresh database per test on the shared throwaway
//! Postgres, an in-process server on a free port, and a small HTTP client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cachesync::config::Config;
use cachesync::server::Server;
use cachesync_testkit::postgres::{self, PgServer, TestDb};
use cachesync_testkit::{eventually, temp_dir, unique};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// How long tests wait for a condition before failing with what they last saw.
pub const WAIT: Duration = Duration::from_secs(20);

/// A test's own database on a Postgres server, with an open admin connection.
pub struct Db {
    pub pg: Arc<PgServer>,
    pub db: TestDb,
    pub sql: tokio_postgres::Client,
}

impl Db {
    /// A fresh database on the shared server.
    pub async fn new() -> Db {
        Db::on(postgres::shared()).await
    }

    /// A fresh database on `pg`.
    pub async fn on(pg: Arc<PgServer>) -> Db {
        let db = pg.create_database().await;
        let sql = pg.connect(&db.name).await;
        Db { pg, db, sql }
    }

    pub async fn exec(&self, sql: &str) {
        self.sql
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A single value from a query returning one row and one column.
    pub async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.sql
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// A session holding `table` in EXCLUSIVE mode (reads go on, writes such as a flush wait)
    /// until it commits or is dropped.
    pub async fn lock(&self, table: &str) -> tokio_postgres::Client {
        let session = self.pg.connect(&self.db.name).await;
        session
            .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN EXCLUSIVE MODE;"))
            .await
            .unwrap_or_else(|e| panic!("lock {table}: {e}"));
        session
    }

    /// A config listening on a free port, using this database, with the given keyspaces.
    pub fn config(&self, keyspaces: &str) -> Config {
        Config::parse(&self.config_text(keyspaces)).expect("test config is valid")
    }

    pub fn config_text(&self, keyspaces: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n[postgres]\nurl = \"{}\"\nacquire_timeout = \"2s\"\nconnect_timeout = \"2s\"\n{keyspaces}",
            self.db.url
        )
    }
}

/// The sum of the samples of a Prometheus metric whose line starts with `name` (a name, or a
/// name with the start of its labels).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends the server's logs to the test output when `CACHESYNC_TEST_LOG` is set (an EnvFilter,
/// e.g. `cachesync=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("CACHESYNC_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Starts an in-process server and waits until every keyspace is bound.
pub async fn serve(config: Config) -> (Server, Http) {
    init_logging();
    let server = Server::start(config).await.expect("server starts");
    server.wait_ready(WAIT).await.expect("keyspaces become ready");
    let http = Http::new(server.local_addr());
    (server, http)
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The `error` code of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }

    pub fn detail(&self) -> String {
        self.json()["detail"].as_str().unwrap_or_default().to_string()
    }
}

/// A small HTTP client bound to one server.
#[derive(Clone)]
pub struct Http {
    pub base: String,
    client: reqwest::Client,
}

impl Http {
    pub fn new(addr: std::net::SocketAddr) -> Http {
        Http::at(format!("http://{addr}"))
    }

    pub fn at(base: String) -> Http {
        Http {
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        }
    }

    /// A request to `path` that the caller finishes (headers), for [`Http::send_with`].
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    /// Sends a request built with [`Http::request`].
    pub async fn send_with(&self, req: reqwest::RequestBuilder) -> Resp {
        self.send(req).await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let r = req.send().await.expect("request reaches the server");
        Resp {
            status: r.status(),
            headers: r.headers().clone(),
            body: r.text().await.expect("body"),
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.client.get(format!("{}{path}", self.base))).await
    }

    pub async fn put(&self, path: &str, body: impl Into<reqwest::Body>) -> Resp {
        self.send(self.client.put(format!("{}{path}", self.base)).body(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(self.client.delete(format!("{}{path}", self.base))).await
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> Resp {
        self.send(self.client.post(format!("{}{path}", self.base)).body(body))
            .await
    }
}

/// GETs `path` until `pred` holds for the response (or fails the test after [`WAIT`]).
pub async fn until(http: &Http, path: &str, what: &str, pred: impl Fn(&Resp) -> bool) -> Resp {
    eventually(WAIT, what, || async {
        let r = http.get(path).await;
        if pred(&r) {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .await
}

/// A sidecar's durable identity across restarts: its log directory and slot.
pub struct Node {
    pub log: PathBuf,
    pub slot: String,
}

impl Node {
    pub fn new() -> Node {
        Node {
            log: temp_dir("cdclog", None),
            slot: format!("cs_test_{}_{}", std::process::id(), unique()),
        }
    }

    pub fn config(&self, db: &Db, keyspaces: &str) -> Config {
        Config::parse(&self.config_text(db, keyspaces, "")).expect("valid test config")
    }

    /// The configuration text, with `extra` sections appended (e.g. `[write_behind]`).
    pub fn config_text(&self, db: &Db, keyspaces: &str, extra: &str) -> String {
        format!(
            "{}\n[log]\ndir = \"{}\"\n[cdc]\nslot = \"{}\"\nheartbeat = \"0s\"\nready_grace = \"1s\"\n{extra}\n",
            db.config_text(keyspaces),
            self.log.display(),
            self.slot
        )
    }

    /// Starts an in-process server from a configuration text.
    pub async fn start_text(&self, text: &str) -> (Server, Http) {
        start_text(text).await
    }

    pub async fn start(&self, db: &Db, keyspaces: &str) -> (Server, Http) {
        init_logging();
        let server = Server::start(self.config(db, keyspaces)).await.expect("server starts");
        server
            .wait_ready(Duration::from_secs(60))
            .await
            .expect("CDC keyspaces become ready");
        let http = Http::new(server.local_addr());
        (server, http)
    }
}

/// Starts an in-process server from a configuration text, once every keyspace is ready.
pub async fn start_text(text: &str) -> (Server, Http) {
    init_logging();
    let server = Server::start(Config::parse(text).expect("valid test config"))
        .await
        .expect("server starts");
    server
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("keyspaces become ready");
    let http = Http::new(server.local_addr());
    (server, http)
}

/// Holds loads between their query and their install until released.
pub struct Gate {
    pub reached: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<()>>,
    pub release: Arc<tokio::sync::Notify>,
}

pub fn hold_loads(ks: &cachesync::keyspace::Keyspace) -> Gate {
    let (tx, rx) = tokio::sync::mpsc::channel::<()>(8);
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    ks.set_load_hook(Some(Arc::new(move |_key| {
        let (tx, release) = (tx.clone(), r.clone());
        Box::pin(async move {
            let _ = tx.send(()).await;
            release.notified().await;
        })
    })));
    Gate {
        reached: tokio::sync::Mutex::new(rx),
        release,
    }
}

/// Write-behind writes not yet flushed, from `/metrics`.
pub async fn backlog(http: &Http) -> f64 {
    metric(
        &http.get("/metrics").await.body,
        "cachesync_writebehind_backlog_records",
    )
}

/// Waits until every write-behind write reached Postgres.
pub async fn drained(http: &Http) {
    eventually(Duration::from_secs(60), "the backlog drains", || async {
        let b = backlog(http).await;
        if b == 0.0 { Ok(()) } else { Err(b) }
    })
    .await;
}
