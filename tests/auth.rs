//! Authentication: the three socket token sources and their precedence (PROTOCOL.md §1.2),
//! every kind of bad token (§1.2, §1.3), the REST auth endpoints (§4.2), CORS (§4.1) and
//! Bearer auth on the thread API (§4.4).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{Auth, Client, Closed, Server, Spawn};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use netra::auth::{Keys, TokenKind, User};
use netra::config::Secret;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const FRONTEND: &str = "http://localhost:3000";

fn b64url(text: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

/// An access token signed with the server's own secret whose `exp` is in the past.
fn expired_token(server: &Server, user: &str) -> String {
    let now = now();
    let claims = json!({"sub": user, "iat": now - 3600, "exp": now - 120, "type": "access", "token_type": "access"});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(server.secret.as_bytes()))
        .expect("sign")
}

/// A valid access token for a different secret.
fn wrong_key_token(user: &str) -> String {
    Keys::new(&Secret::new("some-other-secret-entirely-0123456789")).mint(
        &User::new(user),
        TokenKind::Access,
        Duration::from_secs(3600),
    )
}

/// The server's own valid claims, re-packed unsigned under `alg: none`.
fn alg_none_token(server: &Server, user: &str) -> String {
    let good = server.token(user);
    let body = good.split('.').nth(1).expect("three parts");
    format!("{}.{body}.", b64url(r#"{"alg":"none","typ":"JWT"}"#))
}

fn refresh_token(server: &Server, user: &str) -> String {
    server.keys().mint(&User::new(user), TokenKind::Refresh, Duration::from_secs(3600))
}

/// Opens a socket with any mix of headers and query string, for precedence tests.
async fn open_with(server: &Server, query: &str, headers: &[(&'static str, String)]) -> Client {
    let url = format!("{}{query}", server.ws_url());
    let mut request = url.as_str().into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().expect("header value"));
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await.expect("upgrade succeeds");
    let protocol = response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
    Client(netra::client::Client { ws, protocol })
}

async fn assert_established(client: &mut Client, user: &str) {
    let first = client.next().await;
    assert_eq!(first["type"], "system_message", "{first}");
    assert_eq!(first["payload"]["event"], "connection_established", "{first}");
    assert_eq!(first["payload"]["user_id"], user, "{first}");
}

/// The refusal of §1.2: exactly one `error` frame with `code`, then close 1008.
async fn assert_refused(mut client: Client, code: &str) -> Closed {
    let (frames, closed) = client.until_close().await;
    assert_eq!(frames.len(), 1, "exactly one frame before the close: {frames:?}");
    let error = &frames[0];
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["payload"]["code"], code, "{error}");
    assert!(error["payload"]["error_message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    assert!(error.get("seq").is_none(), "a protocol error has no seq: {error}");
    assert_eq!(closed.code, 1008, "{closed:?}");
    if code == "token_expired" {
        assert_eq!(closed.reason, "Token expired");
    } else {
        // The frontend refreshes and retries when the reason says the token expired.
        assert!(!closed.reason.to_ascii_lowercase().contains("expired"), "{closed:?}");
    }
    closed
}

/// Sum of every `netra_auth_failures_total` sample on `/metrics`.
async fn auth_failures(server: &Server) -> f64 {
    let text = reqwest::get(server.http("/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .filter(|l| l.starts_with("netra_auth_failures_total"))
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).expect("a sample value"))
        .sum()
}

/// Opens a socket with `auth`, asserts the §1.2 refusal and that the failure was counted.
async fn refused_and_counted(auth: impl FnOnce(&Server) -> Auth, code: &str) {
    let server = Server::start().await;
    assert_eq!(auth_failures(&server).await, 0.0);
    let client = Client::open(&server.ws_url(), auth(&server)).await.expect("the upgrade succeeds");
    assert_refused(client, code).await;
    assert_eq!(auth_failures(&server).await, 1.0, "netra_auth_failures_total counts the refusal");
}

// ---- token sources (§1.2) ----

#[tokio::test]
async fn bearer_header_token_opens_a_socket() {
    let server = Server::start().await;
    let mut client = Client::open(&server.ws_url(), Auth::Header(server.token("hdr"))).await.expect("connect");
    assert_eq!(client.protocol, None, "no subprotocol was offered, none is selected");
    assert_established(&mut client, "hdr").await;
}

#[tokio::test]
async fn subprotocol_token_opens_a_socket_and_selects_exactly_jwt_auth() {
    let server = Server::start().await;
    let mut client = Client::open(&server.ws_url(), Auth::Subprotocol(server.token("sub"))).await.expect("connect");
    assert_eq!(client.protocol.as_deref(), Some("jwt-auth"));
    assert_established(&mut client, "sub").await;
}

#[tokio::test]
async fn subprotocol_token_with_base64_padding_is_accepted() {
    let server = Server::start().await;
    let token = server.token("padded");
    let encoded = base64::engine::general_purpose::URL_SAFE.encode(&token);
    let offered = format!("jwt-auth, jwt.{encoded}");
    let mut client = open_with(&server, "", &[("sec-websocket-protocol", offered)]).await;
    assert_eq!(client.protocol.as_deref(), Some("jwt-auth"));
    assert_established(&mut client, "padded").await;
}

#[tokio::test]
async fn query_token_opens_a_socket() {
    let server = Server::start().await;
    let mut client = Client::open(&server.ws_url(), Auth::Query(server.token("qry"))).await.expect("connect");
    assert_established(&mut client, "qry").await;
}

#[tokio::test]
async fn valid_header_wins_over_a_bad_subprotocol_token() {
    let server = Server::start().await;
    let headers = [
        ("authorization", format!("Bearer {}", server.token("winner"))),
        ("sec-websocket-protocol", format!("jwt-auth, jwt.{}", b64url("garbage.not.ajwt"))),
    ];
    let mut client = open_with(&server, "", &headers).await;
    assert_eq!(client.protocol.as_deref(), Some("jwt-auth"));
    assert_established(&mut client, "winner").await;
}

#[tokio::test]
async fn bad_header_with_a_valid_query_token_is_refused() {
    let server = Server::start().await;
    let query = format!("?token={}", server.token("fallback"));
    let client = open_with(&server, &query, &[("authorization", "Bearer not-a-jwt".to_string())]).await;
    assert_refused(client, "unauthorized").await;
}

#[tokio::test]
async fn bad_subprotocol_token_with_a_valid_query_token_is_refused() {
    let server = Server::start().await;
    let query = format!("?token={}", server.token("fallback"));
    let offered = format!("jwt-auth, jwt.{}", b64url(&wrong_key_token("fallback")));
    let client = open_with(&server, &query, &[("sec-websocket-protocol", offered)]).await;
    assert_eq!(client.protocol.as_deref(), Some("jwt-auth"), "jwt-auth is selected even when auth then fails");
    assert_refused(client, "unauthorized").await;
}

// ---- bad tokens (§1.2, §1.3) ----

#[tokio::test]
async fn expired_token_gets_token_expired_and_close_1008_token_expired() {
    refused_and_counted(|s| Auth::Header(expired_token(s, "late")), "token_expired").await;
}

#[tokio::test]
async fn expired_token_in_the_subprotocol_gets_token_expired() {
    refused_and_counted(|s| Auth::Subprotocol(expired_token(s, "late")), "token_expired").await;
}

/// A token whose `nbf` is an hour ahead is not valid yet (RFC 7519 §4.1.5), on the socket
/// and on the REST API.
#[tokio::test]
async fn token_not_valid_before_an_hour_ahead_is_unauthorized() {
    let early = |s: &Server| {
        let now = now();
        let claims = json!({"sub": "early", "iat": now, "nbf": now + 3600, "exp": now + 7200,
                            "type": "access", "token_type": "access"});
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(s.secret.as_bytes()))
            .expect("sign")
    };
    let server = Server::start().await;
    let response =
        reqwest::Client::new().get(server.http("/api/threads")).bearer_auth(early(&server)).send().await.expect("get");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
    refused_and_counted(|s| Auth::Header(early(s)), "unauthorized").await;
}

#[tokio::test]
async fn token_signed_with_another_key_is_unauthorized() {
    refused_and_counted(|_| Auth::Header(wrong_key_token("forger")), "unauthorized").await;
}

#[tokio::test]
async fn alg_none_token_is_unauthorized() {
    refused_and_counted(|s| Auth::Header(alg_none_token(s, "unsigned")), "unauthorized").await;
}

#[tokio::test]
async fn malformed_token_is_unauthorized() {
    refused_and_counted(|_| Auth::Header("this-is-not-a-jwt".into()), "unauthorized").await;
}

#[tokio::test]
async fn missing_token_is_unauthorized() {
    refused_and_counted(|_| Auth::None, "unauthorized").await;
}

#[tokio::test]
async fn refresh_token_on_the_socket_is_unauthorized() {
    refused_and_counted(|s| Auth::Header(refresh_token(s, "refresher")), "unauthorized").await;
}

#[tokio::test]
async fn hand_minted_token_with_a_future_exp_is_accepted() {
    // The control for the expired case: the same hand-built claims, only `exp` differs.
    let server = Server::start().await;
    let now = now();
    let claims = json!({"sub": "handmade", "iat": now, "exp": now + 600, "type": "access", "token_type": "access"});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(server.secret.as_bytes()),
    )
    .expect("sign");
    let mut client = Client::open(&server.ws_url(), Auth::Header(token)).await.expect("connect");
    assert_established(&mut client, "handmade").await;
    assert_eq!(auth_failures(&server).await, 0.0);
}

// ---- REST auth (§4.2) ----

async fn dev_login(server: &Server) -> Value {
    let response = reqwest::Client::new()
        .post(server.http("/auth/dev/login"))
        .json(&json!({"email": "dev@example.com", "password": "dev"}))
        .send()
        .await
        .expect("dev login");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("json")
}

async fn assert_detail(response: reqwest::Response, status: StatusCode) {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
}

#[tokio::test]
async fn auth_config_reports_development_mode_without_oauth() {
    let server = Server::start().await;
    let response = reqwest::get(server.http("/auth/config")).await.expect("config");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["development_mode"], true, "{body}");
    assert_eq!(body["oauth_enabled"], false, "{body}");
    assert_eq!(body["google_client_id"], "", "{body}");
}

#[tokio::test]
async fn dev_login_returns_a_bearer_pair_whose_access_token_opens_a_socket() {
    let server = Server::start().await;
    let body = dev_login(&server).await;
    assert_eq!(body["token_type"], "Bearer", "{body}");
    assert_eq!(body["expires_in"], 24 * 3600, "dev tokens live 24 h by default: {body}");
    let access = body["access_token"].as_str().expect("access_token");
    let refresh = body["refresh_token"].as_str().expect("refresh_token");
    let user = server.keys().verify(access, TokenKind::Access).expect("an access token");
    assert_eq!(user.email.as_deref(), Some("dev@example.com"));
    let again = server.keys().verify(refresh, TokenKind::Refresh).expect("a refresh token");
    assert_eq!(again.id, user.id);
    let mut client = Client::open(&server.ws_url(), Auth::Subprotocol(access.to_string())).await.expect("connect");
    assert_eq!(client.protocol.as_deref(), Some("jwt-auth"));
    assert_established(&mut client, &user.id).await;
}

#[tokio::test]
async fn dev_login_is_403_with_detail_when_disabled() {
    let server = Spawn::new().env("NETRA_DEV_LOGIN", "false").ready().await;
    let response = reqwest::Client::new()
        .post(server.http("/auth/dev/login"))
        .json(&json!({"email": "dev@example.com", "password": "dev"}))
        .send()
        .await
        .expect("dev login");
    assert_detail(response, StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn refresh_trades_a_refresh_token_for_a_new_pair() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let login = dev_login(&server).await;
    let mut refresh = login["refresh_token"].as_str().expect("refresh_token").to_string();
    for field in ["refresh_token", "refreshToken", "token"] {
        let response =
            http.post(server.http("/auth/refresh")).json(&json!({ field: refresh })).send().await.expect("refresh");
        assert_eq!(response.status(), StatusCode::OK, "field {field}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["token_type"], "Bearer", "{body}");
        assert!(body["expires_in"].as_u64().is_some_and(|s| s > 0), "{body}");
        let access = body["access_token"].as_str().expect("access_token");
        let user = server.keys().verify(access, TokenKind::Access).expect("new access token");
        assert_eq!(user.id, "dev@example.com");
        let next = body["refresh_token"].as_str().expect("refresh_token");
        assert_ne!(next, refresh, "a new refresh token");
        server.keys().verify(next, TokenKind::Refresh).expect("new refresh token");
        refresh = next.to_string();
    }
}

#[tokio::test]
async fn refresh_refuses_an_access_token_with_401_and_a_missing_one_with_422() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let login = dev_login(&server).await;
    let access = login["access_token"].as_str().expect("access_token");
    let response =
        http.post(server.http("/auth/refresh")).json(&json!({"refresh_token": access})).send().await.expect("refresh");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
    let expired = expired_token(&server, "dev@example.com");
    let response =
        http.post(server.http("/auth/refresh")).json(&json!({"refresh_token": expired})).send().await.expect("refresh");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
    let response = http.post(server.http("/auth/refresh")).json(&json!({})).send().await.expect("refresh");
    assert_detail(response, StatusCode::UNPROCESSABLE_ENTITY).await;
}

#[tokio::test]
async fn me_returns_id_user_id_and_email_and_401_without_a_token() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let login = dev_login(&server).await;
    let access = login["access_token"].as_str().expect("access_token");
    let response = http.get(server.http("/auth/me")).bearer_auth(access).send().await.expect("me");
    assert_eq!(response.status(), StatusCode::OK);
    let me: Value = response.json().await.expect("json");
    let sub = server.keys().verify(access, TokenKind::Access).expect("valid").id;
    assert_eq!(me["id"], sub.as_str(), "{me}");
    assert_eq!(me["user_id"], sub.as_str(), "{me}");
    assert_eq!(me["email"], "dev@example.com", "{me}");
    let response = http.get(server.http("/auth/me")).send().await.expect("me");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
    let response =
        http.get(server.http("/auth/me")).bearer_auth(expired_token(&server, &sub)).send().await.expect("me");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn validate_accepts_an_access_token_and_refuses_others_with_401() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let login = dev_login(&server).await;
    let access = login["access_token"].as_str().expect("access_token");
    let response = http.post(server.http("/auth/validate")).bearer_auth(access).send().await.expect("validate");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["valid"], true, "{body}");
    assert_eq!(body["user_id"], "dev@example.com", "{body}");
    assert_eq!(body["email"], "dev@example.com", "{body}");
    let response = http.post(server.http("/auth/validate")).send().await.expect("validate");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
    let refresh = login["refresh_token"].as_str().expect("refresh_token");
    let response = http.post(server.http("/auth/validate")).bearer_auth(refresh).send().await.expect("validate");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn logout_succeeds_and_session_is_always_401() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let access = server.token("leaver");
    let response = http.post(server.http("/auth/logout")).bearer_auth(&access).send().await.expect("logout");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"success": true}));
    let response = http.get(server.http("/auth/session")).send().await.expect("session");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
    let response = http.get(server.http("/auth/session")).bearer_auth(&access).send().await.expect("session");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

