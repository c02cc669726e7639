//! HTTP: health probes, metrics, the auth endpoints and thread REST API the Netra web
//! client calls (PROTOCOL.md §4), and the agent-over-REST shims (§4.6). Handlers hold no
//! state of their own; they read the published `App`, and answer 503 before it exists.

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::agent::StartError;
use crate::auth::{TokenKind, User};
use crate::startup::{Criticality, State as ComponentState};
use crate::store::{StoreError, Thread};
use crate::telemetry::metric;
use crate::{App, Shared, gateway};

/// A REST failure: one status and a `{"detail"}` body the client shows.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self { status, detail: detail.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"detail": self.detail}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::new(StatusCode::NOT_FOUND, "not found"),
            other => {
                tracing::warn!(error = %other, "store error in a request");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable; try again")
            }
        }
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        let status = match &e {
            StartError::Forbidden => StatusCode::NOT_FOUND,
            StartError::Busy => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, gateway::start_error(e).message)
    }
}

/// The published app; 503 while starting.
pub(crate) struct Ready(Arc<App>);

impl FromRequestParts<Arc<Shared>> for Ready {
    type Rejection = ApiError;
    async fn from_request_parts(_: &mut Parts, shared: &Arc<Shared>) -> Result<Self, ApiError> {
        shared.app_now().map(Ready).ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service starting"))
    }
}

/// A request with a valid access token.
pub(crate) struct Authed {
    app: Arc<App>,
    user: User,
}

impl FromRequestParts<Arc<Shared>> for Authed {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Self, ApiError> {
        let Ready(app) = Ready::from_request_parts(parts, shared).await?;
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let user = app.keys.verify(token.trim(), TokenKind::Access).map_err(|e| {
            metrics::counter!(metric::AUTH_FAILURES, "reason" => e.reason()).increment(1);
            ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())
        })?;
        Ok(Self { app, user })
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let origins: Vec<HeaderValue> = shared.config.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_credentials(true)
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT])
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS]);
    Router::new()
        .route("/ws", get(gateway::upgrade))
        .route("/websocket", get(gateway::upgrade))
        .route("/ws/isolated", get(gateway::upgrade))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/startup", get(startup_report))
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .route("/auth/config", get(auth_config))
        .route("/auth/dev/login", post(dev_login))
        .route("/auth/refresh", post(refresh))
        .route("/auth/me", get(me))
        .route("/auth/logout", post(logout))
        .route("/auth/validate", post(validate))
        .route("/auth/session", get(session))
        .route("/api/threads", get(list_threads).post(create_thread))
        .route("/api/threads/{id}", get(get_thread).put(update_thread).delete(delete_thread))
        .route("/api/threads/{id}/messages", get(thread_messages))
        .route("/api/agent/v2/execute", post(execute_v2))
        .route("/api/agents/{kind}", post(execute_v1))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(count_requests))
        .layer(cors)
        // Outside the CORS layer: it answers preflights itself, without calling inward.
        .layer(axum::middleware::map_response(preflight_no_content))
        .with_state(shared)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not found")
}

/// PROTOCOL.md §4.1 wants 204 for preflights.
async fn preflight_no_content(mut response: Response) -> Response {
    if response.headers().contains_key(header::ACCESS_CONTROL_ALLOW_METHODS) && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

async fn count_requests(request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    metrics::counter!(metric::HTTP_REQUESTS, "route" => route, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let reasons = shared.unready_reasons();
    if reasons.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unready", "reasons": reasons}))).into_response()
    }
}

async fn startup_report(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.report.snapshot();
    let status = if snapshot.complete { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(snapshot)).into_response()
}

/// `application/health+json` (draft-inadarei-api-health-check) with one check per component.
async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.report.snapshot();
    let mut worst = "pass";
    let mut checks = serde_json::Map::new();
    for c in &snapshot.components {
        let status = match (c.state, c.criticality) {
            (ComponentState::Ready, _) => "pass",
            (_, Criticality::Optional) | (ComponentState::Pending | ComponentState::Starting, _) => "warn",
            _ => "fail",
        };
        if status == "fail" || (status == "warn" && worst == "pass") {
            worst = status;
        }
        let mut check = json!({"componentType": "component", "status": status, "state": c.state,
                               "criticality": c.criticality, "observedUnit": "ms", "observedValue": c.duration_ms});
        if let Some(e) = &c.error {
            check["output"] = json!(e);
        }
        checks.insert(c.name.to_string(), json!([check]));
    }
    if shared.is_draining() {
        worst = "fail";
    }
    let code = if worst == "fail" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = json!({"status": worst, "serviceId": "netra", "version": env!("CARGO_PKG_VERSION"), "checks": checks});
    (code, [(header::CONTENT_TYPE, "application/health+json")], body.to_string()).into_response()
}

