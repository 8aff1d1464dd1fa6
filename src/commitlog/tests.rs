//! Tests of the commit log on a real filesystem: round trips, rolling, reopening, torn tails,
//! flipped bits, index rebuilding, cursors, retention, fsync policies, group commit, and a
//! property test of random operation sequences against a simple model.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus::Registry;
use proptest::prelude::*;

use super::*;
use cachesync_testkit::temp_dir;

fn cfg(dir: &Path) -> LogConfig {
    LogConfig::new(dir)
}

fn payload(i: u64, size: usize) -> Vec<u8> {
    let mut p = format!("record-{i}-").into_bytes();
    p.resize(size.max(p.len()), b'x');
    p
}

async fn open(config: LogConfig) -> CommitLog {
    CommitLog::open(config, &Registry::new()).await.expect("open log").0
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn appends_read_back_with_contiguous_offsets() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    let a = log.append(vec![payload(0, 10), payload(1, 10)]).await.unwrap();
    let b = log.append(vec![payload(2, 10)]).await.unwrap();
    assert_eq!(a, Offset(0)..Offset(2));
    assert_eq!(b, Offset(2)..Offset(3));
    assert_eq!(log.end(), Offset(3));
    let recs = log.read(Offset(1), 10).unwrap();
    assert_eq!(recs.iter().map(|r| r.offset.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(recs[0].payload, payload(1, 10));
    assert!(recs[0].timestamp_ms > 0);
    assert!(log.read(Offset(3), 10).unwrap().is_empty());
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_tail_is_woken_by_new_durable_records() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    let mut tail = log.tail(Offset(0));
    let waiter = tokio::spawn(async move { tail.next(100, usize::MAX).await.map(|r| (r, tail.position())) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished(), "no records yet, the tail waits");
    log.append(vec![payload(0, 5)]).await.unwrap();
    let (recs, pos) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken")
        .unwrap()
        .unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(pos, Offset(1));
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_tail_waiting_for_a_batch_is_woken_when_the_batch_is_durable_and_not_before() {
    use futures::FutureExt;
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    let tail = log.tail(Offset(0));
    let mut waiting = std::pin::pin!(tail.until_available(3));
    assert!(waiting.as_mut().now_or_never().is_none(), "nothing durable yet");
    // An append returns once published, and publishing wakes what it reached: polling right
    // after each append shows whether it woke the waiter.
    for i in 0..2 {
        log.append(vec![payload(i, 5)]).await.unwrap();
        assert!(waiting.as_mut().now_or_never().is_none(), "{} of 3 records", i + 1);
        assert_eq!(log.shared.thresholds.lowest(), 3, "still registered");
    }
    log.append(vec![payload(2, 5)]).await.unwrap();
    assert!(
        matches!(waiting.as_mut().now_or_never(), Some(Ok(()))),
        "the third record wakes it"
    );
    assert_eq!(
        log.shared.thresholds.lowest(),
        u64::MAX,
        "and it is no longer registered"
    );
    // Enough already durable: at once.
    assert!(matches!(tail.until_available(2).now_or_never(), Some(Ok(()))));
    // A waiter that gives up (dropped, as when a batch's delay is out first) leaves nothing behind.
    {
        let mut gave_up = std::pin::pin!(tail.until_available(10));
        assert!(gave_up.as_mut().now_or_never().is_none());
        assert_eq!(log.shared.thresholds.lowest(), 10);
    }
    assert_eq!(log.shared.thresholds.lowest(), u64::MAX);
    // Closing the log ends a wait that cannot be met.
    let other = log.clone();
    let mut waiting = std::pin::pin!(tail.until_available(10));
    assert!(waiting.as_mut().now_or_never().is_none());
    other.close().await.unwrap();
    assert!(matches!(waiting.as_mut().now_or_never(), Some(Err(LogError::Closed))));
}

#[tokio::test]
async fn segments_roll_and_reads_cross_them_and_survive_reopen() {
    let dir = temp_dir("log", None);
    let mut c = cfg(&dir);
    c.segment_bytes = 1000;
    c.index_interval_bytes = 100;
    let log = open(c.clone()).await;
    for i in 0..200 {
        log.append(vec![payload(i, 50)]).await.unwrap();
    }
    assert!(log.segment_count() > 5, "{} segments", log.segment_count());
    let all = log.read(Offset(0), 1000).unwrap();
    assert_eq!(all.len(), 200);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, Offset(i as u64));
        assert_eq!(r.payload, payload(i as u64, 50));
    }
    // Every segment is named by its first offset.
    for f in segment_files(&dir) {
        let base: u64 = f.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        assert_eq!(f.file_name().unwrap().len(), 24);
        let first = log.read(Offset(base), 1).unwrap();
        assert_eq!(first[0].offset.0, base);
    }
    log.close().await.unwrap();
    let log = open(c).await;
    assert_eq!(log.end(), Offset(200));
    assert_eq!(log.read(Offset(137), 1).unwrap()[0].payload, payload(137, 50));
    assert_eq!(
        log.append(vec![payload(200, 50)]).await.unwrap(),
        Offset(200)..Offset(201)
    );
    log.close().await.unwrap();
}

#[tokio::test]
async fn torn_tails_are_truncated_at_any_cut() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    for i in 0..20 {
        log.append(vec![payload(i, 30)]).await.unwrap();
    }
    log.close().await.unwrap();
    let file = segment_files(&dir).pop().unwrap();
    let full = std::fs::read(&file).unwrap();
    let record_len = full.len() / 20;
    for cut in [
        full.len() - 1,
        full.len() - record_len + 3,
        full.len() - record_len / 2,
        full.len() - 2 * record_len - 7,
    ] {
        let d = temp_dir("log", None);
        std::fs::write(d.join(file.file_name().unwrap()), &full[..cut]).unwrap();
        let (log, rec) = CommitLog::open(cfg(&d), &Registry::new())
            .await
            .expect("a torn tail is not an error");
        let whole = (cut / record_len) as u64;
        assert_eq!(log.end(), Offset(whole), "cut at {cut}");
        assert_eq!(rec.truncated_bytes, Some((cut - whole as usize * record_len) as u64));
        let back = log.read(Offset(0), 100).unwrap();
        assert_eq!(back.len() as u64, whole);
        assert_eq!(back.last().unwrap().payload, payload(whole - 1, 30));
        // Offsets continue without a gap.
        assert_eq!(log.append(vec![b"next".to_vec()]).await.unwrap().start, Offset(whole));
        log.close().await.unwrap();
    }
}

#[tokio::test]
async fn flipped_bits_are_truncated_at_the_tail_and_reported_in_the_middle() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    for i in 0..10 {
        log.append(vec![payload(i, 40)]).await.unwrap();
    }
    log.close().await.unwrap();
    let file = segment_files(&dir).pop().unwrap();
    let full = std::fs::read(&file).unwrap();
    let rl = full.len() / 10;

    // A flip inside the last record: indistinguishable from a torn write; cut it.
    let mut tail = full.clone();
    tail[full.len() - 5] ^= 0x10;
    std::fs::write(&file, &tail).unwrap();
    let log = open(cfg(&dir)).await;
    assert_eq!(log.end(), Offset(9));
    log.close().await.unwrap();

    // A flip in record 3 with valid records after it: acknowledged data is damaged. Opening
    // reports it with the file and byte position instead of cutting 6 good records.
    let mut mid = full.clone();
    mid[3 * rl + 30] ^= 0x01;
    std::fs::write(&file, &mid).unwrap();
    match CommitLog::open(cfg(&dir), &Registry::new()).await {
        Err(LogError::Corrupt { file: f, position, .. }) => {
            assert_eq!(f, file);
            assert_eq!(position, 3 * rl as u64);
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got an open log"),
    }
}

#[tokio::test]
async fn corruption_in_a_sealed_segment_is_reported_to_readers() {
    let dir = temp_dir("log", None);
    let mut c = cfg(&dir);
    c.segment_bytes = 500;
    let log = open(c.clone()).await;
    for i in 0..40 {
        log.append(vec![payload(i, 40)]).await.unwrap();
    }
    log.close().await.unwrap();
    let files = segment_files(&dir);
    assert!(files.len() >= 3);
    let sealed = &files[0];
    let mut bytes = std::fs::read(sealed).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xFF;
    std::fs::write(sealed, &bytes).unwrap();
    let log = open(c).await;
    let err = log.read(Offset(0), 1000).expect_err("reading through the damage fails");
    match err {
        LogError::Corrupt { file, .. } => assert_eq!(&file, sealed),
        other => panic!("expected Corrupt, got {other}"),
    }
    // Records before the damage and in later segments still read.
    assert_eq!(log.read(Offset(0), 1).unwrap()[0].payload, payload(0, 40));
    let later = std::fs::read_dir(&dir).unwrap().count();
    assert!(later > 0);
    let second_base: u64 = files[1].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(log.read(Offset(second_base), 1).unwrap()[0].offset.0, second_base);
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_missing_or_damaged_index_is_rebuilt() {
    let dir = temp_dir("log", None);
    let mut c = cfg(&dir);
    c.segment_bytes = 2000;
    c.index_interval_bytes = 200;
    let log = open(c.clone()).await;
    for i in 0..100 {
        log.append(vec![payload(i, 60)]).await.unwrap();
    }
    log.close().await.unwrap();
    let indexes: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "index"))
        .collect();
    assert!(indexes.len() >= 2);
    std::fs::remove_file(&indexes[0]).unwrap();
    std::fs::write(&indexes[1], b"garbage!!").unwrap();
    let log = open(c).await;
    for i in [0u64, 17, 55, 99] {
        assert_eq!(log.read(Offset(i), 1).unwrap()[0].payload, payload(i, 60));
    }
    log.close().await.unwrap();
}

