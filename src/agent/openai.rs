//! The `openai` provider: any OpenAI-compatible chat-completions endpoint (OpenAI, Ollama,
//! vLLM, llama.cpp server, LM Studio). A run sends the system prompt, the thread's earlier
//! messages within a character budget, and the builtin tools as function tools. The reply
//! streams back as server-sent events: the text deltas go to the run's merged stream
//! (one `partial_result` per stream interval); tool calls run here, and their results go
//! back to the model for a bounded number of rounds. Every upstream failure is an [`UpstreamError`] with a reason
//! code; only failures before any byte of a reply (connect errors, 429, 5xx) are retried.
//! A stopped run drops the response stream, which closes the upstream connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::tools::Tool;
use super::{Answer, RunContext, RunFailure, Usage};
use crate::config::{Llm, OpenAiEndpoint};
use crate::protocol::{Payload, Status};
use crate::store::Message;

/// Model calls per run: the last one is offered no tools, so the model must answer.
const MAX_ROUNDS: usize = 5;
/// Retries of a request that failed before any byte of its reply.
const MAX_RETRIES: u32 = 2;
/// A `retry-after` longer than this is not waited for: the run fails at once.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The wait before retrying a 429 that names no `retry-after`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The readiness probe's limit, within the startup component's own.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// The most characters of an upstream error body quoted in a message.
const MAX_DETAIL: usize = 200;
/// An SSE line longer than this is not a chat-completions stream.
const MAX_LINE_BYTES: usize = 1 << 20;

/// What went wrong upstream. Each variant has a reason code ([`UpstreamError::reason`])
/// and a message naming the cause; neither ever contains the API key.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the model endpoint refused the API key (HTTP {0}); check LLM_API_KEY")]
    Auth(u16),
    #[error("the model endpoint is rate limiting requests (HTTP 429{})", retry_note(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error("the model endpoint is unavailable (HTTP {0})")]
    Unavailable(u16),
    #[error("the model endpoint rejected the request (HTTP {status}): {detail}")]
    Rejected { status: u16, detail: String },
    #[error("the model endpoint reported an error: {0}")]
    Reported(String),
    #[error("cannot reach the model endpoint {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("the model endpoint {url} sent nothing for {} s", after.as_secs_f64())]
    Silent { url: String, after: Duration },
    #[error("the model endpoint sent a malformed stream: {0}")]
    Malformed(String),
    #[error("the model's reply stream ended before it finished: {0}")]
    Cut(String),
}

fn retry_note(retry_after: &Option<Duration>) -> String {
    retry_after.map(|d| format!(", retry after {} s", d.as_secs())).unwrap_or_default()
}

impl UpstreamError {
    /// The code clients see in `agent_error.error_context.reason` and `error.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Auth(_) => "upstream_auth",
            Self::RateLimited { .. } => "upstream_rate_limited",
            Self::Unavailable(_) => "upstream_unavailable",
            Self::Rejected { .. } | Self::Reported(_) => "upstream_rejected",
            Self::Unreachable { .. } | Self::Silent { .. } => "upstream_unreachable",
            Self::Malformed(_) => "upstream_malformed",
            Self::Cut(_) => "upstream_cut",
        }
    }

    /// What a chat client is told: the cause in general terms, never an address, a
    /// credential or the upstream's own words (those go to the log).
    pub fn public_message(&self) -> String {
        match self {
            Self::Auth(code) => format!("the model endpoint refused netra's credentials (HTTP {code})"),
            Self::RateLimited { .. } => {
                "the model endpoint is rate limiting requests (HTTP 429); try again later".into()
            }
            Self::Unavailable(code) => format!("the model endpoint is unavailable (HTTP {code})"),
            Self::Rejected { status, .. } => format!("the model endpoint rejected the request (HTTP {status})"),
            Self::Reported(_) => "the model endpoint reported an error".into(),
            Self::Unreachable { .. } => "cannot reach the model endpoint".into(),
            Self::Silent { after, .. } => format!("the model endpoint sent nothing for {} s", after.as_secs_f64()),
            Self::Malformed(_) => "the model endpoint sent a malformed stream".into(),
            Self::Cut(_) => "the model's reply stream ended before it finished".into(),
        }
    }

    /// How long to wait before trying again, when trying again is safe and useful.
    fn retry_wait(&self, retries: u32) -> Option<Duration> {
        match self {
            Self::Unreachable { .. } | Self::Unavailable(_) => Some(Duration::from_millis(250 << retries)),
            Self::RateLimited { retry_after: None } => Some(DEFAULT_RETRY_AFTER),
            Self::RateLimited { retry_after: Some(d) } => (*d <= MAX_RETRY_AFTER).then_some(*d),
            _ => None,
        }
    }
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for the model endpoint: {0}")]
pub struct ClientError(#[from] reqwest::Error);

/// A provider that talks to an OpenAI-compatible endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OpenAi {
    client: reqwest::Client,
    endpoint: OpenAiEndpoint,
    system_prompt: String,
    history_budget: usize,
    tool_timeout: Duration,
}

