//! Findings of the hostile-client review (issue #17), each proven against the real binary:
//! the test fails on the code before the fix and passes after.

mod common;

use common::{Spawn, types};
use serde_json::json;

/// A frame refused by the rate limit is still answered with its own reference, so a
/// client knows which message to send again.
#[tokio::test]
async fn a_rate_limited_frame_is_answered_with_its_reference() {
    let server = Spawn::new().env("NETRA_RATE_LIMIT", "2").env("NETRA_RATE_WINDOW", "60s").ready().await;
    let mut client = server.connect("flooder").await;
    for i in 0..2 {
        client.send(json!({"type": "ping", "message_id": format!("p-{i}")})).await;
        assert_eq!(client.next().await["type"], "pong");
    }
    client.send(json!({"type": "user_message", "message_id": "m-3", "payload": {"content": "hi"}})).await;
    let refused = client.next().await;
    assert_eq!(refused["payload"]["code"], "rate_limited", "{refused}");
    assert_eq!(refused["payload"]["ref"], "m-3", "{refused}");
    // A frame that is not even JSON still gets its rate_limited error, without a reference.
    client.send_text("{not json").await;
    let refused = client.next().await;
    assert_eq!(refused["payload"]["code"], "rate_limited", "{refused}");
    assert!(refused["payload"].get("ref").is_none(), "{refused}");
}

/// `subscribe` with an `after_seq` the thread has not reached would mute the thread on
/// that socket until its seq caught up; it is refused instead, and nothing is muted.
#[tokio::test]
async fn subscribe_past_the_last_seq_is_invalid_and_mutes_nothing() {
    let server = Spawn::new().ready().await;
    let mut tab = server.connect("ahead").await;
    let run = tab.chat("what is 1 + 1?", None).await;
    let thread = run[0]["thread_id"].as_str().expect("thread id").to_string();
    let last = run.iter().filter_map(|f| f["seq"].as_u64()).max().expect("seq");
    tab.send(json!({"type": "subscribe", "message_id": "s-1",
                    "payload": {"thread_id": thread, "after_seq": last + 1000}}))
        .await;
    let refused = tab.next().await;
    assert_eq!(refused["payload"]["code"], "invalid_field", "{refused}");
    assert_eq!(refused["payload"]["ref"], "s-1", "{refused}");
    // The socket still sees its next run in the thread, whole.
    let next = tab.chat("and 2 + 2?", Some(&thread)).await;
    assert_eq!(next.first().and_then(|f| f["seq"].as_u64()), Some(last + 1), "{:?}", types(&next));
    assert_eq!(next.last().expect("frames")["type"], "final_report", "{:?}", types(&next));
    // Subscribing exactly at the last seq is fine: nothing to replay, live from there.
    let end = next.iter().filter_map(|f| f["seq"].as_u64()).max().expect("seq");
    tab.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": end}})).await;
    tab.send(json!({"type": "ping", "timestamp": 1})).await;
    assert_eq!(tab.next().await["type"], "pong");
}

async fn post(server: &common::Server, path: &str, user: &str, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.http(path))
        .bearer_auth(server.token(user))
        .json(&body)
        .send()
        .await
        .expect("post")
}

async fn detail(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("a JSON error body");
    body["detail"].as_str().unwrap_or_else(|| panic!("a detail: {body}")).to_string()
}

/// The REST agent routes take no message the socket would refuse: the body is held to the
/// socket's frame limit, answered 413 with a JSON detail, and nothing reaches any tab.
#[tokio::test]
async fn a_rest_message_past_the_frame_limit_is_413_and_reaches_no_tab() {
    let server = Spawn::new().env("NETRA_MAX_FRAME_BYTES", "65536").ready().await;
    let mut tab = server.connect("big").await;
    let huge = "x".repeat(200_000);
    for path in ["/api/agent/v2/execute", "/api/agents/triage"] {
        let response = post(&server, path, "big", json!({"message": huge})).await;
        assert_eq!(response.status(), 413, "{path}");
        assert!(!detail(response).await.is_empty());
    }
    tab.expect_silence(std::time::Duration::from_millis(300)).await;
    // Within the limit it is a run like any other.
    let response = post(&server, "/api/agent/v2/execute", "big", json!({"message": "x".repeat(60_000)})).await;
    assert_eq!(response.status(), 200);
}