#[tokio::test]
async fn cursors_are_durable_and_validated() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    log.append((0..10).map(|i| payload(i, 8)).collect()).await.unwrap();
    let cur = log.cursor("flusher", true).unwrap();
    assert_eq!(cur.position(), Offset(0));
    cur.commit_async(Offset(7)).await.unwrap();
    assert!(log.cursor("bad/name", false).is_err());
    log.close().await.unwrap();
    let log = open(cfg(&dir)).await;
    assert_eq!(log.cursor("flusher", true).unwrap().position(), Offset(7));
    log.close().await.unwrap();
    std::fs::write(dir.join("cursors/flusher.cursor"), b"CSC1\x07\0\0\0\0\0\0\0\0\0\0\0").unwrap();
    let log = open(cfg(&dir)).await;
    assert!(matches!(log.cursor("flusher", true), Err(LogError::Corrupt { .. })));
    log.close().await.unwrap();
}

#[tokio::test]
async fn cursor_commits_overwrite_in_place_and_survive_a_torn_slot() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    let path = dir.join("cursors/c.cursor");
    // A format-1 file from an earlier build is read, then replaced on the next commit.
    std::fs::create_dir_all(dir.join("cursors")).unwrap();
    let mut v1 = b"CSC1".to_vec();
    v1.extend_from_slice(&3u64.to_le_bytes());
    v1.extend_from_slice(&crc32c::crc32c(&v1).to_le_bytes());
    std::fs::write(&path, &v1).unwrap();
    let cur = log.cursor("c", true).unwrap();
    assert_eq!(cur.position(), Offset(3));
    let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    for to in 4..=9 {
        cur.commit(Offset(to)).unwrap();
    }
    let first_ino = ino(&path);
    cur.commit(Offset(10)).unwrap();
    assert_eq!(
        ino(&path),
        first_ino,
        "commits after the first rewrite the same file in place"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        48,
        "two fixed slots; the file never grows"
    );
    assert_eq!(cursor::read_file(&path).unwrap(), Some(Offset(10)));
    // Tear the newest slot: the other slot's position is read.
    let mut bytes = std::fs::read(&path).unwrap();
    let seq = |at: usize| u64::from_le_bytes(bytes[at + 4..at + 12].try_into().unwrap());
    let newest = if seq(0) > seq(24) { 0 } else { 24 };
    bytes[newest + 14] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        cursor::read_file(&path).unwrap(),
        Some(Offset(9)),
        "a torn newest slot falls back to the one before"
    );
    log.close().await.unwrap();
}

