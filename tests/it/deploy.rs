//! `deploy/`: what the Kubernetes schemas cannot check (`deploy/dev/validate-deploy.sh` checks
//! them against the schemas in CI). The sidecar is a native sidecar; probes point at real
//! routes on the port the config listens on; mounts, secrets, services, the network policy and
//! the monitors line up with the configs and the workloads; every ConfigMap's config passes
//! `cachesync check` as the pod mounts it; every metric the Grafana dashboard plots is one the
//! code exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cachesync_testkit::{eventually, temp_dir};
use yaml_rust2::{Yaml, YamlLoader};

use crate::common::{Db, Http, Node, WAIT, start_text};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every document of every manifest under deploy/k8s, with its file.
fn manifests() -> Vec<(PathBuf, Yaml)> {
    let mut files = Vec::new();
    for dir in ["deploy/k8s", "deploy/k8s/sidecar", "deploy/k8s/hub"] {
        for e in std::fs::read_dir(root().join(dir)).expect("deploy/k8s") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read manifest");
        for doc in YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display())) {
            out.push((f.clone(), doc));
        }
    }
    out
}

fn find<'a>(docs: &'a [(PathBuf, Yaml)], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| v.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// The config a ConfigMap carries, parsed as TOML.
fn config_of(cm: &Yaml) -> toml::Table {
    cm["data"]["cachesync.toml"]
        .as_str()
        .expect("cachesync.toml in the ConfigMap")
        .parse()
        .expect("TOML")
}

fn port_of(listen: &str) -> i64 {
    listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
}

/// Whether `labels` (a mapping) carries every label of `selector` (matchLabels).
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let sel = selector.as_hash().expect("matchLabels");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels[k.as_str().unwrap()] == *v)
}

/// A container's port number by name.
fn container_port(c: &Yaml, name: &str) -> i64 {
    c["ports"]
        .as_vec()
        .and_then(|ps| ps.iter().find(|p| p["name"].as_str() == Some(name)))
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no port named {name}"))
}

