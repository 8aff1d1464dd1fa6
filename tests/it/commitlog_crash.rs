//! Crash test of the commit log: a child process appends from several tasks with
//! `fsync = "always"` and reports every acknowledged offset; it is killed with SIGKILL at random
//! moments, 20 times. After each kill the log is reopened: every acknowledged record reads back
//! intact at its offset, offsets are contiguous from the start, and appends continue at the end.
//! Then `cachesync log stat` / `log dump` inspect the result. A second test kills the child once
//! and checks what it leaves: records followed by the writer's preallocated zeros.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachesync::commitlog::{CommitLog, LogConfig, Offset};
use cachesync::event::{ChangeEvent, Source};

const CHILD_DIR: &str = "CACHESYNC_CRASH_CHILD_DIR";
const CYCLES: usize = 20;

/// A small deterministic generator (xorshift), seeded per run and printed for replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn event(task: u64, seq: u64, rng: &mut Rng) -> ChangeEvent {
    let len = 10 + (rng.next() % 300) as usize;
    let value: Vec<u8> = (0..len).map(|_| b'a' + (rng.next() % 26) as u8).collect();
    ChangeEvent::put(
        "crash",
        format!("t{task}-{seq}"),
        Bytes::from(format!("\"{}\"", String::from_utf8(value).unwrap())),
    )
    .from_origin("child", seq, Source::Api)
}

/// The child: appends until killed, printing `ack <offset> <crc32c of payload>` for every record
/// once its append has been acknowledged.
#[test]
#[ignore = "the child process of sigkill_during_appends_loses_nothing_acknowledged, which runs it"]
fn crash_child() {
    let dir = std::env::var(CHILD_DIR).expect("run by the crash test");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (log, _) = CommitLog::open(LogConfig::new(&dir), &prometheus::Registry::new())
            .await
            .expect("child opens the log");
        let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for task in 0..8u64 {
            let (log, out) = (log.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (task + 1) ^ std::process::id() as u64);
                for seq in 0.. {
                    let n = 1 + (rng.next() % 4);
                    let payloads: Vec<Vec<u8>> = (0..n).map(|i| event(task, seq * 10 + i, &mut rng).encode()).collect();
                    let range = log.append(payloads.clone()).await.expect("append");
                    let mut lines = String::new();
                    for (off, p) in (range.start.0..range.end.0).zip(&payloads) {
                        lines.push_str(&format!("ack {off} {}\n", crc32c::crc32c(p)));
                    }
                    use std::io::Write;
                    let mut o = out.lock().unwrap();
                    let _ = o.write_all(lines.as_bytes());
                    let _ = o.flush();
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// Starts the child on `dir`: its process, the acknowledgements it prints (offset, crc32c) and
/// the thread reading them.
fn spawn_child(
    dir: &std::path::Path,
) -> (
    std::process::Child,
    mpsc::Receiver<(u64, u32)>,
    std::thread::JoinHandle<()>,
) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "commitlog_crash::crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<(u64, u32)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ack ") {
                let mut it = rest.split(' ');
                let off = it.next().and_then(|s| s.parse().ok());
                let crc = it.next().and_then(|s| s.parse().ok());
                if let (Some(o), Some(c)) = (off, crc) {
                    let _ = tx.send((o, c));
                }
            }
        }
    });
    (child, rx, reader)
}

/// The active (last) segment file of the log in `dir`.
fn active_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs.pop().expect("a segment file")
}