impl OpenAi {
    /// The model runs ask for.
    pub fn model(&self) -> &str {
        &self.endpoint.model
    }

    /// A provider for `endpoint`, sending what `llm` says a run sends.
    pub fn new(endpoint: OpenAiEndpoint, llm: &Llm) -> Result<Self, ClientError> {
        let client =
            reqwest::Client::builder().connect_timeout(endpoint.timeout.min(Duration::from_secs(10))).build()?;
        Ok(Self {
            client,
            endpoint,
            system_prompt: llm.system_prompt.clone(),
            history_budget: llm.history_budget,
            tool_timeout: llm.tool_timeout,
        })
    }

    /// The readiness check: `GET {base}/models` answers 2xx with this key.
    pub async fn check(&self) -> Result<(), UpstreamError> {
        let url = &self.endpoint.base_url;
        let request = self.authorized(self.client.get(format!("{url}/models")).timeout(CHECK_TIMEOUT));
        let shown = self.endpoint.shown_url();
        let checked = match request.send().await {
            Ok(response) => status_error(response).await.map(drop),
            Err(e) if e.is_timeout() => Err(UpstreamError::Silent { url: shown, after: CHECK_TIMEOUT }),
            Err(e) => Err(UpstreamError::Unreachable { url: shown, cause: innermost_cause(&e) }),
        };
        checked.map_err(|e| self.scrub(e))
    }

    /// Removes the endpoint's credentials from what an upstream error quotes (a body may
    /// echo the key or the URL); messages then go to the log and the run's record.
    fn scrub(&self, e: UpstreamError) -> UpstreamError {
        let clean = |text: String| {
            let mut text = text.replace(&self.endpoint.base_url, &self.endpoint.shown_url());
            if let Some(key) = self.endpoint.api_key.as_ref().map(|k| k.expose()).filter(|k| !k.is_empty()) {
                text = text.replace(key, "***");
            }
            text
        };
        match e {
            UpstreamError::Rejected { status, detail } => UpstreamError::Rejected { status, detail: clean(detail) },
            UpstreamError::Reported(detail) => UpstreamError::Reported(clean(detail)),
            UpstreamError::Malformed(detail) => UpstreamError::Malformed(clean(detail)),
            UpstreamError::Cut(detail) => UpstreamError::Cut(clean(detail)),
            UpstreamError::Unreachable { url, cause } => UpstreamError::Unreachable { url, cause: clean(cause) },
            other => other,
        }
    }

    /// Answers the run's message, streaming the model's words and running its tool calls.
    pub async fn run(&self, ctx: &RunContext) -> Result<Answer, RunFailure> {
        self.answer(ctx).await.map_err(|failure| match failure {
            RunFailure::Upstream(e) => RunFailure::Upstream(self.scrub(e)),
            other => other,
        })
    }

