//! HTTP routes: the auth endpoints and thread REST API the Netra web client calls
//! (PROTOCOL.md §4), the agent-over-REST shims (§4.6), health, metrics, and the OpenAPI
//! document generated from the handlers' types (the browser pages are in `pages`).
//! Handlers hold no state of their own; they read the published `App` and answer 503
//! before it exists.

mod admin;
mod auth;
mod client;
mod pages;
mod threads;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;

use crate::agent::StartError;
use crate::auth::User;
use crate::store::StoreError;
use crate::telemetry::metric;
use crate::{App, Shared, gateway, health};

/// The body of every REST error: the web client shows `detail`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Detail {
    detail: String,
}

/// A REST failure: one status and a `{"detail"}` body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    detail: String,
    /// Whole seconds for a `retry-after` header.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self { status, detail: detail.into(), retry_after: None }
    }

    /// 429 with a `retry-after` of `wait`, rounded up to whole seconds.
    fn rate_limited(wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "too many requests; try again later");
        e.retry_after = Some(secs.max(1));
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(Detail { detail: self.detail })).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::new(StatusCode::NOT_FOUND, "not found"),
            StoreError::NotOwner => Self::new(StatusCode::FORBIDDEN, "not your thread"),
            StoreError::TooLarge(detail) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, detail),
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

/// A JSON body whose rejections are `{"detail"}` errors like every other failure. The
/// body must be a JSON object: serde would otherwise take `[null, null]` for a struct.
pub(crate) struct Body<T>(pub(crate) T);

fn from_object<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

impl<T, S> FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<Value>::from_request(req, state).await {
            Ok(Json(v)) => from_object(v).map(Self),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

impl<T, S> axum::extract::OptionalFromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        match <Json<Value> as axum::extract::OptionalFromRequest<S>>::from_request(req, state).await {
            Ok(Some(Json(Value::Null)) | None) => Ok(None),
            Ok(Some(Json(v))) => from_object(v).map(|t| Some(Self(t))),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
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
        let user = app.keys.authenticate(token.trim()).await.map_err(|e| {
            metrics::counter!(metric::AUTH_FAILURES, "reason" => e.reason()).increment(1);
            ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())
        })?;
        Ok(Self { app, user })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "netra", description = "REST API of netra, the real-time AI chat backend (PROTOCOL.md §4)."),
    paths(
        auth::config, auth::dev_login, auth::refresh, auth::me, auth::logout, auth::validate, auth::session,
        threads::list, threads::create, threads::get_one, threads::update, threads::delete, threads::messages,
        threads::execute_v2, threads::execute_v1,
        client::discovery, client::mcp_servers, client::mcp_tools, client::mcp_config,
        admin::stats,
    ),
    modifiers(&BearerAuth, &CommonResponses),
)]
struct ApiDoc;

/// The answers every operation may give besides its own, added in one place: netra's
/// limits and axum's rejections of a body, all `{"detail"}` JSON.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, Required, ResponseBuilder};
        let detail = |why: &str| {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Detail"))).build();
            ResponseBuilder::new().description(why).content("application/json", content).build()
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for op in operations.into_iter().flatten() {
                let mut answers = vec![
                    ("408", "the request took longer than NETRA_REQUEST_TIMEOUT"),
                    ("503", "the server is starting, or its database is unavailable"),
                ];
                if op.security.is_some() {
                    answers.push(("401", "no bearer token, or not a valid access token"));
                }
                let in_query = |p: &utoipa::openapi::path::Parameter| {
                    matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query)
                };
                if op.parameters.as_ref().is_some_and(|ps| ps.iter().any(in_query)) {
                    answers.push(("400", "a query parameter is not of its type"));
                }
                if let Some(body) = &op.request_body {
                    answers.push(("400", "the body is not JSON, or JSON of another shape"));
                    answers.push(("413", "the body is larger than NETRA_MAX_FRAME_BYTES"));
                    answers.push(("422", "the body does not fit the schema"));
                    if matches!(body.required, Some(Required::True)) {
                        answers.push(("415", "the body is not application/json"));
                    }
                }
                for (code, why) in answers {
                    op.responses.responses.entry(code.to_string()).or_insert_with(|| detail(why).into());
                }
            }
        }
    }
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The OpenAPI 3 document, generated from the handlers' annotations and types.
pub(crate) fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the generated document serializes")
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
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
        .route("/ws/echo", get(gateway::echo))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/health/startup", get(health::startup_report))
        .route("/health", get(health::health))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi))
        .route("/auth/config", get(auth::config))
        .route("/auth/dev/login", post(auth::dev_login))
        .route("/auth/refresh", post(auth::refresh))
        .route("/auth/me", get(auth::me))
        .route("/auth/logout", post(auth::logout))
        .route("/auth/validate", post(auth::validate))
        .route("/auth/session", get(auth::session))
        .route("/api/threads", get(threads::list).post(threads::create))
        .route("/api/threads/{id}", get(threads::get_one).put(threads::update).delete(threads::delete))
        .route("/api/threads/{id}/messages", get(threads::messages))
        .route("/api/agent/v2/execute", post(threads::execute_v2))
        .route("/api/agents/{kind}", post(threads::execute_v1))
        .route("/api/discovery/services", get(client::discovery))
        .route("/api/mcp/servers", get(client::mcp_servers))
        .route("/api/mcp/tools", get(client::mcp_tools))
        .route("/api/mcp/config", get(client::mcp_config))
        .route("/api/admin/stats", get(admin::stats))
        .merge(pages::routes())
        .fallback(not_found)
        // A REST body is held to the socket's frame limit: no way in takes a bigger message.
        .layer(axum::extract::DefaultBodyLimit::max(shared.config.limits.max_frame_bytes))
        // A request, its body included, may take so long; a body sent a byte a second ends 408.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            shared.config.limits.request_timeout,
        ))
        .layer(axum::middleware::from_fn(count_requests))
        .layer(cors)
        // Outside the CORS layer: it answers preflights itself, without calling inward.
        .layer(axum::middleware::map_response(preflight_no_content))
        .layer(axum::middleware::map_response(json_errors))
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

/// Every error is `{"detail"}` JSON (PROTOCOL.md §4), whoever made it: axum's own
/// rejections (405 with no body, text/plain 400s for a bad query string or a `GET /ws`
/// without upgrade headers, 413s) are rewritten here, once, with their headers kept.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json =
        response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // axum's rejection texts are short; anything longer is cut, not buffered.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let detail = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        t => t.to_string(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = serde_json::to_vec(&Detail { detail }).expect("a string serializes");
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn count_requests(request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    metrics::counter!(metric::HTTP_REQUESTS, "route" => route, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_openapi_document_covers_every_rest_route() {
        let doc: serde_json::Value = serde_json::from_str(&super::openapi_json()).expect("json");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
        for path in [
            "/auth/config",
            "/auth/dev/login",
            "/auth/refresh",
            "/auth/me",
            "/api/threads",
            "/api/threads/{id}",
            "/api/threads/{id}/messages",
            "/api/agent/v2/execute",
            "/api/agents/{kind}",
            "/api/discovery/services",
            "/api/mcp/servers",
            "/api/mcp/tools",
            "/api/mcp/config",
            "/api/admin/stats",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing from the OpenAPI document");
        }
        assert!(doc["components"]["schemas"].get("ThreadOut").is_some());
        assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
    }
}
