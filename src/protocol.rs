//! Every frame on the wire, in and out (PROTOCOL.md). Inbound text becomes a
//! [`ClientMessage`] or a [`ProtocolError`] carrying the exact §6c code; outbound frames
//! are built here and nowhere else, so the envelope the web client depends on
//! (`payload`, top-level `agent_name`/`run_id`/`timestamp`, RFC 3339 milliseconds) has
//! one definition.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// An error code of PROTOCOL.md §6c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidMessage,
    UnknownType,
    MissingField,
    InvalidField,
    Forbidden,
    RateLimited,
    Busy,
    AgentFailed,
    Internal,
    Unauthorized,
    TokenExpired,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidMessage => "invalid_message",
            Self::UnknownType => "unknown_type",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::Busy => "busy",
            Self::AgentFailed => "agent_failed",
            Self::Internal => "internal",
            Self::Unauthorized => "unauthorized",
            Self::TokenExpired => "token_expired",
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A client frame that could not be acted on; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    /// The offending frame's `message_id` (or payload `message_id`/`correlation_id`).
    pub reference: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), reference: None }
    }
}

/// What a client asked for, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// `start_agent`, `user_message` and its aliases: run the agent on `text`.
    Chat {
        text: String,
        thread_id: Option<String>,
    },
    Stop {
        run_id: Option<String>,
        thread_id: Option<String>,
    },
    SwitchThread {
        thread_id: String,
    },
    Ping {
        timestamp: Option<Value>,
    },
    Subscribe {
        thread_id: String,
        after_seq: u64,
    },
    Unsubscribe {
        thread_id: String,
    },
    /// Sent by the web client and deliberately ignored (`session_restore`, `disconnect`…).
    Ignored,
}

/// A parsed frame and the reference its errors echo.
#[derive(Debug)]
pub struct Inbound {
    pub message: ClientMessage,
    pub reference: Option<String>,
}

/// Parses one text frame. Never panics, whatever the input.
pub fn parse_client_frame(text: &str) -> Result<Inbound, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, format!("frame is not JSON: {e}")))?;
    let Value::Object(frame) = value else {
        return Err(ProtocolError::new(ErrorCode::InvalidMessage, "frame must be a JSON object"));
    };
    let empty = Map::new();
    let payload = match frame.get("payload") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => {
            let mut e = ProtocolError::new(ErrorCode::InvalidField, "payload must be an object");
            e.reference = reference(&frame, &empty);
            return Err(e);
        }
    };
    let reference = reference(&frame, payload);
    let with_ref = |mut e: ProtocolError| {
        e.reference = reference.clone();
        e
    };
    let Some(kind) = frame.get("type").and_then(Value::as_str) else {
        return Err(with_ref(ProtocolError::new(ErrorCode::InvalidMessage, "frame needs a string field 'type'")));
    };
    let message = classify(kind, &frame, payload).map_err(with_ref)?;
    Ok(Inbound { message, reference })
}

fn reference(frame: &Map<String, Value>, payload: &Map<String, Value>) -> Option<String> {
    [frame.get("message_id"), payload.get("message_id"), payload.get("correlation_id")].into_iter().flatten().find_map(
        |v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        },
    )
}

fn classify(
    kind: &str,
    frame: &Map<String, Value>,
    payload: &Map<String, Value>,
) -> Result<ClientMessage, ProtocolError> {
    Ok(match kind {
        "start_agent" => ClientMessage::Chat {
            text: chat_text(payload, &["user_request", "content", "text"], true)?,
            thread_id: optional_id(payload, "thread_id")?,
        },
        "user_message" | "user_input" | "message" | "chat" => ClientMessage::Chat {
            text: chat_text(payload, &["content", "text", "user_request"], false)?,
            thread_id: optional_id(payload, "thread_id")?,
        },
        "stop_agent" => ClientMessage::Stop {
            run_id: optional_id(payload, "run_id")?,
            thread_id: optional_id(payload, "thread_id")?,
        },
        "switch_thread" => ClientMessage::SwitchThread { thread_id: required_id(payload, "thread_id")? },
        "ping" => {
            ClientMessage::Ping { timestamp: frame.get("timestamp").or_else(|| payload.get("timestamp")).cloned() }
        }
        "subscribe" => {
            let after_seq = match payload.get("after_seq") {
                None | Some(Value::Null) => 0,
                Some(v) => v.as_u64().ok_or_else(|| {
                    ProtocolError::new(ErrorCode::InvalidField, "after_seq must be a non-negative integer")
                })?,
            };
            ClientMessage::Subscribe { thread_id: required_id(payload, "thread_id")?, after_seq }
        }
        "unsubscribe" => ClientMessage::Unsubscribe { thread_id: required_id(payload, "thread_id")? },
        "session_restore" | "disconnect" | "heartbeat_ack" | "pong" => ClientMessage::Ignored,
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(ProtocolError::new(ErrorCode::UnknownType, format!("unknown message type '{shown}'")));
        }
    })
}

