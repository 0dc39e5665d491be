//! Password hashing: argon2id in PHC format, always run off the async
//! runtime (`spawn_blocking`) because one hash costs tens of milliseconds
//! at the default cost. The cost is configurable (`auth.password_hash_*`):
//! each stored hash carries its own parameters, so changing the cost only
//! affects passwords hashed afterwards.
//!
//! One hash holds about `memory_kib` of memory for its whole run (19 MiB
//! at the default cost), so the number of hashes running at once is
//! bounded ([`HashSlot`]): a hash or verification waits for a slot at most
//! the queue timeout, then gives up with [`Busy`] (`AUTH_BUSY` over HTTP)
//! instead of letting a burst of registrations grow the process by
//! gigabytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
pub enum HashError {
    /// Every hashing slot stayed taken for the whole queue timeout.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// argon2 refused the parameters or failed.
    #[error("password hashing failed: {0}")]
    Failed(String),
}

impl HashError {
    fn failed(error: impl std::fmt::Display) -> HashError {
        HashError::Failed(error.to_string())
    }
}

/// No hashing slot came free within the queue timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password hashes in progress; retry shortly")]
pub struct Busy;

/// How many hashes may run at once and how long one may wait for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashLimits {
    /// Hashes (and verifications) running at once.
    pub concurrency: usize,
    /// Longest wait for a slot before [`Busy`].
    pub queue_timeout: Duration,
}

impl HashLimits {
    /// Concurrency `configured`, or the number of cores when it is 0.
    pub fn new(configured: usize, queue_timeout: Duration) -> HashLimits {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        HashLimits {
            concurrency: if configured == 0 { cores } else { configured },
            queue_timeout,
        }
    }
}

/// Hashes and verifies passwords at one cost.
#[derive(Clone)]
pub struct PasswordHasher {
    inner: Arc<Inner>,
}

struct Inner {
    params: Params,
    limits: HashLimits,
    slots: Arc<Semaphore>,
    /// Hashes running now, and the most that ever ran at once (for the
    /// gauge and for tests of the bound).
    running: AtomicUsize,
    peak: AtomicUsize,
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
    /// passes (one lane), running at most `limits.concurrency` hashes at
    /// once. Computes its dummy hash, so it costs one hash.
    pub fn new(
        memory_kib: u32,
        iterations: u32,
        limits: HashLimits,
    ) -> Result<PasswordHasher, HashError> {
        let params = Params::new(memory_kib, iterations, 1, None).map_err(HashError::failed)?;
        if limits.concurrency == 0 {
            return Err(HashError::failed("hash concurrency must be positive"));
        }
        let dummy = hash_with(&params, "pingme-dummy-password")?;
        Ok(PasswordHasher {
            inner: Arc::new(Inner {
                params,
                limits,
                slots: Arc::new(Semaphore::new(limits.concurrency)),
                running: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                dummy,
            }),
        })
    }

    /// Waits (at most the queue timeout) for a hashing slot. [`hash`] and
    /// [`verify`] take one for each run; holding one from outside keeps
    /// that much hashing from running.
    ///
    /// [`hash`]: PasswordHasher::hash
    /// [`verify`]: PasswordHasher::verify
    pub async fn slot(&self) -> Result<HashSlot, Busy> {
        let waited = tokio::time::timeout(
            self.inner.limits.queue_timeout,
            self.inner.slots.clone().acquire_owned(),
        )
        .await;
        match waited {
            Ok(Ok(permit)) => Ok(HashSlot { _permit: permit }),
            // Timed out, or the semaphore closed (never: it is not closed).
            _ => Err(Busy),
        }
    }

    /// The most hashes that ran at once since this hasher was made.
    pub fn peak_concurrent(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// The limits this hasher runs under.
    pub fn limits(&self) -> HashLimits {
        self.inner.limits
    }

    /// Runs `work` on the blocking pool while holding a slot.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let slot = self.slot().await?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let running = inner.running.fetch_add(1, Ordering::AcqRel) + 1;
            inner.peak.fetch_max(running, Ordering::AcqRel);
            metrics::gauge!(crate::ops::PASSWORD_HASHES_RUNNING).increment(1.0);
            let result = work(&inner);
            inner.running.fetch_sub(1, Ordering::AcqRel);
            metrics::gauge!(crate::ops::PASSWORD_HASHES_RUNNING).decrement(1.0);
            // The slot is released only once the memory is given back.
            drop(slot);
            result
        })
        .await
        .map_err(HashError::failed)
    }

    /// Hashes `password` with a fresh salt, on the blocking pool.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move |inner| hash_with(&inner.params, &password))
            .await?
    }

    /// Whether `password` matches `hash`, on the blocking pool. With `hash
    /// == None` (unknown user) the same work is spent on the dummy hash and
    /// the answer is false.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Busy> {
        let verdict = self
            .run(move |inner| match hash {
                Some(hash) => verify_blocking(&password, &hash),
                None => {
                    verify_blocking(&password, &inner.dummy);
                    false
                }
            })
            .await;
        match verdict {
            Ok(verdict) => Ok(verdict),
            Err(HashError::Busy(busy)) => Err(busy),
            // The blocking task panicked: no match.
            Err(HashError::Failed(_)) => Ok(false),
        }
    }
}

