//! The store API against both backends: sequence numbers, atomic writes, paging.

mod common;

use common::{BACKENDS, Backend, fresh_pg_url, unique};
use netra::config::DatabaseUrl;
use netra::config::Secret;
use netra::delivery::{Delivery, DeliveryError, Link};
use netra::protocol::EventType;
use netra::store::{NewEvent, Row, Store, StoreError, WriteJob};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;

/// A new database on `backend`: a file in `dir`, or a fresh PostgreSQL schema.
async fn database(backend: Backend, dir: &tempfile::TempDir) -> DatabaseUrl {
    match backend {
        Backend::Sqlite => DatabaseUrl::Sqlite(dir.path().join("netra.db")),
        Backend::Postgres => DatabaseUrl::Postgres(Secret::new(fresh_pg_url().await)),
    }
}

/// A node's store on `url`; several on one database are several nodes.
async fn connect(url: &DatabaseUrl) -> Store {
    Store::connect(url, Duration::from_secs(10)).await.expect("store connects")
}

async fn open(backend: Backend, dir: &tempfile::TempDir) -> Store {
    connect(&database(backend, dir).await).await
}

/// A store on `backend` with a node's delivery on it (its writer), without a broker.
async fn delivering(backend: Backend, dir: &tempfile::TempDir) -> (Store, Delivery) {
    let store = open(backend, dir).await;
    let tracker = tokio_util::task::TaskTracker::new();
    let delivery = Delivery::start(store.clone(), 100, usize::MAX, &tracker, netra::broker::Broker::local());
    (store, delivery)
}

fn event(kind: EventType, n: usize) -> NewEvent {
    NewEvent {
        kind,
        run_id: Some("run_x".into()),
        agent_name: Some("supervisor"),
        timestamp: format!("2026-01-01T00:00:00.{n:03}Z"),
        payload: RawValue::from_string(format!("{{\"n\":{n}}}")).expect("json"),
    }
}

fn new_thread_job(thread: &str, owner: &str) -> WriteJob {
    WriteJob {
        expected_last_seq: None,
        thread_id: thread.into(),
        rows: vec![Row::CreateThread { owner_id: owner.into(), title: "t".into() }],
        events: vec![event(EventType::ThreadCreated, 0)],
    }
}

fn append_job(thread: &str, n: usize) -> WriteJob {
    WriteJob {
        expected_last_seq: None,
        thread_id: thread.into(),
        rows: vec![],
        events: (0..n).map(|i| event(EventType::PartialResult, i)).collect(),
    }
}

#[tokio::test]
async fn batches_assign_dense_seq_per_thread() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, &dir).await;
        let (a, b) = (unique("th"), unique("th"));
        store.write_batch(&vec![new_thread_job(&a, "u"), new_thread_job(&b, "u")].into()).await.expect("create");
        let written = store
            .write_batch(&vec![append_job(&a, 3), append_job(&b, 2), append_job(&a, 2)].into())
            .await
            .expect("append");
        assert_eq!(written, vec![2, 2, 5], "{backend:?}: the first seq of each job");
        let all = store.events_after(&a, 0, 100, usize::MAX).await.expect("read");
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6], "{backend:?}");
        let page = store.events_after(&a, 2, 2, usize::MAX).await.expect("page");
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4], "{backend:?}");
        assert_eq!(page[0].payload.get(), "{\"n\":1}");
        // A byte budget cuts the page short, but never below one event.
        let one = store.events_after(&a, 0, 100, 1).await.expect("page");
        assert_eq!(one.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1], "{backend:?}");
        let budget = all[0].payload.get().len() + all[1].payload.get().len();
        let two = store.events_after(&a, 0, 100, budget).await.expect("page");
        assert_eq!(two.len(), 2, "{backend:?}");
    }
}

