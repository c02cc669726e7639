//! Runs over the socket (PROTOCOL.md §2, §3, §6a, §6d): who receives a run, how threads
//! are created and continued, ownership, stop, the deadline, history and tools.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Server, Spawn, assert_dense, types};
use serde_json::{Value, json};

/// The §3.2 order: each frame's rank never goes down; thinking and tool pairs share a
/// rank because the builtin agent thinks between tools.
fn rank(kind: &str) -> Option<u8> {
    Some(match kind {
        "thread_created" => 0,
        "user_message" => 1,
        "agent_started" => 2,
        "agent_thinking" | "tool_executing" | "tool_completed" => 3,
        "partial_result" => 4,
        "agent_completed" => 5,
        "final_report" => 6,
        _ => return None,
    })
}

/// Asserts that `frames` is one successful run in the §3.2 order, `final_report` last.
fn assert_successful_run(frames: &[Value], new_thread: bool) {
    let kinds = types(frames);
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    let mut last = 0;
    for (i, kind) in kinds.iter().enumerate() {
        let r = rank(kind).unwrap_or_else(|| panic!("unexpected frame {i} in a run: {kinds:?}"));
        assert!(r >= last, "frame {i} ({kind}) out of §3.2 order: {kinds:?}");
        last = r;
    }
    assert_eq!(count("thread_created"), usize::from(new_thread), "{kinds:?}");
    for once in ["user_message", "agent_started", "agent_completed", "final_report"] {
        assert_eq!(count(once), 1, "{once} once in {kinds:?}");
    }
    assert!(count("agent_thinking") >= 1, "{kinds:?}");
    assert!(count("partial_result") >= 1, "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("final_report"), "{kinds:?}");
    assert_eq!(kinds[kinds.len() - 2], "agent_completed", "{kinds:?}");
    assert_eq!(frames[frames.len() - 2]["payload"]["status"], "completed");
    // Tools come in executing → completed pairs naming the same tool.
    let tools: Vec<&Value> =
        frames.iter().filter(|f| matches!(f["type"].as_str(), Some("tool_executing" | "tool_completed"))).collect();
    assert!(!tools.is_empty(), "{kinds:?}");
    for pair in tools.chunks(2) {
        assert_eq!(pair.len(), 2, "unpaired tool event: {kinds:?}");
        assert_eq!(pair[0]["type"], "tool_executing", "{kinds:?}");
        assert_eq!(pair[1]["type"], "tool_completed", "{kinds:?}");
        assert_eq!(pair[0]["payload"]["tool_name"], pair[1]["payload"]["tool_name"]);
    }
    // Every frame belongs to the same thread; all but thread_created to the same run.
    let thread_id = &frames[0]["thread_id"];
    assert!(thread_id.as_str().is_some_and(|t| !t.is_empty()), "{}", frames[0]);
    let run_id = &frames[frames.len() - 1]["run_id"];
    assert!(run_id.as_str().is_some_and(|r| !r.is_empty()), "{}", frames[frames.len() - 1]);
    for f in frames {
        assert_eq!(&f["thread_id"], thread_id, "{f}");
        assert!(f["seq"].as_u64().is_some(), "{f}");
        assert!(f["payload"].is_object(), "{f}");
        if f["type"] != "thread_created" {
            assert_eq!(&f["run_id"], run_id, "{f}");
        }
    }
    assert_dense(frames);
}

fn tool_names(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["type"] == "tool_executing")
        .filter_map(|f| f["payload"]["tool_name"].as_str().map(str::to_string))
        .collect()
}

fn summary(frames: &[Value]) -> String {
    let last = frames.last().expect("a run has frames");
    assert_eq!(last["type"], "final_report", "{last}");
    last["payload"]["executive_summary"].as_str().expect("executive_summary is text").to_string()
}

fn seq(frame: &Value) -> u64 {
    frame["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {frame}"))
}

fn str_field<'a>(frame: &'a Value, field: &str) -> &'a str {
    frame[field].as_str().unwrap_or_else(|| panic!("no {field} in {frame}"))
}