    async fn answer(&self, ctx: &RunContext) -> Result<Answer, RunFailure> {
        let asking = format!("Asking {}", self.endpoint.model);
        ctx.emit(thinking(&asking, 1)).await?;
        let mut messages = conversation(&self.system_prompt, &ctx.history, &ctx.text, self.history_budget);
        let mut text = String::new();
        let mut tools_used = Vec::new();
        let mut usage: Option<Usage> = None;
        for round in 1..=MAX_ROUNDS {
            let offer_tools = round < MAX_ROUNDS;
            let reply = self.complete(ctx, &messages, offer_tools).await?;
            text.push_str(&reply.content);
            if let Some(u) = reply.usage {
                let total = usage.get_or_insert_with(Usage::default);
                total.prompt_tokens += u.prompt_tokens;
                total.completion_tokens += u.completion_tokens;
            }
            if reply.calls.is_empty() || !offer_tools {
                break;
            }
            let calls: Vec<PendingCall> = reply
                .calls
                .into_values()
                .enumerate()
                .map(|(n, mut call)| {
                    if call.id.is_empty() {
                        call.id = format!("call_{round}_{n}");
                    }
                    call
                })
                .collect();
            messages.push(json!({
                "role": "assistant",
                "content": if reply.content.is_empty() { Value::Null } else { Value::String(reply.content) },
                "tool_calls": calls.iter().map(|c| json!({
                    "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments},
                })).collect::<Vec<_>>(),
            }));
            for call in &calls {
                let result = self.call_tool(ctx, call).await?;
                tools_used.push(call.name.clone());
                messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": result.to_string()}));
            }
            ctx.emit(thinking("Reading the tool results", round as u64 + 1)).await?;
        }
        Ok(Answer { text, tools: tools_used, usage })
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.endpoint.api_key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        }
    }

    /// One model call: streams its text as `partial_result` events and returns the reply.
    async fn complete(&self, ctx: &RunContext, messages: &[Value], offer_tools: bool) -> Result<Reply, RunFailure> {
        let mut body = json!({
            "model": self.endpoint.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if offer_tools {
            body["tools"] = tool_specs();
        }
        let response = self.post(&body).await?;
        // Owned by this future: a stopped run drops it, which closes the connection.
        let mut stream = response.bytes_stream();
        let mut parser = SseParser::default();
        let mut reply = Reply::default();
        loop {
            let silent_at = tokio::time::Instant::now() + self.endpoint.timeout;
            // While the model pauses, text held for merging still goes out when it is due.
            let read = loop {
                match ctx.text_due() {
                    Some(due) if due < silent_at => match tokio::time::timeout_at(due, stream.next()).await {
                        Ok(read) => break read,
                        Err(_) => ctx.flush_text().await?,
                    },
                    _ => {
                        break tokio::time::timeout_at(silent_at, stream.next()).await.map_err(|_| {
                            UpstreamError::Silent { url: self.endpoint.shown_url(), after: self.endpoint.timeout }
                        })?;
                    }
                }
            };
            let (events, ended) = match read {
                Some(Ok(bytes)) => (parser.push(&bytes)?, false),
                Some(Err(e)) => return Err(UpstreamError::Cut(innermost_cause(&e)).into()),
                None => (parser.finish()?, true),
            };
            let mut text = String::new();
            for data in &events {
                reply.apply(data, &mut text)?;
                if reply.done {
                    break;
                }
            }
            if !text.is_empty() {
                ctx.stream_text(&text).await?;
            }
            if reply.done {
                break;
            }
            if ended {
                if reply.finish_reason.is_none() {
                    return Err(UpstreamError::Cut("the connection closed before [DONE]".into()).into());
                }
                break;
            }
        }
        Ok(reply)
    }

    /// POSTs a chat completion and returns the successful response, retrying what is safe.
    async fn post(&self, body: &Value) -> Result<reqwest::Response, UpstreamError> {
        let mut retries = 0;
        loop {
            let error = match self.post_once(body).await {
                Ok(response) => return Ok(response),
                Err(e) => e,
            };
            match error.retry_wait(retries) {
                Some(wait) if retries < MAX_RETRIES => {
                    tracing::info!(error = %error, wait_ms = wait.as_millis() as u64, "retrying the model request");
                    tokio::time::sleep(wait).await;
                    retries += 1;
                }
                _ => return Err(error),
            }
        }
    }

    async fn post_once(&self, body: &Value) -> Result<reqwest::Response, UpstreamError> {
        let url = &self.endpoint.base_url;
        let request = self.authorized(self.client.post(format!("{url}/chat/completions")).json(body));
        match tokio::time::timeout(self.endpoint.timeout, request.send()).await {
            Err(_) => Err(UpstreamError::Silent { url: self.endpoint.shown_url(), after: self.endpoint.timeout }),
            Ok(Err(e)) => {
                Err(UpstreamError::Unreachable { url: self.endpoint.shown_url(), cause: innermost_cause(&e) })
            }
            Ok(Ok(response)) => status_error(response).await,
        }
    }

    /// Runs one tool call of the model. Whatever goes wrong becomes a result the model
    /// reads (`{"error": …}`), never a failed run.
    async fn call_tool(&self, ctx: &RunContext, call: &PendingCall) -> Result<Value, RunFailure> {
        let args: Result<Value, String> = if call.arguments.trim().is_empty() {
            Ok(json!({}))
        } else {
            serde_json::from_str(&call.arguments).map_err(|e| format!("the arguments are not JSON: {e}"))
        };
        let args = args.and_then(|v| if v.is_object() { Ok(v) } else { Err("the arguments are not an object".into()) });
        let parameters = args.clone().unwrap_or_else(|_| json!({"raw": call.arguments}));
        let running = format!("Running {}", call.name);
        ctx.emit(Payload::ToolExecuting {
            tool_name: &call.name,
            parameters: &parameters,
            status: Status::Executing,
            message: &running,
        })
        .await?;
        let started = Instant::now();
        let outcome = match (Tool::by_name(&call.name), args) {
            (None, _) => {
                Err(format!("unknown tool '{}'; the tools are {}", call.name, Tool::ALL.map(Tool::name).join(", ")))
            }
            (Some(_), Err(e)) => Err(e),
            (Some(tool), Ok(args)) => self.run_tool(tool, args).await,
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (result, message) = match outcome {
            Ok(v) => (v, format!("{} finished", call.name)),
            Err(e) => {
                let message = format!("{} failed: {e}", call.name);
                (json!({"error": e}), message)
            }
        };
        ctx.emit(Payload::ToolCompleted {
            tool_name: &call.name,
            result: &result,
            execution_time_ms: elapsed_ms,
            status: Status::Completed,
            message: &message,
        })
        .await?;
        Ok(result)
    }

    /// Runs a tool off the async threads, within the tool time limit.
    async fn run_tool(&self, tool: Tool, args: Value) -> Result<Value, String> {
        let task = tokio::task::spawn_blocking(move || tool.run(&args));
        match tokio::time::timeout(self.tool_timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("the tool crashed: {e}")),
            Err(_) => Err(format!("the tool did not finish within {} s", self.tool_timeout.as_secs_f64())),
        }
    }
}

/// The messages a run sends: the system prompt, then as many of the thread's earlier
/// messages as fit in `budget` characters (dropping the oldest first), then `text`.
fn conversation(system_prompt: &str, history: &[Arc<Message>], text: &str, budget: usize) -> Vec<Value> {
    // The run's own message is normally the last of the history; it is always sent.
    let earlier = match history.split_last() {
        Some((last, earlier)) if last.role == "user" && last.content == text => earlier,
        _ => history,
    };
    let mut left = budget;
    let mut kept = Vec::new();
    for m in earlier.iter().rev().filter(|m| matches!(m.role.as_str(), "user" | "assistant")) {
        let len = m.content.chars().count();
        if len > left {
            break;
        }
        left -= len;
        kept.push(json!({"role": m.role, "content": m.content}));
    }
    let mut messages = Vec::with_capacity(kept.len() + 2);
    messages.push(json!({"role": "system", "content": system_prompt}));
    messages.extend(kept.into_iter().rev());
    messages.push(json!({"role": "user", "content": text}));
    messages
}

/// The builtin tools as OpenAI function tools.
fn tool_specs() -> Value {
    Tool::ALL
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name(), "description": t.description(), "parameters": t.schema(),
            }})
        })
        .collect()
}

