//! `/api/threads…` (PROTOCOL.md §4.4) and the agent-over-REST shims (§4.6). Every call
//! checks the thread's owner; times are integer Unix seconds, as the client expects.

use axum::Json;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, Authed, Body, Detail};
use crate::App;
use crate::auth::User;
use crate::store::Thread;

#[derive(Serialize, ToSchema)]
pub(crate) struct ThreadOut {
    id: String,
    /// Always `thread`.
    object: &'static str,
    title: String,
    /// Unix seconds.
    created_at: i64,
    /// Unix seconds.
    updated_at: i64,
    #[schema(value_type = Object)]
    metadata: Value,
    message_count: i64,
}

impl From<&Thread> for ThreadOut {
    fn from(t: &Thread) -> Self {
        Self {
            id: t.id.clone(),
            object: "thread",
            title: t.title.clone(),
            created_at: t.created_at / 1000,
            updated_at: t.updated_at / 1000,
            metadata: t.metadata.clone(),
            message_count: t.message_count,
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Page {
    /// At most 100.
    limit: Option<i64>,
    offset: Option<i64>,
}

impl Page {
    fn bounds(&self, default: i64) -> (i64, i64) {
        (self.limit.unwrap_or(default).clamp(1, 100), self.offset.unwrap_or(0).max(0))
    }
}

async fn owned_thread(app: &App, user: &User, id: &str) -> Result<Thread, ApiError> {
    Ok(app.store.owned_thread(&user.id, id).await?)
}

/// The caller's threads, most recently updated first.
#[utoipa::path(get, path = "/api/threads", tag = "threads", params(Page), security(("bearer" = [])),
    responses((status = 200, body = Vec<ThreadOut>), (status = 401, body = Detail)))]
pub(crate) async fn list(auth: Authed, Query(page): Query<Page>) -> Result<Json<Vec<ThreadOut>>, ApiError> {
    let (limit, offset) = page.bounds(20);
    let threads = auth.app.store.threads_of(&auth.user.id, limit, offset).await?;
    Ok(Json(threads.iter().map(ThreadOut::from).collect()))
}

#[derive(Deserialize, Default, ToSchema)]
pub(crate) struct ThreadBody {
    title: Option<String>,
    /// Merged key by key into the thread's metadata.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
}

impl ThreadBody {
    fn title(&self) -> Option<String> {
        self.title.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(|t| t.chars().take(200).collect())
    }

    fn metadata(&self) -> Result<Option<&Value>, ApiError> {
        match &self.metadata {
            None | Some(Value::Null) => Ok(None),
            Some(m @ Value::Object(_)) => Ok(Some(m)),
            Some(_) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "metadata must be an object")),
        }
    }
}

#[utoipa::path(post, path = "/api/threads", tag = "threads", request_body = Option<ThreadBody>, security(("bearer" = [])),
    responses((status = 200, body = ThreadOut), (status = 401, body = Detail), (status = 422, body = Detail)))]
pub(crate) async fn create(auth: Authed, body: Option<Body<ThreadBody>>) -> Result<Json<ThreadOut>, ApiError> {
    let body = body.map(|Body(b)| b).unwrap_or_default();
    let title = body.title().unwrap_or_else(|| "New Chat".into());
    let metadata = body.metadata()?.cloned().unwrap_or_else(|| json!({}));
    auth.app.store.upsert_user(&auth.user.id, auth.user.email.as_deref(), auth.user.name.as_deref()).await?;
    let id = format!("th_{}", uuid::Uuid::now_v7().simple());
    let thread = auth.app.store.create_thread(&id, &auth.user.id, &title, &metadata).await?;
    Ok(Json((&thread).into()))
}

#[utoipa::path(get, path = "/api/threads/{id}", tag = "threads", params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = ThreadOut), (status = 403, body = Detail), (status = 404, body = Detail)))]
pub(crate) async fn get_one(auth: Authed, Path(id): Path<String>) -> Result<Json<ThreadOut>, ApiError> {
    Ok(Json((&owned_thread(&auth.app, &auth.user, &id).await?).into()))
}

