//! The REST API the web client calls (PROTOCOL.md §4.4, §4.5, §4.6): threads, their
//! messages, ownership, and the agent-over-REST shims that start socket runs.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Server, Spawn, types};
use reqwest::Method;
use serde_json::{Value, json};

/// One REST call as `user` (no token when `None`); returns the status and JSON body.
async fn call(server: &Server, method: Method, path: &str, user: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let http = reqwest::Client::builder().timeout(common::WAIT).build().expect("http client");
    let mut request = http.request(method.clone(), server.http(path));
    if let Some(user) = user {
        request = request.bearer_auth(server.token(user));
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path} -> {status}: {e}: {text:?}"));
    (status, value)
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

/// Asserts the exact §4.4 thread object, with times in seconds near now.
fn assert_thread_object(t: &Value) {
    let keys: BTreeSet<&str> = t.as_object().expect("thread is an object").keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> =
        ["id", "object", "title", "created_at", "updated_at", "metadata", "message_count"].into_iter().collect();
    assert_eq!(keys, expected, "{t}");
    assert!(t["id"].as_str().is_some_and(|id| !id.is_empty()), "{t}");
    assert_eq!(t["object"], "thread", "{t}");
    assert!(t["title"].is_string(), "{t}");
    assert!(t["metadata"].is_object(), "{t}");
    assert!(t["message_count"].is_u64(), "{t}");
    let now = now_secs();
    for field in ["created_at", "updated_at"] {
        let secs = t[field].as_i64().unwrap_or_else(|| panic!("{field} is an integer: {t}"));
        assert!((secs - now).abs() <= 60, "{field} = {secs} is not seconds near {now}: {t}");
    }
}

/// Asserts a REST error: the status and a `{"detail": "<text>"}` body.
fn assert_detail(status: u16, body: &Value, expected: u16) {
    assert_eq!(status, expected, "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
}

fn ids(list: &Value) -> Vec<&str> {
    list.as_array().expect("a JSON array").iter().map(|t| t["id"].as_str().expect("id")).collect()
}

async fn create(server: &Server, user: &str, body: Value) -> Value {
    let (status, thread) = call(server, Method::POST, "/api/threads", Some(user), Some(body)).await;
    assert_eq!(status, 200, "{thread}");
    assert_thread_object(&thread);
    thread
}

#[tokio::test]
async fn threads_are_created_listed_renamed_and_archived() {
    let server = Server::start().await;
    let user = common::unique("rest");
    let plans = create(&server, &user, json!({"title": "Plans", "metadata": {"a": 1}})).await;
    assert_eq!(plans["title"], "Plans");
    assert_eq!(plans["metadata"], json!({"a": 1}));
    assert_eq!(plans["message_count"], 0);
    let older = plans["id"].as_str().expect("id").to_string();
    let newer_thread = create(&server, &user, json!({"title": "Later"})).await;
    let newer = newer_thread["id"].as_str().expect("id").to_string();
    assert_ne!(older, newer);

    let (status, got) = call(&server, Method::GET, &format!("/api/threads/{older}"), Some(&user), None).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got, plans);

    let (status, list) = call(&server, Method::GET, "/api/threads?limit=20&offset=0", Some(&user), None).await;
    assert_eq!(status, 200, "{list}");
    let listed: BTreeSet<&str> = ids(&list).into_iter().collect();
    assert_eq!(listed, [older.as_str(), newer.as_str()].into_iter().collect(), "{list}");
    for t in list.as_array().expect("array") {
        assert_thread_object(t);
    }
    let updated: Vec<i64> =
        list.as_array().expect("array").iter().map(|t| t["updated_at"].as_i64().expect("int")).collect();
    assert!(updated.windows(2).all(|w| w[0] >= w[1]), "newest first: {list}");

    // A chat into the older thread makes it the most recently updated.
    let mut tab = server.connect(&user).await;
    let run = tab.chat("what is 5 * 5?", Some(&older)).await;
    assert_eq!(types(&run).last().map(String::as_str), Some("final_report"), "{run:?}");
    let (_, list) = call(&server, Method::GET, "/api/threads?limit=20&offset=0", Some(&user), None).await;
    assert_eq!(ids(&list), [older.as_str(), newer.as_str()], "{list}");
    assert_eq!(list[0]["message_count"], 2, "{list}");
    let (_, first_only) = call(&server, Method::GET, "/api/threads?limit=1&offset=0", Some(&user), None).await;
    assert_eq!(ids(&first_only), [older.as_str()]);
    let (_, second_only) = call(&server, Method::GET, "/api/threads?limit=1&offset=1", Some(&user), None).await;
    assert_eq!(ids(&second_only), [newer.as_str()]);

    let (status, renamed) = call(
        &server,
        Method::PUT,
        &format!("/api/threads/{older}"),
        Some(&user),
        Some(json!({"title": "x", "metadata": {"auto_renamed": true}})),
    )
    .await;
    assert_eq!(status, 200, "{renamed}");
    assert_thread_object(&renamed);
    assert_eq!(renamed["id"], older.as_str());
    assert_eq!(renamed["title"], "x");
    assert_eq!(renamed["metadata"], json!({"a": 1, "auto_renamed": true}), "metadata is merged");
    let (_, got) = call(&server, Method::GET, &format!("/api/threads/{older}"), Some(&user), None).await;
    assert_eq!(got["title"], "x");
    assert_eq!(got["metadata"], json!({"a": 1, "auto_renamed": true}));

    let (status, deleted) = call(&server, Method::DELETE, &format!("/api/threads/{older}"), Some(&user), None).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted, json!({"message": "Thread archived successfully"}));
    let (status, body) = call(&server, Method::GET, &format!("/api/threads/{older}"), Some(&user), None).await;
    assert_detail(status, &body, 404);
    let (_, list) = call(&server, Method::GET, "/api/threads?limit=20&offset=0", Some(&user), None).await;
    assert_eq!(ids(&list), [newer.as_str()], "{list}");

    tab.send(json!({"type": "user_message", "payload": {"content": "still there?", "thread_id": older}})).await;
    let refused = tab.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "forbidden", "{refused}");
    assert!(refused.get("seq").is_none(), "{refused}");
    tab.send(json!({"type": "subscribe", "payload": {"thread_id": older, "after_seq": 0}})).await;
    let refused = tab.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["code"], "forbidden", "{refused}");
    tab.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn another_users_thread_is_403_and_an_unknown_one_is_404() {
    let server = Server::start().await;
    let owner = common::unique("owner");
    let other = common::unique("other");
    let thread = create(&server, &owner, json!({"title": "Mine"})).await;
    let id = thread["id"].as_str().expect("id");
    let unknown = common::unique("th");
    for (target, expected) in [(id, 403), (unknown.as_str(), 404)] {
        let base = format!("/api/threads/{target}");
        let (status, body) = call(&server, Method::GET, &base, Some(&other), None).await;
        assert_detail(status, &body, expected);
        let (status, body) = call(&server, Method::PUT, &base, Some(&other), Some(json!({"title": "stolen"}))).await;
        assert_detail(status, &body, expected);
        let (status, body) = call(&server, Method::DELETE, &base, Some(&other), None).await;
        assert_detail(status, &body, expected);
        let (status, body) = call(&server, Method::GET, &format!("{base}/messages"), Some(&other), None).await;
        assert_detail(status, &body, expected);
    }
    let (status, list) = call(&server, Method::GET, "/api/threads", Some(&other), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list, json!([]), "other users' threads are not listed");

    // The owner's thread is untouched.
    let (status, got) = call(&server, Method::GET, &format!("/api/threads/{id}"), Some(&owner), None).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["title"], "Mine");

    // And no token at all is 401.
    let (status, body) = call(&server, Method::GET, "/api/threads", None, None).await;
    assert_detail(status, &body, 401);
    let (status, body) = call(&server, Method::GET, &format!("/api/threads/{id}"), None, None).await;
    assert_detail(status, &body, 401);
}

