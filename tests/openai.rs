//! The `openai` provider against a small OpenAI-compatible server written here: real
//! HTTP, real SSE framing (`data: …\n\n`), replies scripted per test. Covers token
//! streaming, the tool-call round trip, every upstream error's reason code, stop and the
//! deadline closing the upstream connection, the per-user limit, history, the system
//! prompt, token usage, and startup with the endpoint away.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::{Server, Spawn, types};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

const MODEL: &str = "test-model";
const API_KEY: &str = "sk-test-key-do-not-leak";
const SYSTEM_PROMPT: &str = "You are a test assistant.";

/// One piece of a streamed reply.
enum Piece {
    /// Written as one body chunk, exactly.
    Bytes(String),
    /// Holds the stream until the test says go.
    WaitFor(Arc<Notify>),
    /// Never finishes: an SSE comment every 100 ms, until the client goes away.
    Stall,
}

/// What the fake answers to one chat-completions request.
enum Script {
    Status {
        code: u16,
        retry_after: Option<u64>,
    },
    /// An error status whose OpenAI error body says `message`.
    Refuse {
        code: u16,
        message: String,
    },
    Stream(Vec<Piece>),
}

/// A request the fake received.
#[derive(Clone)]
struct Seen {
    body: Value,
    authorization: Option<String>,
    at: Instant,
}

#[derive(Clone)]
struct Fake {
    scripts: Arc<Mutex<VecDeque<Script>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Notified when a stalled stream finds its client gone.
    closed: Arc<Notify>,
    url: String,
}

impl Fake {
    async fn start(scripts: Vec<Script>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake model");
        let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
        let fake = Self {
            scripts: Arc::new(Mutex::new(scripts.into())),
            seen: Arc::new(Mutex::new(Vec::new())),
            closed: Arc::new(Notify::new()),
            url,
        };
        let router = axum::Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/models", get(|| async { Json(json!({"object": "list", "data": [{"id": MODEL}]})) }))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        fake
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// A netra server using this fake as its model.
    fn spawn(&self) -> Spawn {
        Spawn::new()
            .env("LLM_BASE_URL", &self.url)
            .env("LLM_MODEL", MODEL)
            .env("LLM_API_KEY", API_KEY)
            .env("NETRA_SYSTEM_PROMPT", SYSTEM_PROMPT)
    }
}

async fn completions(State(fake): State<Fake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    fake.seen.lock().expect("seen lock").push(Seen { body, authorization, at: Instant::now() });
    let script = fake.scripts.lock().expect("scripts lock").pop_front();
    match script {
        None => (StatusCode::IM_A_TEAPOT, "the test scripted no more replies").into_response(),
        Some(Script::Status { code, retry_after }) => {
            let status = StatusCode::from_u16(code).expect("a status code");
            let mut response =
                (status, Json(json!({"error": {"message": format!("scripted {code}")}}))).into_response();
            if let Some(secs) = retry_after {
                response.headers_mut().insert(header::RETRY_AFTER, secs.to_string().parse().expect("header value"));
            }
            response
        }
        Some(Script::Refuse { code, message }) => {
            let status = StatusCode::from_u16(code).expect("a status code");
            (status, Json(json!({"error": {"message": message}}))).into_response()
        }
        Some(Script::Stream(pieces)) => {
            let (tx, rx) = mpsc::channel::<String>(1);
            let closed = fake.closed.clone();
            tokio::spawn(async move {
                for piece in pieces {
                    match piece {
                        Piece::Bytes(b) => {
                            if tx.send(b).await.is_err() {
                                return;
                            }
                        }
                        Piece::WaitFor(gate) => gate.notified().await,
                        Piece::Stall => loop {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            // Fails once hyper dropped the body: the client closed the connection.
                            if tx.send(": still thinking\n\n".into()).await.is_err() {
                                closed.notify_one();
                                return;
                            }
                        },
                    }
                }
            });
            let body = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (Ok::<_, Infallible>(chunk), rx))
            });
            ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
        }
    }
}

fn data(v: Value) -> Piece {
    Piece::Bytes(format!("data: {v}\n\n"))
}

fn token(text: &str) -> Piece {
    data(json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}))
}

fn finish(reason: &str) -> Piece {
    data(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}))
}

fn usage(prompt: u64, completion: u64) -> Piece {
    data(json!({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}))
}