/// The SQLite writer files a batch's events in multi-row statements of a few fixed
/// sizes; whatever the count, every event lands once, in its place, with all its fields.
#[tokio::test]
async fn a_batch_of_any_size_files_each_event_once_in_its_place() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, &dir).await;
        for total in [1, 3, 4, 5, 16, 21, 64, 85, 150] {
            let (a, b) = (unique("th"), unique("th"));
            store.write_batch(&vec![new_thread_job(&a, "u"), new_thread_job(&b, "u")].into()).await.expect("create");
            // Jobs of 1, 2, 3 … events, alternating between the two threads.
            // Every event is numbered apart, so a swapped or repeated row shows.
            let mut jobs: Vec<WriteJob> = Vec::new();
            let (mut written, mut size) = (0, 1);
            while written < total {
                let n = size.min(total - written);
                let thread = if jobs.len().is_multiple_of(2) { &a } else { &b };
                let events = (written..written + n).map(|i| event(EventType::PartialResult, i)).collect();
                jobs.push(WriteJob { expected_last_seq: None, thread_id: thread.clone(), rows: vec![], events });
                written += n;
                size += 1;
            }
            store.write_batch(&jobs.clone().into()).await.expect("append");
            for thread in [&a, &b] {
                let expected: Vec<NewEvent> =
                    jobs.iter().filter(|j| &j.thread_id == thread).flat_map(|j| j.events.clone()).collect();
                let stored = store.events_after(thread, 1, 1000, usize::MAX).await.expect("read");
                assert_eq!(stored.len(), expected.len(), "{backend:?} {total}");
                for (i, (got, want)) in stored.iter().zip(&expected).enumerate() {
                    assert_eq!(got.seq, i as u64 + 2, "{backend:?} {total}");
                    assert_eq!(got.payload.get(), want.payload.get(), "{backend:?} {total}");
                    assert_eq!(got.timestamp, want.timestamp, "{backend:?} {total}");
                    assert_eq!(got.kind, want.kind.as_str(), "{backend:?} {total}");
                    assert_eq!(got.run_id.as_deref(), want.run_id.as_deref(), "{backend:?} {total}");
                    assert_eq!(got.agent_name.as_deref(), want.agent_name, "{backend:?} {total}");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_failed_write_leaves_no_row_behind() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, &dir).await;
        let existing = unique("th");
        let run = unique("run");
        let mut first = new_thread_job(&existing, "u");
        first.rows.push(Row::StartRun { run_id: run.clone(), user_id: "u".into(), node_id: "n".into() });
        store.write_batch(&vec![first].into()).await.expect("first");
        // A new thread, its message and a run whose id collides: the insert of the run
        // fails after the thread, message and events were written in the transaction.
        let doomed = unique("th");
        let mut job = new_thread_job(&doomed, "u");
        job.rows.push(Row::Message { id: unique("msg"), role: "user", content: "hi".into(), event_index: 0 });
        job.rows.push(Row::StartRun { run_id: run.clone(), user_id: "u".into(), node_id: "n".into() });
        let err = store.write_batch(&vec![job].into()).await.expect_err("duplicate run id");
        assert!(matches!(err, StoreError::Rejected(_)), "{backend:?}: {err:?}");
        assert!(matches!(store.thread(&doomed).await, Err(StoreError::NotFound)), "{backend:?}");
        assert!(store.events_after(&doomed, 0, 10, usize::MAX).await.expect("read").is_empty(), "{backend:?}");
        let (messages, total) = store.messages(&doomed, 10, 0).await.expect("read");
        assert!(messages.is_empty() && total == 0, "{backend:?}");
        assert_eq!(store.thread(&existing).await.expect("untouched").last_seq, 1, "{backend:?}");
    }
}

#[tokio::test]
async fn concurrent_writers_on_one_thread_keep_seq_dense() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, &dir).await;
        // A second handle stands for a second node sharing the database.
        let other = match backend {
            Backend::Sqlite => {
                Store::connect(&DatabaseUrl::Sqlite(dir.path().join("netra.db")), Duration::from_secs(10))
                    .await
                    .expect("second handle")
            }
            Backend::Postgres => store.clone(),
        };
        let thread = unique("th");
        store.write_batch(&vec![new_thread_job(&thread, "u")].into()).await.expect("create");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = if i % 2 == 0 { store.clone() } else { other.clone() };
            let t = thread.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    s.write_batch(&vec![append_job(&t, 2)].into()).await.expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
        let all = store.events_after(&thread, 0, 1000, usize::MAX).await.expect("read");
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=161).collect::<Vec<u64>>(), "{backend:?}");
    }
}

#[tokio::test]
async fn soft_deleted_threads_are_hidden_and_refuse_writes() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, &dir).await;
        let owner = unique("u");
        let thread = unique("th");
        store.write_batch(&vec![new_thread_job(&thread, &owner)].into()).await.expect("create");
        assert_eq!(store.threads_of(&owner, 10, 0).await.expect("list").len(), 1);
        store.delete_thread(&thread).await.expect("delete");
        assert!(store.threads_of(&owner, 10, 0).await.expect("list").is_empty(), "{backend:?}");
        assert!(matches!(store.thread(&thread).await, Err(StoreError::NotFound)));
        assert!(
            matches!(store.write_batch(&vec![append_job(&thread, 1)].into()).await, Err(StoreError::NotFound)),
            "{backend:?}"
        );
    }
}

/// A job that appends a user's message: its `user_message` event and the row that
/// makes the event a message.
fn message_job(thread: &str, text: &str) -> WriteJob {
    let id = unique("msg");
    let payload = serde_json::json!({"message_id": id, "content": text, "role": "user"}).to_string();
    let echo = NewEvent {
        kind: EventType::UserMessage,
        payload: RawValue::from_string(payload).expect("json"),
        ..event(EventType::UserMessage, 0)
    };
    WriteJob {
        expected_last_seq: None,
        thread_id: thread.into(),
        rows: vec![Row::Message { id, role: "user", content: text.into(), event_index: 0 }],
        events: vec![echo],
    }
}

