//! JWT access and refresh tokens (HS256) and [`JwtAuthenticator`], the
//! [`Authenticator`] the sessions and the HTTP API use.
//!
//! A token carries the user, the device, the device's token generation at
//! issue time, its expiry and its kind (access or refresh). Logout bumps the
//! device's generation in the store, which revokes every token issued to the
//! device before: [`JwtAuthenticator::authenticate`] checks the signature
//! and expiry first (no I/O), then the generation in the store. There is no
//! cache: a cached generation would let a revoked token live on in other
//! gateways of a cluster, and one key read per connect or request is cheap.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use pingme_protocol::ErrorCode;
use pingme_router::store_error_code;
use pingme_storage::{StoreError, UserId, UserStore};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{Authenticator, Claims};
use crate::config::AuthConfig;

/// Longest accepted device id.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Access tokens authenticate requests and sessions; refresh tokens only
/// buy a new pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Short-lived; sent as `Authorization: Bearer` or in `Authenticate`.
    Access,
    /// Long-lived; only accepted by `POST /v1/auth/refresh`.
    Refresh,
}

/// The JWT payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenClaims {
    /// The user id, as a decimal string (JWT `sub`).
    sub: String,
    /// The device id.
    dev: String,
    /// The device's token generation at issue time.
    r#gen: u64,
    /// Access or refresh.
    typ: TokenKind,
    /// Issued at, Unix seconds.
    iat: i64,
    /// Expiry, Unix seconds.
    exp: i64,
}

/// A freshly issued access + refresh token pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenPair {
    /// The access token.
    pub token: String,
    /// The refresh token.
    pub refresh_token: String,
    /// The user.
    pub user_id: UserId,
    /// Expiry of the access token, Unix seconds.
    pub expires_at: i64,
    /// Expiry of the refresh token, Unix seconds.
    pub refresh_expires_at: i64,
}

/// Issues and checks tokens.
pub struct JwtAuthenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    access_ttl: Duration,
    refresh_ttl: Duration,
    users: Arc<dyn UserStore>,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .finish_non_exhaustive()
    }
}