fn done() -> Piece {
    Piece::Bytes("data: [DONE]\n\n".into())
}

/// A complete streamed answer: each token, stop, usage, `[DONE]`.
fn answer(tokens: &[&str], prompt: u64, completion: u64) -> Script {
    let mut pieces: Vec<Piece> = tokens.iter().map(|t| token(t)).collect();
    pieces.extend([finish("stop"), usage(prompt, completion), done()]);
    Script::Stream(pieces)
}

fn tool_call(index: u64, id: &str, name: &str, arguments: &str) -> Piece {
    data(json!({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}}
    ]}}]}))
}

fn tool_arguments(index: u64, piece: &str) -> Piece {
    data(
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}}]}),
    )
}

fn text_of(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "partial_result")
        .map(|f| f["payload"]["content"].as_str().expect("partial_result content"))
        .collect()
}

fn last_of<'a>(frames: &'a [Value], kind: &str) -> &'a Value {
    frames.iter().rev().find(|f| f["type"] == kind).unwrap_or_else(|| panic!("no {kind} in {:?}", types(frames)))
}

/// Asserts the run failed with `reason` (agent_error → error agent_failed, last) and
/// returns the error message.
fn assert_failed(frames: &[Value], reason: &str) -> String {
    let kinds = types(frames);
    assert_eq!(&kinds[kinds.len() - 2..], ["agent_error", "error"], "{kinds:?}");
    let agent_error = &frames[frames.len() - 2]["payload"];
    let error = &frames[frames.len() - 1]["payload"];
    assert_eq!(agent_error["status"], "error", "{agent_error}");
    assert_eq!(agent_error["error_context"]["reason"], reason, "{agent_error}");
    assert_eq!(error["code"], "agent_failed", "{error}");
    assert_eq!(error["reason"], reason, "{error}");
    let message = error["error_message"].as_str().expect("error_message").to_string();
    assert_eq!(agent_error["error_message"], message.as_str());
    assert!(!message.contains(API_KEY), "the API key leaked: {message}");
    assert!(!kinds.contains(&"final_report".to_string()), "{kinds:?}");
    message
}

/// A localhost port with nothing listening.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

async fn stored_usage(server: &Server, run_id: &str) -> (String, Option<i64>, Option<i64>) {
    use sqlx::{Connection, Row};
    // The suite's PostgreSQL pass records the server's database URL in its data dir.
    let url = std::fs::read_to_string(server.data_dir.join("test-database-url"))
        .unwrap_or_else(|_| format!("sqlite://{}", server.data_dir.join("netra.db").display()));
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&url).await.expect("open the server's database");
    let row = sqlx::query("SELECT status, prompt_tokens, completion_tokens FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&mut db)
        .await
        .expect("the run row");
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn model_tokens_stream_as_they_arrive_and_the_answer_carries_usage() {
    let gate = Arc::new(Notify::new());
    let fake = Fake::start(vec![Script::Stream(vec![
        token("Hel"),
        Piece::WaitFor(gate.clone()),
        token("lo"),
        token(" world"),
        finish("stop"),
        usage(11, 3),
        done(),
    ])])
    .await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("streamer").await;
    tab.send(json!({"type": "user_message", "payload": {"content": "say hello"}})).await;
    // The first token reaches the client while the model is still holding the rest.
    let mut frames = tab.until(|f| f["type"] == "partial_result").await;
    assert_eq!(frames.last().expect("a frame")["payload"], json!({"content": "Hel", "is_complete": false}));
    gate.notify_one();
    frames.extend(tab.collect_run().await);

    let kinds = types(&frames);
    assert_eq!(&kinds[..4], ["thread_created", "user_message", "agent_started", "agent_thinking"], "{kinds:?}");
    assert_eq!(&kinds[kinds.len() - 2..], ["agent_completed", "final_report"], "{kinds:?}");
    assert!(kinds[4..kinds.len() - 2].iter().all(|k| k == "partial_result"), "{kinds:?}");
    assert_eq!(text_of(&frames), "Hello world");
    let completed = &last_of(&frames, "agent_completed")["payload"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["result"]["response"], "Hello world");
    assert_eq!(completed["metrics"], json!({"prompt_tokens": 11, "completion_tokens": 3}));
    assert_eq!(last_of(&frames, "final_report")["payload"]["executive_summary"], "Hello world");
    common::assert_dense(&frames);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let body = &requests[0].body;
    assert_eq!(requests[0].authorization.as_deref(), Some(format!("Bearer {API_KEY}").as_str()));
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "say hello"}])
    );
    let tools: Vec<&str> = body["tools"]
        .as_array()
        .expect("tools offered")
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "function", "{t}");
            assert_eq!(t["function"]["parameters"]["type"], "object", "{t}");
            t["function"]["name"].as_str().expect("a name")
        })
        .collect();
    assert!(tools.contains(&"calculator") && tools.contains(&"clock"), "{tools:?}");

    let run_id = last_of(&frames, "agent_completed")["run_id"].as_str().expect("run_id");
    let stored = stored_usage(&server, run_id).await;
    assert_eq!(stored, ("completed".to_string(), Some(11), Some(3)));
    assert!(!server.stderr().contains(API_KEY), "the API key reached the log");
}