/// Checks one cachesync container against its config: probes on real routes of the listened
/// port, the config file and log directory mounted where the config says, tokens from the
/// Secret, the hardened security context.
fn check_container(c: &Yaml, pod: &Yaml, config: &toml::Table, secret: &Yaml) {
    let listen = config["server"]["listen"].as_str().expect("listen");
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"].as_str(), Some(path), "{probe} path");
        let port = g["port"].as_str().expect("a named port");
        assert_eq!(
            container_port(c, port),
            port_of(listen),
            "{probe} goes to the port the config listens on"
        );
    }
    assert!(
        !listen.starts_with("127."),
        "probes come from the kubelet: the API must listen on the pod IP"
    );
    let args = strs(&c["args"]);
    let cfg_path = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| args[i + 1].clone())
        .expect("--config");
    let mounts = c["volumeMounts"].as_vec().expect("mounts");
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
    };
    let volume = |name: &str| {
        pod["volumes"]
            .as_vec()
            .and_then(|vs| vs.iter().find(|v| v["name"].as_str() == Some(name)))
            .cloned()
    };
    let cfg_mount = mount_of(&cfg_path);
    assert_eq!(
        cfg_mount["readOnly"].as_bool(),
        Some(true),
        "the config is mounted read-only"
    );
    assert!(
        volume(cfg_mount["name"].as_str().unwrap()).is_some_and(|v| v["configMap"]["name"].as_str().is_some()),
        "the config comes from a ConfigMap"
    );
    if let Some(dir) = config.get("log").and_then(|l| l["dir"].as_str()) {
        let m = mount_of(dir);
        assert_ne!(m["readOnly"].as_bool(), Some(true), "the log directory is writable");
    }
    let keys: Vec<String> = secret["stringData"]
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let mut token_files = vec![
        config["server"]["token_file"]
            .as_str()
            .expect("a token: the API is not on loopback"),
    ];
    token_files.extend(config.get("replication").and_then(|r| r["token_file"].as_str()));
    if let Some(ups) = config.get("upstream").and_then(|u| u.as_array()) {
        token_files.extend(ups.iter().filter_map(|u| u["token_file"].as_str()));
    }
    for f in token_files {
        let m = mount_of(f);
        let v = volume(m["name"].as_str().unwrap()).expect("the tokens' volume");
        let file = Path::new(f).file_name().unwrap().to_str().unwrap();
        let item = v["secret"]["items"]
            .as_vec()
            .and_then(|is| is.iter().find(|i| i["path"].as_str() == Some(file)))
            .unwrap_or_else(|| panic!("{f} is not projected from the Secret"));
        assert!(
            keys.contains(&item["key"].as_str().unwrap().to_string()),
            "{f}: the Secret has the key"
        );
    }
    let env = c["env"].as_vec().expect("env");
    let pg = env
        .iter()
        .find(|e| e["name"].as_str() == Some("CACHESYNC_POSTGRES_URL"))
        .expect("the Postgres URL from the environment");
    assert!(keys.contains(&pg["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap().to_string()));
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL".to_string()]);
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let grace = pod["terminationGracePeriodSeconds"].as_i64().expect("a grace period");
    let shutdown: std::time::Duration =
        humantime::parse_duration(config["server"]["shutdown_grace"].as_str().unwrap()).unwrap();
    assert!(
        (grace as u64) > shutdown.as_secs(),
        "terminationGracePeriodSeconds ({grace}) must exceed shutdown_grace ({shutdown:?}): the log syncs after the drain"
    );
}

#[test]
fn the_manifests_line_up_with_the_configs_and_each_other() {
    let docs = manifests();
    let secret = find(&docs, "Secret", "cachesync");

    // The app with its edge sidecar: a native sidecar (an init container that keeps running).
    let app = find(&docs, "Deployment", "app");
    let pod = &app["spec"]["template"]["spec"];
    let pod_labels = &app["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&app["spec"]["selector"]["matchLabels"], pod_labels));
    let sidecar = pod["initContainers"]
        .as_vec()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some("cachesync")))
        .expect("cachesync is an init container");
    assert_eq!(sidecar["restartPolicy"].as_str(), Some("Always"), "a native sidecar");
    assert!(
        !pod["containers"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|c| c["name"].as_str() == Some("cachesync")),
        "not an ordinary container: those stop at the same time as the app"
    );
    let edge_cm = find(&docs, "ConfigMap", "cachesync-edge");
    let edge = config_of(edge_cm);
    check_container(sidecar, pod, &edge, secret);
    assert!(
        pod["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|v| v["emptyDir"].as_hash().is_some()),
        "the edge's log on an emptyDir"
    );

    // The hub: one replica, its log on a claim, a Service for the replication port.
    let hub = find(&docs, "StatefulSet", "cachesync-hub");
    assert_eq!(hub["spec"]["replicas"].as_i64(), Some(1), "a slot has one consumer");
    let hub_pod = &hub["spec"]["template"]["spec"];
    let hub_labels = &hub["spec"]["template"]["metadata"]["labels"];
    let hub_c = &hub_pod["containers"][0];
    let hub_cfg = config_of(find(&docs, "ConfigMap", "cachesync-hub"));
    check_container(hub_c, hub_pod, &hub_cfg, secret);
    let claim = hub["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .expect("a claim");
    let log_dir = hub_cfg["log"]["dir"].as_str().unwrap();
    assert!(
        hub_c["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|m| m["name"].as_str() == Some(claim) && log_dir.starts_with(m["mountPath"].as_str().unwrap())),
        "the hub's log is on its claim"
    );
    let repl_port = port_of(hub_cfg["replication"]["listen"].as_str().unwrap());
    assert_eq!(container_port(hub_c, "replication"), repl_port);
    let svc = find(&docs, "Service", "cachesync-hub");
    assert!(
        selects(&svc["spec"]["selector"], hub_labels),
        "the Service selects the hub"
    );
    for p in svc["spec"]["ports"].as_vec().unwrap() {
        container_port(hub_c, p["targetPort"].as_str().expect("a named target port"));
    }
    // The edges follow the hub through that Service.
    let url = edge["upstream"].as_array().unwrap()[0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    let svc_port = svc["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("replication"))
        .and_then(|p| p["port"].as_i64())
        .unwrap();
    assert_eq!(
        url,
        format!("http://cachesync-hub:{svc_port}"),
        "edges follow the hub's Service"
    );
    assert_eq!(edge["cdc"]["source"].as_str(), Some("upstream"), "edges hold no slot");
    let pdb = find(&docs, "PodDisruptionBudget", "cachesync-hub");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], hub_labels));

    // Only the app's pods reach the replication port.
    let np = find(&docs, "NetworkPolicy", "cachesync-hub");
    assert!(selects(&np["spec"]["podSelector"]["matchLabels"], hub_labels));
    let rules = np["spec"]["ingress"].as_vec().unwrap();
    let to_repl: Vec<&Yaml> = rules
        .iter()
        .filter(|r| {
            r["ports"]
                .as_vec()
                .unwrap()
                .iter()
                .any(|p| p["port"].as_i64() == Some(repl_port))
        })
        .collect();
    assert_eq!(to_repl.len(), 1, "one rule opens the replication port");
    let from = to_repl[0]["from"].as_vec().unwrap();
    assert!(
        from.iter().all(|f| f["podSelector"].as_hash().is_some()
            && f["namespaceSelector"].is_badvalue()
            && selects(&f["podSelector"]["matchLabels"], pod_labels)),
        "and only to the app's pods"
    );

    // The monitors scrape ports that exist, on the pods and Services they select.
    let pm = find(&docs, "PodMonitor", "cachesync-edges");
    assert!(selects(&pm["spec"]["selector"]["matchLabels"], pod_labels));
    for e in pm["spec"]["podMetricsEndpoints"].as_vec().unwrap() {
        container_port(sidecar, e["port"].as_str().unwrap());
        assert_eq!(e["path"].as_str(), Some("/metrics"));
    }
    let sm = find(&docs, "ServiceMonitor", "cachesync-hub");
    assert!(selects(
        &sm["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"]
    ));
    for e in sm["spec"]["endpoints"].as_vec().unwrap() {
        let name = e["port"].as_str().unwrap();
        assert!(
            svc["spec"]["ports"]
                .as_vec()
                .unwrap()
                .iter()
                .any(|p| p["name"].as_str() == Some(name))
        );
    }
}

/// Each ConfigMap's config passes `cachesync check`, read from a read-only directory with the
/// Secret's files where the pod mounts them.
#[test]
fn every_configmap_passes_check_as_the_pod_mounts_it() {
    let docs = manifests();
    let mut checked = 0;
    for (file, d) in &docs {
        if d["kind"].as_str() != Some("ConfigMap") {
            continue;
        }
        let text = d["data"]["cachesync.toml"].as_str().expect("cachesync.toml");
        let dir = temp_dir("k8s-config", None);
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        for key in ["api-token", "replication-token"] {
            std::fs::write(secrets.join(key), "a-test-token-0123456789\n").unwrap();
        }
        let text = text
            .replace("/var/run/secrets/cachesync", &secrets.display().to_string())
            .replace("/var/lib/cachesync", &dir.join("data").display().to_string());
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let cfg = etc.join("cachesync.toml");
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cachesync"))
            .args(["check", "--config"])
            .arg(&cfg)
            .env("CACHESYNC_POSTGRES_URL", "postgres://app@postgres.example:5432/app")
            .output()
            .expect("run cachesync check");
        assert!(
            out.status.success(),
            "{} ({}): {}{}",
            file.display(),
            d["metadata"]["name"].as_str().unwrap_or(""),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "the edge's and the hub's");
}

/// The metric names a dashboard expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("cachesync_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_string());
        i = end;
    }
    out
}

/// Every metric the dashboard plots is exported by a hub and an edge (with write-behind and the
/// Redis tier) once they have served a little.
#[tokio::test]
async fn every_metric_on_the_dashboard_is_exported() {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/cachesync.json")).unwrap()).unwrap();
    let mut wanted = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            wanted.extend(metric_names(t["expr"].as_str().expect("expr")));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            wanted.extend(metric_names(q));
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");

    let db = Db::new().await;
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL); INSERT INTO items VALUES (1, 'a');
         CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL); INSERT INTO notes VALUES (1, 'n');",
    )
    .await;
    let redis = cachesync_testkit::redis::shared();
    let node = Node::new();
    let hub_ks = "[[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\n\
                  [[keyspace]]\nname = \"notes\"\ntable = \"notes\"\nkey = \"id\"\nwrite = \"behind\"\n";
    let (hub, hh) = start_text(&crate::replication::hub_text(&db, &node, hub_ks, "")).await;
    let upstream = hub.replication_addr().expect("log server").to_string();
    let edge_ks = "[[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\nl2 = true\n";
    let redis_section = format!(
        "[redis]\nurl = \"{}\"\nprefix = \"{}\"\n",
        redis.url(),
        redis.key_prefix().trim_end_matches(':')
    );
    let (edge, he) = start_text(&crate::replication::edge_text(
        &db,
        "edge-1",
        &temp_dir("dash-edge", None),
        &upstream,
        edge_ks,
        &redis_section,
    ))
    .await;
    // A little of everything: hits and misses, a write-behind write flushed, a change streamed.
    for h in [&hh, &he] {
        h.get("/v1/kv/items/1").await;
        h.get("/v1/kv/items/1").await;
        h.get("/v1/kv/items/2").await;
    }
    assert_eq!(hh.put("/v1/kv/notes/2", r#"{"id":2,"body":"x"}"#).await.status, 202);
    db.exec("UPDATE items SET name = 'b' WHERE id = 1").await;
    let exported = |h: Http| async move { h.get("/metrics").await.body };
    let missing = eventually(WAIT, "every dashboard metric is exported", || async {
        let text = format!("{}\n{}", exported(hh.clone()).await, exported(he.clone()).await);
        let names: BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<&String> = wanted.iter().filter(|w| !names.contains(w.as_str())).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{missing:?}"))
        }
    })
    .await;
    let () = missing;
    drop((hub, edge));
}

