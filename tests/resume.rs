//! Durable threads: every event persisted with its seq, and `subscribe` resumes with no
//! gap and no duplicate (PROTOCOL.md §6a, §6b), on SQLite and PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{BACKENDS, Spawn, ends_run, types};
use serde_json::{Value, json};

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|f| f["seq"].as_u64()).collect()
}

#[tokio::test]
async fn resume_after_gap_replays_missing_events_once() {
    for backend in BACKENDS {
        let server = Spawn::new().backend(backend).await.ready().await;
        let mut a = server.connect("alice").await;
        let run = a.chat("what is 1 + 1?", None).await;
        let thread = run[0]["thread_id"].as_str().expect("thread id").to_string();
        let last = *seqs(&run).last().expect("seq");
        // A new tab that saw up to seq 3 resumes from there.
        let mut b = server.connect("alice").await;
        b.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 3}})).await;
        let replay = b.until(|f| f["seq"].as_u64() == Some(last)).await;
        assert_eq!(seqs(&replay), (4..=last).collect::<Vec<_>>(), "{backend:?}");
        for (live, replayed) in run.iter().skip(3).zip(&replay) {
            assert_eq!(live, replayed, "{backend:?}: replay must equal what was sent live");
        }
        // Then live, exactly once, on both tabs.
        let next = a.chat("and 2 + 2?", Some(&thread)).await;
        let on_b = b.collect_run().await;
        assert_eq!(seqs(&on_b), seqs(&next), "{backend:?}");
        assert_eq!(seqs(&next)[0], last + 1);
    }
}

#[tokio::test]
async fn resume_racing_live_events_has_no_gap_and_no_duplicate() {
    for backend in BACKENDS {
        let server = Spawn::new().backend(backend).await.env("NETRA_AGENT_TOKEN_DELAY", "2ms").ready().await;
        let mut a = server.connect("racer").await;
        let first = a.chat("warm up", None).await;
        let thread = first[0]["thread_id"].as_str().expect("thread").to_string();
        let words = (0..40).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        a.send(json!({"type": "user_message", "payload": {"content": words, "thread_id": thread}})).await;
        // Subscribe from zero while the run streams: replay and live overlap.
        let mut b = server.connect("racer").await;
        a.until(|f| f["type"] == "partial_result").await;
        b.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}})).await;
        let on_a = a.collect_run().await;
        let end = on_a.last().and_then(|f| f["seq"].as_u64()).expect("final seq");
        let on_b = b.until(|f| f["seq"].as_u64() == Some(end)).await;
        // Before the subscribe took effect b followed the thread live by default; from
        // the replay's first frame on, every seq arrives exactly once and in order.
        let s = seqs(&on_b);
        let replay_start = s.iter().position(|&q| q == 1).expect("replay starts at seq 1");
        assert!(s[..replay_start].windows(2).all(|w| w[1] == w[0] + 1), "{backend:?}: {s:?}");
        assert_eq!(s[replay_start..], (1..=end).collect::<Vec<_>>(), "{backend:?}");
        b.expect_silence(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn two_concurrent_runs_on_one_thread_keep_seq_dense() {
    for backend in BACKENDS {
        let server = Spawn::new().backend(backend).await.env("NETRA_AGENT_TOKEN_DELAY", "1ms").ready().await;
        let mut a = server.connect("pair").await;
        let first = a.chat("start", None).await;
        let thread = first[0]["thread_id"].as_str().expect("thread").to_string();
        let mut b = server.connect("pair").await;
        let long = "a b c d e f g h i j k l m n o p";
        a.send(json!({"type": "user_message", "payload": {"content": long, "thread_id": thread}})).await;
        b.send(json!({"type": "user_message", "payload": {"content": long, "thread_id": thread}})).await;
        // Each tab sees both runs; collect until two final_reports.
        let mut frames = Vec::new();
        let mut done = 0;
        while done < 2 {
            let f = a.next().await;
            if f["type"] == "final_report" {
                done += 1;
            }
            frames.push(f);
        }
        let s = seqs(&frames);
        let start = *s.first().expect("seq");
        assert_eq!(s, (start..start + s.len() as u64).collect::<Vec<_>>(), "{backend:?}");
        let runs: BTreeMap<&str, usize> =
            frames.iter().filter_map(|f| f["run_id"].as_str()).fold(BTreeMap::new(), |mut m, r| {
                *m.entry(r).or_default() += 1;
                m
            });
        assert_eq!(runs.len(), 2, "{backend:?}");
    }
}

#[tokio::test]
async fn subscribe_to_a_foreign_or_unknown_thread_is_forbidden() {
    let server = Spawn::new().ready().await;
    let mut owner = server.connect("owner").await;
    let run = owner.chat("mine", None).await;
    let thread = run[0]["thread_id"].as_str().expect("thread").to_string();
    let mut other = server.connect("intruder").await;
    for t in [thread.as_str(), "th_does_not_exist"] {
        other.send(json!({"type": "subscribe", "payload": {"thread_id": t, "after_seq": 0}, "message_id": "s1"})).await;
        let e = other.next().await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["payload"]["code"], "forbidden");
        assert_eq!(e["payload"]["ref"], "s1");
        assert!(e.get("seq").is_none());
        // unsubscribe is held to the same rule: a mute lasts as long as the connection.
        other.send(json!({"type": "unsubscribe", "payload": {"thread_id": t}, "message_id": "u1"})).await;
        let e = other.next().await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["payload"]["code"], "forbidden");
        assert_eq!(e["payload"]["ref"], "u1");
    }
    other.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn unsubscribe_stops_a_thread_until_the_client_sends_into_it() {
    let server = Spawn::new().ready().await;
    let mut a = server.connect("mute").await;
    let mut b = server.connect("mute").await;
    let run = a.chat("one", None).await;
    let thread = run[0]["thread_id"].as_str().expect("thread").to_string();
    b.collect_run().await;
    b.send(json!({"type": "unsubscribe", "payload": {"thread_id": thread}})).await;
    b.send(json!({"type": "ping"})).await;
    assert_eq!(b.next().await["type"], "pong");
    a.chat("two", Some(&thread)).await;
    b.expect_silence(Duration::from_millis(300)).await;
    // Sending into the thread follows it again.
    let own = b.chat("three", Some(&thread)).await;
    assert_eq!(own.last().expect("frames")["type"], "final_report");
}

