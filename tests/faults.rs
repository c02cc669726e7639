//! Faults of the machine under netra: its disk filling up. (A killed or stopped process
//! and a PostgreSQL outage are in resume.rs, shutdown.rs and outage.rs.)

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Spawn, assert_dense, ends_run, types};
use serde_json::{Value, json};

/// A small tmpfs, unmounted when dropped (after the server using it is gone).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(bytes: u64) -> Self {
        let dir = std::env::temp_dir().join(common::unique("netra-disk"));
        std::fs::create_dir_all(&dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "this test mounts a tmpfs to fill it: run it as root, as scripts/test does");
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A full disk ends each run explicitly (never a client left waiting), keeps what was
/// stored intact, and once space is back the next run completes with the thread's `seq`
/// dense: no accepted event was lost.
#[tokio::test]
async fn a_full_disk_fails_runs_explicitly_and_recovers_without_losing_an_event() {
    let disk = SmallDisk::mount(4 * 1024 * 1024);
    let filler = disk.0.join("filler");
    std::fs::write(&filler, vec![0u8; 1024 * 1024]).expect("filler");
    // SQLite in the small disk's data dir, on both passes of the suite: the fault is its disk.
    let data = disk.0.join("data");
    let server = Spawn::new()
        .env("DATABASE_URL", format!("sqlite://{}", data.join("netra.db").display()))
        .data_dir(data)
        .env("NETRA_AGENT_TOKEN_DELAY", "0")
        .ready()
        .await;
    let mut tab = server.connect("filler").await;
    let big = "x".repeat(100_000);
    let mut thread: Option<String> = None;
    let mut answered = Vec::new();
    let mut failed = None;
    for _ in 0..60 {
        tab.send(json!({"type": "user_message", "payload": {"content": big, "thread_id": thread}})).await;
        // `next` panics after its deadline: a run the client never hears the end of fails here.
        let run = tab.until(|f| ends_run(f) || f["type"] == "error").await;
        if thread.is_none() {
            thread = run.iter().find_map(|f| f["thread_id"].as_str()).map(str::to_string);
        }
        let last = run.last().expect("frames").clone();
        if last["type"] == "final_report" {
            answered.push(last);
        } else {
            failed = Some(run);
            break;
        }
    }
    let failed = failed.expect("the disk filled within 60 runs of 100 KB");
    let error = failed.last().expect("frames");
    assert_eq!(error["type"], "error", "{:?}", types(&failed));
    assert!(!error["payload"]["message"].as_str().unwrap_or_default().is_empty(), "{error}");
    assert!(!answered.is_empty(), "some runs completed before the disk filled");

    std::fs::remove_file(&filler).expect("free the space");
    let thread = thread.expect("a thread");
    let mut recovered = None;
    for _ in 0..5 {
        let run = tab.chat("what is 2 + 2?", Some(&thread)).await;
        if run.last().is_some_and(|f| f["type"] == "final_report") {
            recovered = Some(run);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let recovered = recovered.expect("a run completes once there is space again");

    let mut reader = server.connect("filler").await;
    reader.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}})).await;
    let end = recovered.last().and_then(|f| f["seq"].as_u64()).expect("seq");
    let history = reader.until(|f| f["seq"].as_u64() == Some(end)).await;
    assert_eq!(history.first().and_then(|f| f["seq"].as_u64()), Some(1));
    assert_dense(&history);
    let stored: Vec<&Value> = history.iter().filter(|f| f["type"] == "final_report").collect();
    for answer in &answered {
        assert!(stored.contains(&answer), "an answer the client got is in the history: {}", answer["seq"]);
    }
}