#[utoipa::path(put, path = "/api/threads/{id}", tag = "threads", params(("id" = String, Path)), request_body = ThreadBody,
    security(("bearer" = [])),
    responses((status = 200, body = ThreadOut), (status = 403, body = Detail), (status = 404, body = Detail),
              (status = 422, description = "metadata not an object, or past 16 KiB once merged", body = Detail)))]
pub(crate) async fn update(
    auth: Authed,
    Path(id): Path<String>,
    Body(body): Body<ThreadBody>,
) -> Result<Json<ThreadOut>, ApiError> {
    owned_thread(&auth.app, &auth.user, &id).await?;
    let metadata = body.metadata()?;
    let thread = auth.app.store.update_thread(&id, body.title().as_deref(), metadata).await?;
    Ok(Json((&thread).into()))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Archived {
    message: &'static str,
}

/// Soft delete: the thread and its events are no longer served.
#[utoipa::path(delete, path = "/api/threads/{id}", tag = "threads", params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = Archived), (status = 403, body = Detail), (status = 404, body = Detail)))]
pub(crate) async fn delete(auth: Authed, Path(id): Path<String>) -> Result<Json<Archived>, ApiError> {
    owned_thread(&auth.app, &auth.user, &id).await?;
    auth.app.store.delete_thread(&id).await?;
    Ok(Json(Archived { message: "Thread archived successfully" }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct MessageOut {
    id: String,
    /// `user` or `assistant` (the final_report text).
    role: String,
    content: String,
    /// Unix seconds.
    created_at: i64,
    #[schema(value_type = Object)]
    metadata: Value,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct MessagesPage {
    thread_id: String,
    messages: Vec<MessageOut>,
    total: i64,
    limit: i64,
    offset: i64,
}

#[utoipa::path(get, path = "/api/threads/{id}/messages", tag = "threads", params(("id" = String, Path), Page),
    security(("bearer" = [])),
    responses((status = 200, body = MessagesPage), (status = 403, body = Detail), (status = 404, body = Detail)))]
pub(crate) async fn messages(
    auth: Authed,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<MessagesPage>, ApiError> {
    owned_thread(&auth.app, &auth.user, &id).await?;
    let (limit, offset) = page.bounds(50);
    let (messages, total) = auth.app.store.messages(&id, limit, offset).await?;
    let messages = messages
        .into_iter()
        .map(|m| MessageOut {
            id: m.id,
            role: m.role,
            content: m.content,
            created_at: m.created_at / 1000,
            metadata: m.metadata,
        })
        .collect();
    Ok(Json(MessagesPage { thread_id: id, messages, total, limit, offset }))
}

/// The agent request bodies of both shims; the text is the first non-empty alias.
#[derive(Deserialize)]
pub(crate) struct AgentRequest {
    request_id: Option<Value>,
    #[allow(dead_code)]
    agent_type: Option<String>,
    message: Option<String>,
    content: Option<String>,
    user_request: Option<String>,
    query: Option<String>,
    thread_id: Option<String>,
}

/// Written by hand: one of the text fields must hold text, which derive cannot say.
impl utoipa::PartialSchema for AgentRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
        const TEXT_FIELDS: [&str; 4] = ["message", "content", "user_request", "query"];
        let text = || ObjectBuilder::new().schema_type(Type::String).pattern(Some(r"\S"));
        let optional_string = || {
            ObjectBuilder::new().schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]))
        };
        let mut object = ObjectBuilder::new()
            .description(Some("The message is the first of message, content, user_request, query that holds text."))
            .property("request_id", ObjectBuilder::new().schema_type(utoipa::openapi::schema::SchemaType::AnyValue))
            .property("agent_type", optional_string())
            .property("thread_id", optional_string());
        for field in TEXT_FIELDS {
            object = object.property(field, optional_string());
        }
        let one_of_them = TEXT_FIELDS.iter().fold(AnyOfBuilder::new(), |any, field| {
            any.item(ObjectBuilder::new().required(*field).property(*field, text()))
        });
        Schema::AllOf(utoipa::openapi::schema::AllOfBuilder::new().item(object).item(one_of_them).build()).into()
    }
}