#[tokio::test]
async fn thread_messages_hold_the_question_and_the_final_report() {
    let server = Server::start().await;
    let user = common::unique("history");
    let mut tab = server.connect(&user).await;
    let question = "what is 9 * 9?";
    let run = tab.chat(question, None).await;
    let report = run.last().expect("frames");
    assert_eq!(report["type"], "final_report", "{report}");
    let answer = report["payload"]["executive_summary"].as_str().expect("summary");
    assert!(answer.contains("81"), "{answer}");
    let id = run[0]["thread_id"].as_str().expect("thread_id");

    let (status, page) = call(&server, Method::GET, &format!("/api/threads/{id}/messages"), Some(&user), None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["thread_id"], id, "{page}");
    assert_eq!(page["total"], 2, "{page}");
    assert_eq!(page["limit"], 50, "{page}");
    assert_eq!(page["offset"], 0, "{page}");
    let messages = page["messages"].as_array().expect("messages array");
    assert_eq!(messages.len(), 2, "{page}");
    let (user_msg, assistant) = (&messages[0], &messages[1]);
    assert_eq!(user_msg["role"], "user", "{page}");
    assert_eq!(user_msg["content"], question, "{page}");
    assert_eq!(user_msg["id"], run[1]["payload"]["message_id"], "the echo's message_id is the stored id");
    assert_eq!(assistant["role"], "assistant", "{page}");
    assert_eq!(assistant["content"], answer, "{page}");
    let now = now_secs();
    for m in messages {
        assert!(m["id"].as_str().is_some_and(|i| !i.is_empty()), "{m}");
        assert!(m["metadata"].is_object(), "{m}");
        let created = m["created_at"].as_i64().expect("integer seconds");
        assert!((created - now).abs() <= 60, "{m}");
    }
    assert_ne!(user_msg["id"], assistant["id"]);

    let (status, paged) =
        call(&server, Method::GET, &format!("/api/threads/{id}/messages?limit=1&offset=1"), Some(&user), None).await;
    assert_eq!(status, 200, "{paged}");
    assert_eq!(paged["total"], 2, "{paged}");
    assert_eq!(paged["limit"], 1, "{paged}");
    assert_eq!(paged["offset"], 1, "{paged}");
    assert_eq!(paged["messages"], json!([assistant]), "{paged}");
}