/// The binary run as the pod runs it — its config in a read-only directory, Postgres's URL from
/// the environment, its log on a separate writable directory — is sent SIGTERM while the app
/// is still writing: it stops taking requests, stops capture after confirming its position,
/// drains write-behind into Postgres and syncs its log, in that order, and every write it
/// acknowledged is in Postgres.
#[tokio::test]
async fn sigterm_drains_in_order_and_loses_nothing_acknowledged() {
    use std::os::unix::fs::PermissionsExt;
    let db = Db::new().await;
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL); INSERT INTO items VALUES (1, 'a');
         CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);",
    )
    .await;
    let node = Node::new();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"20s\"\n[postgres]\nconnect_timeout = \"2s\"\n\
         [log]\ndir = \"{}\"\n[cdc]\nslot = \"{}\"\nheartbeat = \"0s\"\n\
         [[keyspace]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\ncdc = \"update\"\n\
         [[keyspace]]\nname = \"notes\"\ntable = \"notes\"\nkey = \"id\"\nwrite = \"behind\"\n",
        node.log.display(),
        node.slot
    );
    let etc = temp_dir("pod-etc", None);
    let cfg = etc.join("cachesync.toml");
    std::fs::write(&cfg, text).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut sidecar = cachesync_testkit::sidecar::Sidecar::spawn_file(
        Path::new(env!("CARGO_BIN_EXE_cachesync")),
        &cfg,
        &[("CACHESYNC_POSTGRES_URL", db.db.url.as_str())],
    );
    let http = Http::at(sidecar.base_url());
    eventually(WAIT, "ready", || async {
        let r = http.get("/readyz").await;
        if r.status == 200 { Ok(()) } else { Err(r.body) }
    })
    .await;
    // The app keeps writing (write-behind: 202 once durable) until the sidecar stops answering.
    let writer = {
        let base = sidecar.base_url();
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap();
            let mut acked = Vec::new();
            for id in 1i64.. {
                let r = client
                    .put(format!("{base}/v1/kv/notes/{id}"))
                    .body(format!(r#"{{"id":{id},"body":"b{id}"}}"#))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 202 => acked.push(id),
                    // Refused, reset or 503 once it is shutting down: not acknowledged.
                    _ => break,
                }
            }
            acked
        })
    };
    eventually(WAIT, "the app has written a while", || async {
        let n: i64 = db.scalar("SELECT count(*) FROM notes").await;
        if n >= 50 { Ok(()) } else { Err(n) }
    })
    .await;
    sidecar.signal("TERM");
    let acked = writer.await.expect("writer");
    let status = tokio::task::spawn_blocking(move || {
        let s = sidecar.wait_timeout(std::time::Duration::from_secs(60));
        (s, sidecar)
    })
    .await
    .unwrap();
    let (status, sidecar) = status;
    let log = sidecar.log();
    assert!(status.is_some_and(|s| s.success()), "a clean exit: {status:?}\n{log}");
    assert!(acked.len() >= 50, "{} writes acknowledged", acked.len());
    let stored: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM notes WHERE id = ANY(ARRAY[{}]::bigint[])",
            acked.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        ))
        .await;
    assert_eq!(stored, acked.len() as i64, "every acknowledged write reached Postgres");
    let order = [
        "shutdown requested",
        "shutdown: requests finished",
        "shutdown: change capture stopped",
        "shutdown: every write-behind write reached Postgres",
        "shutdown: the commit log is synced and closed",
    ];
    let at: Vec<usize> = order
        .iter()
        .map(|m| log.find(m).unwrap_or_else(|| panic!("the log says {m:?}:\n{log}")))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "drained in order {order:?}:\n{log}");
    assert!(!log.contains(db.db.url.as_str()), "the Postgres URL is never logged");
    let _ = std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755));
}