impl utoipa::ToSchema for AgentRequest {}

impl AgentRequest {
    fn text(&self) -> Result<String, ApiError> {
        [&self.message, &self.content, &self.user_request, &self.query]
            .into_iter()
            .flatten()
            .map(|t| t.trim())
            .find(|t| !t.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "field 'message' must be non-empty text"))
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct RunRef {
    run_id: String,
    thread_id: String,
    /// Always `started`: the run streams over the socket.
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ExecuteV2Reply {
    /// The request's `request_id`, whatever JSON it was; null when it had none.
    request_id: Value,
    success: bool,
    result: RunRef,
    warnings: Vec<String>,
}

/// Starts a run like `start_agent` and answers at once; the events stream over the socket.
#[utoipa::path(post, path = "/api/agent/v2/execute", tag = "agents", request_body = AgentRequest, security(("bearer" = [])),
    responses((status = 200, body = ExecuteV2Reply), (status = 404, body = Detail),
              (status = 413, description = "body past NETRA_MAX_FRAME_BYTES", body = Detail), (status = 422, body = Detail),
              (status = 429, description = "too many runs or requests for this user", body = Detail)))]
pub(crate) async fn execute_v2(auth: Authed, Body(body): Body<AgentRequest>) -> Result<Json<ExecuteV2Reply>, ApiError> {
    auth.app.run_rates.allow(&auth.user.id).map_err(ApiError::rate_limited)?;
    let text = body.text()?;
    let thread_id = body.thread_id.as_deref().filter(|t| !t.is_empty());
    let started = auth.app.supervisor.start(&auth.user.id, thread_id, &text).await?;
    Ok(Json(ExecuteV2Reply {
        request_id: body.request_id.unwrap_or(Value::Null),
        success: true,
        result: RunRef { run_id: started.run_id, thread_id: started.thread_id, status: "started" },
        warnings: Vec::new(),
    }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct RunIds {
    run_id: String,
    thread_id: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ExecuteV1Reply {
    success: bool,
    status: &'static str,
    agent: String,
    output: &'static str,
    data: RunIds,
}

/// The v1 routes carry no thread id: the run goes to the user's most recent thread.
#[utoipa::path(post, path = "/api/agents/{kind}", tag = "agents", request_body = AgentRequest,
    params(("kind" = String, Path, description = "triage, data or optimization")), security(("bearer" = [])),
    responses((status = 200, body = ExecuteV1Reply), (status = 404, body = Detail),
              (status = 413, description = "body past NETRA_MAX_FRAME_BYTES", body = Detail), (status = 422, body = Detail),
              (status = 429, description = "too many runs or requests for this user", body = Detail)))]
pub(crate) async fn execute_v1(
    auth: Authed,
    Path(kind): Path<String>,
    Body(body): Body<AgentRequest>,
) -> Result<Json<ExecuteV1Reply>, ApiError> {
    if !matches!(kind.as_str(), "triage" | "data" | "optimization") {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no agent '{kind}'")));
    }
    auth.app.run_rates.allow(&auth.user.id).map_err(ApiError::rate_limited)?;
    let text = body.text()?;
    let latest = auth.app.store.threads_of(&auth.user.id, 1, 0).await?;
    let started = auth.app.supervisor.start(&auth.user.id, latest.first().map(|t| t.id.as_str()), &text).await?;
    Ok(Json(ExecuteV1Reply {
        success: true,
        status: "started",
        agent: kind,
        output: "",
        data: RunIds { run_id: started.run_id, thread_id: started.thread_id },
    }))
}
