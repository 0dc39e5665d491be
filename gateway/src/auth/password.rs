//! Password hashing: argon2id in PHC format, always run off the async
//! runtime (`spawn_blocking`) because one hash costs tens of milliseconds
//! at the default cost. The cost is configurable (`auth.password_hash_*`):
//! each stored hash carries its own parameters, so changing the cost only
//! affects passwords hashed afterwards.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;

/// Shortest password accepted at registration.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted (bounds the hashing work an attacker can ask for).
pub const MAX_PASSWORD_LEN: usize = 128;
/// Default memory cost in KiB (argon2id's recommended 19 MiB).
pub const DEFAULT_MEMORY_KIB: u32 = 19 * 1024;
/// Default number of passes.
pub const DEFAULT_ITERATIONS: u32 = 2;

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes and verifies passwords at one cost.
#[derive(Clone)]
pub struct PasswordHasher {
    inner: Arc<Inner>,
}

struct Inner {
    params: Params,
    /// A hash of a fixed password at the same cost: verifying against it
    /// for unknown users keeps response times from telling which usernames
    /// exist.
    dummy: String,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher")
            .field("params", &self.inner.params)
            .finish_non_exhaustive()
    }
}

impl PasswordHasher {
    /// A hasher using argon2id with `memory_kib` KiB and `iterations`
    /// passes (one lane). Computes its dummy hash, so it costs one hash.
    pub fn new(memory_kib: u32, iterations: u32) -> Result<PasswordHasher, HashError> {
        let params =
            Params::new(memory_kib, iterations, 1, None).map_err(|e| HashError(e.to_string()))?;
        let dummy = hash_with(&params, "pingme-dummy-password")?;
        Ok(PasswordHasher {
            inner: Arc::new(Inner { params, dummy }),
        })
    }

    /// Hashes `password` with a fresh salt, on the blocking pool.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || hash_with(&inner.params, &password))
            .await
            .map_err(|e| HashError(e.to_string()))?
    }

    /// Whether `password` matches `hash`, on the blocking pool. With `hash
    /// == None` (unknown user) the same work is spent on the dummy hash and
    /// the answer is false.
    pub async fn verify(&self, password: String, hash: Option<String>) -> bool {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || match hash {
            Some(hash) => verify_blocking(&password, &hash),
            None => {
                verify_blocking(&password, &inner.dummy);
                false
            }
        })
        .await
        .unwrap_or(false)
    }
}

fn hash_with(params: &Params, password: &str) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError(e.to_string()))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// True if `password` matches the PHC `hash` (at the hash's own cost). A
/// malformed stored hash never matches.
pub fn verify_blocking(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_only_its_password_whatever_the_cost() {
        let cheap = PasswordHasher::new(64, 1).unwrap();
        let h = cheap.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{h}");
        assert!(cheap.verify("correct horse".into(), Some(h.clone())).await);
        assert!(!cheap.verify("wrong horse".into(), Some(h.clone())).await);
        assert!(!cheap.verify("correct horse".into(), None).await);
        assert!(!verify_blocking("correct horse", "not a phc string"));
        // Salted: the same password hashes differently each time.
        assert_ne!(h, cheap.hash("correct horse".into()).await.unwrap());
        // A hasher at another cost still verifies it (the hash carries its cost).
        let standard = PasswordHasher::new(DEFAULT_MEMORY_KIB, DEFAULT_ITERATIONS).unwrap();
        assert!(standard.verify("correct horse".into(), Some(h)).await);
        assert!(PasswordHasher::new(1, 1).is_err(), "below argon2's minimum");
    }
}
