//! The Netra web client's way of reading frames, played against the real binary: it
//! processes, of the frames arriving within one React render, only the first whose type
//! it knows, and on a new thread's first message it remounts the chat view and processes
//! the first known frame of the whole history again (docs/protocol.md, "The Netra web
//! client"). Sockets that offer `jwt-auth` must be spoken to so that this client still
//! sees every run whole; other sockets keep full-speed streaming.

mod common;

use std::time::Duration;

use common::{Auth, Client, Server, Spawn, types};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Frames arriving this close after a processed one are lost (one render, measured in the
/// client at a few ms; 50 ms is the slow end).
const RENDER: Duration = Duration::from_millis(50);
/// How long the remount after `thread_created` takes; frames arriving meanwhile are lost.
const REMOUNT: Duration = Duration::from_millis(100);

/// The frame types the client's event processor handles (`useEventProcessor.ts`).
const LISTED: &[&str] = &[
    "connection_established",
    "thread_created",
    "user_message",
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "partial_result",
    "agent_completed",
    "final_report",
    "agent_error",
    "error",
];

/// What the client saw: every frame as it arrived, and the ones it processed.
struct Tab {
    client: Client,
    /// Every frame since the socket opened, with its arrival time.
    history: Vec<(Instant, Value)>,
    processed: Vec<Value>,
    last_processed: Option<Instant>,
    remount_at: Option<Instant>,
}

impl Tab {
    async fn open(server: &Server, user: &str) -> Self {
        let client = Client::open(&server.ws_url(), Auth::Subprotocol(server.token(user))).await.expect("connect");
        assert_eq!(client.protocol.as_deref(), Some("jwt-auth"));
        let mut tab =
            Self { client, history: Vec::new(), processed: Vec::new(), last_processed: None, remount_at: None };
        // The hello (a `system_message`, not listed) and the ready frame.
        for _ in 0..2 {
            let frame = tab.client.next().await;
            tab.arrive(Instant::now(), frame);
        }
        tab
    }

    /// Sends a message and plays the client's rules on what arrives until the run's
    /// `final_report` has arrived (processed or not) and the socket has been quiet a while.
    async fn run(&mut self, text: &str, thread_id: Option<&str>) -> Vec<Value> {
        let start = self.processed.len();
        self.client.send(json!({"type": "user_message", "payload": {"content": text, "thread_id": thread_id}})).await;
        loop {
            let frame = self.client.next().await;
            let at = Instant::now();
            let done = frame["type"] == "final_report" || frame["type"] == "error";
            self.arrive(at, frame);
            if done {
                break;
            }
        }
        self.processed[start..].to_vec()
    }

    fn arrive(&mut self, at: Instant, frame: Value) {
        self.history.push((at, frame.clone()));
        let kind = frame["type"].as_str().unwrap_or_default();
        if !LISTED.contains(&kind) {
            return;
        }
        if let Some(remount) = self.remount_at {
            if at < remount {
                return; // the old view is gone, the new one is not listening yet
            }
            // The new view queues the whole history and processes its first listed frame.
            self.remount_at = None;
            let first =
                self.history.iter().map(|(_, f)| f).find(|f| LISTED.contains(&f["type"].as_str().unwrap_or_default()));
            self.processed.push(first.expect("a listed frame").clone());
            self.last_processed = Some(remount);
        }
        if self.last_processed.is_some_and(|last| at.duration_since(last) < RENDER) {
            return; // a later frame of the same render: dropped with the recreated queue
        }
        self.last_processed = Some(at);
        if kind == "thread_created" {
            self.remount_at = Some(at + REMOUNT);
        }
        self.processed.push(frame);
    }
}

/// Checks one run as the client processed it: one card, the whole answer once, and the
/// `final_report` that clears the busy state.
fn assert_whole(processed: &[Value], all: &[Value]) {
    let kinds = types(processed);
    let count = |t: &str| kinds.iter().filter(|k| *k == t).count();
    assert_eq!(count("agent_started"), 1, "one agent card: {kinds:?}");
    assert_eq!(count("final_report"), 1, "the run completes in the UI: {kinds:?}");
    assert_eq!(count("user_message"), 0, "the echo is not sent to this client: {kinds:?}");
    let streamed: String = processed
        .iter()
        .filter(|f| f["type"] == "partial_result")
        .filter_map(|f| f["payload"]["content"].as_str())
        .collect();
    let report = processed.iter().find(|f| f["type"] == "final_report").expect("final_report");
    let answer = report["payload"]["executive_summary"].as_str().expect("executive_summary");
    assert!(!answer.is_empty());
    assert_eq!(streamed, answer, "every streamed word reached the page: {kinds:?}");
    // Nothing the client saw was lost on the wire either: all of the run's events came.
    let arrived = types(all);
    for kind in
        ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed", "final_report"]
    {
        assert!(arrived.iter().any(|k| k == kind), "{kind} missing from {arrived:?}");
    }
}

#[tokio::test]
async fn the_web_client_completes_a_first_and_a_second_run_under_its_own_rules() {
    let server = Server::start().await;
    let mut tab = Tab::open(&server, "webclient").await;

    assert_eq!(types(&tab.processed), ["connection_established"]);
    let seen = tab.history.len();
    let first = tab.run("What is 6*7? Tell me about it.", None).await;
    let all: Vec<Value> = tab.history[seen..].iter().map(|(_, f)| f.clone()).collect();
    let kinds = types(&first);
    assert_eq!(kinds.first().map(String::as_str), Some("thread_created"), "{kinds:?}");
    // The remount replays the first listed frame of the history: the ready frame, not a run event.
    assert_eq!(kinds.get(1).map(String::as_str), Some("connection_established"), "remount: {kinds:?}");
    assert_whole(&first, &all);
    let thread_id = first[0]["payload"]["thread_id"].as_str().expect("thread_id").to_string();

    let seen = tab.history.len();
    let second = tab.run("And what is 2+2?", Some(&thread_id)).await;
    let all: Vec<Value> = tab.history[seen..].iter().map(|(_, f)| f.clone()).collect();
    assert_whole(&second, &all);
    assert!(second.iter().all(|f| f["type"] != "thread_created"), "{:?}", types(&second));
}

#[tokio::test]
async fn the_ready_frame_follows_the_hello_and_belongs_to_no_thread() {
    let server = Server::start().await;
    let mut client = Client::open(&server.ws_url(), Auth::Subprotocol(server.token("ready"))).await.expect("connect");
    let hello = client.next().await;
    assert_eq!(hello["type"], "system_message", "{hello}");
    let ready = client.next().await;
    assert_eq!(ready["type"], "connection_established", "{ready}");
    assert_eq!(ready["payload"]["user_id"], "ready");
    assert_eq!(ready["payload"]["connection_id"], hello["payload"]["connection_id"]);
    assert_eq!(ready["payload"]["connection_ready"], true);
    assert!(ready.get("seq").is_none() && ready.get("thread_id").is_none(), "{ready}");
}

/// Every frame the client keeps counts against its cap of 500, pongs too: a long session
/// of pings and runs must stay well under it.
#[tokio::test]
async fn a_twenty_run_session_with_pings_stays_under_the_clients_frame_cap() {
    // Pacing off the clock only to keep the test short; the frames are the same.
    let server = Spawn::new().env("NETRA_WEB_CLIENT_PACE", "5ms").ready().await;
    let mut tab = Client::open(&server.ws_url(), Auth::Subprotocol(server.token("long"))).await.expect("connect");
    let mut frames = vec![tab.next().await, tab.next().await];
    let mut thread_id: Option<String> = None;
    for i in 0..20 {
        for _ in 0..3 {
            tab.send(json!({"type": "ping", "timestamp": i})).await;
        }
        tab.send(json!({"type": "user_message", "payload": {"content": format!("Run {i}: what is {i}+1?"), "thread_id": thread_id}}))
            .await;
        let run = tab.collect_run().await;
        assert_eq!(run.last().expect("frames")["type"], "final_report", "{:?}", types(&run));
        if thread_id.is_none() {
            let created = run.iter().find(|f| f["type"] == "thread_created").expect("thread_created");
            thread_id = created["payload"]["thread_id"].as_str().map(str::to_string);
        }
        frames.extend(run);
    }
    tab.expect_silence(Duration::from_millis(300)).await;
    let kinds = types(&frames);
    assert!(!kinds.iter().any(|k| k == "pong" || k == "user_message"), "{kinds:?}");
    assert!(frames.len() < 500, "{} frames in 20 runs: {kinds:?}", frames.len());
    // A run is a handful of frames, not one per word.
    assert!(frames.len() <= 2 + 20 * 16, "{} frames in 20 runs", frames.len());
}

/// Clients that do not offer `jwt-auth` keep the whole protocol: the echo, pongs and
/// unpaced delivery.
#[tokio::test]
async fn other_clients_keep_echo_pong_and_full_speed() {
    let server = Server::start().await;
    let mut client = Client::open(&server.ws_url(), Auth::Header(server.token("plain"))).await.expect("connect");
    assert_eq!(client.next().await["type"], "system_message");
    client.send(json!({"type": "ping", "timestamp": 7})).await;
    assert_eq!(client.next().await["type"], "pong");
    let started = Instant::now();
    let frames = client.chat("What is 6*7? Tell me about it.", None).await;
    let elapsed = started.elapsed();
    let kinds = types(&frames);
    assert!(kinds.iter().any(|k| k == "user_message"), "{kinds:?}");
    // Paced at 250 ms these frames would take seconds; unpaced the run takes its own time.
    let paced = Duration::from_millis(250) * (frames.len() as u32 - 1);
    assert!(elapsed < paced, "{} frames took {elapsed:?}", frames.len());
}