/// The writer preallocates the active segment with zeros ahead of its records, so a SIGKILL
/// leaves records followed by zeros. Reopening takes the zeros for the end of the log (not for
/// damage), every acknowledged record reads back, appends continue inside the preallocated
/// space, and a clean close cuts the tail.
#[tokio::test]
async fn a_preallocated_zero_tail_left_by_sigkill_is_the_end_of_the_log() {
    let dir = cachesync_testkit::temp_dir("crashtail", None);
    let (mut child, rx, reader) = spawn_child(&dir);
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 300 {
        assert!(
            Instant::now() < deadline,
            "the child acknowledged only {} records",
            acked.len()
        );
        if let Ok((o, c)) = rx.recv_timeout(Duration::from_millis(50)) {
            acked.insert(o, c);
        }
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    reader.join().unwrap();
    acked.extend(rx.try_iter());

    let active = active_segment(&dir);
    let killed = std::fs::read(&active).unwrap();
    let data_end = killed.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    assert!(
        killed.len() >= data_end + 4096,
        "the killed writer had preallocated ahead of its records: file {} bytes, data ends at {data_end}",
        killed.len()
    );

    let (log, _recovery) = CommitLog::open(LogConfig::new(&dir), &prometheus::Registry::new())
        .await
        .expect("a zero tail reopens");
    let max_acked = *acked.keys().next_back().unwrap();
    assert!(
        log.end().0 > max_acked,
        "log ends at {} but {max_acked} was acknowledged",
        log.end()
    );
    for (&offset, &crc) in &acked {
        let r = log
            .read(Offset(offset), 1)
            .unwrap_or_else(|e| panic!("read {offset}: {e}"));
        assert_eq!(crc32c::crc32c(&r[0].payload), crc, "acknowledged record {offset}");
    }
    let end = log.end();
    let more = log
        .append(vec![b"after the crash".to_vec()])
        .await
        .expect("append after reopen");
    assert_eq!(
        more.start, end,
        "appends continue at the end, inside the preallocated space"
    );
    log.close().await.unwrap();
    let closed = std::fs::metadata(&active).unwrap().len();
    assert!(
        closed < killed.len() as u64,
        "a clean close cuts the preallocated tail ({closed} bytes, {} when killed)",
        killed.len()
    );
    let (log, recovery) = CommitLog::open(LogConfig::new(&dir), &prometheus::Registry::new())
        .await
        .unwrap();
    assert_eq!(recovery.truncated_bytes, None, "nothing torn after a clean close");
    assert_eq!(log.end(), Offset(end.0 + 1));
    assert_eq!(&log.read(end, 1).unwrap()[0].payload[..], b"after the crash");
    log.close().await.unwrap();
}

#[tokio::test]
async fn sigkill_during_appends_loses_nothing_acknowledged() {
    let dir = cachesync_testkit::temp_dir("crashlog", None);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    println!("crash test seed {seed}");
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    let mut end_after_reopen = 0u64;
    for cycle in 0..CYCLES {
        let (mut child, rx, reader) = spawn_child(&dir);
        // Let it get going (at least one acknowledgement), then kill at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("cycle {cycle}: the child acknowledged nothing"));
        let mut this_cycle = vec![first];
        let kill_at = Instant::now() + Duration::from_millis(rng.next() % 250);
        while Instant::now() < kill_at {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(5)) {
                this_cycle.push(a);
            }
        }
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        reader.join().unwrap();
        this_cycle.extend(rx.try_iter());
        // Appends after a reopen continue where the log ended: nothing below that is reused.
        let min = this_cycle.iter().map(|a| a.0).min().unwrap();
        assert!(
            min >= end_after_reopen,
            "cycle {cycle}: offset {min} was handed out again (log ended at {end_after_reopen})"
        );
        for (o, c) in this_cycle {
            assert!(acked.insert(o, c).is_none(), "offset {o} acknowledged twice");
        }

        // Reopen and check every acknowledged record, and that offsets are contiguous.
        let (log, recovery) = CommitLog::open(LogConfig::new(&dir), &prometheus::Registry::new())
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e}"));
        let end = log.end();
        let max_acked = *acked.keys().next_back().unwrap();
        assert!(
            end.0 > max_acked,
            "cycle {cycle}: log ends at {end} but {max_acked} was acknowledged"
        );
        let mut next = 0u64;
        while next < end.0 {
            let batch = log
                .read(Offset(next), 4096)
                .unwrap_or_else(|e| panic!("cycle {cycle}: read at {next}: {e}"));
            assert!(!batch.is_empty());
            for r in batch {
                assert_eq!(r.offset.0, next, "offsets are contiguous");
                if let Some(crc) = acked.get(&next) {
                    assert_eq!(
                        crc32c::crc32c(&r.payload),
                        *crc,
                        "cycle {cycle}: acknowledged record {next} changed"
                    );
                }
                ChangeEvent::decode(&r.payload).unwrap_or_else(|e| panic!("record {next} does not decode: {e}"));
                next += 1;
            }
        }
        println!(
            "cycle {cycle}: {} acknowledged so far, log end {end}, torn tail {:?}",
            acked.len(),
            recovery.truncated_bytes
        );
        end_after_reopen = end.0;
        log.close().await.unwrap();
    }
    assert!(
        acked.len() > 100,
        "the child made progress: {} acknowledged",
        acked.len()
    );

    // The inspection commands read the same log.
    let bin = env!("CARGO_BIN_EXE_cachesync");
    let stat = Command::new(bin)
        .args(["log", "stat", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(stat.status.success(), "{}", String::from_utf8_lossy(&stat.stderr));
    let st: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(st["end_offset"], end_after_reopen);
    assert_eq!(st["start_offset"], 0);
    let dump = Command::new(bin)
        .args(["log", "dump", "--from", "5", "--limit", "3", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(dump.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(dump.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.iter().map(|l| l["offset"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert_eq!(lines[0]["keyspace"], "crash");
    assert!(lines[0]["value"].is_string());
    let _ = std::fs::remove_dir_all(&dir);
}