/// The message text: the first non-empty alias. `start_agent` also accepts
/// `request.query`, as the original did.
fn chat_text(payload: &Map<String, Value>, aliases: &[&str], request_query: bool) -> Result<String, ProtocolError> {
    let nested = request_query.then(|| payload.get("request").and_then(|r| r.get("query"))).flatten();
    aliases
        .iter()
        .filter_map(|a| payload.get(*a))
        .chain(nested)
        .filter_map(Value::as_str)
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            ProtocolError::new(ErrorCode::MissingField, format!("field '{}' must be non-empty text", aliases[0]))
        })
}

fn optional_id(payload: &Map<String, Value>, field: &str) -> Result<Option<String>, ProtocolError> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() <= 128 => Ok(Some(s.clone())),
        Some(_) => Err(ProtocolError::new(ErrorCode::InvalidField, format!("field '{field}' must be a string id"))),
    }
}

fn required_id(payload: &Map<String, Value>, field: &str) -> Result<String, ProtocolError> {
    optional_id(payload, field)?
        .ok_or_else(|| ProtocolError::new(ErrorCode::MissingField, format!("field '{field}' is required")))
}

/// Now as RFC 3339 UTC with milliseconds, the one timestamp format on the wire.
pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

/// `t` as RFC 3339 UTC with milliseconds. Every event carries one, so the usual case
/// (years 0 to 9999) is written digit by digit: `time`'s formatter walks a format
/// description per call, about 1.5 % of the CPU of a chat message.
pub fn format_rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let year = t.year();
    if !(0..=9999).contains(&year) {
        const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
        return t.format(FORMAT).expect("the format has only numeric components, which always format");
    }
    let (hour, minute, second, milli) = t.to_hms_milli();
    let mut out = String::with_capacity(24);
    let mut digits = |value: u32, width: u32, after: char| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
        }
        out.push(after);
    };
    digits(year as u32, 4, '-');
    digits(u8::from(t.month()).into(), 2, '-');
    digits(t.day().into(), 2, 'T');
    digits(hour.into(), 2, ':');
    digits(minute.into(), 2, ':');
    digits(second.into(), 2, '.');
    digits(milli.into(), 3, 'Z');
    out
}

/// The kinds of thread event (§3.2, §3.4). Persisted by their wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    ThreadCreated,
    UserMessage,
    AgentStarted,
    AgentThinking,
    ToolExecuting,
    ToolCompleted,
    PartialResult,
    AgentCompleted,
    FinalReport,
    AgentError,
    Error,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ThreadCreated => "thread_created",
            Self::UserMessage => "user_message",
            Self::AgentStarted => "agent_started",
            Self::AgentThinking => "agent_thinking",
            Self::ToolExecuting => "tool_executing",
            Self::ToolCompleted => "tool_completed",
            Self::PartialResult => "partial_result",
            Self::AgentCompleted => "agent_completed",
            Self::FinalReport => "final_report",
            Self::AgentError => "agent_error",
            Self::Error => "error",
        }
    }
}