#[tokio::test]
async fn retention_by_size_and_age_respects_required_cursors() {
    let dir = temp_dir("log", None);
    let mut c = cfg(&dir);
    c.segment_bytes = 1000;
    c.retention_bytes = Some(3000);
    c.retention_check = Duration::from_secs(3600);
    let log = open(c.clone()).await;
    let cur = log.cursor("applier", true).unwrap();
    for i in 0..200 {
        log.append(vec![payload(i, 50)]).await.unwrap();
    }
    let before = log.segment_count();
    assert_eq!(
        log.apply_retention().await.unwrap(),
        0,
        "the required cursor at 0 holds everything"
    );
    assert_eq!(log.segment_count(), before);
    cur.commit_async(Offset(120)).await.unwrap();
    let removed = log.apply_retention().await.unwrap();
    assert!(removed > 0);
    assert!(
        log.start() <= Offset(120),
        "nothing the cursor has not passed is removed: start {}",
        log.start()
    );
    assert!(matches!(log.read(Offset(0), 1), Err(LogError::OffsetOutOfRange { .. })));
    assert_eq!(log.read(Offset(120), 1).unwrap()[0].offset, Offset(120));
    cur.commit_async(Offset(200)).await.unwrap();
    log.apply_retention().await.unwrap();
    let disk: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log" || x == "index"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let prealloc = super::writer::prealloc_chunk(c.segment_bytes);
    assert!(
        disk <= 3000 + 1100 + prealloc,
        "size bound (plus the active segment and its preallocated tail): {disk}"
    );
    log.close().await.unwrap();

    // By age: everything sealed is older than 1ms after a pause.
    let mut c2 = c.clone();
    c2.retention_bytes = None;
    c2.retention_age = Some(Duration::from_millis(1));
    let log = open(c2).await;
    log.cursor("applier", true).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    log.apply_retention().await.unwrap();
    assert_eq!(log.segment_count(), 1, "only the active segment stays");
    assert_eq!(log.end(), Offset(200));
    log.close().await.unwrap();
}