async fn render_metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics.render()).into_response()
}

async fn auth_config(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let c = &shared.config;
    Json(json!({
        "development_mode": c.dev_login,
        "oauth_enabled": false,
        "google_client_id": "",
        "endpoints": {"login": "/auth/dev/login", "dev_login": "/auth/dev/login", "refresh": "/auth/refresh",
                      "me": "/auth/me", "logout": "/auth/logout", "validate": "/auth/validate"},
        "authorized_javascript_origins": c.cors_origins,
        "authorized_redirect_uris": [],
    }))
}

/// A refresh token lives a week; the web client never keeps dev refresh tokens anyway.
const REFRESH_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

fn token_pair(app: &App, user: &User) -> Json<Value> {
    let ttl = app.config.dev_token_ttl;
    Json(json!({
        "access_token": app.keys.mint(user, TokenKind::Access, ttl),
        "refresh_token": app.keys.mint(user, TokenKind::Refresh, REFRESH_TTL),
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "user": user_json(user),
    }))
}

fn user_json(user: &User) -> Value {
    json!({"id": user.id, "user_id": user.id, "email": user.email, "full_name": user.name,
           "name": user.name, "permissions": user.permissions})
}

#[derive(Deserialize)]
struct DevLogin {
    email: Option<String>,
}

async fn dev_login(Ready(app): Ready, body: Option<Json<DevLogin>>) -> Result<Json<Value>, ApiError> {
    if !app.config.dev_login {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "dev login is disabled on this server"));
    }
    let email = body
        .and_then(|Json(b)| b.email)
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty() && e.len() <= 120)
        .unwrap_or_else(|| "dev@example.com".into());
    let user = User {
        id: email.clone(),
        name: Some(email.split('@').next().unwrap_or("dev").to_string()),
        email: Some(email),
        permissions: Vec::new(),
    };
    app.store.upsert_user(&user.id, user.email.as_deref(), user.name.as_deref()).await?;
    Ok(token_pair(&app, &user))
}

async fn refresh(Ready(app): Ready, body: Option<Json<Value>>) -> Result<Json<Value>, ApiError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let token = ["refresh_token", "refreshToken", "token"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .ok_or_else(|| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "field 'refresh_token' is required"))?;
    let user = app
        .keys
        .verify(token, TokenKind::Refresh)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    Ok(token_pair(&app, &user))
}

async fn me(auth: Authed) -> Json<Value> {
    Json(user_json(&auth.user))
}

async fn logout() -> Json<Value> {
    Json(json!({"success": true}))
}

async fn validate(auth: Authed) -> Json<Value> {
    Json(json!({"valid": true, "user_id": auth.user.id, "email": auth.user.email}))
}

async fn session() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "no session: use a bearer token")
}

fn thread_json(t: &Thread) -> Value {
    json!({"id": t.id, "object": "thread", "title": t.title, "created_at": t.created_at / 1000,
           "updated_at": t.updated_at / 1000, "metadata": t.metadata, "message_count": t.message_count})
}

#[derive(Deserialize)]
struct Page {
    limit: Option<i64>,
    offset: Option<i64>,
}

impl Page {
    fn bounds(&self, default: i64) -> (i64, i64) {
        (self.limit.unwrap_or(default).clamp(1, 100), self.offset.unwrap_or(0).max(0))
    }
}

async fn owned_thread(app: &App, user: &User, id: &str) -> Result<Thread, ApiError> {
    let thread = app.store.thread(id).await?;
    if thread.owner_id != user.id {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not your thread"));
    }
    Ok(thread)
}