/// A thread's messages are found from its row down a chain through their events: the
/// chain holds across jobs, batches and jobs with two messages, skips every other event,
/// and pages and histories read from it match on both backends, from memory or not.
#[tokio::test]
async fn messages_are_read_down_their_chain_past_any_other_events() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = database(backend, &dir).await;
        let store = connect(&url).await;
        let thread = unique("th");
        // One job with two messages and an event between them (an answer and a question).
        let mut two = message_job(&thread, "m3");
        let second = message_job(&thread, "m4");
        two.events.push(event(EventType::PartialResult, 1));
        two.events.extend(second.events);
        let Row::Message { id, .. } = &second.rows[0] else { unreachable!() };
        two.rows.push(Row::Message { id: id.clone(), role: "user", content: "m4".into(), event_index: 2 });
        let batches = vec![
            vec![new_thread_job(&thread, "u"), message_job(&thread, "m1"), append_job(&thread, 5)],
            vec![message_job(&thread, "m2"), append_job(&thread, 3)],
            vec![append_job(&thread, 2), two],
            vec![append_job(&thread, 4)],
            vec![message_job(&thread, "m5")],
        ];
        for batch in batches {
            store.write_batch(&batch.into()).await.expect("write");
        }
        let texts = |messages: &[netra::store::Message]| messages.iter().map(|m| m.content.clone()).collect::<Vec<_>>();
        let (all, total) = store.messages(&thread, 50, 0).await.expect("all");
        assert_eq!(
            (texts(&all), total),
            (vec!["m1", "m2", "m3", "m4", "m5"].into_iter().map(String::from).collect(), 5)
        );
        let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [2, 8, 14, 16, 21], "{backend:?}");
        for (limit, offset, want) in [
            (2, 0, vec!["m1", "m2"]),
            (2, 2, vec!["m3", "m4"]),
            (2, 4, vec!["m5"]),
            (2, 5, vec![]),
            (0, 0, vec![]),
            (3, 9, vec![]),
        ] {
            let (page, total) = store.messages(&thread, limit, offset).await.expect("page");
            assert_eq!(
                (texts(&page), total),
                (want.into_iter().map(String::from).collect(), 5),
                "{backend:?} {limit} {offset}"
            );
        }
        assert_eq!(store.thread(&thread).await.expect("thread").message_count, 5, "{backend:?}");
        // Another node has nothing in memory: it walks the chain in the store.
        let other = connect(&url).await;
        for store in [&store, &other] {
            let history = store.recent_messages(&thread, 3, 21).await.expect("history");
            assert_eq!(
                history.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
                ["m3", "m4", "m5"],
                "{backend:?}"
            );
            let history = store.recent_messages(&thread, 50, 14).await.expect("history up to m3");
            assert_eq!(
                history.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
                ["m1", "m2", "m3"],
                "{backend:?}"
            );
        }
        let (none, total) = other.messages(&unique("th-missing"), 10, 0).await.expect("missing thread");
        assert!(none.is_empty() && total == 0, "{backend:?}");
    }
}

/// The history a run would read right after the thread's latest write.
async fn history(store: &Store, thread: &str, limit: usize) -> Vec<String> {
    let through = store.thread(thread).await.expect("thread").last_seq as u64;
    let messages = store.recent_messages(thread, limit, through).await.expect("history");
    messages.iter().map(|m| m.content.clone()).collect()
}

/// A run's history comes from memory on the node that writes the thread; a write by
/// another node (another handle on the same database) must show up all the same.
#[tokio::test]
async fn history_stays_right_when_another_node_writes_the_thread() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = database(backend, &dir).await;
        let here = connect(&url).await;
        let there = connect(&url).await;
        let thread = unique("th");
        here.write_batch(&vec![new_thread_job(&thread, "u"), message_job(&thread, "one")].into())
            .await
            .expect("create");
        assert_eq!(history(&here, &thread, 10).await, ["one"], "{backend:?}");
        // The other node has never seen the thread: it reads the store.
        there.write_batch(&vec![message_job(&thread, "two")].into()).await.expect("there");
        assert_eq!(history(&there, &thread, 10).await, ["one", "two"], "{backend:?}");
        // This node's next commit sees the gap in seq and stops answering from memory; a
        // reader that needs a later seq than this node has seen reads the store.
        here.write_batch(&vec![message_job(&thread, "three")].into()).await.expect("here");
        assert_eq!(history(&here, &thread, 10).await, ["one", "two", "three"], "{backend:?}");
        assert_eq!(history(&here, &thread, 2).await, ["two", "three"], "{backend:?}");
        there.write_batch(&vec![message_job(&thread, "four")].into()).await.expect("there again");
        assert_eq!(history(&there, &thread, 10).await, ["one", "two", "three", "four"], "{backend:?}");
        assert_eq!(history(&here, &thread, 10).await, ["one", "two", "three", "four"], "{backend:?}");
        // A run sees the thread up to its own message (seq 3 is "two"), not later ones.
        for store in [&here, &there] {
            let upto: Vec<String> = store
                .recent_messages(&thread, 10, 3)
                .await
                .expect("history")
                .iter()
                .map(|m| m.content.clone())
                .collect();
            assert_eq!(upto, ["one", "two"], "{backend:?}");
        }
    }
}