/// Asserts a protocol error (§6c): not thread-scoped, the exact code, the echoed ref.
fn assert_protocol_error(frame: &Value, code: &str, reference: Option<&str>) {
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["payload"]["code"], code, "{frame}");
    assert!(frame.get("seq").is_none(), "protocol errors carry no seq: {frame}");
    assert!(frame["payload"]["error_message"].as_str().is_some_and(|m| !m.is_empty()), "{frame}");
    match reference {
        Some(r) => assert_eq!(frame["payload"]["ref"], r, "{frame}"),
        None => assert!(frame["payload"].get("ref").is_none(), "{frame}"),
    }
}

const TWENTY_WORDS: &str = "please write me a long and thoughtful answer about the weather in the mountains \
                            near the lake this coming weekend";

#[tokio::test]
async fn every_tab_of_the_owner_gets_the_same_run_and_other_users_get_nothing() {
    let server = Server::start().await;
    let user = common::unique("owner");
    let mut tab1 = server.connect(&user).await;
    let mut tab2 = server.connect(&user).await;
    let mut stranger = server.connect(&common::unique("stranger")).await;

    let first = tab1.chat("what is 12 * (3 + 4)?", None).await;
    let seen_by_tab2 = tab2.collect_run().await;
    assert_successful_run(&first, true);
    assert_eq!(first, seen_by_tab2, "both tabs get identical frames");
    assert_eq!(seq(&first[0]), 1);
    assert!(summary(&first).contains("84"), "{}", summary(&first));

    let thread_id = str_field(&first[0], "thread_id").to_string();
    let second = tab2.chat("and what is 6 * 7?", Some(&thread_id)).await;
    let seen_by_tab1 = tab1.collect_run().await;
    assert_successful_run(&second, false);
    assert_eq!(second, seen_by_tab1, "both tabs get identical frames");
    assert_eq!(seq(&second[0]), seq(first.last().expect("frames")) + 1);

    let ids: Vec<&str> =
        first.iter().chain(&second).filter_map(|f| f["payload"].get("message_id")).filter_map(Value::as_str).collect();
    assert_eq!(ids.len(), 2, "one user_message echo per run carries a message_id");
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "payload.message_id values repeat: {ids:?}");

    stranger.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn start_agent_without_a_thread_creates_one_and_a_second_start_continues_it() {
    let server = Server::start().await;
    let mut tab = server.connect(&common::unique("creator")).await;
    // 61 characters with non-ASCII ones: the title is the first 50 characters, not bytes.
    let text = "Über café plans: compare the résumé options for the next quarter";
    tab.send(json!({"type": "start_agent",
                    "payload": {"user_request": text, "thread_id": null, "context": {}, "settings": {}}}))
        .await;
    let first = tab.collect_run().await;
    assert_successful_run(&first, true);
    let created = &first[0];
    assert_eq!(created["type"], "thread_created", "{created}");
    let thread_id = str_field(created, "thread_id").to_string();
    assert_eq!(created["payload"]["thread_id"], thread_id.as_str(), "{created}");
    let title: String = text.chars().take(50).collect();
    assert_eq!(created["payload"]["title"], title.as_str(), "{created}");
    assert_eq!(seq(created), 1);
    let echo = &first[1];
    assert_eq!(echo["type"], "user_message");
    assert_eq!(echo["payload"]["content"], text);
    assert_eq!(echo["payload"]["role"], "user");

    tab.send(json!({"type": "start_agent",
                    "payload": {"user_request": "and one more thing", "thread_id": thread_id, "context": {}, "settings": {}}}))
        .await;
    let second = tab.collect_run().await;
    assert_successful_run(&second, false);
    assert_eq!(second[0]["type"], "user_message", "{}", second[0]);
    assert_eq!(second[0]["thread_id"], thread_id.as_str());
    assert_eq!(seq(&second[0]), seq(first.last().expect("frames")) + 1);
    assert_ne!(second[0]["run_id"], first[1]["run_id"], "a new run id per run");
}