#[tokio::test]
async fn v2_execute_replies_at_once_and_streams_the_run_over_the_socket() {
    // Slow enough that the run is still streaming when the reply arrives.
    let server = Spawn::new().env("NETRA_AGENT_TOKEN_DELAY", "300ms").ready().await;
    let user = common::unique("v2");
    let mut tab = server.connect(&user).await;
    let (status, reply) = call(
        &server,
        Method::POST,
        "/api/agent/v2/execute",
        Some(&user),
        Some(json!({"request_id": "r1", "agent_type": "triage", "message": "what is 2+2",
                    "thread_id": null, "context": {}, "settings": {}})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(reply["request_id"], "r1", "{reply}");
    assert_eq!(reply["warnings"], json!([]), "{reply}");
    assert_eq!(reply["result"]["status"], "started", "{reply}");
    let run_id = reply["result"]["run_id"].as_str().expect("run_id").to_string();
    let thread_id = reply["result"]["thread_id"].as_str().expect("thread_id").to_string();

    // Replied before the run ended: the answer is not stored yet.
    let (status, page) =
        call(&server, Method::GET, &format!("/api/threads/{thread_id}/messages"), Some(&user), None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 1, "the reply came after the run ended: {page}");

    let frames = tab.collect_run().await;
    let kinds = types(&frames);
    assert_eq!(kinds.first().map(String::as_str), Some("thread_created"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("final_report"), "{kinds:?}");
    for f in &frames {
        assert_eq!(f["thread_id"], thread_id.as_str(), "{f}");
        if f["type"] != "thread_created" {
            assert_eq!(f["run_id"], run_id.as_str(), "{f}");
        }
    }
    let answer = frames.last().expect("frames")["payload"]["executive_summary"].as_str().expect("summary");
    assert!(answer.contains('4'), "{answer}");
    common::assert_dense(&frames);
}

#[tokio::test]
async fn v1_agent_routes_start_a_run_in_the_most_recent_thread() {
    let server = Server::start().await;
    let user = common::unique("v1");
    let older = create(&server, &user, json!({"title": "Older"})).await;
    let older = older["id"].as_str().expect("id").to_string();
    let newer = create(&server, &user, json!({"title": "Newer"})).await;
    assert_ne!(newer["id"], older.as_str());
    let mut tab = server.connect(&user).await;
    // Chatting into the older thread makes it the most recently updated one.
    let run = tab.chat("what is 1 + 1?", Some(&older)).await;
    assert_eq!(types(&run).last().map(String::as_str), Some("final_report"));

    let (status, reply) = call(
        &server,
        Method::POST,
        "/api/agents/triage",
        Some(&user),
        Some(json!({"type": "triage", "message": "hello", "context": {}})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(reply["status"], "started", "{reply}");
    assert_eq!(reply["agent"], "triage", "{reply}");
    assert_eq!(reply["output"], "", "{reply}");
    assert_eq!(reply["data"]["thread_id"], older.as_str(), "{reply}");
    let run_id = reply["data"]["run_id"].as_str().expect("run_id").to_string();

    let frames = tab.collect_run().await;
    let kinds = types(&frames);
    assert_eq!(kinds.first().map(String::as_str), Some("user_message"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("final_report"), "{kinds:?}");
    for f in &frames {
        assert_eq!(f["thread_id"], older.as_str(), "{f}");
        assert_eq!(f["run_id"], run_id.as_str(), "{f}");
    }
    assert_eq!(frames[0]["payload"]["content"], "hello");
    assert_eq!(frames[0]["seq"].as_u64(), run.last().expect("frames")["seq"].as_u64().map(|s| s + 1));
}

#[tokio::test]
async fn agent_routes_refuse_unknown_agents_and_empty_messages() {
    let server = Server::start().await;
    let user = common::unique("shim");
    let (status, body) = call(
        &server,
        Method::POST,
        "/api/agents/bogus",
        Some(&user),
        Some(json!({"type": "bogus", "message": "hello", "context": {}})),
    )
    .await;
    assert_detail(status, &body, 404);
    for kind in ["triage", "data", "optimization"] {
        let (status, body) = call(
            &server,
            Method::POST,
            &format!("/api/agents/{kind}"),
            Some(&user),
            Some(json!({"type": kind, "message": "  ", "context": {}})),
        )
        .await;
        assert_detail(status, &body, 422);
    }
    let (status, body) = call(
        &server,
        Method::POST,
        "/api/agent/v2/execute",
        Some(&user),
        Some(json!({"request_id": "r2", "agent_type": "triage", "message": "", "thread_id": null,
                    "context": {}, "settings": {}})),
    )
    .await;
    assert_detail(status, &body, 422);
    // Nothing was started: the user has no thread.
    let (_, list) = call(&server, Method::GET, "/api/threads", Some(&user), None).await;
    assert_eq!(list, json!([]));
}

/// The routes the web client calls at start answer the empty shapes its services read
/// (docs/protocol.md), with or without a token.
#[tokio::test]
async fn discovery_and_mcp_calls_get_the_clients_empty_shapes() {
    let server = Server::start().await;
    let user = common::unique("boot");
    for token in [Some(user.as_str()), None] {
        let (status, discovery) = call(&server, Method::GET, "/api/discovery/services", token, None).await;
        assert_eq!(status, 200, "{discovery}");
        assert_eq!(discovery["services"], json!({}), "{discovery}");
        assert_eq!(discovery["available"], false, "{discovery}");
        assert!(discovery["timestamp"].is_string(), "{discovery}");
        for path in ["/api/mcp/servers", "/api/mcp/tools"] {
            let (status, body) = call(&server, Method::GET, path, token, None).await;
            assert_eq!(status, 200, "{path}: {body}");
            assert_eq!(body["success"], true, "{path}: {body}");
            assert_eq!(body["data"], json!([]), "{path}: {body}");
        }
        let (status, config) = call(&server, Method::GET, "/api/mcp/config", token, None).await;
        assert_eq!(status, 200, "{config}");
        assert_eq!(config["data"]["mcpServers"], json!({}), "{config}");
    }
}

#[tokio::test]
async fn the_openapi_document_is_served_and_names_every_rest_route() {
    let server = common::Server::start().await;
    let doc: serde_json::Value =
        reqwest::get(server.http("/openapi.json")).await.expect("get").json().await.expect("openapi json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    for p in
        ["/api/threads", "/api/threads/{id}", "/api/threads/{id}/messages", "/auth/dev/login", "/api/agent/v2/execute"]
    {
        assert!(paths.contains_key(p), "{p} missing");
    }
    let thread = &doc["components"]["schemas"]["ThreadOut"]["properties"];
    for field in ["id", "object", "title", "created_at", "updated_at", "metadata", "message_count"] {
        assert!(thread.get(field).is_some(), "ThreadOut lacks {field}");
    }
}