/// Users are recorded from every connection (on SQLite, batched on the writer thread):
/// a new user is inserted, new claims update the row, absent claims keep stored ones.
#[tokio::test]
async fn users_are_recorded_and_their_claims_updated() {
    use sqlx::Row as _;
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, raw) = match backend {
            Backend::Sqlite => {
                let path = dir.path().join("netra.db");
                (DatabaseUrl::Sqlite(path.clone()), format!("sqlite://{}", path.display()))
            }
            Backend::Postgres => {
                let raw = fresh_pg_url().await;
                (DatabaseUrl::Postgres(Secret::new(raw.clone())), raw)
            }
        };
        let store = connect(&url).await;
        let (a, b) = (unique("user"), unique("user"));
        let (first, second) =
            tokio::join!(store.upsert_user(&a, Some("a@example.com"), Some("A")), store.upsert_user(&b, None, None));
        first.expect("a");
        second.expect("b");
        store.upsert_user(&a, Some("a2@example.com"), None).await.expect("a again");
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&raw).await.expect("direct connection");
        let read = |id: String| {
            let pool = pool.clone();
            async move {
                let row = sqlx::query("SELECT email, name FROM users WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .expect("user row");
                (row.get::<Option<String>, _>(0), row.get::<Option<String>, _>(1))
            }
        };
        assert_eq!(read(a).await, (Some("a2@example.com".into()), Some("A".into())), "{backend:?}");
        assert_eq!(read(b).await, (None, None), "{backend:?}");
    }
}

/// A run submits its writes without waiting for each commit; once one of them fails,
/// its later writes are refused in order, and only a closing write gets through.
#[tokio::test]
async fn a_failed_write_breaks_its_runs_chain() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, delivery) = delivering(backend, &dir).await;
        let thread = unique("th");
        delivery.commit(new_thread_job(&thread, "u"), "u").await.expect("create");
        let (run, other): (Arc<str>, Arc<str>) = (Arc::from("run_a"), Arc::from("run_b"));
        let missing = unique("th-missing");
        // All submitted before any commit is awaited, as a run does.
        let first = delivery.submit_in(&run, Link::Next, append_job(&thread, 1), "u").await.expect("submit");
        let failing = delivery.submit_in(&run, Link::Next, append_job(&missing, 1), "u").await.expect("submit");
        let after = delivery.submit_in(&run, Link::Next, append_job(&thread, 1), "u").await.expect("submit");
        let last = delivery.submit_in(&run, Link::Last, append_job(&thread, 1), "u").await.expect("submit");
        let unrelated = delivery.submit_in(&other, Link::Last, append_job(&thread, 1), "u").await.expect("submit");
        let close = delivery.submit_in(&run, Link::Close, append_job(&thread, 2), "u").await.expect("submit");
        assert_eq!(first.wait().await.expect("first"), 2, "{backend:?}");
        assert!(matches!(failing.wait().await, Err(DeliveryError::Store(StoreError::NotFound))), "{backend:?}");
        assert!(matches!(after.wait().await, Err(DeliveryError::EarlierWriteFailed)), "{backend:?}");
        assert!(matches!(last.wait().await, Err(DeliveryError::EarlierWriteFailed)), "{backend:?}");
        assert_eq!(unrelated.wait().await.expect("another run is not affected"), 3, "{backend:?}");
        assert_eq!(close.wait().await.expect("a closing write goes through"), 4, "{backend:?}");
        // The chain is over: the run id may be used again.
        let again = delivery.submit_in(&run, Link::Last, append_job(&thread, 1), "u").await.expect("submit");
        assert_eq!(again.wait().await.expect("a new chain"), 6, "{backend:?}");
        let seqs: Vec<u64> =
            store.events_after(&thread, 0, 100, usize::MAX).await.expect("read").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6], "{backend:?}");
    }
}

/// A streamed delta of `text`, as a run emits it.
fn delta_job(thread: &str, text: &str) -> WriteJob {
    let payload = serde_json::json!({"content": text, "is_complete": false}).to_string();
    WriteJob {
        expected_last_seq: None,
        thread_id: thread.into(),
        rows: vec![],
        events: vec![NewEvent {
            kind: EventType::PartialResult,
            run_id: Some("run_a".into()),
            agent_name: Some("supervisor"),
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            payload: RawValue::from_string(payload).expect("json"),
        }],
    }
}

