//! `/auth/*`: what the web client calls at boot and on refresh (PROTOCOL.md §4.2).
//! netra is its own auth service: there are no cookie sessions, only bearer tokens.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Authed, Body, Detail, Ready};
use crate::auth::{TokenKind, User};
use crate::{App, Shared};

/// A refresh token lives a week; the web client never keeps dev refresh tokens anyway.
const REFRESH_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Serialize, ToSchema)]
pub(crate) struct AuthConfig {
    /// When true (and OAuth is off) the client logs in with `/auth/dev/login`.
    development_mode: bool,
    oauth_enabled: bool,
    /// Empty: a short non-empty value aborts login in the client.
    google_client_id: String,
    endpoints: Endpoints,
    authorized_javascript_origins: Vec<String>,
    authorized_redirect_uris: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Endpoints {
    login: &'static str,
    dev_login: &'static str,
    refresh: &'static str,
    me: &'static str,
    logout: &'static str,
    validate: &'static str,
}

#[utoipa::path(get, path = "/auth/config", tag = "auth", responses((status = 200, body = AuthConfig)))]
pub(crate) async fn config(State(shared): State<Arc<Shared>>) -> Json<AuthConfig> {
    let c = &shared.config;
    Json(AuthConfig {
        development_mode: c.dev_login,
        oauth_enabled: false,
        google_client_id: String::new(),
        endpoints: Endpoints {
            login: "/auth/dev/login",
            dev_login: "/auth/dev/login",
            refresh: "/auth/refresh",
            me: "/auth/me",
            logout: "/auth/logout",
            validate: "/auth/validate",
        },
        authorized_javascript_origins: c.cors_origins.clone(),
        authorized_redirect_uris: Vec::new(),
    })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct UserOut {
    id: String,
    user_id: String,
    email: Option<String>,
    full_name: Option<String>,
    name: Option<String>,
    permissions: Vec<String>,
}

impl From<&User> for UserOut {
    fn from(u: &User) -> Self {
        Self {
            id: u.id.clone(),
            user_id: u.id.clone(),
            email: u.email.clone(),
            full_name: u.name.clone(),
            name: u.name.clone(),
            permissions: u.permissions.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct TokenPair {
    access_token: String,
    refresh_token: String,
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    user: UserOut,
}

fn token_pair(app: &App, user: &User) -> Json<TokenPair> {
    let ttl = app.config.dev_token_ttl;
    Json(TokenPair {
        access_token: app.keys.mint(user, TokenKind::Access, ttl),
        refresh_token: app.keys.mint(user, TokenKind::Refresh, REFRESH_TTL),
        token_type: "Bearer",
        expires_in: ttl.as_secs(),
        user: user.into(),
    })
}

#[derive(Deserialize, ToSchema)]
pub(crate) struct DevLogin {
    /// The web client always sends `dev@example.com`; it becomes the user id.
    email: Option<String>,
    #[allow(dead_code)]
    password: Option<String>,
}

#[utoipa::path(post, path = "/auth/dev/login", tag = "auth", request_body = Option<DevLogin>,
    responses((status = 200, body = TokenPair), (status = 403, description = "dev login is off", body = Detail)))]
pub(crate) async fn dev_login(Ready(app): Ready, body: Option<Body<DevLogin>>) -> Result<Json<TokenPair>, ApiError> {
    if !app.config.dev_login {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "dev login is disabled on this server"));
    }
    let email = body
        .and_then(|Body(b)| b.email)
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

#[derive(Deserialize, ToSchema)]
pub(crate) struct RefreshRequest {
    #[serde(alias = "refreshToken", alias = "token")]
    #[schema(required = true, value_type = String)]
    refresh_token: Option<String>,
}

#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenPair), (status = 401, body = Detail), (status = 422, body = Detail)))]
pub(crate) async fn refresh(
    Ready(app): Ready,
    body: Option<Body<RefreshRequest>>,
) -> Result<Json<TokenPair>, ApiError> {
    let token = body
        .and_then(|Body(b)| b.refresh_token)
        .ok_or_else(|| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "field 'refresh_token' is required"))?;
    let user = app
        .keys
        .verify(&token, TokenKind::Refresh)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    Ok(token_pair(&app, &user))
}

#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserOut), (status = 401, body = Detail)))]
pub(crate) async fn me(auth: Authed) -> Json<UserOut> {
    Json((&auth.user).into())
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Success {
    success: bool,
}

#[utoipa::path(post, path = "/auth/logout", tag = "auth", responses((status = 200, body = Success)))]
pub(crate) async fn logout() -> Json<Success> {
    Json(Success { success: true })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Validation {
    valid: bool,
    user_id: String,
    email: Option<String>,
}

#[utoipa::path(post, path = "/auth/validate", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = Validation), (status = 401, body = Detail)))]
pub(crate) async fn validate(auth: Authed) -> Json<Validation> {
    Json(Validation { valid: true, user_id: auth.user.id, email: auth.user.email })
}

#[utoipa::path(get, path = "/auth/session", tag = "auth",
    responses((status = 401, description = "there are no cookie sessions", body = Detail)))]
pub(crate) async fn session() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "no session: use a bearer token")
}