#[tokio::test]
async fn a_tool_call_round_trip_runs_the_calculator_and_gives_the_model_its_result() {
    let fake = Fake::start(vec![
        Script::Stream(vec![
            tool_call(0, "call_1", "calculator", ""),
            tool_arguments(0, "{\"expression\":"),
            tool_arguments(0, "\"6*7\"}"),
            finish("tool_calls"),
            usage(40, 12),
            done(),
        ]),
        answer(&["6*7 is ", "42."], 60, 5),
    ])
    .await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("calculating").await;
    let frames = tab.chat("what is 6*7?", None).await;

    let executing = last_of(&frames, "tool_executing");
    assert_eq!(
        executing["payload"],
        json!({"tool_name": "calculator", "parameters": {"expression": "6*7"}, "status": "executing",
               "message": "Running calculator"})
    );
    let completed = &last_of(&frames, "tool_completed")["payload"];
    assert_eq!(completed["tool_name"], "calculator");
    assert_eq!(completed["result"], json!({"expression": "6*7", "value": "42"}));
    assert_eq!(completed["status"], "completed");
    assert!(completed["execution_time_ms"].as_u64().is_some(), "{completed}");
    let kinds = types(&frames);
    let position = |k: &str| kinds.iter().position(|x| x == k).unwrap_or_else(|| panic!("{k} in {kinds:?}"));
    assert!(position("tool_executing") < position("tool_completed"));
    assert!(position("tool_completed") < position("partial_result"), "{kinds:?}");

    let agent_completed = &last_of(&frames, "agent_completed")["payload"];
    assert_eq!(agent_completed["result"]["response"], "6*7 is 42.");
    assert_eq!(agent_completed["result"]["tools"], json!(["calculator"]));
    assert_eq!(agent_completed["metrics"], json!({"prompt_tokens": 100, "completion_tokens": 17}));
    assert_eq!(last_of(&frames, "final_report")["payload"]["executive_summary"], "6*7 is 42.");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let messages = requests[1].body["messages"].as_array().expect("messages").clone();
    let n = messages.len();
    assert_eq!(messages[n - 2]["role"], "assistant");
    assert_eq!(
        messages[n - 2]["tool_calls"],
        json!([{"id": "call_1", "type": "function",
                "function": {"name": "calculator", "arguments": "{\"expression\":\"6*7\"}"}}])
    );
    assert_eq!(messages[n - 1]["role"], "tool");
    assert_eq!(messages[n - 1]["tool_call_id"], "call_1");
    let result: Value =
        serde_json::from_str(messages[n - 1]["content"].as_str().expect("tool content")).expect("the result is JSON");
    assert_eq!(result["value"], "42");
}

#[tokio::test]
async fn an_unknown_tool_and_bad_arguments_reach_the_model_as_error_results() {
    let fake = Fake::start(vec![
        Script::Stream(vec![
            tool_call(0, "call_a", "teleport", "{}"),
            tool_call(1, "call_b", "calculator", "{\"expression\": "),
            finish("tool_calls"),
            done(),
        ]),
        answer(&["I could not do that."], 1, 1),
    ])
    .await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("confused").await;
    let frames = tab.chat("beam me up", None).await;

    let results: Vec<&Value> = frames.iter().filter(|f| f["type"] == "tool_completed").map(|f| &f["payload"]).collect();
    assert_eq!(results.len(), 2, "{:?}", types(&frames));
    assert_eq!(results[0]["tool_name"], "teleport");
    assert!(results[0]["result"]["error"].as_str().is_some_and(|e| e.contains("unknown tool")), "{}", results[0]);
    assert_eq!(results[1]["tool_name"], "calculator");
    assert!(results[1]["result"]["error"].as_str().is_some_and(|e| e.contains("not JSON")), "{}", results[1]);
    assert_eq!(last_of(&frames, "final_report")["payload"]["executive_summary"], "I could not do that.");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let tool_messages: Vec<&Value> =
        requests[1].body["messages"].as_array().expect("messages").iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tool_messages.len(), 2);
    assert_eq!(tool_messages[0]["tool_call_id"], "call_a");
    assert_eq!(tool_messages[1]["tool_call_id"], "call_b");
    for m in tool_messages {
        assert!(m["content"].as_str().is_some_and(|c| c.contains("\"error\"")), "{m}");
    }
}