/// A run's deltas waiting in one batch are one event, also when the batch fails for
/// another job and is written again job by job: every submitter hears the merged
/// event's seq. A delta behind a failed write of its own run is refused, not merged
/// ahead of it.
#[tokio::test]
async fn merged_deltas_survive_a_failed_batch_and_never_jump_their_runs_failure() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, delivery) = delivering(backend, &dir).await;
        let (thread, other_thread) = (unique("th"), unique("th"));
        delivery.commit(new_thread_job(&thread, "u"), "u").await.expect("create");
        delivery.commit(new_thread_job(&other_thread, "u"), "u").await.expect("create");
        let (run, other): (Arc<str>, Arc<str>) = (Arc::from("run_a"), Arc::from("run_b"));
        let missing = unique("th-missing");
        // All submitted before any commit is awaited, as runs do: one batch, which fails
        // for run_b's write to a missing thread.
        let mut pending = Vec::new();
        for text in ["Hel", "lo", ", wor"] {
            pending.push(delivery.submit_in(&run, Link::Next, delta_job(&thread, text), "u").await.expect("submit"));
        }
        let early = delivery.submit_in(&other, Link::Next, delta_job(&other_thread, "w"), "u").await.expect("submit");
        let failing = delivery.submit_in(&other, Link::Next, append_job(&missing, 1), "u").await.expect("submit");
        pending.push(delivery.submit_in(&run, Link::Next, delta_job(&thread, "ld"), "u").await.expect("submit"));
        // run_b's delta behind its failed write: refused, though a delta of run_b in the
        // same thread waits before that write.
        let refused = delivery.submit_in(&other, Link::Next, delta_job(&other_thread, "x"), "u").await.expect("submit");
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.wait().await.expect("written"), 2, "{backend:?}: delta {i}");
        }
        assert_eq!(early.wait().await.expect("written"), 2, "{backend:?}");
        assert!(matches!(failing.wait().await, Err(DeliveryError::Store(StoreError::NotFound))), "{backend:?}");
        assert!(matches!(refused.wait().await, Err(DeliveryError::EarlierWriteFailed)), "{backend:?}");
        let events = store.events_after(&thread, 0, 100, usize::MAX).await.expect("read");
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2], "{backend:?}");
        let merged: serde_json::Value = serde_json::from_str(events[1].payload.get()).expect("json");
        assert_eq!(merged["content"], "Hello, world", "{backend:?}");
        let others = store.events_after(&other_thread, 0, 100, usize::MAX).await.expect("read");
        assert_eq!(others.len(), 2, "{backend:?}: the creation and the early delta alone");
        let early: serde_json::Value = serde_json::from_str(others[1].payload.get()).expect("json");
        assert_eq!(early["content"], "w", "{backend:?}");
    }
}

fn run_job(thread: &str, rows: Vec<Row>) -> WriteJob {
    WriteJob {
        expected_last_seq: None,
        thread_id: thread.into(),
        rows,
        events: vec![event(EventType::AgentStarted, 0)],
    }
}

fn start(run: &str) -> Row {
    Row::StartRun { run_id: run.into(), user_id: "u".into(), node_id: "n".into() }
}

fn end(run: &str, status: &'static str) -> Row {
    Row::EndRun { run_id: run.into(), status, error: None, prompt_tokens: Some(3), completion_tokens: Some(4) }
}

#[tokio::test]
async fn a_run_keeps_its_ending_whether_it_starts_in_the_same_batch_or_an_earlier_one() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, &dir).await;
        let thread = unique("th");
        let (quick, slow, twice) = (unique("run"), unique("run"), unique("run"));
        store
            .write_batch(&vec![new_thread_job(&thread, "u"), run_job(&thread, vec![start(&slow)])].into())
            .await
            .expect("first batch");
        // Started and ended in one batch (also within one job), ended in a later batch,
        // and ended twice in one batch (the last ending counts).
        let firsts = store
            .write_batch(
                &vec![
                    run_job(&thread, vec![start(&quick)]),
                    run_job(&thread, vec![end(&quick, "completed")]),
                    run_job(&thread, vec![end(&slow, "cancelled")]),
                    run_job(&thread, vec![start(&twice), end(&twice, "failed")]),
                    run_job(&thread, vec![end(&twice, "completed")]),
                ]
                .into(),
            )
            .await
            .expect("second batch");
        assert_eq!(firsts, vec![3, 4, 5, 6, 7], "{backend:?}");
        assert_eq!(store.run_status(&quick).await.expect("quick"), "completed", "{backend:?}");
        assert_eq!(store.run_status(&slow).await.expect("slow"), "cancelled", "{backend:?}");
        assert_eq!(store.run_status(&twice).await.expect("twice"), "completed", "{backend:?}");
        assert!(store.node_started("n", 0).await.expect("none running").is_empty(), "{backend:?}");
    }
}

