//! Authentication: who a token says the caller is. The connection sessions
//! and the HTTP API both go through [`Authenticator`]; the JWT
//! implementation lives beside this trait.

pub mod jwt;
pub mod password;

use async_trait::async_trait;
use pingme_protocol::ErrorCode;

/// What a valid access token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user.
    pub user: u64,
    /// The device the token was issued to.
    pub device: String,
    /// The device's token generation at issue time (logout bumps it).
    pub generation: u64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

/// Checks access tokens.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The claims of a valid, unexpired, unrevoked access token, or the
    /// error code saying why not (`TokenInvalid`, `TokenExpired`,
    /// `TokenRevoked`, `StorageUnavailable`).
    async fn authenticate(&self, token: &str) -> Result<Claims, ErrorCode>;
}