#[tokio::test]
async fn replay_pages_through_a_long_thread_in_order() {
    let server = Spawn::new().env("NETRA_REPLAY_BATCH", "3").env("NETRA_AGENT_TOKEN_DELAY", "0ms").ready().await;
    let mut a = server.connect("pager").await;
    let mut all = a.chat("first", None).await;
    let thread = all[0]["thread_id"].as_str().expect("thread").to_string();
    for i in 0..4 {
        all.extend(a.chat(&format!("message {i}"), Some(&thread)).await);
    }
    let end = *seqs(&all).last().expect("seq");
    let mut b = server.connect("pager").await;
    b.send(json!({"type": "subscribe", "payload": {"thread_id": thread}})).await;
    let replay = b.until(|f| f["seq"].as_u64() == Some(end)).await;
    assert_eq!(replay, all);
}

#[tokio::test]
async fn sigkill_mid_run_loses_nothing_a_client_saw_and_marks_the_run_interrupted() {
    for backend in BACKENDS {
        let mut server = Spawn::new().backend(backend).await.env("NETRA_AGENT_TOKEN_DELAY", "100ms").ready().await;
        let mut a = server.connect("crash").await;
        let words = (0..50).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        a.send(json!({"type": "user_message", "payload": {"content": words}})).await;
        let mut seen = a.until(|f| f["type"] == "partial_result").await;
        seen.extend(a.until(|f| f["type"] == "partial_result").await);
        let thread = seen[0]["thread_id"].as_str().expect("thread").to_string();
        let run_id = seen.iter().find_map(|f| f["run_id"].as_str()).expect("run id").to_string();
        server.kill_and_restart().await;
        let mut b = server.connect("crash").await;
        b.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}})).await;
        let replay = b.until(ends_run).await;
        for f in &seen {
            let seq = f["seq"].as_u64().expect("seq");
            let stored =
                replay.iter().find(|r| r["seq"].as_u64() == Some(seq)).unwrap_or_else(|| panic!("seq {seq} lost"));
            assert_eq!(stored, f, "{backend:?}");
        }
        let end = replay.last().expect("end");
        assert_eq!(end["type"], "error", "{backend:?}: {:?}", types(&replay));
        assert_eq!(end["payload"]["code"], "agent_failed");
        assert_eq!(end["payload"]["reason"], "interrupted");
        assert_eq!(end["run_id"], run_id.as_str());
        common::assert_dense(&replay);
    }
}

/// Sending into a thread while its replay is still paging must not cut the replay short:
/// the tab gets every seq exactly once, the replayed ones and the new run's.
#[tokio::test]
async fn chatting_into_a_thread_during_its_replay_leaves_no_gap() {
    for backend in BACKENDS {
        let server = Spawn::new().env("NETRA_REPLAY_BATCH", "2").backend(backend).await.ready().await;
        let mut a = server.connect("carol").await;
        let first = a.chat("one", None).await;
        let thread = first[0]["thread_id"].as_str().expect("thread id").to_string();
        for text in ["two", "three", "four"] {
            a.chat(text, Some(&thread)).await;
        }
        let mut b = server.connect("carol").await;
        b.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}})).await;
        b.send(json!({"type": "user_message", "payload": {"content": "five", "thread_id": thread}})).await;
        let frames = b
            .until(|f| {
                f["type"] == "final_report"
                    && f["payload"]["executive_summary"].as_str().is_some_and(|s| s.contains("four"))
            })
            .await;
        let got = seqs(&frames);
        let last = *got.last().expect("seq");
        assert_eq!(got, (1..=last).collect::<Vec<_>>(), "{backend:?}: {:?}", types(&frames));
    }
}