async fn list_threads(auth: Authed, Query(page): Query<Page>) -> Result<Json<Value>, ApiError> {
    let (limit, offset) = page.bounds(20);
    let threads = auth.app.store.threads_of(&auth.user.id, limit, offset).await?;
    Ok(Json(Value::Array(threads.iter().map(thread_json).collect())))
}

#[derive(Deserialize, Default)]
struct ThreadBody {
    title: Option<String>,
    metadata: Option<Value>,
}

async fn create_thread(auth: Authed, body: Option<Json<ThreadBody>>) -> Result<Json<Value>, ApiError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let title = body.title.as_deref().map(str::trim).filter(|t| !t.is_empty()).unwrap_or("New Chat");
    let title: String = title.chars().take(200).collect();
    let metadata = match body.metadata {
        None | Some(Value::Null) => json!({}),
        Some(m @ Value::Object(_)) => m,
        Some(_) => return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "metadata must be an object")),
    };
    auth.app.store.upsert_user(&auth.user.id, auth.user.email.as_deref(), auth.user.name.as_deref()).await?;
    let id = format!("th_{}", uuid::Uuid::new_v4().simple());
    let thread = auth.app.store.create_thread(&id, &auth.user.id, &title, &metadata).await?;
    Ok(Json(thread_json(&thread)))
}

async fn get_thread(auth: Authed, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(thread_json(&owned_thread(&auth.app, &auth.user, &id).await?)))
}

async fn update_thread(
    auth: Authed,
    Path(id): Path<String>,
    Json(body): Json<ThreadBody>,
) -> Result<Json<Value>, ApiError> {
    owned_thread(&auth.app, &auth.user, &id).await?;
    if matches!(body.metadata, Some(ref m) if !m.is_object() && !m.is_null()) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "metadata must be an object"));
    }
    let title: Option<String> = body.title.as_deref().map(|t| t.trim().chars().take(200).collect());
    let thread = auth.app.store.update_thread(&id, title.as_deref(), body.metadata.as_ref()).await?;
    Ok(Json(thread_json(&thread)))
}

async fn delete_thread(auth: Authed, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    owned_thread(&auth.app, &auth.user, &id).await?;
    auth.app.store.delete_thread(&id).await?;
    Ok(Json(json!({"message": "Thread archived successfully"})))
}

async fn thread_messages(
    auth: Authed,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    owned_thread(&auth.app, &auth.user, &id).await?;
    let (limit, offset) = page.bounds(50);
    let (messages, total) = auth.app.store.messages(&id, limit, offset).await?;
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| json!({"id": m.id, "role": m.role, "content": m.content, "created_at": m.created_at / 1000, "metadata": m.metadata}))
        .collect();
    Ok(Json(json!({"thread_id": id, "messages": messages, "total": total, "limit": limit, "offset": offset})))
}

fn message_text(body: &Value) -> Result<String, ApiError> {
    ["message", "content", "user_request", "query"]
        .iter()
        .filter_map(|k| body.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "field 'message' must be non-empty text"))
}

async fn execute_v2(auth: Authed, Json(body): Json<Value>) -> Result<Json<Value>, ApiError> {
    let text = message_text(&body)?;
    let thread_id = body.get("thread_id").and_then(Value::as_str).filter(|t| !t.is_empty());
    let started = auth.app.supervisor.start(&auth.user.id, thread_id, &text).await?;
    Ok(Json(json!({
        "request_id": body.get("request_id").cloned().unwrap_or(Value::Null),
        "success": true,
        "result": {"run_id": started.run_id, "thread_id": started.thread_id, "status": "started"},
        "warnings": [],
    })))
}

async fn execute_v1(auth: Authed, Path(kind): Path<String>, Json(body): Json<Value>) -> Result<Json<Value>, ApiError> {
    if !matches!(kind.as_str(), "triage" | "data" | "optimization") {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no agent '{kind}'")));
    }
    let text = message_text(&body)?;
    let latest = auth.app.store.threads_of(&auth.user.id, 1, 0).await?;
    let thread_id = latest.first().map(|t| t.id.as_str());
    let started = auth.app.supervisor.start(&auth.user.id, thread_id, &text).await?;
    Ok(Json(json!({
        "success": true, "status": "started", "agent": kind, "output": "",
        "data": {"run_id": started.run_id, "thread_id": started.thread_id},
    })))
}