#[tokio::test]
async fn interval_and_never_policies_acknowledge_and_publish() {
    for policy in [FsyncPolicy::Interval(Duration::from_millis(20)), FsyncPolicy::Never] {
        let dir = temp_dir("log", None);
        let mut c = cfg(&dir);
        c.fsync = policy;
        let log = open(c.clone()).await;
        let mut tail = log.tail(Offset(0));
        let r = tokio::time::timeout(Duration::from_secs(5), log.append(vec![payload(0, 10)]))
            .await
            .expect("acknowledged")
            .unwrap();
        assert_eq!(r, Offset(0)..Offset(1));
        let seen = tokio::time::timeout(Duration::from_secs(5), tail.next(10, usize::MAX))
            .await
            .expect("published")
            .unwrap();
        assert_eq!(seen.len(), 1, "{policy:?}");
        log.close().await.unwrap();
        let log = open(c).await;
        assert_eq!(log.end(), Offset(1), "{policy:?}: close flushes");
        log.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_group_commits() {
    let dir = temp_dir("log", None);
    let registry = Registry::new();
    let (log, _) = CommitLog::open(cfg(&dir), &registry).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..20 {
                got.push(log.append(vec![payload(t * 1000 + i, 20)]).await.unwrap().start);
            }
            got
        }));
    }
    let mut all: Vec<Offset> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(
        all,
        (0..640).map(Offset).collect::<Vec<_>>(),
        "every append got a distinct offset, no gaps"
    );
    let groups = registry
        .gather()
        .into_iter()
        .find(|m| m.name() == "cachesync_log_group_commit_records")
        .unwrap();
    let h = groups.get_metric()[0].get_histogram();
    assert_eq!(h.get_sample_sum() as u64, 640);
    assert!(
        h.get_sample_count() < 640,
        "{} syncs for 640 appends: some were shared",
        h.get_sample_count()
    );
    log.close().await.unwrap();
}