/// The right to run one hash; hand it back by dropping it.
#[derive(Debug)]
pub struct HashSlot {
    _permit: OwnedSemaphorePermit,
}

fn hash_with(params: &Params, password: &str) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(HashError::failed)?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(HashError::failed)
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

/// Whether `hash` may be imported as a stored password hash (`pingme
/// users import`): an argon2 PHC string (argon2id, argon2i or argon2d)
/// with a salt and an output, at a cost within what `auth.password_hash_*`
/// may configure (memory 8 KiB..1 GiB, 1..16 passes, at most 16 lanes),
/// so an imported file cannot make each login of its users cost more
/// than the server's own setting could. The error says what is wrong.
pub fn check_imported_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC string: {e}"))?;
    if !matches!(
        parsed.algorithm.as_str(),
        "argon2id" | "argon2i" | "argon2d"
    ) {
        return Err(format!(
            "algorithm {} is not argon2id, argon2i or argon2d",
            parsed.algorithm
        ));
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("salt and hash output are both needed".into());
    }
    let params = Params::try_from(&parsed).map_err(|e| format!("argon2 parameters: {e}"))?;
    if !(8..=1024 * 1024).contains(&params.m_cost())
        || !(1..=16).contains(&params.t_cost())
        || params.p_cost() > 16
    {
        return Err(format!(
            "cost m={} t={} p={} is outside m 8..=1048576, t 1..=16, p <= 16",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_only_its_password_whatever_the_cost() {
        let cheap = PasswordHasher::new(64, 1, limits(2)).unwrap();
        let h = cheap.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{h}");
        assert!(
            cheap
                .verify("correct horse".into(), Some(h.clone()))
                .await
                .unwrap()
        );
        assert!(
            !cheap
                .verify("wrong horse".into(), Some(h.clone()))
                .await
                .unwrap()
        );
        assert!(!cheap.verify("correct horse".into(), None).await.unwrap());
        assert!(!verify_blocking("correct horse", "not a phc string"));
        // Salted: the same password hashes differently each time.
        assert_ne!(h, cheap.hash("correct horse".into()).await.unwrap());
        // A hasher at another cost still verifies it (the hash carries its cost).
        let standard =
            PasswordHasher::new(DEFAULT_MEMORY_KIB, DEFAULT_ITERATIONS, limits(1)).unwrap();
        assert!(
            standard
                .verify("correct horse".into(), Some(h))
                .await
                .unwrap()
        );
        assert!(
            PasswordHasher::new(1, 1, limits(1)).is_err(),
            "below argon2's minimum"
        );
        assert!(PasswordHasher::new(64, 1, limits(0)).is_err());
    }

    #[tokio::test]
    async fn only_argon2_hashes_within_the_configurable_cost_can_be_imported() {
        let own = PasswordHasher::new(64, 1, limits(1))
            .unwrap()
            .hash("a password".into())
            .await
            .unwrap();
        assert_eq!(check_imported_hash(&own), Ok(()));
        let salted = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
                      MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI";
        assert_eq!(check_imported_hash(salted), Ok(()));
        for bad in [
            "",
            "plain text password",
            // Other schemes verify nowhere here.
            "$2b$12$abcdefghijklmnopqrstuuQ4Q9xX8wYh8m3e3q0q1q2q3q4q5q6q7",
            "$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA",
            // No output.
            "$argon2id$v=19$m=64,t=1,p=1$c29tZXNhbHRzb21lc2FsdA",
            // A cost the server itself could not be configured with.
            "$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
             MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI",
            "$argon2id$v=19$m=64,t=100,p=1$c29tZXNhbHRzb21lc2FsdA$\
             MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI",
        ] {
            assert!(check_imported_hash(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn limits(concurrency: usize) -> HashLimits {
        HashLimits {
            concurrency,
            queue_timeout: Duration::from_secs(60),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_more_hashes_run_at_once_than_the_bound() {
        let hasher = PasswordHasher::new(256, 1, limits(2)).unwrap();
        let runs: Vec<_> = (0..16)
            .map(|n| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash(format!("password {n}")).await })
            })
            .collect();
        for run in runs {
            run.await.unwrap().unwrap();
        }
        let peak = hasher.peak_concurrent();
        assert!((1..=2).contains(&peak), "peak {peak}");
    }

    #[tokio::test]
    async fn a_hash_gives_up_when_no_slot_comes_free() {
        let hasher = PasswordHasher::new(
            64,
            1,
            HashLimits {
                concurrency: 1,
                queue_timeout: Duration::from_millis(20),
            },
        )
        .unwrap();
        let held = hasher.slot().await.unwrap();
        assert!(matches!(
            hasher.hash("password".into()).await,
            Err(HashError::Busy(Busy))
        ));
        assert_eq!(hasher.verify("password".into(), None).await, Err(Busy));
        drop(held);
        assert!(hasher.hash("password".into()).await.is_ok());
        assert_eq!(hasher.peak_concurrent(), 1);
    }
}