/// A non-2xx response as an error; a 2xx response is returned to be read.
async fn status_error(response: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let code = status.as_u16();
    Err(match code {
        401 | 403 => UpstreamError::Auth(code),
        429 => {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            UpstreamError::RateLimited { retry_after }
        }
        500..=599 => UpstreamError::Unavailable(code),
        _ => {
            let body = tokio::time::timeout(Duration::from_secs(2), response.text()).await;
            let body = body.ok().and_then(Result::ok).unwrap_or_default();
            UpstreamError::Rejected { status: code, detail: error_detail(&body) }
        }
    })
}

/// The `error.message` of an OpenAI error body, or the body itself, shortened.
fn error_detail(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().or_else(|| v["error"].as_str()).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    let short: String = message.chars().take(MAX_DETAIL).collect();
    if short.is_empty() { "no details".into() } else { short }
}

/// The root cause of a client error ("Connection refused (os error 111)"), which says
/// more than reqwest's own summary.
fn innermost_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Splits a server-sent event stream into the `data` of each event, across reads of
/// any size. Comments (`: …`) and other fields are skipped.
#[derive(Debug, Default)]
struct SseParser {
    /// Bytes after the last complete line.
    partial: Vec<u8>,
    /// The data lines of the event being read.
    data: Option<String>,
}