#[tokio::test]
async fn the_postgres_writer_reconnects_after_its_connection_is_killed() {
    use sqlx::Connection;
    // A database of its own: every session of it can be ended without touching the
    // other tests running beside this one.
    let base = common::pg_base_url();
    let mut admin = sqlx::PgConnection::connect(&base).await.expect("admin connection");
    let db = format!("t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut admin).await.expect("create database");
    let (head, tail) = base.split_once("?").map_or((base.as_str(), ""), |(h, t)| (h, t));
    let url = format!(
        "{}/{db}{}{tail}",
        &head[..head.rfind('/').expect("a database in the URL")],
        if tail.is_empty() { "" } else { "?" }
    );
    let store = Store::connect(&DatabaseUrl::Postgres(Secret::new(url)), Duration::from_secs(10)).await.expect("store");
    let thread = unique("th");
    store.write_batch(&vec![new_thread_job(&thread, "u")].into()).await.expect("create");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&mut admin)
        .await
        .expect("terminate");
    // The first write may find its connection dead (the database is away, as far as it
    // can tell); the next one is on a new connection.
    let seq = match store.write_batch(&vec![append_job(&thread, 1)].into()).await {
        Ok(firsts) => firsts[0],
        Err(e) => {
            assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
            store.write_batch(&vec![append_job(&thread, 1)].into()).await.expect("reconnected")[0]
        }
    };
    assert_eq!(seq, 2, "nothing half-written");
    assert_eq!(store.events_after(&thread, 0, 10, usize::MAX).await.expect("read").len(), 2);
    // Recording a user is idempotent: its connection (opened at start) was killed too,
    // and it is replaced under the first user, who does not see it.
    store.upsert_user("idle-user", Some("a@example.com"), None).await.expect("a user after its connection died");
    // A connection that sat idle is checked before use: after the server dropped it, the
    // first write and the first user recorded succeed.
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&mut admin)
        .await
        .expect("terminate");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let firsts = store.write_batch(&vec![append_job(&thread, 1)].into()).await.expect("the first write after idling");
    assert_eq!(firsts, vec![3]);
    store.upsert_user("idle-user-2", None, Some("B")).await.expect("the first user after idling");
    drop(store);
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)")).execute(&mut admin).await.expect("drop database");
}

#[tokio::test]
async fn postgres_run_rows_without_events_still_need_their_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(Backend::Postgres, &dir).await;
    let thread = unique("th");
    store.write_batch(&vec![new_thread_job(&thread, "u")].into()).await.expect("create");
    let (run, early) = (unique("run"), unique("run"));
    let bare =
        |thread: &str, rows| WriteJob { expected_last_seq: None, thread_id: thread.into(), rows, events: vec![] };
    // Rows with no event of their thread in the batch: the thread is still checked.
    store.write_batch(&vec![bare(&thread, vec![start(&run)])].into()).await.expect("an existing thread");
    assert_eq!(store.run_status(&run).await.expect("run"), "running");
    let missing = store.write_batch(&vec![bare(&unique("th-missing"), vec![start(&unique("run"))])].into()).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    // An ending seen before its start in one batch still ends the run.
    store
        .write_batch(&vec![bare(&thread, vec![end(&early, "completed")]), bare(&thread, vec![start(&early)])].into())
        .await
        .expect("ending first");
    assert_eq!(store.run_status(&early).await.expect("early"), "completed");
    assert_eq!(store.thread(&thread).await.expect("thread").last_seq, 1, "no seq handed out");
}