#[tokio::test]
async fn sending_into_a_foreign_or_unknown_thread_is_forbidden() {
    let server = Server::start().await;
    let mut owner = server.connect(&common::unique("owner")).await;
    let mut intruder = server.connect(&common::unique("intruder")).await;
    let run = owner.chat("what is 1 + 1?", None).await;
    let thread_id = str_field(&run[0], "thread_id").to_string();

    intruder
        .send(json!({"type": "start_agent", "message_id": "m-1",
                     "payload": {"user_request": "let me in", "thread_id": thread_id}}))
        .await;
    assert_protocol_error(&intruder.next().await, "forbidden", Some("m-1"));
    intruder.send(json!({"type": "user_message", "payload": {"content": "let me in", "thread_id": thread_id}})).await;
    assert_protocol_error(&intruder.next().await, "forbidden", None);
    let unknown = common::unique("th");
    intruder.send(json!({"type": "user_message", "payload": {"content": "hello", "thread_id": unknown}})).await;
    assert_protocol_error(&intruder.next().await, "forbidden", None);
    intruder.send(json!({"type": "start_agent", "payload": {"user_request": "hello", "thread_id": unknown}})).await;
    assert_protocol_error(&intruder.next().await, "forbidden", None);

    intruder.send(json!({"type": "switch_thread", "payload": {"thread_id": thread_id}})).await;
    assert_protocol_error(&intruder.next().await, "forbidden", None);
    intruder.send(json!({"type": "switch_thread", "payload": {"thread_id": unknown}})).await;
    assert_protocol_error(&intruder.next().await, "forbidden", None);

    owner.send(json!({"type": "switch_thread", "payload": {"thread_id": thread_id}})).await;
    owner.expect_silence(Duration::from_millis(300)).await;

    // Nothing the intruder sent reached the thread: the owner's next run continues at
    // the next seq and is the first thing the owner's tab sees.
    let next = owner.chat("what is 2 + 2?", Some(&thread_id)).await;
    assert_successful_run(&next, false);
    assert_eq!(seq(&next[0]), seq(run.last().expect("frames")) + 1);
}