impl SseParser {
    /// Feeds one read; returns the data of every event it completes.
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, UpstreamError> {
        self.partial.extend_from_slice(bytes);
        let buffer = std::mem::take(&mut self.partial);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = buffer[start..].iter().position(|&b| b == b'\n') {
            let line = &buffer[start..start + end];
            self.line(line.strip_suffix(b"\r").unwrap_or(line), &mut events)?;
            start += end + 1;
        }
        self.partial = buffer[start..].to_vec();
        if self.partial.len() > MAX_LINE_BYTES {
            return Err(UpstreamError::Malformed(format!("a line longer than {MAX_LINE_BYTES} bytes")));
        }
        Ok(events)
    }

    /// The end of the stream: a last line or event without its terminator still counts.
    fn finish(&mut self) -> Result<Vec<String>, UpstreamError> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.partial);
        if !rest.is_empty() {
            self.line(rest.strip_suffix(b"\r").unwrap_or(&rest), &mut events)?;
        }
        self.line(b"", &mut events)?;
        Ok(events)
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) -> Result<(), UpstreamError> {
        let line = std::str::from_utf8(line).map_err(|_| UpstreamError::Malformed("a line is not UTF-8".into()))?;
        if line.is_empty() {
            events.extend(self.data.take());
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        Ok(())
    }
}

/// One streamed chat-completion chunk; only the fields netra reads.
#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// A tool call being assembled from its streamed pieces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PendingCall {
    id: String,
    name: String,
    arguments: String,
}

/// One model call's reply, as far as it has streamed.
#[derive(Debug, Default)]
struct Reply {
    content: String,
    calls: BTreeMap<usize, PendingCall>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    /// `data: [DONE]` arrived.
    done: bool,
}

impl Reply {
    /// Applies one event's data, appending its text to `text`.
    fn apply(&mut self, data: &str, text: &mut String) -> Result<(), UpstreamError> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            let excerpt: String = data.chars().take(80).collect();
            UpstreamError::Malformed(format!("{e} in {excerpt:?}"))
        })?;
        if let Some(error) = chunk.error {
            let message = error["message"].as_str().map(str::to_string).unwrap_or_else(|| error.to_string());
            return Err(UpstreamError::Reported(message.chars().take(MAX_DETAIL).collect()));
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens });
        }
        for choice in chunk.choices.unwrap_or_default() {
            if let Some(delta) = choice.delta {
                if let Some(content) = delta.content {
                    text.push_str(&content);
                    self.content.push_str(&content);
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.add_call_piece(call);
                }
            }
            if choice.finish_reason.is_some() {
                self.finish_reason = choice.finish_reason;
            }
        }
        Ok(())
    }

    fn add_call_piece(&mut self, piece: ToolCallDelta) {
        let index = piece.index.unwrap_or_else(|| {
            // Without an index, a new id starts a new call and anything else continues
            // the last one.
            let last = self.calls.keys().next_back().copied();
            match (&piece.id, last) {
                (Some(id), Some(last)) if self.calls[&last].id == *id => last,
                (Some(_), Some(last)) => last + 1,
                (_, last) => last.unwrap_or(0),
            }
        });
        let call = self.calls.entry(index).or_default();
        if let Some(id) = piece.id.filter(|id| !id.is_empty()) {
            call.id = id;
        }
        if let Some(function) = piece.function {
            if let Some(name) = function.name.filter(|_| call.name.is_empty()) {
                call.name = name;
            }
            if let Some(arguments) = function.arguments {
                call.arguments.push_str(&arguments);
            }
        }
    }
}