#[tokio::test]
async fn a_refused_api_key_ends_the_run_with_upstream_auth_without_retrying() {
    let fake = Fake::start(vec![Script::Status { code: 401, retry_after: None }]).await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("locked-out").await;
    let frames = tab.chat("hello", None).await;
    let message = assert_failed(&frames, "upstream_auth");
    assert!(message.contains("401"), "{message}");
    assert_eq!(fake.requests().len(), 1, "401 is not retried");
    let log = server.stderr();
    assert!(!log.contains(API_KEY), "the API key reached the log");
    assert!(log.contains("LLM_API_KEY"), "the log tells the operator what to check");
}

#[tokio::test]
async fn a_429_with_a_short_retry_after_is_retried_then_succeeds() {
    let fake = Fake::start(vec![Script::Status { code: 429, retry_after: Some(1) }, answer(&["patience"], 2, 1)]).await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("patient").await;
    let frames = tab.chat("hello", None).await;
    assert_eq!(last_of(&frames, "final_report")["payload"]["executive_summary"], "patience");
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}, before retry-after");
    assert!(waited < Duration::from_secs(3), "retried after {waited:?}");
}

#[tokio::test]
async fn a_429_with_a_long_retry_after_ends_the_run_with_upstream_rate_limited() {
    let fake = Fake::start(vec![Script::Status { code: 429, retry_after: Some(60) }]).await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("throttled").await;
    let frames = tab.chat("hello", None).await;
    let message = assert_failed(&frames, "upstream_rate_limited");
    assert!(message.contains("429"), "{message}");
    assert_eq!(fake.requests().len(), 1, "a 60 s retry-after is not waited for");
}

#[tokio::test]
async fn a_failing_model_is_retried_twice_then_ends_with_upstream_unavailable() {
    let fake = Fake::start((0..3).map(|_| Script::Status { code: 503, retry_after: None }).collect()).await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("unlucky").await;
    let frames = tab.chat("hello", None).await;
    let message = assert_failed(&frames, "upstream_unavailable");
    assert!(message.contains("503"), "{message}");
    assert_eq!(fake.requests().len(), 3, "one request and two retries");
}

