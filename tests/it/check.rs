//! `cachesync check`: every problem in one run, with and without `--connect`.

use std::path::Path;
use std::process::Command;

use crate::common::Db;

fn check(config: &str, connect: bool) -> (bool, String) {
    let dir = cachesync_testkit::temp_dir("check", None);
    let path = dir.join("c.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(Path::new(env!("CARGO_BIN_EXE_cachesync")));
    cmd.arg("check").arg("--config").arg(&path);
    if connect {
        cmd.arg("--connect");
    }
    let out = cmd.output().expect("run cachesync check");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn reports_every_problem_in_the_file_with_its_line() {
    let config = r#"[server]
listen = "127.0.0.1:7070"
colour = "blue"
[postgres]
url = "postgres://app:hunter2@127.0.0.1/app"
[[keyspace]]
name = "users"
table = "users"
key = "id"
columns = ["name"]
ttl = "soon"
"#;
    let (ok, out) = check(config, false);
    assert!(!ok, "exit status is non-zero: {out}");
    assert!(out.contains("3 problem(s)"), "{out}");
    assert!(out.contains("line 3: server.colour: unknown field `colour`"), "{out}");
    assert!(
        out.contains("line 11: keyspace[users].ttl: invalid duration \"soon\""),
        "{out}"
    );
    assert!(
        out.contains("line 10: keyspace[users].columns: key column `id` is missing"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "no credentials in output: {out}");
}

#[test]
fn a_good_file_passes() {
    let (ok, out) = check("[[keyspace]]\nname = \"m\"\n", false);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn connect_reports_a_missing_table_and_a_missing_column_in_one_run() {
    let db = Db::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, name text); CREATE TABLE nokey (id int, v text);")
        .await;
    let config = db.config_text(
        "[[keyspace]]\nname = \"gone\"\ntable = \"public.missing\"\nkey = \"id\"\n\
         [[keyspace]]\nname = \"users\"\ntable = \"users\"\nkey = \"id\"\ncolumns = [\"id\", \"name\", \"email\"]\n\
         [[keyspace]]\nname = \"nokey\"\ntable = \"nokey\"\nkey = \"id\"\n\
         [[keyspace]]\nname = \"fine\"\ntable = \"users\"\nkey = \"id\"\nwrite = \"through\"\n",
    );
    let (ok, out) = tokio::task::spawn_blocking(move || check(&config, true)).await.unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("3 problem(s)"), "{out}");
    assert!(
        out.contains("keyspace[gone]: table public.missing does not exist"),
        "{out}"
    );
    assert!(
        out.contains("keyspace[users]: column `email` does not exist in table public.users"),
        "{out}"
    );
    assert!(
        out.contains("keyspace[nokey]: no primary key or unique index on exactly (id)"),
        "{out}"
    );
    assert!(!out.contains("keyspace[fine]"), "{out}");
}

#[tokio::test]
async fn connect_passes_when_everything_matches() {
    let db = Db::new().await;
    db.exec("CREATE TABLE users (id int PRIMARY KEY, name text);").await;
    let config =
        db.config_text("[[keyspace]]\nname = \"users\"\ntable = \"users\"\nkey = \"id\"\nwrite = \"through\"\n");
    let (ok, out) = tokio::task::spawn_blocking(move || check(&config, true)).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("verified"), "{out}");
}

#[tokio::test]
async fn connect_reports_cdc_prerequisites() {
    let db = Db::new().await;
    // A publication whose name differs only in case is not the one configured.
    db.exec(
        "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE NOT NULL, name text); CREATE PUBLICATION mypub;",
    )
    .await;
    let config = format!(
        "{}\n[log]\ndir = \"/tmp/unused\"\n[cdc]\npublication = \"MyPub\"\ncreate_publication = false\n",
        db.config_text(
            "[[keyspace]]\nname = \"by_email\"\ntable = \"users\"\nkey = \"email\"\ncdc = \"update\"\n\
             [[keyspace]]\nname = \"by_id\"\ntable = \"users\"\nkey = \"id\"\ncdc = \"invalidate\"\n"
        )
    );
    let first = config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || check(&first, true)).await.unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("keyspace[by_email]: key column `email` is not in the replica identity"),
        "{out}"
    );
    assert!(out.contains("REPLICA IDENTITY FULL"), "{out}");
    assert!(out.contains("cdc: publication \"MyPub\" does not exist"), "{out}");
    assert!(
        !out.contains("wal_level"),
        "the test server has wal_level = logical: {out}"
    );
    assert!(!out.contains("REPLICATION attribute"), "{out}");
    // The publication that does exist, without the table.
    let config = config.replace("MyPub", "mypub");
    let (ok, out) = tokio::task::spawn_blocking(move || check(&config, true)).await.unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("keyspace[by_id]: publication mypub does not include public.users"),
        "{out}"
    );
}

#[tokio::test]
async fn connect_accepts_a_view_for_reads_and_refuses_cdc_and_writes_on_it() {
    let db = Db::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int); CREATE VIEW tv AS SELECT id, v * 2 AS doubled FROM t;")
        .await;
    let reads = db.config_text(
        "[[keyspace]]\nname = \"doubled\"\ntable = \"tv\"\nkey = \"id\"\nttl = \"1s\"\nrefresh_ahead = 0.5\n",
    );
    let (ok, out) = tokio::task::spawn_blocking(move || check(&reads, true)).await.unwrap();
    assert!(ok, "a view serves reads without a unique key: {out}");
    let log = cachesync_testkit::temp_dir("check-view", None);
    let config = format!(
        "{}\n[log]\ndir = \"{}\"\n",
        db.config_text(
            "[[keyspace]]\nname = \"followed\"\ntable = \"tv\"\nkey = \"id\"\ncdc = \"invalidate\"\n\
             [[keyspace]]\nname = \"written\"\ntable = \"tv\"\nkey = \"id\"\nwrite = \"behind\"\n"
        ),
        log.display()
    );
    let (ok, out) = tokio::task::spawn_blocking(move || check(&config, true)).await.unwrap();
    let _ = std::fs::remove_dir_all(&log);
    assert!(!ok, "{out}");
    assert!(out.contains("2 problem(s)"), "{out}");
    assert!(
        out.contains("keyspace[followed]: public.tv is a view; logical replication carries only the changes of tables"),
        "{out}"
    );
    assert!(
        out.contains("refresh_ahead"),
        "the message names the alternative: {out}"
    );
    assert!(
        out.contains("keyspace[written]: public.tv is a view; write = \"behind\" needs a table"),
        "{out}"
    );
}

/// The runnable configs in `patterns/` stay runnable: each passes `check --connect` against the
/// sample schema that `deploy/dev/postgres.sh` loads.
#[tokio::test]
async fn every_pattern_config_passes_check_against_the_sample_schema() {
    let db = Db::new().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    db.exec(&std::fs::read_to_string(root.join("deploy/dev/sample.sql")).unwrap())
        .await;
    let mut configs: Vec<_> = std::fs::read_dir(root.join("patterns"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 5, "{configs:?}");
    let url = db.db.url.clone();
    for path in configs {
        let url = url.clone();
        let out = tokio::task::spawn_blocking(move || {
            let out = Command::new(Path::new(env!("CARGO_BIN_EXE_cachesync")))
                .args(["check", "--connect", "--config"])
                .arg(&path)
                .env("CACHESYNC_POSTGRES_URL", &url)
                .output()
                .expect("run cachesync check");
            (path, out)
        })
        .await
        .unwrap();
        let (path, out) = out;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{}: {text}", path.display());
        assert!(text.contains("verified"), "{}: {text}", path.display());
    }
}