/// Step `step` of a model's run, whose number of steps is not known ahead.
fn thinking(reasoning: &str, step: u64) -> Payload<'_> {
    Payload::AgentThinking {
        reasoning,
        step_number: step,
        total_steps: None,
        progress_percentage: None,
        status: Status::Thinking,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> Arc<Message> {
        Arc::new(Message {
            id: "m".into(),
            role: role.into(),
            content: content.into(),
            created_at: 0,
            metadata: Value::Null,
            seq: 0,
        })
    }

    #[test]
    fn events_split_across_reads_are_reassembled() {
        let mut parser = SseParser::default();
        let stream = "data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":\r\n\r\ndata: é\n\ndata: [DONE]";
        let bytes = stream.as_bytes();
        let mut events = Vec::new();
        // One byte at a time splits every line and the two-byte é.
        for b in bytes {
            events.extend(parser.push(std::slice::from_ref(b)).expect("valid"));
        }
        events.extend(parser.finish().expect("valid"));
        assert_eq!(events, vec!["{\"a\":1}", "{\"b\":", "é", "[DONE]"]);
    }

    #[test]
    fn tool_call_pieces_accumulate_by_index() {
        let mut reply = Reply::default();
        let mut text = String::new();
        for data in [
            r#"{"choices":[{"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"calculator","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"expression\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"6*7\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#,
        ] {
            reply.apply(data, &mut text).expect("valid chunk");
        }
        assert_eq!(text, "");
        assert_eq!(
            reply.calls[&0],
            PendingCall { id: "c1".into(), name: "calculator".into(), arguments: r#"{"expression":"6*7"}"#.into() }
        );
        assert_eq!(reply.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(reply.usage, Some(Usage { prompt_tokens: 12, completion_tokens: 3 }));
        assert!(matches!(reply.apply("{not json", &mut text), Err(UpstreamError::Malformed(_))));
    }

    #[test]
    fn the_history_budget_drops_the_oldest_messages_first() {
        let history = [
            message("user", "first question"),
            message("assistant", "first answer"),
            message("user", "second"),
            message("assistant", "reply two"),
            message("user", "now"),
        ];
        let all = conversation("be brief", &history, "now", 1000);
        let roles: Vec<&str> = all.iter().map(|m| m["role"].as_str().unwrap_or_default()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant", "user"]);
        assert_eq!(all[0]["content"], "be brief");
        assert_eq!(all[5]["content"], "now");
        let trimmed = conversation("be brief", &history, "now", "second".len() + "reply two".len());
        let contents: Vec<&str> = trimmed.iter().map(|m| m["content"].as_str().unwrap_or_default()).collect();
        assert_eq!(contents, ["be brief", "second", "reply two", "now"]);
        assert_eq!(conversation("s", &history, "now", 0).len(), 2);
    }

    #[test]
    fn upstream_statuses_map_to_reason_codes() {
        assert_eq!(UpstreamError::Auth(401).reason(), "upstream_auth");
        assert_eq!(UpstreamError::RateLimited { retry_after: None }.reason(), "upstream_rate_limited");
        assert_eq!(UpstreamError::Unavailable(503).reason(), "upstream_unavailable");
        let long = UpstreamError::RateLimited { retry_after: Some(Duration::from_secs(60)) };
        assert_eq!(long.retry_wait(0), None, "a long retry-after fails at once");
        assert_eq!(UpstreamError::Malformed("x".into()).retry_wait(0), None, "never retried");
        assert_eq!(error_detail(r#"{"error":{"message":"model 'x' not found"}}"#), "model 'x' not found");
    }
}