#[tokio::test]
async fn a_malformed_chunk_ends_the_run_with_upstream_malformed() {
    let fake = Fake::start(vec![Script::Stream(vec![
        token("fine so far"),
        Piece::Bytes("data: {\"choices\": [oops\n\n".into()),
        done(),
    ])])
    .await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("garbled").await;
    let frames = tab.chat("hello", None).await;
    assert_failed(&frames, "upstream_malformed");
    assert_eq!(fake.requests().len(), 1, "a reply that started is never retried");
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_the_run_with_upstream_cut() {
    let fake = Fake::start(vec![Script::Stream(vec![token("half an ans")])]).await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("cut-off").await;
    let frames = tab.chat("hello", None).await;
    assert_eq!(text_of(&frames), "half an ans", "the text before the cut was streamed");
    assert_failed(&frames, "upstream_cut");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn stop_agent_mid_stream_cancels_the_run_and_closes_the_upstream_connection() {
    let fake = Fake::start(vec![Script::Stream(vec![token("Let me think"), Piece::Stall])]).await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("impatient").await;
    tab.send(json!({"type": "user_message", "payload": {"content": "think hard"}})).await;
    let frames = tab.until(|f| f["type"] == "partial_result").await;
    let run_id = frames.last().expect("a frame")["run_id"].as_str().expect("run_id").to_string();

    let stopped = Instant::now();
    tab.send(json!({"type": "stop_agent", "payload": {"run_id": run_id}})).await;
    let rest = tab.collect_run().await;
    let end = rest.last().expect("a frame");
    assert_eq!(end["type"], "agent_completed", "{end}");
    assert_eq!(end["payload"]["status"], "cancelled", "{end}");
    tokio::time::timeout(Duration::from_secs(2), fake.closed.notified())
        .await
        .expect("the fake model saw its connection closed within 2 s of the stop");
    assert!(stopped.elapsed() < Duration::from_secs(2), "{:?}", stopped.elapsed());
    let stored = stored_usage(&server, &run_id).await;
    assert_eq!(stored.0, "cancelled");
}

#[tokio::test]
async fn a_stalled_model_hits_the_run_deadline_and_fails_timed_out() {
    let fake = Fake::start(vec![Script::Stream(vec![Piece::Stall])]).await;
    let server = fake.spawn().env("NETRA_RUN_DEADLINE", "1s").ready().await;
    let mut tab = server.connect("waiting").await;
    let began = Instant::now();
    let frames = tab.chat("hello", None).await;
    let took = began.elapsed();
    let message = assert_failed(&frames, "timed_out");
    assert!(message.contains("deadline"), "{message}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(4), "ended after {took:?}");
    tokio::time::timeout(Duration::from_secs(2), fake.closed.notified())
        .await
        .expect("the fake model saw its connection closed after the deadline");
}

#[tokio::test]
async fn a_second_run_of_the_same_user_gets_busy_while_the_model_streams() {
    let fake = Fake::start(vec![Script::Stream(vec![token("working"), Piece::Stall])]).await;
    let server = fake.spawn().env("NETRA_MAX_RUNS_PER_USER", "1").ready().await;
    let mut tab = server.connect("greedy").await;
    tab.send(json!({"type": "user_message", "payload": {"content": "first"}})).await;
    let frames = tab.until(|f| f["type"] == "partial_result").await;
    let run_id = frames.last().expect("a frame")["run_id"].as_str().expect("run_id").to_string();

    tab.send(json!({"type": "user_message", "message_id": "m-2", "payload": {"content": "second"}})).await;
    let busy = tab.until(|f| f["type"] == "error").await.pop().expect("an error");
    assert_eq!(busy["payload"]["code"], "busy", "{busy}");
    assert_eq!(busy["payload"]["ref"], "m-2", "{busy}");
    assert!(busy.get("seq").is_none_or(Value::is_null), "busy is not a thread event: {busy}");
    assert_eq!(fake.requests().len(), 1, "the refused message never reached the model");

    tab.send(json!({"type": "stop_agent", "payload": {"run_id": run_id}})).await;
    let end = tab.until(|f| f["type"] == "agent_completed").await.pop().expect("a frame");
    assert_eq!(end["payload"]["status"], "cancelled", "{end}");
}

#[tokio::test]
async fn the_second_message_sends_the_first_exchange_after_the_system_prompt() {
    let fake = Fake::start(vec![answer(&["Paris", "."], 5, 2), answer(&["About 2.1 million."], 9, 4)]).await;
    let server = fake.spawn().ready().await;
    let mut tab = server.connect("curious").await;
    let first = tab.chat("What is the capital of France?", None).await;
    let thread_id = first[0]["thread_id"].as_str().expect("thread_id").to_string();
    let second = tab.chat("How many people live there?", Some(&thread_id)).await;
    assert_eq!(last_of(&second, "final_report")["payload"]["executive_summary"], "About 2.1 million.");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].body["messages"],
        json!([
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "How many people live there?"},
        ])
    );
}

#[tokio::test]
async fn the_history_budget_drops_the_oldest_messages() {
    let fake = Fake::start(vec![answer(&["one"], 1, 1), answer(&["two"], 1, 1), answer(&["three"], 1, 1)]).await;
    // Room for "second" and "two" (9 characters), not for "first" and "one" too.
    let server = fake.spawn().env("NETRA_HISTORY_BUDGET", "9").ready().await;
    let mut tab = server.connect("forgetful").await;
    let first = tab.chat("first", None).await;
    let thread_id = first[0]["thread_id"].as_str().expect("thread_id").to_string();
    tab.chat("second", Some(&thread_id)).await;
    tab.chat("third", Some(&thread_id)).await;
    let contents: Vec<String> = fake.requests()[2].body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(contents, [SYSTEM_PROMPT, "second", "two", "third"]);
}