/// The schema as it was before events and messages were filed under thread numbers
/// (versions 1 to 6), with rows in it, written without the store.
async fn old_database(backend: Backend, dir: &tempfile::TempDir) -> DatabaseUrl {
    use sqlx::Connection;
    const OLD: [(i64, &str, Option<Backend>); 6] = [
        (1, include_str!("../src/store/migrations/0001_init.sql"), None),
        (2, include_str!("../src/store/migrations/0002_run_usage.sql"), None),
        (3, include_str!("../src/store/migrations/0003_threads_by_owner.sql"), None),
        (4, include_str!("../src/store/migrations/0004_running_runs.sql"), None),
        (5, include_str!("../src/store/migrations/0005_nodes.sql"), None),
        (
            6,
            include_str!("../src/store/migrations/0006_postgres_events_without_foreign_keys.sql"),
            Some(Backend::Postgres),
        ),
    ];
    let mut statements =
        vec!["CREATE TABLE netra_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)".to_string()];
    for (version, sql, only) in OLD {
        if only.is_none_or(|b| b == backend) {
            let code: Vec<&str> = sql.lines().filter(|l| !l.trim_start().starts_with("--")).collect();
            statements.extend(code.join("\n").split(';').filter(|s| !s.trim().is_empty()).map(str::to_string));
        }
        statements.push(format!("INSERT INTO netra_migrations VALUES ({version}, 0)"));
    }
    for (thread, owner, last_seq) in [("th_old_a", "ann", 3), ("th_old_b", "bob", 2)] {
        statements.push(format!(
            "INSERT INTO threads (id, owner_id, title, created_at, updated_at, last_seq) \
             VALUES ('{thread}', '{owner}', 'old', 1, 1, {last_seq})"
        ));
        // Every event is a message: the user's, and on th_old_a an answer last.
        for seq in 1..=last_seq {
            let text = format!("said {seq} in {thread}");
            let (kind, role, payload) = if thread == "th_old_a" && seq == last_seq {
                ("final_report", "assistant", format!("{{\"executive_summary\":\"{text}\",\"report\":{{}}}}"))
            } else {
                ("user_message", "user", format!("{{\"message_id\":\"msg_{thread}_{seq}\",\"content\":\"{text}\"}}"))
            };
            statements.push(format!(
                "INSERT INTO events (thread_id, seq, run_id, type, payload, created_at) \
                 VALUES ('{thread}', {seq}, 'run_old', '{kind}', '{payload}', '2026-01-01T00:00:0{seq}.500Z')"
            ));
            statements.push(format!(
                "INSERT INTO messages (id, thread_id, seq, role, content, created_at) \
                 VALUES ('msg_{thread}_{seq}', '{thread}', {seq}, '{role}', '{text}', 1)"
            ));
        }
    }
    match backend {
        Backend::Sqlite => {
            let path = dir.path().join("old.db");
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).create_if_missing(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&options).await.expect("sqlite");
            for s in &statements {
                sqlx::query(s).execute(&mut conn).await.unwrap_or_else(|e| panic!("{s}: {e}"));
            }
            DatabaseUrl::Sqlite(path)
        }
        Backend::Postgres => {
            let url = fresh_pg_url().await;
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("postgres");
            for s in &statements {
                sqlx::query(s).execute(&mut conn).await.unwrap_or_else(|e| panic!("{s}: {e}"));
            }
            DatabaseUrl::Postgres(Secret::new(url))
        }
    }
}

#[tokio::test]
async fn an_older_database_keeps_its_events_and_messages_when_filed_under_thread_numbers() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = old_database(backend, &dir).await;
        let store = Store::connect(&url, Duration::from_secs(10)).await.expect("the store migrates");
        let (a, b) = ("th_old_a", "th_old_b");
        let seqs = |events: Vec<netra::protocol::EventFrame>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(store.events_after(a, 0, 100, usize::MAX).await.expect("a")), vec![1, 2, 3], "{backend:?}");
        let b_events = store.events_after(b, 1, 100, usize::MAX).await.expect("b");
        assert_eq!(seqs(b_events.clone()), vec![2], "{backend:?}");
        assert_eq!(
            b_events[0].payload.get(),
            "{\"message_id\":\"msg_th_old_b_2\",\"content\":\"said 2 in th_old_b\"}",
            "{backend:?}"
        );
        let (messages, total) = store.messages(b, 10, 0).await.expect("messages");
        assert_eq!(total, 2, "{backend:?}");
        let texts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["said 1 in th_old_b", "said 2 in th_old_b"], "{backend:?}");
        // Messages keep their ids, roles and places; their time is their event's.
        let (messages, _) = store.messages(a, 10, 1).await.expect("messages");
        let seen: Vec<(&str, &str, i64, i64)> =
            messages.iter().map(|m| (m.id.as_str(), m.role.as_str(), m.seq, m.created_at)).collect();
        let (at2, at3) = (1_767_225_602_500, 1_767_225_603_500);
        assert_eq!(seen, [("msg_th_old_a_2", "user", 2, at2), ("msg_th_old_a_3", "assistant", 3, at3)], "{backend:?}");
        assert_eq!(store.thread(a).await.expect("thread").message_count, 3, "{backend:?}");
        assert_eq!(history(&store, a, 2).await, ["said 2 in th_old_a", "said 3 in th_old_a"], "{backend:?}");
        // Writing goes on from where the old rows stopped; a new thread gets a number of
        // its own, so its events are not mixed with the old threads'.
        assert_eq!(store.write_batch(&vec![append_job(a, 2)].into()).await.expect("append"), vec![4], "{backend:?}");
        let c = unique("th");
        store.write_batch(&vec![new_thread_job(&c, "carl")].into()).await.expect("new thread");
        store.create_thread(&unique("th"), "dee", "empty", &serde_json::json!({})).await.expect("REST thread");
        assert_eq!(seqs(store.events_after(&c, 0, 100, usize::MAX).await.expect("c")), vec![1], "{backend:?}");
        assert_eq!(seqs(store.events_after(a, 0, 100, usize::MAX).await.expect("a")), vec![1, 2, 3, 4, 5]);
        // A purge takes the thread's rows and nobody else's.
        store.purge_thread(a).await.expect("purge");
        assert!(store.events_after(a, 0, 100, usize::MAX).await.expect("a").is_empty(), "{backend:?}");
        assert_eq!(store.messages(a, 10, 0).await.expect("a").1, 0, "{backend:?}");
        assert_eq!(store.messages(b, 10, 0).await.expect("b").1, 2, "{backend:?}");
    }
}