/// The REST agent routes count against the same rate limit as a socket's frames.
#[tokio::test]
async fn rest_runs_are_rate_limited_with_retry_after() {
    let server = Spawn::new()
        .env("NETRA_RATE_LIMIT", "2")
        .env("NETRA_RATE_WINDOW", "60s")
        .env("NETRA_MAX_RUNS_PER_USER", "50")
        .ready()
        .await;
    for _ in 0..2 {
        assert_eq!(post(&server, "/api/agent/v2/execute", "eager", json!({"message": "hi"})).await.status(), 200);
    }
    let refused = post(&server, "/api/agents/data", "eager", json!({"message": "hi"})).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=60).contains(&wait), "retry-after {wait}");
    assert!(!detail(refused).await.is_empty());
    // Another user has a window of their own.
    assert_eq!(post(&server, "/api/agent/v2/execute", "calm", json!({"message": "hi"})).await.status(), 200);
}

/// Metadata merges are capped: it cannot grow past 16 KiB however many updates come.
#[tokio::test]
async fn thread_metadata_cannot_grow_without_bound() {
    let server = Spawn::new().ready().await;
    let http = reqwest::Client::new();
    let token = server.token("hoarder");
    let thread: serde_json::Value =
        post(&server, "/api/threads", "hoarder", json!({"title": "t"})).await.json().await.expect("thread");
    let url = server.http(&format!("/api/threads/{}", thread["id"].as_str().expect("id")));
    let blob = "y".repeat(6_000);
    let mut refused = 0;
    for i in 0..6 {
        let response = http
            .put(&url)
            .bearer_auth(&token)
            .json(&json!({"metadata": {format!("k{i}"): blob}}))
            .send()
            .await
            .expect("put");
        match response.status().as_u16() {
            200 => {}
            422 => {
                refused += 1;
                assert!(detail(response).await.contains("16384"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(refused, 4, "two 6 KB keys fit in 16 KiB, a third does not");
    let list: serde_json::Value = http
        .get(server.http("/api/threads"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(list[0]["metadata"].to_string().len() <= 16 * 1024, "stored metadata stays within the cap");
    // Creating with too much at once is refused the same way.
    let response = post(&server, "/api/threads", "hoarder", json!({"metadata": {"a": "z".repeat(20_000)}})).await;
    assert_eq!(response.status(), 422);
}

/// Every REST error is `{"detail"}` JSON, including the ones the framework makes itself.
#[tokio::test]
async fn framework_errors_are_json_details_too() {
    let server = Spawn::new().ready().await;
    let http = reqwest::Client::new();
    let token = server.token("strict");
    let cases = [
        (http.delete(server.http("/api/threads")).bearer_auth(&token), 405),
        (http.patch(server.http("/auth/config")), 405),
        (http.get(server.http("/api/threads?limit=lots")).bearer_auth(&token), 400),
        (http.get(server.http("/ws")), 400),
        (http.get(server.http("/no/such/route")), 404),
        (
            http.post(server.http("/api/threads"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("{not json"),
            400,
        ),
    ];
    for (request, status) in cases {
        let response = request.send().await.expect("send");
        let url = response.url().to_string();
        assert_eq!(response.status().as_u16(), status, "{url}");
        if status == 405 {
            assert!(response.headers().contains_key("allow"), "{url}: 405 names the allowed methods");
        }
        let kind = response.headers()["content-type"].to_str().expect("ascii").to_string();
        assert!(kind.starts_with("application/json"), "{url}: {kind}");
        assert!(!detail(response).await.is_empty(), "{url}");
    }
}

/// A WebSocket client written byte by byte, to send what no library would.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub(crate) struct Raw(TcpStream);

    impl Raw {
        /// Upgrades `/ws` with a bearer token and reads up to the end of the 101 response.
        pub(crate) async fn open(server: &super::common::Server, user: &str) -> Self {
            let addr = server.addr.to_string();
            let mut tcp = TcpStream::connect(&addr).await.expect("connect");
            let request = format!(
                "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Authorization: Bearer {}\r\n\r\n",
                server.token(user)
            );
            tcp.write_all(request.as_bytes()).await.expect("write");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(tcp.read_u8().await.expect("response head"));
            }
            assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
            Self(tcp)
        }

        /// Sends one frame: `first` is the FIN/RSV/opcode byte, masked unless told not to.
        pub(crate) async fn send(&mut self, first: u8, payload: &[u8], masked: bool) {
            assert!(payload.len() < 126);
            let mut frame = vec![first, payload.len() as u8 | if masked { 0x80 } else { 0 }];
            let key = [0x12, 0x34, 0x56, 0x78];
            if masked {
                frame.extend(key);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            } else {
                frame.extend(payload);
            }
            self.0.write_all(&frame).await.expect("write frame");
        }

        /// Reads frames until a close and returns its code; panics if none comes in time.
        pub(crate) async fn close_code(&mut self) -> u16 {
            let read = async {
                loop {
                    let first = self.0.read_u8().await.expect("a frame");
                    let len = match self.0.read_u8().await.expect("length") & 0x7f {
                        126 => u64::from(self.0.read_u16().await.expect("length")),
                        127 => self.0.read_u64().await.expect("length"),
                        n => u64::from(n),
                    };
                    let mut payload = vec![0; len as usize];
                    self.0.read_exact(&mut payload).await.expect("payload");
                    if first & 0x0f == 0x8 {
                        return u16::from_be_bytes([payload[0], payload[1]]);
                    }
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), read).await.expect("a close frame in time")
        }
    }
}

/// A frame that breaks RFC 6455 closes with the code §7.4.1 gives it, not 1000.
#[tokio::test]
async fn websocket_protocol_violations_close_1002_and_bad_utf8_1007() {
    let server = Spawn::new().ready().await;
    let cases: [(&str, u8, &[u8], bool, u16); 5] = [
        ("invalid UTF-8 in a text frame", 0x81, &[0x7b, 0xff, 0xfe, 0x7d], true, 1007),
        ("a reserved opcode", 0x83, b"{}", true, 1002),
        ("RSV1 without an extension", 0xc1, b"{}", true, 1002),
        ("an unmasked client frame", 0x81, b"{}", false, 1002),
        ("a fragmented ping", 0x09, b"", true, 1002),
    ];
    for (what, first, payload, masked, code) in cases {
        let mut raw = raw::Raw::open(&server, "raw").await;
        raw.send(first, payload, masked).await;
        assert_eq!(raw.close_code().await, code, "{what}");
    }
    // The control: a well-formed frame is answered, not closed.
    let mut client = server.connect("raw").await;
    client.send(json!({"type": "ping", "timestamp": 1})).await;
    assert_eq!(client.next().await["type"], "pong");
}

mod slow {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Connects to the server's port.
    pub(crate) async fn connect(server: &super::common::Server) -> TcpStream {
        let addr = server.addr.to_string();
        TcpStream::connect(addr).await.expect("connect")
    }

    /// Reads until the server closes the connection; returns what it sent and when.
    pub(crate) async fn until_closed(tcp: &mut TcpStream, limit: Duration) -> (String, Duration) {
        let started = Instant::now();
        let mut seen = Vec::new();
        let read = async {
            let mut buf = [0u8; 1024];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(limit, read).await.expect("the server closes the connection in time");
        (String::from_utf8_lossy(&seen).into_owned(), started.elapsed())
    }

    /// Writes `text` a byte at a time, `gap` apart, until the server stops taking it.
    pub(crate) async fn dribble(tcp: &mut TcpStream, text: &str, gap: Duration) {
        for b in text.bytes() {
            if tcp.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    }
}

/// Slowloris: a connection that sends nothing, or its header a byte at a time, or idles
/// after a request, is closed once the header timeout has passed.
#[tokio::test]
async fn slow_and_silent_connections_are_closed_after_the_header_timeout() {
    use std::time::Duration;
    let server = Spawn::new().env("NETRA_HEADER_TIMEOUT", "500ms").ready().await;
    let mut silent = slow::connect(&server).await;
    let (_, after) = slow::until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(after >= Duration::from_millis(400), "closed after {after:?}, before the timeout");

    let mut dribbler = slow::connect(&server).await;
    let request = "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    tokio::time::timeout(Duration::from_secs(5), slow::dribble(&mut dribbler, request, Duration::from_millis(50)))
        .await
        .expect("the server stops reading in time");
    let (answer, _) = slow::until_closed(&mut dribbler, Duration::from_secs(5)).await;
    assert!(!answer.contains("200 OK"), "a header dribbled past the timeout is not served: {answer}");

    let mut idle = slow::connect(&server).await;
    tokio::io::AsyncWriteExt::write_all(&mut idle, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (answer, after) = slow::until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(after >= Duration::from_millis(400), "a kept-alive connection idles up to the timeout: {after:?}");
}

/// Connections waiting for their first request are capped: past the cap the one that
/// has waited longest is closed, so a client that sends its request at once gets in even
/// while silent connections fill every place.
#[tokio::test]
async fn connections_waiting_for_a_request_are_capped_oldest_first() {
    use std::time::Duration;
    let server =
        Spawn::new().env("NETRA_HEADER_TIMEOUT", "10s").env("NETRA_MAX_PENDING_CONNECTIONS", "4").ready().await;
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(slow::connect(&server).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fifth silent connection takes the oldest one's place: that one is closed now,
    // long before the header timeout.
    let _fifth = slow::connect(&server).await;
    let (_, after) = slow::until_closed(&mut holders[0], Duration::from_secs(5)).await;
    assert!(after < Duration::from_secs(2), "the oldest pending connection was closed: {after:?}");
    // A real request is served at once although every place was taken.
    let started = std::time::Instant::now();
    let response = reqwest::get(server.http("/health/live")).await.expect("served");
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let metrics = reqwest::get(server.http("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("netra_http_connections_shed_total"), "{metrics}");
}

/// A REST body sent too slowly ends with a 408 JSON detail.
#[tokio::test]
async fn a_body_sent_too_slowly_is_408() {
    use std::time::Duration;
    let server = Spawn::new().env("NETRA_REQUEST_TIMEOUT", "500ms").ready().await;
    let mut tcp = slow::connect(&server).await;
    let head = format!(
        "POST /api/threads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"title\":",
        server.token("dribbler")
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes()).await.expect("write");
    let (answer, _) = slow::until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"detail\""), "{answer}");
}

/// The process raises its open-file soft limit to the hard limit at start.
#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let server = Spawn::new().ready().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("proc limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "soft equals hard: {line}");
    assert!(server.stderr().contains("open-file limit"), "the limit is logged");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of KiB")
}

/// Sockets that subscribe to a thread of large events and never read hold at most about
/// an outbox's worth each (replay pages included), not the thread: memory is bounded in
/// bytes, and everyone else still chats.
#[tokio::test]
async fn sockets_that_never_read_hold_a_bounded_amount_of_memory() {
    let server = Spawn::new()
        .env("NETRA_AGENT_TOKEN_DELAY", "0")
        .env("NETRA_SEND_QUEUE_BYTES", "1048576")
        .env("NETRA_MAX_CONNECTIONS_PER_USER", "20")
        .ready()
        .await;
    let mut writer = server.connect("hoard").await;
    let big = "lorem ".repeat(16_000);
    let first = writer.chat(&big, None).await;
    let thread = first[0]["thread_id"].as_str().expect("thread").to_string();
    for _ in 0..59 {
        let run = writer.chat(&big, Some(&thread)).await;
        assert_eq!(run.last().expect("frames")["type"], "final_report");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = rss_kib(server.pid());
    let mut hoarders = Vec::new();
    for _ in 0..10 {
        let mut tab = server.connect("hoard").await;
        tab.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}})).await;
        hoarders.push(tab);
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let grown_mib = rss_kib(server.pid()).saturating_sub(before) / 1024;
    // The thread holds about 60 × 2 × 96 KB. Measured (2 cores, 2026-12-01): 210 MiB when
    // each replay queued all of it, 61 MiB with a 1 MiB outbox (about 5.5 MiB a socket:
    // the outbox, the batch being written, one replay page, and what the allocator keeps).
    assert!(grown_mib < 90, "RSS grew {grown_mib} MiB for ten sockets that never read");
    let mut other = server.connect("bystander").await;
    let run = other.chat("what is 2 + 2?", None).await;
    assert_eq!(run.last().expect("frames")["type"], "final_report");
    eprintln!("RSS growth with ten never-reading sockets: {grown_mib} MiB");
    drop(hoarders);
}

/// A browser page from a foreign origin cannot open a socket (cross-site WebSocket
/// hijacking); the server's own page, listed origins and non-browser clients can.
#[tokio::test]
async fn sockets_from_foreign_origins_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = Spawn::new().env("NETRA_CORS_ORIGINS", "https://app.example.com").ready().await;
    let host = server.addr.to_string();
    let open = |origin: Option<String>| {
        let mut request = server.ws_url().into_client_request().expect("request");
        request.headers_mut().insert("authorization", format!("Bearer {}", server.token("o")).parse().expect("h"));
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse().expect("h"));
        }
        tokio_tungstenite::connect_async(request)
    };
    for origin in ["https://evil.example.net", "http://app.example.com", "null"] {
        let refused = open(Some(origin.to_string())).await.expect_err("refused");
        let tokio_tungstenite::tungstenite::Error::Http(response) = refused else { panic!("{origin}: {refused}") };
        assert_eq!(response.status(), 403, "{origin}");
    }
    for origin in [Some("https://app.example.com".to_string()), Some(format!("http://{host}")), None] {
        open(origin.clone()).await.unwrap_or_else(|e| panic!("{origin:?}: {e}"));
    }
}

/// The echo route is off unless configured, and then answers every data frame.
#[tokio::test]
async fn the_echo_route_is_off_by_default_and_echoes_when_enabled() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let off = Spawn::new().ready().await;
    let url = off.ws_url().replace("/ws", "/ws/echo");
    assert!(tokio_tungstenite::connect_async(url).await.is_err(), "no echo route by default");
    let on = Spawn::new().env("NETRA_ECHO_ROUTE", "true").ready().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(on.ws_url().replace("/ws", "/ws/echo")).await.expect("echo");
    ws.send(Message::text("héllo")).await.expect("send");
    assert_eq!(ws.next().await.expect("frame").expect("ok"), Message::text("héllo"));
    ws.send(Message::binary(vec![0u8, 1, 2])).await.expect("send");
    assert_eq!(ws.next().await.expect("frame").expect("ok"), Message::binary(vec![0u8, 1, 2]));
}

/// Another user's ids, through every socket message and agent route, get `forbidden` or a
/// 404 and change nothing: the owner's run completes untouched, and neither side sees a
/// frame of the other.
#[tokio::test]
async fn another_users_ids_are_refused_everywhere_and_leak_nothing() {
    let server = Spawn::new().env("NETRA_AGENT_TOKEN_DELAY", "30ms").ready().await;
    let mut owner = server.connect("owner").await;
    let first = owner.chat("what is 1 + 1?", None).await;
    let thread = first[0]["thread_id"].as_str().expect("thread").to_string();
    // A second run, in flight while the intruder tries everything.
    owner
        .send(json!({"type": "user_message", "payload": {"content": "tell me a long story", "thread_id": thread}}))
        .await;
    let started = owner.until(|f| f["type"] == "agent_started").await;
    let run_id = started.last().and_then(|f| f["run_id"].as_str()).expect("run_id").to_string();

    let mut intruder = server.connect("intruder").await;
    let attempts = [
        json!({"type": "user_message", "message_id": "a1", "payload": {"content": "hi", "thread_id": thread}}),
        json!({"type": "start_agent", "message_id": "a2", "payload": {"user_request": "hi", "thread_id": thread}}),
        json!({"type": "subscribe", "message_id": "a3", "payload": {"thread_id": thread, "after_seq": 0}}),
        json!({"type": "unsubscribe", "message_id": "a4", "payload": {"thread_id": thread}}),
        json!({"type": "switch_thread", "message_id": "a5", "payload": {"thread_id": thread}}),
    ];
    for attempt in &attempts {
        intruder.send(attempt.clone()).await;
        let refused = intruder.next().await;
        assert_eq!(refused["payload"]["code"], "forbidden", "{attempt} -> {refused}");
        assert_eq!(refused["payload"]["ref"], attempt["message_id"], "{refused}");
        assert!(!refused.to_string().contains("owner"), "the refusal names nobody: {refused}");
    }
    // Stopping someone else's run, by run or by thread, stops nothing (and says nothing).
    intruder.send(json!({"type": "stop_agent", "payload": {"run_id": run_id}})).await;
    intruder.send(json!({"type": "stop_agent", "payload": {"thread_id": thread}})).await;
    for path in ["/api/agent/v2/execute", "/api/agents/triage"] {
        let response = reqwest::Client::new()
            .post(server.http(path))
            .bearer_auth(server.token("intruder"))
            .json(&json!({"message": "hi", "thread_id": thread}))
            .send()
            .await
            .expect("post");
        if path.ends_with("execute") {
            assert_eq!(response.status(), 404, "{path}");
        } else {
            // The v1 route takes no thread id: it runs in the intruder's own latest thread.
            let body: serde_json::Value = response.json().await.expect("json");
            assert_ne!(body["data"]["thread_id"], json!(thread), "{body}");
        }
    }
    let rest = owner.collect_run().await;
    assert_eq!(rest.last().expect("frames")["type"], "final_report", "the owner's run was not stopped");
    assert!(rest.iter().all(|f| f["thread_id"] == json!(thread)), "only the owner's thread reached the owner");
    // The intruder saw nothing of the owner's thread, only its own v1 run.
    intruder.send(json!({"type": "ping", "timestamp": 9})).await;
    let seen = intruder.until(|f| f["type"] == "pong").await;
    assert!(seen.iter().all(|f| f["thread_id"] != json!(thread)), "{seen:?}");
}