#[tokio::test]
async fn an_unreachable_model_leaves_the_server_ready_and_runs_fail_upstream_unreachable() {
    let port = closed_port().await;
    let server = Spawn::new().env("LLM_BASE_URL", format!("http://127.0.0.1:{port}/v1")).ready().await;
    let http = reqwest::Client::new();
    let ready = http.get(server.http("/health/ready")).send().await.expect("ready");
    assert_eq!(ready.status(), 200, "the model is optional");
    let report: Value =
        http.get(server.http("/health/startup")).send().await.expect("startup").json().await.expect("json");
    let provider = report["components"]
        .as_array()
        .expect("components")
        .iter()
        .find(|c| c["name"] == "llm_provider")
        .expect("llm_provider listed")
        .clone();
    assert_eq!(provider["criticality"], "optional", "{provider}");
    assert_eq!(provider["state"], "degraded", "{provider}");

    let mut tab = server.connect("offline").await;
    let frames = tab.chat("hello", None).await;
    let message = assert_failed(&frames, "upstream_unreachable");
    assert!(!message.contains(&format!("127.0.0.1:{port}")), "clients are not told the endpoint: {message}");
    assert!(server.stderr().contains(&format!("127.0.0.1:{port}")), "the log names it for the operator");
    let thread_id = frames[0]["thread_id"].as_str().expect("thread_id");

    let threads =
        http.get(server.http("/api/threads")).bearer_auth(server.token("offline")).send().await.expect("threads");
    assert_eq!(threads.status(), 200);
    assert!(threads.text().await.expect("body").contains(thread_id), "history is served");
}

/// Credentials in `LLM_BASE_URL` and whatever the upstream says in an error body reach no
/// chat client, no health report and no log line; the operator's log keeps the detail.
#[tokio::test]
async fn credentials_and_upstream_bodies_never_reach_clients_health_or_the_log() {
    let fake = Fake::start(vec![Script::Refuse {
        code: 400,
        message: format!("bad request from key {API_KEY}: upstream-internal-detail"),
    }])
    .await;
    let with_credentials = fake.url.replacen("http://", "http://alice:pa55-w0rd-hidden@", 1);
    let server = Spawn::new()
        .env("LLM_BASE_URL", with_credentials)
        .env("LLM_API_KEY", API_KEY)
        .env("LLM_MODEL", MODEL)
        .ready()
        .await;
    let mut tab = server.connect("leaky").await;
    let frames = tab.chat("hello", None).await;
    let message = assert_failed(&frames, "upstream_rejected");
    assert!(message.contains("400"), "{message}");
    let on_the_wire: String = frames.iter().map(Value::to_string).collect();
    // Replayed later from the store, exactly as sent.
    let thread = frames[0]["thread_id"].as_str().expect("thread_id");
    tab.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}})).await;
    let replayed: String = tab.collect_run().await.iter().map(Value::to_string).collect();
    let http = reqwest::Client::new();
    let mut reports = String::new();
    for path in ["/health", "/health/startup", "/health/ready"] {
        reports.push_str(&http.get(server.http(path)).send().await.expect("health").text().await.expect("body"));
    }
    let log = server.stderr();
    for (place, text) in [("frames", &on_the_wire), ("replay", &replayed), ("health", &reports), ("log", &log)] {
        assert!(!text.contains("pa55-w0rd-hidden"), "the URL's password reached the {place}");
        assert!(!text.contains(API_KEY), "the API key reached the {place}");
    }
    for (place, text) in [("frames", &on_the_wire), ("replay", &replayed)] {
        assert!(!text.contains("upstream-internal-detail"), "the upstream body reached the {place}");
        assert!(!text.contains("alice"), "the endpoint reached the {place}");
    }
    assert!(log.contains("upstream-internal-detail"), "the operator's log keeps the upstream's words");
}

#[tokio::test]
async fn a_required_model_that_is_unreachable_stops_startup_naming_llm_provider() {
    let port = closed_port().await;
    let mut server = Spawn::new()
        .env("LLM_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("LLM_REQUIRED", "true")
        .start()
        .await;
    assert_eq!(server.wait_exit().await, Some(1));
    let stderr = server.stderr();
    assert!(
        stderr.lines().any(|l| l.contains("component llm_provider") && l.contains(&format!("127.0.0.1:{port}"))),
        "one line names the component and the endpoint:\n{stderr}"
    );
}