/// `job`, made for its thread at `last_seq` (as a run that took its history from memory).
fn expecting(mut job: WriteJob, last_seq: u64) -> WriteJob {
    job.expected_last_seq = Some(last_seq);
    job
}

/// A job made for its thread as it was is written only if nothing was written to the
/// thread since; otherwise the batch writes nothing and names it, whatever else it holds.
#[tokio::test]
async fn a_job_made_for_its_thread_as_it_no_longer_is_is_not_written() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, &dir).await;
        let (one, two) = (unique("th"), unique("th"));
        store.write_batch(&vec![new_thread_job(&one, "u"), new_thread_job(&two, "u")].into()).await.expect("create");
        let last = |thread: String| {
            let store = store.clone();
            async move { store.thread(&thread).await.expect("thread").last_seq }
        };
        // Each thread is at seq 1. A job that expects 0 raced a write, wherever it is in the batch.
        let raced = store.write_batch(&vec![append_job(&two, 1), expecting(append_job(&one, 1), 0)].into()).await;
        assert!(matches!(raced, Err(StoreError::Raced(ref jobs)) if jobs == &[1]), "{backend:?}: {raced:?}");
        let raced = store.write_batch(&vec![expecting(append_job(&one, 1), 0), append_job(&two, 1)].into()).await;
        assert!(matches!(raced, Err(StoreError::Raced(ref jobs)) if jobs == &[0]), "{backend:?}: {raced:?}");
        assert_eq!((last(one.clone()).await, last(two.clone()).await), (1, 1), "{backend:?}: nothing written");
        // What the jobs before it in the batch write is counted in: after 2 events, 3.
        let firsts = store
            .write_batch(&vec![append_job(&one, 2), expecting(append_job(&one, 1), 3), append_job(&two, 1)].into())
            .await
            .expect("an expectation that holds");
        assert_eq!(firsts, [2, 4, 2], "{backend:?}");
        let raced = store.write_batch(&vec![append_job(&one, 2), expecting(append_job(&one, 1), 4)].into()).await;
        assert!(matches!(raced, Err(StoreError::Raced(ref jobs)) if jobs == &[1]), "{backend:?}: {raced:?}");
        // A missing or deleted thread is missing, not raced.
        let missing = store
            .write_batch(&vec![append_job(&unique("th-missing"), 1), expecting(append_job(&one, 1), 4)].into())
            .await;
        assert!(matches!(missing, Err(StoreError::NotFound)), "{backend:?}: {missing:?}");
        assert_eq!((last(one.clone()).await, last(two.clone()).await), (4, 2), "{backend:?}");
        store.delete_thread(&two).await.expect("delete");
        let gone = store.write_batch(&vec![expecting(append_job(&two, 1), 2)].into()).await;
        assert!(matches!(gone, Err(StoreError::NotFound)), "{backend:?}: {gone:?}");
        let firsts = store.write_batch(&vec![expecting(append_job(&one, 1), 4)].into()).await.expect("holds");
        assert_eq!(firsts, [5], "{backend:?}");
    }
}

/// A raced job fails alone, with its run's later writes; the rest of its batch, other
/// runs' writes to the same thread too, is written as if it had never been there.
#[tokio::test]
async fn a_raced_write_fails_with_its_runs_later_writes_and_nothing_else() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, delivery) = delivering(backend, &dir).await;
        let thread = unique("th");
        delivery.commit(new_thread_job(&thread, "u"), "u").await.expect("create");
        let (run, other): (Arc<str>, Arc<str>) = (Arc::from("run_a"), Arc::from("run_b"));
        // All submitted before any commit is awaited, as a run does: they share a batch.
        let start =
            delivery.submit_in(&run, Link::Next, expecting(append_job(&thread, 2), 0), "u").await.expect("submit");
        let after = delivery.submit_in(&run, Link::Next, append_job(&thread, 1), "u").await.expect("submit");
        let unrelated = delivery.submit_in(&other, Link::Last, append_job(&thread, 1), "u").await.expect("submit");
        let close = delivery.submit_in(&run, Link::Close, append_job(&thread, 1), "u").await.expect("submit");
        assert!(matches!(start.wait().await, Err(DeliveryError::Raced)), "{backend:?}");
        assert!(matches!(after.wait().await, Err(DeliveryError::EarlierWriteFailed)), "{backend:?}");
        assert_eq!(unrelated.wait().await.expect("another run is not affected"), 2, "{backend:?}");
        assert_eq!(close.wait().await.expect("a closing write goes through"), 3, "{backend:?}");
        let seqs: Vec<u64> =
            store.events_after(&thread, 0, 100, usize::MAX).await.expect("read").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "{backend:?}");
    }
}