/// Starts a long run, stops it with `stop` built from (run_id, thread_id), and checks
/// it ends cancelled with nothing after.
async fn stop_cancels_the_run(stop: impl Fn(&str, &str) -> Value, wrong: Option<Value>) {
    let server = Spawn::new().env("NETRA_AGENT_TOKEN_DELAY", "200ms").ready().await;
    let mut tab = server.connect(&common::unique("stopper")).await;
    tab.send(json!({"type": "user_message", "payload": {"content": TWENTY_WORDS, "thread_id": null}})).await;
    let mut frames = tab.until(|f| f["type"] == "partial_result").await;
    assert!(!frames.iter().any(common::ends_run), "{:?}", types(&frames));
    let streaming = frames.last().expect("hit").clone();
    let run_id = str_field(&streaming, "run_id").to_string();
    let thread_id = str_field(&streaming, "thread_id").to_string();

    if let Some(wrong) = wrong {
        // A stop naming another run or thread leaves this one streaming.
        tab.send(json!({"type": "stop_agent", "payload": wrong})).await;
        for _ in 0..2 {
            let f = tab.next().await;
            assert_eq!(f["type"], "partial_result", "a stop for something else touched the run: {f}");
            frames.push(f);
        }
    }

    tab.send(json!({"type": "stop_agent", "payload": stop(&run_id, &thread_id)})).await;
    frames.extend(tab.collect_run().await);
    let end = frames.last().expect("frames");
    assert_eq!(end["type"], "agent_completed", "{end}");
    assert_eq!(end["payload"]["status"], "cancelled", "{end}");
    assert_eq!(end["payload"]["result"], json!({}), "{end}");
    assert_eq!(end["run_id"], run_id.as_str(), "{end}");
    assert_eq!(end["thread_id"], thread_id.as_str(), "{end}");
    assert!(!types(&frames).iter().any(|t| t == "final_report"), "{:?}", types(&frames));
    assert_dense(&frames);
    tab.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn stop_with_an_empty_payload_cancels_the_running_run() {
    stop_cancels_the_run(|_, _| json!({}), None).await;
}

#[tokio::test]
async fn stop_with_a_run_id_cancels_that_run() {
    stop_cancels_the_run(|run_id, _| json!({"run_id": run_id}), Some(json!({"run_id": common::unique("run")}))).await;
}

#[tokio::test]
async fn stop_with_a_thread_id_cancels_the_threads_run() {
    stop_cancels_the_run(
        |_, thread_id| json!({"thread_id": thread_id}),
        Some(json!({"thread_id": common::unique("th")})),
    )
    .await;
}

#[tokio::test]
async fn stop_when_nothing_runs_sends_no_frame() {
    let server = Server::start().await;
    let mut tab = server.connect(&common::unique("idle")).await;
    tab.send(json!({"type": "stop_agent", "payload": {}})).await;
    tab.expect_silence(Duration::from_millis(300)).await;

    let run = tab.chat("what is 3 + 3?", None).await;
    assert_successful_run(&run, true);
    let run_id = str_field(run.last().expect("frames"), "run_id").to_string();
    let thread_id = str_field(&run[0], "thread_id").to_string();
    for payload in [json!({}), json!({"run_id": run_id}), json!({"thread_id": thread_id})] {
        tab.send(json!({"type": "stop_agent", "payload": payload})).await;
    }
    tab.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_run_past_its_deadline_ends_with_agent_error_then_agent_failed() {
    let server = Spawn::new().env("NETRA_RUN_DEADLINE", "1s").env("NETRA_AGENT_TOKEN_DELAY", "300ms").ready().await;
    let mut tab = server.connect(&common::unique("slow")).await;
    let frames = tab.chat("one two three four five six seven eight nine ten", None).await;
    let kinds = types(&frames);
    assert!(!kinds.iter().any(|k| k == "final_report" || k == "agent_completed"), "{kinds:?}");
    let n = frames.len();
    assert!(n >= 3, "{kinds:?}");
    let (failed, error) = (&frames[n - 2], &frames[n - 1]);
    assert_eq!(failed["type"], "agent_error", "{kinds:?}");
    assert_eq!(failed["payload"]["status"], "error", "{failed}");
    assert!(failed["payload"]["error_message"].as_str().is_some_and(|m| !m.is_empty()), "{failed}");
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["payload"]["code"], "agent_failed", "{error}");
    assert!(error["payload"]["error_message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    let run_id = str_field(&frames[1], "run_id");
    assert_eq!(error["run_id"], run_id, "the run-ending error is thread-scoped: {error}");
    assert_eq!(error["thread_id"], frames[0]["thread_id"], "{error}");
    assert_eq!(seq(error), seq(failed) + 1, "{error}");
    assert_dense(&frames);
    tab.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn the_agent_sees_the_threads_earlier_messages() {
    let server = Server::start().await;
    let mut tab = server.connect(&common::unique("memory")).await;
    let remembered = "my favourite colour is teal";
    let first = tab.chat(remembered, None).await;
    assert_successful_run(&first, true);
    assert!(!summary(&first).contains(remembered), "the first answer has no history: {}", summary(&first));
    let thread_id = str_field(&first[0], "thread_id").to_string();
    let second = tab.chat("what did I tell you?", Some(&thread_id)).await;
    assert_successful_run(&second, false);
    let answer = summary(&second);
    assert!(answer.contains(remembered), "{answer}");
}

#[tokio::test]
async fn arithmetic_uses_the_calculator_and_time_uses_the_clock() {
    let server = Server::start().await;
    let mut tab = server.connect(&common::unique("tools")).await;
    let math = tab.chat("what is 2 ^ 10 - 24?", None).await;
    assert_successful_run(&math, true);
    assert_eq!(tool_names(&math), ["analyze_message", "calculator"]);
    let completed = math
        .iter()
        .find(|f| f["type"] == "tool_completed" && f["payload"]["tool_name"] == "calculator")
        .expect("calculator completed");
    assert_eq!(completed["payload"]["result"]["value"], "1000", "{completed}");
    assert!(summary(&math).contains("1000"), "{}", summary(&math));

    let clock = tab.chat("what time is it", None).await;
    assert_successful_run(&clock, true);
    assert_eq!(tool_names(&clock), ["analyze_message", "clock"]);
    assert!(summary(&clock).contains("UTC"), "{}", summary(&clock));
}

/// A chat whose socket closes right after sending it must not keep the user's run slot:
/// the start finishes (message saved, run spawned and ended) even though nobody waits.
#[tokio::test]
async fn a_socket_closed_right_after_a_chat_does_not_keep_the_run_slot() {
    let server = Spawn::new().env("NETRA_MAX_RUNS_PER_USER", "1").env("NETRA_AGENT_TOKEN_DELAY", "0ms").ready().await;
    for _ in 0..8 {
        let mut tab = server.connect("dropper").await;
        tab.send(json!({"type": "user_message", "payload": {"content": "hello and goodbye"}})).await;
        drop(tab);
    }
    // Every run above ends on its own; then one slot is free again.
    let mut tab = server.connect("dropper").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let frames = tab.chat("still there?", None).await;
        if frames.iter().any(|f| f["type"] == "final_report") {
            break;
        }
        let busy = frames.iter().any(|f| f["type"] == "error" && f["payload"]["code"] == "busy");
        assert!(busy, "{:?}", types(&frames));
        assert!(std::time::Instant::now() < deadline, "the user's run slot was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Streamed text under load: with every chunk sent as it comes (interval 0), a run's
/// deltas that wait for the same commit are merged by the writer (at this pace about a
/// quarter of them, though how many depends on the machine; the writer's unit tests pin
/// the merge itself). However they were merged, each run's deltas add up to its answer,
/// in order and with dense `seq`, and a replay from the store gives exactly the frames
/// that went live.
#[tokio::test]
async fn streamed_text_adds_up_to_the_answer_however_the_writer_merged_it() {
    let server = Spawn::new().env("NETRA_STREAM_INTERVAL", "0ms").env("NETRA_AGENT_TOKEN_DELAY", "100us").ready().await;
    let mut users = Vec::new();
    for u in 0..16 {
        let user = common::unique(&format!("streamer{u}"));
        let mut tab = server.connect(&user).await;
        users.push(tokio::spawn(async move {
            let mut runs: Vec<Vec<Value>> = Vec::new();
            for n in 0..3 {
                let thread = runs.first().map(|r| str_field(&r[0], "thread_id").to_string());
                runs.push(
                    tab.chat(&format!("message {n} of a conversation long enough to stream"), thread.as_deref()).await,
                );
            }
            (user, runs)
        }));
    }
    let mut deltas = 0;
    for user in users {
        let (user, runs) = user.await.expect("a user's runs");
        for (n, frames) in runs.iter().enumerate() {
            assert_successful_run(frames, n == 0);
            assert_dense(frames);
            let streamed: String = frames
                .iter()
                .filter(|f| f["type"] == "partial_result")
                .map(|f| f["payload"]["content"].as_str().expect("delta text"))
                .collect();
            assert_eq!(streamed, summary(frames), "the deltas add up to the answer");
            deltas += frames.iter().filter(|f| f["type"] == "partial_result").count();
        }
        let live: Vec<Value> = runs.concat();
        let thread = str_field(&live[0], "thread_id");
        let end = seq(live.last().expect("frames"));
        assert_eq!(seq(&live[0]), 1);
        assert_dense(&live);
        let mut replay = server.connect(&user).await;
        replay.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}})).await;
        let replayed = replay.until(|f| f["seq"].as_u64() == Some(end)).await;
        assert_eq!(replayed, live, "the store holds what went live");
    }
    assert!(deltas >= 16 * 3, "every run streamed at least one delta");
}
