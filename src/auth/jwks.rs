//! Access tokens signed by an identity provider, verified with the keys its JWKS URL
//! publishes. Only asymmetric algorithms are taken here (an HS256 token is netra's own
//! and checked against netra's secret, never against a published key), each key only
//! for the algorithm family it is (`jsonwebtoken` refuses an RSA key for HS256), and
//! the token's `alg` must match the key's own `alg` when the JWKS names one.
//!
//! Keys are cached by issuer and `kid` together: a `kid` is only unique within one
//! issuer's set, and a cache keyed by `kid` alone let one issuer's tokens pass with
//! another's key in a well-known realtime server. A `kid` not in the cache fetches the
//! set again (at most once per [`MIN_REFETCH`], so unknown kids cannot hammer the
//! provider); the whole set is refreshed after [`MAX_AGE`], so a withdrawn key stops
//! working; a failed refresh keeps the keys it had.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use tokio::time::Instant;

use super::{AuthError, User};
use crate::config::{IdentityProvider, mask_url};

/// A `kid` the cache does not know fetches the set again, but not more often than this.
const MIN_REFETCH: Duration = Duration::from_secs(30);
/// The set is fetched again once it is this old.
const MAX_AGE: Duration = Duration::from_secs(600);
/// One fetch of the set may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is not one.
const MAX_JWKS_BYTES: usize = 1 << 20;

const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why the key set could not be had.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot fetch the JWKS from {url}: {cause}")]
    Fetch { url: String, cause: String },
    #[error("the JWKS at {url} is not a key set: {cause}")]
    Invalid { url: String, cause: String },
}

struct PublishedKey {
    key: DecodingKey,
    /// The algorithm the JWKS pins the key to, if it names one.
    alg: Option<Algorithm>,
}

#[derive(Default)]
struct Cache {
    /// By (issuer, kid).
    keys: HashMap<(String, String), PublishedKey>,
    fetched_at: Option<Instant>,
    tried_at: Option<Instant>,
}

/// The provider's keys and the rules its tokens must meet.
pub struct Jwks {
    provider: IdentityProvider,
    /// The issuer the cache files keys under: the configured `iss`, or the URL itself.
    scope: String,
    client: reqwest::Client,
    cache: RwLock<Cache>,
    /// One fetch at a time; others wait for its result.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Deserialize)]
struct ProviderClaims {
    sub: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    permissions: Vec<String>,
}

impl Jwks {
    pub fn new(provider: IdentityProvider) -> Result<Self, JwksError> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| JwksError::Fetch { url: mask_url(&provider.jwks_url), cause: e.to_string() })?;
        let scope = provider.issuer.clone().unwrap_or_else(|| provider.jwks_url.clone());
        Ok(Self { provider, scope, client, cache: RwLock::default(), fetching: tokio::sync::Mutex::new(()) })
    }

    /// Fetches the key set now; startup calls it so a wrong URL is found at once.
    pub async fn load(&self) -> Result<usize, JwksError> {
        let _one = self.fetching.lock().await;
        self.fetch().await
    }

    /// Verifies a provider-signed access token.
    pub async fn verify(&self, token: &str) -> Result<User, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(AuthError::BadSignature);
        }
        let kid = header.kid.filter(|k| !k.is_empty() && k.len() <= 256).ok_or(AuthError::Malformed)?;
        self.refresh_if_needed(&kid).await;
        let cache = self.cache.read().expect("jwks lock is never held across a panic");
        let published = cache.keys.get(&(self.scope.clone(), kid)).ok_or(AuthError::UnknownKey)?;
        if published.alg.is_some_and(|alg| alg != header.alg) {
            return Err(AuthError::BadSignature);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        required.extend(self.provider.issuer.as_ref().map(|_| "iss"));
        required.extend(self.provider.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match &self.provider.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.provider.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data =
            jsonwebtoken::decode::<ProviderClaims>(token, &published.key, &validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::NotAccepted
                }
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::BadSignature
                }
                _ => AuthError::Malformed,
            })?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 128 {
            return Err(AuthError::Malformed);
        }
        Ok(User { id: c.sub, email: c.email, name: c.name, permissions: c.permissions })
    }

    /// Fetches the set again when `kid` is unknown (rate limited) or the set is old.
    async fn refresh_if_needed(&self, kid: &str) {
        let due = |cache: &Cache| {
            let known = cache.keys.contains_key(&(self.scope.clone(), kid.to_string()));
            let old = cache.fetched_at.is_none_or(|t| t.elapsed() >= MAX_AGE);
            let may_try = cache.tried_at.is_none_or(|t| t.elapsed() >= MIN_REFETCH);
            (old || !known) && may_try
        };
        if !due(&self.cache.read().expect("jwks lock is never held across a panic")) {
            return;
        }
        let _one = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        if !due(&self.cache.read().expect("jwks lock is never held across a panic")) {
            return;
        }
        self.cache.write().expect("jwks lock is never held across a panic").tried_at = Some(Instant::now());
        if let Err(e) = self.fetch().await {
            tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys already known");
        }
    }

    async fn fetch(&self) -> Result<usize, JwksError> {
        let url = &self.provider.jwks_url;
        let shown = mask_url(url);
        let fetch_error = |cause: String| JwksError::Fetch { url: shown.clone(), cause };
        let response = self.client.get(url).send().await.map_err(|e| fetch_error(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fetch_error(format!("HTTP {}", response.status().as_u16())));
        }
        if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(fetch_error("the document is larger than 1 MiB".into()));
        }
        let body = response.bytes().await.map_err(|e| fetch_error(e.to_string()))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(fetch_error("the document is larger than 1 MiB".into()));
        }
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| JwksError::Invalid { url: shown.clone(), cause: e.to_string() })?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            // A shared secret published in a key set is never a signing key here.
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            let alg = jwk.common.key_algorithm.and_then(|a| a.to_string().parse::<Algorithm>().ok());
            keys.insert((self.scope.clone(), kid), PublishedKey { key, alg });
        }
        let count = keys.len();
        let mut cache = self.cache.write().expect("jwks lock is never held across a panic");
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
        tracing::info!(keys = count, "loaded the identity provider's keys");
        Ok(count)
    }
}
