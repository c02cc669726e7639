//! The store API against both backends: sequence numbers, atomic writes, paging.

mod common;

use common::{BACKENDS, Backend, fresh_pg_url, unique};
use netra::config::DatabaseUrl;
use netra::config::Secret;
use netra::protocol::EventType;
use netra::store::{NewEvent, Row, Store, StoreError, WriteJob};
use serde_json::value::RawValue;
use std::time::Duration;

async fn open(backend: Backend, dir: &tempfile::TempDir) -> Store {
    let url = match backend {
        Backend::Sqlite => DatabaseUrl::Sqlite(dir.path().join("netra.db")),
        Backend::Postgres => DatabaseUrl::Postgres(Secret::new(fresh_pg_url().await)),
    };
    Store::connect(&url, Duration::from_secs(10)).await.expect("store connects")
}

fn event(kind: EventType, n: usize) -> NewEvent {
    NewEvent {
        kind,
        run_id: Some("run_x".into()),
        agent_name: Some("supervisor".into()),
        timestamp: format!("2026-01-01T00:00:00.{n:03}Z"),
        payload: RawValue::from_string(format!("{{\"n\":{n}}}")).expect("json"),
    }
}

fn new_thread_job(thread: &str, owner: &str) -> WriteJob {
    WriteJob {
        thread_id: thread.into(),
        rows: vec![Row::CreateThread { owner_id: owner.into(), title: "t".into() }],
        events: vec![event(EventType::ThreadCreated, 0)],
    }
}

fn append_job(thread: &str, n: usize) -> WriteJob {
    WriteJob {
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
        store.write_batch(&[new_thread_job(&a, "u"), new_thread_job(&b, "u")]).await.expect("create");
        let written =
            store.write_batch(&[append_job(&a, 3), append_job(&b, 2), append_job(&a, 2)]).await.expect("append");
        let seqs: Vec<Vec<u64>> = written.iter().map(|f| f.iter().map(|e| e.seq).collect()).collect();
        assert_eq!(seqs, vec![vec![2, 3, 4], vec![2, 3], vec![5, 6]], "{backend:?}");
        let all = store.events_after(&a, 0, 100).await.expect("read");
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6], "{backend:?}");
        let page = store.events_after(&a, 2, 2).await.expect("page");
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4], "{backend:?}");
        assert_eq!(page[0].payload.get(), "{\"n\":1}");
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
        store.write_batch(&[first]).await.expect("first");
        // A new thread, its message and a run whose id collides: the insert of the run
        // fails after the thread, message and events were written in the transaction.
        let doomed = unique("th");
        let mut job = new_thread_job(&doomed, "u");
        job.rows.push(Row::Message {
            id: unique("msg"),
            role: "user",
            content: "hi".into(),
            run_id: Some(run.clone()),
            event_index: 0,
        });
        job.rows.push(Row::StartRun { run_id: run.clone(), user_id: "u".into(), node_id: "n".into() });
        let err = store.write_batch(&[job]).await.expect_err("duplicate run id");
        assert!(matches!(err, StoreError::Rejected(_)), "{backend:?}: {err:?}");
        assert!(matches!(store.thread(&doomed).await, Err(StoreError::NotFound)), "{backend:?}");
        assert!(store.events_after(&doomed, 0, 10).await.expect("read").is_empty(), "{backend:?}");
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
        store.write_batch(&[new_thread_job(&thread, "u")]).await.expect("create");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = if i % 2 == 0 { store.clone() } else { other.clone() };
            let t = thread.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    s.write_batch(&[append_job(&t, 2)]).await.expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
        let all = store.events_after(&thread, 0, 1000).await.expect("read");
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
        store.write_batch(&[new_thread_job(&thread, &owner)]).await.expect("create");
        assert_eq!(store.threads_of(&owner, 10, 0).await.expect("list").len(), 1);
        store.delete_thread(&thread).await.expect("delete");
        assert!(store.threads_of(&owner, 10, 0).await.expect("list").is_empty(), "{backend:?}");
        assert!(matches!(store.thread(&thread).await, Err(StoreError::NotFound)));
        assert!(matches!(store.write_batch(&[append_job(&thread, 1)]).await, Err(StoreError::NotFound)), "{backend:?}");
    }
}
