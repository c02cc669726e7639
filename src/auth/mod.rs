//! Tokens and users. netra's own tokens are HS256 JWTs: the algorithm is pinned, so
//! `alg: none` or a token signed for another algorithm is rejected before its claims are
//! read. In development a secret is generated once into the data dir (mode 0600) so
//! `netra token` and the server agree without any setup. With `JWT_JWKS_URL`, access
//! tokens an identity provider signs are accepted too ([`jwks`]).

mod jwks;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

pub use self::jwks::{Jwks, JwksError};
use crate::config::Secret;

/// A token longer than this is refused before it is parsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Who a request or connection acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub permissions: Vec<String>,
}

impl User {
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), email: None, name: None, permissions: Vec::new() }
    }
}

/// Access tokens open sockets and call the API; refresh tokens only buy new pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Access,
    Refresh,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Access => "access",
            Self::Refresh => "refresh",
        }
    }
}

/// Why a token was refused. Only `Expired` is told apart to the client (§1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token is malformed")]
    Malformed,
    #[error("token signature or algorithm is invalid")]
    BadSignature,
    #[error("Token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is signed with a key the identity provider does not publish")]
    UnknownKey,
    #[error("token issuer or audience is not accepted")]
    NotAccepted,
    #[error("token is not of the right type")]
    WrongType,
}

impl AuthError {
    /// The bounded label used in metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::UnknownKey => "unknown_key",
            Self::NotAccepted => "not_accepted",
            Self::WrongType => "wrong_type",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    full_name: Option<String>,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
}

/// Signing and verifying keys for one secret, and the identity provider's keys if any.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    provider: Option<Arc<Jwks>>,
}

impl Keys {
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 0;
        validation.validate_aud = false;
        // A token with `nbf` in the future is not valid yet (RFC 7519 §4.1.5).
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            provider: None,
        }
    }

    /// Also accepts access tokens signed by `provider`.
    pub fn with_provider(mut self, provider: Arc<Jwks>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Verifies an access token a client presents: netra's own (HS256) or, with an
    /// identity provider, one it signed with a published key.
    pub async fn authenticate(&self, token: &str) -> Result<User, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        match &self.provider {
            Some(provider) if header.alg != Algorithm::HS256 => provider.verify(token).await,
            _ => self.verify(token, TokenKind::Access),
        }
    }

    /// Signs a token for `user`, with the claims the web client reads (§1.3).
    pub fn mint(&self, user: &User, kind: TokenKind, ttl: Duration) -> String {
        let now = unix_now();
        let claims = Claims {
            sub: user.id.clone(),
            exp: now + ttl.as_secs().max(1),
            iat: now,
            kind: Some(kind.as_str().into()),
            token_type: Some(kind.as_str().into()),
            email: user.email.clone(),
            name: user.name.clone(),
            full_name: user.name.clone(),
            permissions: user.permissions.clone(),
            iss: Some("netra-auth-service".into()),
            aud: Some("netra-platform".into()),
            jti: Some(uuid::Uuid::new_v4().to_string()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of serializable claims cannot fail")
    }

    /// Verifies a token and that it is of `kind`.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<User, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::BadSignature
                }
                _ => AuthError::Malformed,
            })?;
        let c = data.claims;
        let claimed = c.kind.as_deref().or(c.token_type.as_deref());
        if claimed != Some(kind.as_str()) {
            return Err(AuthError::WrongType);
        }
        if c.sub.is_empty() || c.sub.len() > 128 {
            return Err(AuthError::Malformed);
        }
        Ok(User { id: c.sub, email: c.email, name: c.name.or(c.full_name), permissions: c.permissions })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Reads the development secret from `dir/jwt_secret`, creating it (mode 0600) on
/// first use. Two processes racing here both end up with the file's one value.
pub fn dev_secret(dir: &Path) -> std::io::Result<Secret> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("jwt_secret");
    std::fs::create_dir_all(dir)?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let fresh: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut file) => {
            file.write_all(fresh.as_bytes())?;
            file.sync_all()?;
            Ok(Secret::new(fresh))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path)?;
            let text = text.trim();
            if text.len() < 16 {
                return Err(std::io::Error::other(format!(
                    "{} holds a secret shorter than 16 characters",
                    path.display()
                )));
            }
            Ok(Secret::new(text))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn keys() -> Keys {
        Keys::new(&Secret::new("0123456789abcdef0123456789abcdef"))
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let mut user = User::new("alice");
        user.email = Some("alice@example.com".into());
        let token = keys().mint(&user, TokenKind::Access, Duration::from_secs(60));
        assert_eq!(keys().verify(&token, TokenKind::Access), Ok(user));
        assert_eq!(keys().verify(&token, TokenKind::Refresh), Err(AuthError::WrongType));
    }

    #[test]
    fn wrong_key_and_alg_none_are_refused() {
        let token = keys().mint(&User::new("a"), TokenKind::Access, Duration::from_secs(60));
        let other = Keys::new(&Secret::new("another-secret-another-secret"));
        assert_eq!(other.verify(&token, TokenKind::Access), Err(AuthError::BadSignature));
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = token.split('.').nth(1).expect("three parts");
        let none = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), body);
        assert!(keys().verify(&none, TokenKind::Access).is_err());
        assert_eq!(keys().verify("not-a-jwt", TokenKind::Access), Err(AuthError::Malformed));
    }

    #[test]
    fn dev_secret_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = dev_secret(dir.path()).expect("created");
        let second = dev_secret(dir.path()).expect("read back");
        assert_eq!(first, second);
        let mode = std::fs::metadata(dir.path().join("jwt_secret")).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