// ---- CORS (§4.1) ----

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().expect("ascii header").to_string())
}

async fn preflight(server: &Server, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, server.http("/api/threads"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .send()
        .await
        .expect("preflight")
}

#[tokio::test]
async fn preflight_from_the_frontend_origin_is_204_with_the_origin_echoed_and_credentials() {
    let server = Server::start().await;
    let mut statuses = Vec::new();
    for origin in [FRONTEND, "http://127.0.0.1:3000"] {
        let response = preflight(&server, origin).await;
        assert_eq!(header(&response, "access-control-allow-origin").as_deref(), Some(origin));
        assert_eq!(header(&response, "access-control-allow-credentials").as_deref(), Some("true"));
        let methods = header(&response, "access-control-allow-methods").expect("allow-methods").to_ascii_uppercase();
        for m in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert!(methods.contains(m), "{m} missing from {methods}");
        }
        let headers = header(&response, "access-control-allow-headers").expect("allow-headers").to_ascii_lowercase();
        for h in ["authorization", "content-type", "accept"] {
            assert!(headers.contains(h), "{h} missing from {headers}");
        }
        statuses.push(response.status());
    }
    assert_eq!(statuses, [StatusCode::NO_CONTENT; 2], "preflights are answered 204");
}

#[tokio::test]
async fn preflight_from_an_unconfigured_origin_gets_no_allow_origin() {
    let server = Server::start().await;
    let response = preflight(&server, "http://evil.example:3000").await;
    assert_eq!(header(&response, "access-control-allow-origin"), None);
    let get = reqwest::Client::new()
        .get(server.http("/api/threads"))
        .header("origin", "http://evil.example:3000")
        .bearer_auth(server.token("victim"))
        .send()
        .await
        .expect("threads");
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(header(&get, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn cors_origins_come_from_netra_cors_origins() {
    let server = Spawn::new().env("NETRA_CORS_ORIGINS", "https://app.example").ready().await;
    let allowed = preflight(&server, "https://app.example").await;
    assert_eq!(header(&allowed, "access-control-allow-origin").as_deref(), Some("https://app.example"));
    let default_gone = preflight(&server, FRONTEND).await;
    assert_eq!(header(&default_gone, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn get_with_an_origin_echoes_it_on_success_and_on_401() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let ok = http
        .get(server.http("/api/threads"))
        .header("origin", FRONTEND)
        .bearer_auth(server.token("corsy"))
        .send()
        .await
        .expect("threads");
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(header(&ok, "access-control-allow-origin").as_deref(), Some(FRONTEND));
    assert_eq!(header(&ok, "access-control-allow-credentials").as_deref(), Some("true"));
    // The frontend must be able to read a 401 cross-origin to try its refresh.
    let denied = http.get(server.http("/api/threads")).header("origin", FRONTEND).send().await.expect("threads");
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&denied, "access-control-allow-origin").as_deref(), Some(FRONTEND));
    assert_eq!(header(&denied, "access-control-allow-credentials").as_deref(), Some("true"));
}

// ---- Bearer on the thread API (§4.4) ----

#[tokio::test]
async fn api_threads_without_a_token_is_401_with_detail() {
    let server = Server::start().await;
    let response = reqwest::get(server.http("/api/threads?limit=20&offset=0")).await.expect("threads");
    assert_detail(response, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn api_threads_with_a_bad_token_is_401_with_detail() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let url = server.http("/api/threads?limit=20&offset=0");
    let bad = [
        ("malformed", "Bearer not-a-jwt".to_string()),
        ("expired", format!("Bearer {}", expired_token(&server, "api"))),
        ("wrong key", format!("Bearer {}", wrong_key_token("api"))),
        ("alg none", format!("Bearer {}", alg_none_token(&server, "api"))),
        ("refresh type", format!("Bearer {}", refresh_token(&server, "api"))),
        ("basic scheme", format!("Basic {}", server.token("api"))),
    ];
    for (what, value) in bad {
        let response = http.get(&url).header("authorization", value).send().await.expect("threads");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        let body: Value = response.json().await.expect("json");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}: {body}");
    }
    let response = http.get(&url).bearer_auth(server.token("api")).send().await.expect("threads");
    assert_eq!(response.status(), StatusCode::OK, "the control: a valid token is accepted");
    let body: Value = response.json().await.expect("json");
    assert!(body.is_array(), "{body}");
}