/// What a thread event says: each kind's payload with its fields (§3.2, §3.4), typed,
/// and serialized straight into the text that is stored and sent (only `partial_result`
/// deltas merged by the writer are read back and written again). The kind is the
/// variant ([`Payload::kind`]).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Payload<'a> {
    ThreadCreated {
        thread_id: &'a str,
        title: &'a str,
    },
    UserMessage {
        message_id: &'a str,
        content: &'a str,
        role: Role,
    },
    AgentStarted {
        status: Status,
        message: &'a str,
        context: Empty,
    },
    AgentThinking {
        reasoning: &'a str,
        step_number: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        total_steps: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        progress_percentage: Option<u64>,
        status: Status,
    },
    ToolExecuting {
        tool_name: &'a str,
        parameters: &'a Value,
        status: Status,
        message: &'a str,
    },
    ToolCompleted {
        tool_name: &'a str,
        result: &'a Value,
        execution_time_ms: u64,
        status: Status,
        message: &'a str,
    },
    PartialResult {
        content: &'a str,
        is_complete: bool,
    },
    /// A run that completed (with its answer and, when a model counted them, its tokens)
    /// or was cancelled (neither).
    AgentCompleted {
        status: Status,
        result: RunResult<'a>,
        execution_time_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        metrics: Option<Tokens>,
        message: &'a str,
    },
    FinalReport {
        executive_summary: &'a str,
        report: Empty,
        recommendations: [&'a str; 0],
        action_plan: &'a str,
        total_duration_ms: u64,
    },
    AgentError {
        status: Status,
        error_message: &'a str,
        error_context: FailureReason<'a>,
        message: &'a str,
    },
    /// A run's failure as an §6c `error` with its code, in the thread's history.
    Error {
        code: ErrorCode,
        message: &'a str,
        error_message: &'a str,
        reason: &'a str,
    },
}

impl Payload<'_> {
    pub fn kind(&self) -> EventType {
        match self {
            Self::ThreadCreated { .. } => EventType::ThreadCreated,
            Self::UserMessage { .. } => EventType::UserMessage,
            Self::AgentStarted { .. } => EventType::AgentStarted,
            Self::AgentThinking { .. } => EventType::AgentThinking,
            Self::ToolExecuting { .. } => EventType::ToolExecuting,
            Self::ToolCompleted { .. } => EventType::ToolCompleted,
            Self::PartialResult { .. } => EventType::PartialResult,
            Self::AgentCompleted { .. } => EventType::AgentCompleted,
            Self::FinalReport { .. } => EventType::FinalReport,
            Self::AgentError { .. } => EventType::AgentError,
            Self::Error { .. } => EventType::Error,
        }
    }

    /// The payload's JSON text.
    pub fn to_raw(&self) -> Box<RawValue> {
        serde_json::value::to_raw_value(self).expect("a payload has string keys and JSON values")
    }
}

/// The `status` of a run's progress events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Started,
    Thinking,
    Executing,
    Completed,
    Cancelled,
    Error,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
}

/// `{}`: a field the web client reads that netra has nothing to put in.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Empty {}

/// What a run produced: its answer and the tools it used; `{}` when it has none.
#[derive(Debug, Default, Serialize)]
pub struct RunResult<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<&'a [String]>,
}

/// The tokens a model reported for a run, each when it said; `{}` when it said nothing.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tokens {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
}

/// Why a run failed, in a word the client can match on.
#[derive(Debug, Serialize)]
pub struct FailureReason<'a> {
    pub reason: &'a str,
}

/// A persisted thread event, exactly as it goes on the wire (§3.1, §6a).
#[derive(Debug, Clone)]
pub struct EventFrame {
    pub kind: String,
    pub thread_id: String,
    pub run_id: Option<String>,
    pub seq: u64,
    pub agent_name: Option<String>,
    pub timestamp: String,
    pub payload: Box<RawValue>,
}

impl EventFrame {
    /// The frame's JSON text; serialized once and shared by every receiver.
    pub fn to_text(&self) -> String {
        EventText {
            kind: &self.kind,
            thread_id: &self.thread_id,
            run_id: self.run_id.as_deref(),
            seq: self.seq,
            agent_name: self.agent_name.as_deref(),
            timestamp: &self.timestamp,
            payload: &self.payload,
        }
        .to_text()
    }
}