fn counter(registry: &Registry, name: &str) -> u64 {
    registry
        .gather()
        .into_iter()
        .find(|m| m.name() == name)
        .map_or(0, |m| m.get_metric()[0].get_counter().get_value() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_log_is_written_by_its_appender_and_order_holds_whoever_writes() {
    let dir = temp_dir("log", None);
    let registry = Registry::new();
    let (log, _) = CommitLog::open(cfg(&dir), &registry).await.unwrap();
    // One appender at a time: the log is idle at each append, so the appender writes it (the
    // writer thread may take only the first, while it looks at its queue once at start).
    for i in 0..50 {
        assert_eq!(
            log.append(vec![payload(i, 20)]).await.unwrap(),
            Offset(i)..Offset(i + 1)
        );
    }
    let led = counter(&registry, "cachesync_log_led_groups_total");
    assert!(led >= 49, "{led} of 50 lone appends written by their appender");
    // Producers mixing `enqueue` (left to the writer thread) and `append` (led when idle): each
    // producer's records keep the order it queued them in, and no offset is lost or doubled.
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..40u64 {
                    let p = payload(t * 1000 + i, 30);
                    let r = if i % 3 == 0 {
                        log.enqueue(vec![p]).await.unwrap().durable().await.unwrap()
                    } else {
                        log.append(vec![p]).await.unwrap()
                    };
                    mine.push(r.start.0);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "a producer's order holds: {mine:?}"
        );
        all.extend(mine);
    }
    all.sort();
    assert_eq!(all, (50..370).collect::<Vec<u64>>());
    let recs = log.read(Offset(0), 1000).unwrap();
    assert_eq!(recs.len(), 370);
    for r in &recs[..50] {
        assert_eq!(r.payload, payload(r.offset.0, 20));
    }
    // Every handle dropped without `close`: the writer thread finds every sender gone, closes
    // the log and releases the directory for the next writer.
    drop(log);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let reopened = loop {
        match CommitLog::open(cfg(&dir), &Registry::new()).await {
            Ok((log, _)) => break log,
            Err(LogError::Locked { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("reopen after the last handle was dropped: {e}"),
        }
    };
    assert_eq!(reopened.end(), Offset(370));
    reopened.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_runtime_with_one_worker_leaves_every_sync_to_the_writer_thread() {
    // A leader syncs on its own worker; with no second worker that would stall every other task
    // for the sync, so such a runtime never leads and its appends are written by the writer
    // thread — in order, none lost.
    let dir = temp_dir("log", None);
    let registry = Registry::new();
    let (log, _) = CommitLog::open(cfg(&dir), &registry).await.unwrap();
    for i in 0..20 {
        assert_eq!(
            log.append(vec![payload(i, 20)]).await.unwrap(),
            Offset(i)..Offset(i + 1)
        );
    }
    assert_eq!(counter(&registry, "cachesync_log_led_groups_total"), 0);
    let recs = log.read(Offset(0), 100).unwrap();
    assert_eq!(recs.len(), 20);
    for r in &recs {
        assert_eq!(r.payload, payload(r.offset.0, 20));
    }
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_byte_budget_holds_appenders_back_without_losing_any() {
    let dir = temp_dir("log", None);
    let mut c = cfg(&dir);
    c.max_queued_bytes = 500;
    let log = open(c).await;
    let tasks: Vec<_> = (0..16u64)
        .map(|t| {
            let log = log.clone();
            // Some appends are larger than the whole budget: they go through alone.
            tokio::spawn(async move {
                log.append(vec![payload(t, if t % 4 == 0 { 2000 } else { 300 })])
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(log.end(), Offset(16));
    log.close().await.unwrap();
}

#[tokio::test]
async fn close_stops_the_writer_while_other_handles_live() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    let other = log.clone();
    let mut tail = log.tail(Offset(0));
    log.append(vec![payload(0, 10)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), log.close())
        .await
        .expect("close returns though `other` is alive")
        .unwrap();
    assert!(matches!(
        other.append(vec![payload(1, 10)]).await,
        Err(LogError::Closed)
    ));
    assert_eq!(
        tail.next(10, usize::MAX).await.unwrap().len(),
        1,
        "what was durable is still read"
    );
    assert!(
        matches!(tail.next(10, usize::MAX).await, Err(LogError::Closed)),
        "then the tail ends"
    );
    // The directory is free for the next writer.
    open(cfg(&dir)).await.close().await.unwrap();
}

#[tokio::test]
async fn a_second_writer_is_refused() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    assert!(matches!(
        CommitLog::open(cfg(&dir), &Registry::new()).await,
        Err(LogError::Locked { .. })
    ));
    log.close().await.unwrap();
}

#[tokio::test]
async fn inspection_reads_without_changing_anything() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    let e = crate::event::ChangeEvent::put("users", "1", bytes::Bytes::from_static(br#"{"a":1}"#)).from_origin(
        "n1",
        5,
        crate::event::Source::Api,
    );
    log.append_events(&[e.clone(), e]).await.unwrap();
    log.cursor("c", false).unwrap().commit(Offset(1)).unwrap();
    let st = inspect::stat(&dir).unwrap();
    assert_eq!((st.start_offset, st.end_offset, st.records), (0, 2, 2));
    assert_eq!(st.cursors[0].lag_records, Some(1));
    let mut lines = Vec::new();
    inspect::dump(&dir, Some(Offset(1)), Some(5), |r| lines.push(inspect::record_json(r))).unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["value"]["a"], 1);
    assert_eq!(lines[0]["op"], "put");
    log.close().await.unwrap();
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Step {
    Append(Vec<usize>),
    Reopen,
    CommitCursor(u8),
    Retention,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => proptest::collection::vec(0usize..400, 1..6).prop_map(Step::Append),
        1 => Just(Step::Reopen),
        1 => any::<u8>().prop_map(Step::CommitCursor),
        1 => Just(Step::Retention),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn any_sequence_reads_back_identical_records_at_identical_offsets(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let dir = temp_dir("logprop", None);
            let mut c = cfg(&dir);
            c.segment_bytes = 700;
            c.index_interval_bytes = 150;
            c.retention_bytes = Some(2000);
            c.retention_check = Duration::from_secs(3600);
            let mut log = open(c.clone()).await;
            let mut cursor = log.cursor("keep", true).unwrap();
            let mut model: Vec<Vec<u8>> = Vec::new();
            for s in steps {
                match s {
                    Step::Append(sizes) => {
                        let ps: Vec<Vec<u8>> = sizes.iter().map(|&n| payload(model.len() as u64 * 1000 + n as u64, n)).collect();
                        let r = log.append(ps.clone()).await.unwrap();
                        assert_eq!(r.start.0 as usize, model.len());
                        model.extend(ps);
                    }
                    Step::Reopen => {
                        log.close().await.unwrap();
                        log = open(c.clone()).await;
                        cursor = log.cursor("keep", true).unwrap();
                    }
                    Step::CommitCursor(frac) => {
                        let to = model.len() as u64 * frac as u64 / 255;
                        cursor.commit_async(Offset(to.max(cursor.position().0))).await.unwrap();
                    }
                    Step::Retention => {
                        log.apply_retention().await.unwrap();
                    }
                }
                let start = log.start();
                assert!(start <= cursor.position(), "retention passed the required cursor");
                assert_eq!(log.end().0 as usize, model.len());
                let back = log.read(start, usize::MAX).unwrap();
                assert_eq!(back.len(), model.len() - start.0 as usize);
                for r in &back {
                    assert_eq!(&r.payload[..], &model[r.offset.0 as usize][..], "offset {}", r.offset);
                }
            }
            log.close().await.unwrap();
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}

#[tokio::test]
async fn a_log_keeps_its_identity_and_a_recreated_log_gets_a_new_one() {
    let dir = temp_dir("log", None);
    let log = open(cfg(&dir)).await;
    let id = log.identity().to_string();
    assert_eq!(id.len(), 32, "{id}");
    log.append(vec![payload(0, 10)]).await.unwrap();
    log.close().await.unwrap();
    let log = open(cfg(&dir)).await;
    assert_eq!(log.identity(), id, "reopened: the same log");
    assert_eq!(inspect::stat(&dir).unwrap().identity.as_deref(), Some(id.as_str()));
    log.close().await.unwrap();
    // Segments wiped (the IDENTITY file left behind): offsets restart, so the identity must not.
    for f in segment_files(&dir) {
        std::fs::remove_file(f).unwrap();
    }
    let log = open(cfg(&dir)).await;
    assert_eq!(log.end(), Offset(0));
    assert_ne!(log.identity(), id, "a recreated log is another log");
    log.close().await.unwrap();
    // A file that is not an identity is refused, not replaced.
    std::fs::write(dir.join("IDENTITY"), "something else\n").unwrap();
    let err = CommitLog::open(cfg(&dir), &Registry::new())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not a cachesync log identity"), "{err}");
}

#[tokio::test]
async fn preallocated_zeros_after_the_records_are_the_end_of_the_log() {
    let dir = temp_dir("log", None);
    let mut c = cfg(&dir);
    c.segment_bytes = 2000;
    let log = open(c.clone()).await;
    for i in 0..10 {
        log.append(vec![payload(i, 40)]).await.unwrap();
    }
    let active = segment_files(&dir).pop().unwrap();
    let open_len = std::fs::metadata(&active).unwrap().len();
    log.close().await.unwrap();
    let records = std::fs::metadata(&active).unwrap().len();
    assert!(
        open_len >= records + super::writer::prealloc_chunk(2000) / 2,
        "the writer keeps zeros ahead of its records ({open_len} bytes open, {records} of records)"
    );

    // What a crash leaves: zeros after the active segment's records, and (a crash right as a
    // segment was sealed) after a sealed one's.
    let log = open(c.clone()).await;
    for i in 10..60 {
        log.append(vec![payload(i, 40)]).await.unwrap();
    }
    log.close().await.unwrap();
    let files = segment_files(&dir);
    assert!(files.len() >= 2, "rolled");
    let sealed = files[0].clone();
    let sealed_len = std::fs::metadata(&sealed).unwrap().len();
    for f in [&sealed, files.last().unwrap()] {
        let mut w = std::fs::OpenOptions::new().append(true).open(f).unwrap();
        std::io::Write::write_all(&mut w, &[0u8; 5000]).unwrap();
    }
    let log = open(c.clone()).await;
    assert_eq!(log.end(), Offset(60), "the zeros are neither records nor damage");
    assert_eq!(
        std::fs::metadata(&sealed).unwrap().len(),
        sealed_len,
        "a sealed segment's zero tail is cut at open"
    );
    for i in 0..60 {
        assert_eq!(log.read(Offset(i), 1).unwrap()[0].payload, payload(i, 40));
    }
    log.append(vec![payload(60, 40)]).await.unwrap();
    log.close().await.unwrap();
    let log = open(c).await;
    assert_eq!(log.end(), Offset(61));
    assert_eq!(log.read(Offset(60), 1).unwrap()[0].payload, payload(60, 40));
}