/// Whether a device id is acceptable: 1..=64 of `[A-Za-z0-9._:-]`.
pub fn valid_device_id(device: &str) -> bool {
    !device.is_empty()
        && device.len() <= MAX_DEVICE_ID_LEN
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl JwtAuthenticator {
    /// An authenticator signing with `secret` (HS256), issuing access
    /// tokens valid for `access_ttl` and refresh tokens for `refresh_ttl`,
    /// checking generations in `users`.
    pub fn new(
        secret: &[u8],
        access_ttl: Duration,
        refresh_ttl: Duration,
        users: Arc<dyn UserStore>,
    ) -> JwtAuthenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        // The server both issues and checks its tokens: no clock skew to forgive.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtAuthenticator {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_ttl,
            refresh_ttl,
            users,
        }
    }

    /// An authenticator from the `auth` config section. An empty secret is
    /// replaced by 32 random bytes (the caller refuses that in production
    /// through config validation); the flag says whether that happened, so
    /// the caller can warn that tokens die with the process.
    pub fn from_config(config: &AuthConfig, users: Arc<dyn UserStore>) -> (JwtAuthenticator, bool) {
        let generated = config.jwt_secret.is_empty();
        let secret = if generated {
            let mut secret = vec![0u8; 32];
            rand::rng().fill_bytes(&mut secret);
            secret
        } else {
            config.jwt_secret.as_bytes().to_vec()
        };
        let auth = JwtAuthenticator::new(
            &secret,
            config.access_token_ttl,
            config.refresh_token_ttl,
            users,
        );
        (auth, generated)
    }

    /// Issues a token pair for the device at `generation`.
    pub fn issue(&self, user: UserId, device: &str, generation: u64) -> TokenPair {
        let now = now_secs();
        let expires_at = now + self.access_ttl.as_secs() as i64;
        let refresh_expires_at = now + self.refresh_ttl.as_secs() as i64;
        TokenPair {
            token: self.sign(user, device, generation, TokenKind::Access, now, expires_at),
            refresh_token: self.sign(
                user,
                device,
                generation,
                TokenKind::Refresh,
                now,
                refresh_expires_at,
            ),
            user_id: user,
            expires_at,
            refresh_expires_at,
        }
    }

    /// Signs one token with explicit times (tests use it to mint expired tokens).
    pub fn sign(
        &self,
        user: UserId,
        device: &str,
        generation: u64,
        kind: TokenKind,
        issued_at: i64,
        expires_at: i64,
    ) -> String {
        let claims = TokenClaims {
            sub: user.to_string(),
            dev: device.to_string(),
            r#gen: generation,
            typ: kind,
            iat: issued_at,
            exp: expires_at,
        };
        // HS256 over a serialisable struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Checks signature, expiry and kind; no store access.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<Claims, ErrorCode> {
        let data = jsonwebtoken::decode::<TokenClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => ErrorCode::TokenExpired,
                _ => ErrorCode::TokenInvalid,
            })?;
        let claims = data.claims;
        let user: UserId = claims.sub.parse().map_err(|_| ErrorCode::TokenInvalid)?;
        if claims.typ != kind || user == 0 || !valid_device_id(&claims.dev) {
            return Err(ErrorCode::TokenInvalid);
        }
        Ok(Claims {
            user,
            device: claims.dev,
            generation: claims.r#gen,
            expires_at: claims.exp,
        })
    }

    /// Checks that the device's generation still is the token's (not
    /// logged out since).
    pub async fn check_not_revoked(&self, claims: &Claims) -> Result<(), ErrorCode> {
        match self.users.device(claims.user, &claims.device).await {
            Ok(Some(device)) if device.token_generation == claims.generation => Ok(()),
            Ok(_) => Err(ErrorCode::TokenRevoked),
            Err(error) => Err(store_code(error)),
        }
    }

    /// Exchanges a valid, unrevoked refresh token for a new pair, and
    /// rotates: the device's generation is bumped, so the presented pair
    /// (refresh and access token) stops working and only the new one does.
    ///
    /// A refresh token of an older generation than the device's is a
    /// reuse: it was rotated away (or logged out) already, so someone kept
    /// a copy. The whole family is revoked (the generation is bumped again,
    /// killing the newest pair too) and [`RefreshError::Reused`] says so,
    /// for the caller to disconnect the device.
    ///
    /// Two refreshes racing with the same token both rotate; only the
    /// later pair stays valid, and the other's next refresh is a reuse.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, RefreshError> {
        let claims = self.verify(refresh_token, TokenKind::Refresh)?;
        let device = self
            .users
            .device(claims.user, &claims.device)
            .await
            .map_err(store_code)?;
        match device {
            Some(device) if device.token_generation == claims.generation => {
                let generation = self
                    .users
                    .bump_token_generation(claims.user, &claims.device)
                    .await
                    .map_err(store_code)?;
                Ok(self.issue(claims.user, &claims.device, generation))
            }
            Some(device) if device.token_generation > claims.generation => {
                self.users
                    .bump_token_generation(claims.user, &claims.device)
                    .await
                    .map_err(store_code)?;
                Err(RefreshError::Reused(claims))
            }
            _ => Err(RefreshError::Refused(ErrorCode::TokenRevoked)),
        }
    }
}

/// Why a refresh gave no new pair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The token is invalid, expired or revoked, or the store failed.
    #[error("{}", .0.name())]
    Refused(ErrorCode),
    /// A rotated-away refresh token came back: every token of the device
    /// is now revoked (answered as `TOKEN_REVOKED`).
    #[error("refresh token reused; every token of the device is revoked")]
    Reused(Claims),
}

impl RefreshError {
    /// The code the client gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            RefreshError::Refused(code) => *code,
            RefreshError::Reused(_) => ErrorCode::TokenRevoked,
        }
    }
}

impl From<ErrorCode> for RefreshError {
    fn from(code: ErrorCode) -> Self {
        RefreshError::Refused(code)
    }
}

/// The code of a store failure met while checking tokens: the store being
/// down is not the token's fault; any other store answer (an unknown user
/// or device) means the token is no good.
fn store_code(error: StoreError) -> ErrorCode {
    match store_error_code(&error) {
        code @ (ErrorCode::StorageUnavailable | ErrorCode::StorageCorrupt) => code,
        _ => ErrorCode::TokenRevoked,
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Claims, ErrorCode> {
        let claims = self.verify(token, TokenKind::Access)?;
        self.check_not_revoked(&claims).await?;
        Ok(claims)
    }
}