/// An event frame's fields, borrowed: the one serialization of a thread event, used
/// live (straight from the job that was committed) and on replay (from the store), so
/// both give the same bytes.
///
/// [`EventText::to_text`] writes the frame field by field. It gives the bytes serde_json
/// gives for this struct (the tests hold the two together), but it copies the field
/// names, and every value that needs no escape, instead of passing them byte by byte
/// through serde_json's escaper: that escaper was a tenth of a chat message's
/// instructions, and half of it came from here.
#[derive(Debug, Serialize)]
pub struct EventText<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub thread_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<&'a str>,
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<&'a str>,
    pub timestamp: &'a str,
    pub payload: &'a RawValue,
}

impl EventText<'_> {
    pub fn to_text(&self) -> String {
        let fields = self.kind.len() + self.thread_id.len() + self.timestamp.len();
        let named = self.run_id.map_or(0, str::len) + self.agent_name.map_or(0, str::len);
        let mut text = String::with_capacity(self.payload.get().len() + fields + named + 100);
        text.push_str(r#"{"type":"#);
        push_json_string(&mut text, self.kind);
        text.push_str(r#","thread_id":"#);
        push_json_string(&mut text, self.thread_id);
        if let Some(run_id) = self.run_id {
            text.push_str(r#","run_id":"#);
            push_json_string(&mut text, run_id);
        }
        text.push_str(r#","seq":"#);
        text.push_str(itoa::Buffer::new().format(self.seq));
        if let Some(agent_name) = self.agent_name {
            text.push_str(r#","agent_name":"#);
            push_json_string(&mut text, agent_name);
        }
        text.push_str(r#","timestamp":"#);
        push_json_string(&mut text, self.timestamp);
        text.push_str(r#","payload":"#);
        text.push_str(self.payload.get());
        text.push('}');
        text
    }
}

/// `value` as a JSON string, as serde_json writes it: copied between quotes when it has
/// nothing to escape (ids, types and times never do), escaped by serde_json otherwise.
fn push_json_string(text: &mut String, value: &str) {
    // A fold, not `all`: without the early exit the check runs 32 bytes at a time.
    let escape = value.bytes().fold(false, |escape, b| escape | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if !escape {
        text.push('"');
        text.push_str(value);
        text.push('"');
    } else {
        text.push_str(&serde_json::to_string(value).expect("a str always serializes"));
    }
}

/// One outbound text frame: serialized once and shared by every connection it goes to
/// (a clone is a reference count), UTF-8 because it is only ever made from a `str`. The
/// gateway hands it to the socket; nothing before the gateway knows the WebSocket
/// library's types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    pub const fn from_static(text: &'static str) -> Self {
        Self(Bytes::from_static(text.as_bytes()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The frame's UTF-8 bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self(Bytes::from(text))
    }
}

/// The first frame of every accepted connection (§1.4).
pub fn connection_established(connection_id: &str, user_id: &str, heartbeat_secs: u64, max_frame: usize) -> String {
    let now = now_rfc3339();
    json!({"type": "system_message", "timestamp": now, "payload": {
        "event": "connection_established", "connection_id": connection_id, "user_id": user_id,
        "server_time": now, "connection_ready": true,
        "config": {"heartbeat_interval": heartbeat_secs, "max_message_size": max_frame}}})
    .to_string()
}

/// The Netra web client's "ready" frame, sent after the hello to its sockets alone
/// (docs/protocol.md): not tied to a thread, no `seq`.
pub fn web_client_ready(connection_id: &str, user_id: &str) -> String {
    json!({"type": "connection_established", "timestamp": now_rfc3339(), "payload": {
        "connection_id": connection_id, "user_id": user_id, "connection_ready": true}})
    .to_string()
}

/// Told to a run's tabs when its ending could not be stored (the database is away or
/// full): an `error` like a protocol error, outside the thread's history, with no `seq`.
/// It names the run and thread in its payload so the client can stop waiting for them.
pub fn run_lost(run_id: &str, thread_id: &str) -> String {
    let message = "the run ended but could not be recorded: the database is unavailable; try again";
    json!({"type": "error", "timestamp": now_rfc3339(), "payload": {
        "code": ErrorCode::Internal.as_str(), "message": message, "error_message": message,
        "run_id": run_id, "thread_id": thread_id}})
    .to_string()
}

pub fn pong(client_timestamp: Option<&Value>) -> String {
    let payload = match client_timestamp {
        Some(t) => json!({"client_timestamp": t}),
        None => json!({}),
    };
    json!({"type": "pong", "timestamp": now_rfc3339(), "payload": payload}).to_string()
}

/// A protocol error frame: no `seq`, not part of any thread's history.
pub fn error_frame(error: &ProtocolError) -> String {
    let mut payload = json!({"code": error.code.as_str(), "message": error.message, "error_message": error.message});
    if let Some(r) = &error.reference {
        payload["ref"] = Value::String(r.clone());
    }
    json!({"type": "error", "timestamp": now_rfc3339(), "payload": payload}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client_frame(text).expect_err("should be rejected").code
    }

    #[test]
    fn bad_frames_get_their_exact_codes() {
        assert_eq!(code("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"strat_agent"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"user_message","payload":{"content":"   "}}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"type":"user_message","payload":{"content":"hi","thread_id":7}}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(code(r#"{"type":"subscribe","payload":{"thread_id":"t","after_seq":-1}}"#), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"type":"switch_thread","payload":{}}"#), ErrorCode::MissingField);
    }

    #[test]
    fn errors_echo_the_first_reference_present() {
        let e = parse_client_frame(r#"{"type":"nope","message_id":"m-17","payload":{"message_id":"x"}}"#)
            .expect_err("unknown");
        assert_eq!(e.reference.as_deref(), Some("m-17"));
        let e = parse_client_frame(r#"{"type":"nope","payload":{"correlation_id":"c-1"}}"#).expect_err("unknown");
        assert_eq!(e.reference.as_deref(), Some("c-1"));
        let frame: Value = serde_json::from_str(&error_frame(&e)).expect("json");
        assert_eq!(frame["payload"]["ref"], "c-1");
        assert_eq!(frame["payload"]["error_message"], frame["payload"]["message"]);
    }

    #[test]
    fn chat_text_takes_the_first_non_empty_alias() {
        let m = parse_client_frame(
            r#"{"type":"start_agent","payload":{"user_request":"","request":{"query":"q"},"thread_id":null}}"#,
        )
        .expect("valid");
        assert_eq!(m.message, ClientMessage::Chat { text: "q".into(), thread_id: None });
        let m = parse_client_frame(r#"{"type":"chat","payload":{"text":" hi ","thread_id":"th_1"}}"#).expect("valid");
        assert_eq!(m.message, ClientMessage::Chat { text: "hi".into(), thread_id: Some("th_1".into()) });
    }

    #[test]
    fn every_client_type_the_frontend_sends_is_accepted() {
        for t in ["session_restore", "disconnect", "heartbeat_ack", "pong"] {
            let m = parse_client_frame(&format!(r#"{{"type":"{t}","payload":{{"threadId":"x"}}}}"#)).expect("accepted");
            assert_eq!(m.message, ClientMessage::Ignored);
        }
        let m = parse_client_frame(r#"{"type":"stop_agent","payload":{}}"#).expect("valid");
        assert_eq!(m.message, ClientMessage::Stop { run_id: None, thread_id: None });
        let m = parse_client_frame(r#"{"type":"ping","timestamp":17}"#).expect("valid");
        assert_eq!(m.message, ClientMessage::Ping { timestamp: Some(json!(17)) });
    }

    proptest::proptest! {
        /// The frame written by hand is byte for byte what serde_json writes for the
        /// struct, whatever its strings hold (quotes, backslashes, control characters,
        /// any Unicode) and whichever optional fields are there.
        #[test]
        fn event_text_is_what_serde_json_writes(
            kind in proptest::prelude::any::<String>(),
            thread_id in proptest::prelude::any::<String>(),
            run_id in proptest::option::of(proptest::prelude::any::<String>()),
            seq in proptest::prelude::any::<u64>(),
            agent_name in proptest::option::of("[a-z\"\\\\\u{0}-\u{1f}\u{7f}é]{0,12}"),
            timestamp in "[0-9TZ:.\"\\\\\n-]{0,30}",
            payload in any_json(),
        ) {
            let payload = serde_json::value::to_raw_value(&payload).expect("json");
            let event = EventText {
                kind: &kind,
                thread_id: &thread_id,
                run_id: run_id.as_deref(),
                seq,
                agent_name: agent_name.as_deref(),
                timestamp: &timestamp,
                payload: &payload,
            };
            proptest::prop_assert_eq!(event.to_text(), serde_json::to_string(&event).expect("serializes"));
        }
    }

    /// Any JSON value, nested a few levels, strings from the whole of Unicode.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                proptest::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const TYPES: &[&str] = &[
        "start_agent",
        "user_message",
        "user_input",
        "message",
        "chat",
        "stop_agent",
        "switch_thread",
        "ping",
        "subscribe",
        "unsubscribe",
        "session_restore",
        "disconnect",
        "heartbeat_ack",
        "pong",
        "nope",
    ];

    proptest::proptest! {
        /// Whatever text arrives, parsing answers: a message, or an error with a code and
        /// a message, never a panic.
        #[test]
        fn any_text_is_parsed_or_refused_with_a_code(text in proptest::prelude::any::<String>()) {
            if let Err(e) = parse_client_frame(&text) {
                proptest::prop_assert!(!e.message.is_empty());
                let frame: Value = serde_json::from_str(&error_frame(&e)).expect("error frames are JSON");
                proptest::prop_assert_eq!(&frame["payload"]["code"], e.code.as_str());
            }
        }

        /// Frames of every known type with any payload: never a panic; a refused frame that
        /// names a string `message_id` gets it back as `ref`.
        #[test]
        fn any_payload_of_a_known_type_is_parsed_or_refused(
            kind in proptest::sample::select(TYPES),
            payload in any_json(),
            reference in proptest::option::of("[a-z0-9-]{1,12}"),
        ) {
            let mut frame = serde_json::json!({"type": kind, "payload": payload});
            if let Some(r) = &reference {
                frame["message_id"] = Value::from(r.clone());
            }
            if let Err(e) = parse_client_frame(&frame.to_string()) {
                proptest::prop_assert!(!e.message.is_empty());
                if let Some(r) = &reference {
                    proptest::prop_assert_eq!(e.reference.as_deref(), Some(r.as_str()));
                }
            }
        }

        /// `after_seq` is taken exactly when it is a non-negative integer.
        #[test]
        fn subscribe_takes_any_u64_after_seq(after in proptest::prelude::any::<u64>(), thread in "[a-z_0-9]{1,128}") {
            let text = format!(r#"{{"type":"subscribe","payload":{{"thread_id":"{thread}","after_seq":{after}}}}}"#);
            let parsed = parse_client_frame(&text).expect("valid");
            proptest::prop_assert_eq!(parsed.message, ClientMessage::Subscribe { thread_id: thread, after_seq: after });
        }
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let t = time::macros::datetime!(2025-09-08 10:15:02.317891 UTC);
        assert_eq!(format_rfc3339(t), "2025-09-08T10:15:02.317Z");
        assert_eq!(format_rfc3339(time::macros::datetime!(0987-01-02 03:04:05.006 UTC)), "0987-01-02T03:04:05.006Z");
    }

    proptest::proptest! {
        #[test]
        fn timestamps_are_written_as_the_time_crate_writes_them(ms in 86_400_000i64..253_402_214_400_000, offset in -86_399i32..86_400) {
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .expect("in range")
                .to_offset(time::UtcOffset::from_whole_seconds(offset).expect("valid offset"));
            let described = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            let expected = t.to_offset(time::UtcOffset::UTC).format(described).expect("formats");
            proptest::prop_assert_eq!(format_rfc3339(t), expected);
        }
    }

    fn json(payload: &Payload<'_>) -> Value {
        serde_json::from_str(payload.to_raw().get()).expect("a payload is JSON")
    }

    #[test]
    fn payloads_have_the_fields_the_web_client_reads() {
        let thinking = Payload::AgentThinking {
            reasoning: "Reading",
            step_number: 1,
            total_steps: None,
            progress_percentage: None,
            status: Status::Thinking,
        };
        assert_eq!(thinking.kind(), EventType::AgentThinking);
        assert_eq!(json(&thinking), json!({"reasoning": "Reading", "step_number": 1, "status": "thinking"}));

        let tools = vec!["calculator".to_string()];
        let completed = Payload::AgentCompleted {
            status: Status::Completed,
            result: RunResult { response: Some("42"), tools: Some(&tools) },
            execution_time_ms: 7,
            metrics: Some(Tokens::default()),
            message: "done",
        };
        assert_eq!(
            json(&completed),
            json!({"status": "completed", "result": {"response": "42", "tools": ["calculator"]},
                   "execution_time_ms": 7, "metrics": {}, "message": "done"})
        );
        let cancelled = Payload::AgentCompleted {
            status: Status::Cancelled,
            result: RunResult::default(),
            execution_time_ms: 3,
            metrics: None,
            message: "stopped",
        };
        assert_eq!(
            json(&cancelled),
            json!({"status": "cancelled", "result": {}, "execution_time_ms": 3, "message": "stopped"})
        );

        let report = Payload::FinalReport {
            executive_summary: "42",
            report: Empty {},
            recommendations: [],
            action_plan: "",
            total_duration_ms: 7,
        };
        assert_eq!(report.kind(), EventType::FinalReport);
        assert_eq!(
            json(&report),
            json!({"executive_summary": "42", "report": {}, "recommendations": [], "action_plan": "",
                   "total_duration_ms": 7})
        );

        let params = json!({"expression": "6*7"});
        let result = json!({"value": "42"});
        let rest = [
            (
                Payload::ThreadCreated { thread_id: "th_1", title: "hi" },
                EventType::ThreadCreated,
                json!({"thread_id": "th_1", "title": "hi"}),
            ),
            (
                Payload::UserMessage { message_id: "msg_1", content: "hi", role: Role::User },
                EventType::UserMessage,
                json!({"message_id": "msg_1", "content": "hi", "role": "user"}),
            ),
            (
                Payload::AgentStarted { status: Status::Started, message: "netra started", context: Empty {} },
                EventType::AgentStarted,
                json!({"status": "started", "message": "netra started", "context": {}}),
            ),
            (
                Payload::AgentThinking {
                    reasoning: "Writing",
                    step_number: 2,
                    total_steps: Some(2),
                    progress_percentage: Some(66),
                    status: Status::Thinking,
                },
                EventType::AgentThinking,
                json!({"reasoning": "Writing", "step_number": 2, "total_steps": 2, "progress_percentage": 66,
                       "status": "thinking"}),
            ),
            (
                Payload::ToolExecuting {
                    tool_name: "calculator",
                    parameters: &params,
                    status: Status::Executing,
                    message: "Running calculator",
                },
                EventType::ToolExecuting,
                json!({"tool_name": "calculator", "parameters": {"expression": "6*7"}, "status": "executing",
                       "message": "Running calculator"}),
            ),
            (
                Payload::ToolCompleted {
                    tool_name: "calculator",
                    result: &result,
                    execution_time_ms: 1,
                    status: Status::Completed,
                    message: "calculator finished",
                },
                EventType::ToolCompleted,
                json!({"tool_name": "calculator", "result": {"value": "42"}, "execution_time_ms": 1,
                       "status": "completed", "message": "calculator finished"}),
            ),
            (
                Payload::PartialResult { content: "4", is_complete: false },
                EventType::PartialResult,
                json!({"content": "4", "is_complete": false}),
            ),
            (
                Payload::AgentError {
                    status: Status::Error,
                    error_message: "m",
                    error_context: FailureReason { reason: "timed_out" },
                    message: "m",
                },
                EventType::AgentError,
                json!({"status": "error", "error_message": "m", "error_context": {"reason": "timed_out"}, "message": "m"}),
            ),
        ];
        for (payload, kind, wire) in rest {
            assert_eq!(payload.kind(), kind);
            assert_eq!(json(&payload), wire, "{kind:?}");
        }

        let failed =
            Payload::Error { code: ErrorCode::AgentFailed, message: "m", error_message: "m", reason: "timed_out" };
        assert_eq!(failed.kind(), EventType::Error);
        assert_eq!(
            json(&failed),
            json!({"code": "agent_failed", "message": "m", "error_message": "m", "reason": "timed_out"})
        );
    }
}
