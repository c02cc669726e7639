//! Access tokens from an identity provider (`JWT_JWKS_URL`), against a JWKS server written
//! here that publishes the test keys in tests/fixtures/jwks. Covers RS256 and ES256, key
//! rotation, the attacks on JWT verification (alg none, HS256 with the public key as the
//! secret, another issuer's key under a known kid, wrong issuer or audience, expiry, nbf,
//! oversized tokens), and that no token reaches the log.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use common::{Auth, Client, Server, Spawn};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "netra";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/jwks/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn jwk(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).expect("a JWK")
}

/// The provider's JWKS endpoint: serves whatever keys the test sets, counting fetches.
#[derive(Clone)]
struct Provider {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    url: String,
}

impl Provider {
    async fn start(keys: Vec<Value>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().expect("addr"));
        let provider = Self { keys: Arc::new(Mutex::new(keys)), fetches: Arc::default(), url };
        let router = axum::Router::new()
            .route(
                "/.well-known/jwks.json",
                get(|State(p): State<Provider>| async move {
                    p.fetches.fetch_add(1, Ordering::SeqCst);
                    Json(json!({"keys": p.keys.lock().expect("keys").clone()}))
                }),
            )
            .with_state(provider.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        provider
    }

    async fn netra(&self) -> Server {
        Spawn::new()
            .env("JWT_JWKS_URL", self.url.clone())
            .env("JWT_ISSUER", ISSUER)
            .env("JWT_AUDIENCE", AUDIENCE)
            .env("NETRA_LOG", "debug")
            .ready()
            .await
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// Claims the provider would sign for `sub`, valid for an hour.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 3600, "email": format!("{sub}@example.test")})
}

fn sign(alg: Algorithm, kid: &str, pem: &str, claims: &Value) -> String {
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(fixture(pem).as_bytes()),
        _ => EncodingKey::from_rsa_pem(fixture(pem).as_bytes()),
    }
    .expect("a private key");
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

/// Opens a socket with `token`; `Ok(user_id)` from the hello, or the refusal's code.
async fn socket_user(server: &Server, token: &str) -> Result<String, String> {
    let mut client = Client::open(&server.ws_url(), Auth::Header(token.into())).await.expect("upgrade");
    let first = client.next().await;
    if first["type"] == "error" {
        return Err(first["payload"]["code"].as_str().unwrap_or_default().to_string());
    }
    Ok(first["payload"]["user_id"].as_str().expect("user_id").to_string())
}

async fn rest_status(server: &Server, token: &str) -> u16 {
    reqwest::Client::new()
        .get(server.http("/api/threads"))
        .bearer_auth(token)
        .send()
        .await
        .expect("get")
        .status()
        .as_u16()
}

#[tokio::test]
async fn rs256_and_es256_tokens_of_the_provider_open_sockets_and_call_the_api() {
    let provider = Provider::start(vec![jwk("rs256.jwk.json"), jwk("es256.jwk.json")]).await;
    let server = provider.netra().await;
    let rsa = sign(Algorithm::RS256, "rsa-1", "rs256.pem", &claims("idp-alice"));
    let ec = sign(Algorithm::ES256, "ec-1", "es256.pem", &claims("idp-bob"));
    assert_eq!(socket_user(&server, &rsa).await, Ok("idp-alice".into()));
    assert_eq!(socket_user(&server, &ec).await, Ok("idp-bob".into()));
    assert_eq!(rest_status(&server, &rsa).await, 200);
    // The provider's user chats like anyone else.
    let mut client = Client::open(&server.ws_url(), Auth::Subprotocol(ec.clone())).await.expect("upgrade");
    client.next().await;
    client.next().await;
    let frames = client.chat("what is 2 + 3?", None).await;
    assert_eq!(frames.last().expect("frames")["type"], "final_report");
    // netra's own tokens still work beside the provider's.
    assert_eq!(socket_user(&server, &server.token("local")).await, Ok("local".into()));
    assert_eq!(provider.fetches(), 1, "the keys are fetched once at start and cached");
    let log = server.stderr();
    for token in [&rsa, &ec] {
        let signature = token.rsplit('.').next().expect("signature");
        assert!(!log.contains(signature), "a token reached the log");
    }
}

#[tokio::test]
async fn the_attacks_on_jwt_verification_are_refused() {
    let provider = Provider::start(vec![jwk("rs256.jwk.json"), jwk("es256.jwk.json")]).await;
    let server = provider.netra().await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let mut attacks: Vec<(&str, String)> = Vec::new();
    // alg none with a known kid.
    attacks
        .push(("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "kid": "rsa-1"})), b64(&claims("mallory")))));
    // HS256 signed with the provider's public key as the secret (algorithm confusion).
    let public = jwk("rs256.jwk.json")["n"].as_str().expect("n").to_string();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused =
        jsonwebtoken::encode(&header, &claims("mallory"), &EncodingKey::from_secret(public.as_bytes())).expect("sign");
    attacks.push(("HS256 with the public key", confused));
    // Another issuer's key under the provider's kid.
    attacks.push(("another key, same kid", sign(Algorithm::RS256, "rsa-1", "other.pem", &claims("mallory"))));
    // The ES256 key used under the RSA key's kid, and an RSA token claiming the EC key's kid.
    attacks.push(("ES256 under an RSA kid", sign(Algorithm::ES256, "rsa-1", "es256.pem", &claims("mallory"))));
    attacks.push(("RS256 under an EC kid", sign(Algorithm::RS256, "ec-1", "rs256.pem", &claims("mallory"))));
    let mut wrong_iss = claims("mallory");
    wrong_iss["iss"] = json!("https://evil.example.test");
    attacks.push(("wrong issuer", sign(Algorithm::RS256, "rsa-1", "rs256.pem", &wrong_iss)));
    let mut wrong_aud = claims("mallory");
    wrong_aud["aud"] = json!("someone-else");
    attacks.push(("wrong audience", sign(Algorithm::RS256, "rsa-1", "rs256.pem", &wrong_aud)));
    let mut no_aud = claims("mallory");
    no_aud.as_object_mut().expect("object").remove("aud");
    attacks.push(("no audience", sign(Algorithm::RS256, "rsa-1", "rs256.pem", &no_aud)));
    let mut expired = claims("mallory");
    expired["exp"] = json!(now() - 60);
    attacks.push(("expired", sign(Algorithm::RS256, "rsa-1", "rs256.pem", &expired)));
    let mut early = claims("mallory");
    early["nbf"] = json!(now() + 3600);
    attacks.push(("not valid yet", sign(Algorithm::RS256, "rsa-1", "rs256.pem", &early)));
    let mut huge = claims("mallory");
    huge["padding"] = json!("x".repeat(64 * 1024));
    attacks.push(("oversized", sign(Algorithm::RS256, "rsa-1", "rs256.pem", &huge)));
    attacks.push(("no kid", {
        let key = EncodingKey::from_rsa_pem(fixture("rs256.pem").as_bytes()).expect("key");
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims("mallory"), &key).expect("sign")
    }));
    for (what, token) in &attacks {
        let refused = socket_user(&server, token).await;
        assert!(
            matches!(&refused, Err(code) if code == "unauthorized" || code == "token_expired"),
            "{what}: {refused:?}"
        );
        assert_eq!(rest_status(&server, token).await, 401, "{what}");
    }
    assert!(provider.fetches() <= 2, "bad tokens do not make netra hammer the provider: {}", provider.fetches());
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart_and_unknown_kids_are_rate_limited() {
    let provider = Provider::start(vec![jwk("rs256.jwk.json")]).await;
    let server = provider.netra().await;
    let ec = sign(Algorithm::ES256, "ec-1", "es256.pem", &claims("rotated"));
    // The provider starts signing with a new key: its kid is unknown, netra fetches again.
    provider.keys.lock().expect("keys").push(jwk("es256.jwk.json"));
    assert_eq!(socket_user(&server, &ec).await, Ok("rotated".into()));
    assert_eq!(provider.fetches(), 2);
    // Unknown kids fetch at most once per interval, however many tokens carry them.
    for _ in 0..5 {
        let stray = sign(Algorithm::ES256, "ec-2", "es256.pem", &claims("stray"));
        assert!(socket_user(&server, &stray).await.is_err());
    }
    assert_eq!(provider.fetches(), 2, "no fetch for ec-2 within the interval after the last one");
}

#[tokio::test]
async fn a_provider_that_cannot_be_reached_stops_startup_naming_auth() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let mut server = Spawn::new().env("JWT_JWKS_URL", format!("http://127.0.0.1:{port}/jwks.json")).start().await;
    assert_eq!(server.wait_exit().await, Some(1));
    let stderr = server.stderr();
    assert!(stderr.lines().any(|l| l.contains("component auth") && l.contains("JWKS")), "{stderr}");
}
