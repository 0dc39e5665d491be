//! Bulk provisioning of accounts, the operator's path around the HTTP API
//! (`pingme users import`): accounts whose passwords are already hashed
//! (a migration from another system, or users for a load test) go
//! straight into the configured store in batches, and optionally each gets
//! a device and an access token minted with the configured JWT secret,
//! written to a file (`user_id token` a line, what `pingme-loadgen run
//! --tokens` reads).
//!
//! Why not registration: registration hashes each password with argon2 at
//! the server's cost (tens of milliseconds and 19 MiB each by design) and
//! is throttled per address, so a million users would take hours. Import
//! never hashes: the file brings PHC strings ([`check_imported_hash`]
//! bounds their cost), so normal registration and login stay as strict as
//! they are. Minting tokens needs nothing a stranger has: whoever can read
//! the config holds the JWT secret and the store's credentials already.
//! The tokens file is a credential: it is created owner-only.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures::StreamExt;
use pingme_storage::{ImportedAccount, NewAccount, UserStore};
use serde::Deserialize;

use crate::auth::jwt::{JwtAuthenticator, valid_device_id};
use crate::auth::password::check_imported_hash;
use crate::config::AuthConfig;
use crate::http::valid_username;

/// Accounts per store call (one transaction on MySQL).
pub const DEFAULT_BATCH: usize = 1000;
/// Batches in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// One line of the import file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    username: String,
    password_hash: String,
}

/// Reads and checks the whole import file before anything is stored: a
/// bad line fails the import with its line number, and nothing is written.
/// Lines are JSON objects `{"username": ..., "password_hash": ...}`;
/// blank lines are skipped. Usernames follow registration's rule and must
/// be distinct within the file.
pub fn read_accounts(input: impl BufRead) -> anyhow::Result<Vec<NewAccount>> {
    let mut accounts = Vec::new();
    let mut seen = HashSet::new();
    for (index, line) in input.lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("reading line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ImportLine = serde_json::from_str(&line).with_context(|| {
            format!("line {number}: not {{\"username\": ..., \"password_hash\": ...}}")
        })?;
        if !valid_username(&parsed.username) {
            bail!(
                "line {number}: username {:?} must be 3 to 32 characters of a-z, 0-9, '_', '.', '-'",
                parsed.username
            );
        }
        if let Err(why) = check_imported_hash(&parsed.password_hash) {
            bail!("line {number}: password_hash: {why}");
        }
        if !seen.insert(parsed.username.clone()) {
            bail!(
                "line {number}: username {:?} appears twice",
                parsed.username
            );
        }
        accounts.push(NewAccount {
            username: parsed.username,
            password_hash: parsed.password_hash,
        });
    }
    Ok(accounts)
}

/// Where the minted tokens go, and for which device.
pub struct TokenOutput<'a> {
    /// The device every imported user gets (and its tokens name).
    pub device: &'a str,
    /// Signs the tokens (the configured secret; see [`authenticator`]).
    pub auth: &'a JwtAuthenticator,
    /// `user_id token` lines, in the file's order.
    pub out: &'a mut dyn Write,
}

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportSummary {
    /// Accounts stored.
    pub imported: usize,
    /// Tokens written.
    pub tokens: usize,
}

/// Stores `accounts` in batches of `batch` (a few in flight), in order; with
/// `tokens`, every account also gets the device and one access token.
/// On a store error the accounts of earlier batches stay stored, and the
/// error says how many those are.
pub async fn import(
    users: Arc<dyn UserStore>,
    accounts: Vec<NewAccount>,
    batch: usize,
    mut tokens: Option<TokenOutput<'_>>,
) -> anyhow::Result<ImportSummary> {
    if let Some(output) = &tokens
        && !valid_device_id(output.device)
    {
        bail!("--device must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'");
    }
    let device = tokens.as_ref().map(|t| t.device.to_string());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let batches: Vec<Vec<NewAccount>> = accounts
        .chunks(batch.max(1))
        .map(<[NewAccount]>::to_vec)
        .collect();
    let mut done = futures::stream::iter(batches)
        .map(|batch| {
            let users = users.clone();
            let device = device.clone();
            async move {
                users
                    .import_accounts(&batch, device.as_deref(), now_ms)
                    .await
            }
        })
        .buffered(BATCHES_IN_FLIGHT);
    let mut summary = ImportSummary {
        imported: 0,
        tokens: 0,
    };
    while let Some(result) = done.next().await {
        let imported: Vec<ImportedAccount> = result.with_context(|| {
            format!(
                "storing the batch after the first {} accounts (those are stored)",
                summary.imported
            )
        })?;
        summary.imported += imported.len();
        if let Some(output) = tokens.as_mut() {
            for account in &imported {
                let Some(device) = &account.device else {
                    bail!("the store made no device for {}", account.user.username);
                };
                let pair =
                    output
                        .auth
                        .issue(account.user.id, &device.device_id, device.token_generation);
                writeln!(output.out, "{} {}", account.user.id, pair.token)?;
                summary.tokens += 1;
            }
        }
    }
    if let Some(output) = tokens.as_mut() {
        output.out.flush()?;
    }
    Ok(summary)
}

/// The authenticator that mints import tokens: only with a configured
/// secret (a random one would die with this process, and no gateway
/// would accept its tokens).
pub fn authenticator(
    config: &AuthConfig,
    users: Arc<dyn UserStore>,
) -> anyhow::Result<JwtAuthenticator> {
    if config.jwt_secret.is_empty() {
        bail!("minting tokens needs auth.jwt_secret (JWT_SECRET) set to the gateways' secret");
    }
    Ok(JwtAuthenticator::from_config(config, users).0)
}

/// Creates `path` for tokens, readable and writable by its owner only.
pub fn create_tokens_file(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .with_context(|| format!("creating the tokens file {}", path.display()))
}

/// Accounts per second, for the closing line.
pub fn rate(count: usize, started: Instant) -> f64 {
    count as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pingme_storage::embedded::{Durability, EmbeddedStore};

    use super::*;
    use crate::auth::Authenticator;
    use crate::auth::password::PasswordHasher;

    fn hash_line(name: &str, hash: &str) -> String {
        format!("{{\"username\": \"{name}\", \"password_hash\": \"{hash}\"}}\n")
    }

    #[tokio::test]
    async fn imported_users_log_in_with_their_password_and_connect_with_their_token() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn UserStore> = Arc::new(
            EmbeddedStore::open(dir.path(), Durability::UnsafeNoSyncForBenchmarks).unwrap(),
        );
        let hasher = PasswordHasher::new(
            64,
            1,
            crate::auth::password::HashLimits::new(1, Duration::from_secs(30)),
        )
        .unwrap();
        let hash = hasher.hash("imported secret".into()).await.unwrap();
        let mut file = String::from("\n");
        for i in 0..5 {
            file.push_str(&hash_line(&format!("imported{i}"), &hash));
        }
        let accounts = read_accounts(file.as_bytes()).unwrap();
        assert_eq!(accounts.len(), 5);

        let mut config = crate::config::Config::default().auth;
        config.jwt_secret = "import-test-secret-0123456789abcdef".into();
        let auth = authenticator(&config, store.clone()).unwrap();
        let mut out = Vec::new();
        let summary = import(
            store.clone(),
            accounts,
            2,
            Some(TokenOutput {
                device: "bench",
                auth: &auth,
                out: &mut out,
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            summary,
            ImportSummary {
                imported: 5,
                tokens: 5
            }
        );

        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        for (i, line) in lines.iter().enumerate() {
            let (id, token) = line.split_once(' ').unwrap();
            let user = store
                .user_by_name(&format!("imported{i}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(id, user.id.to_string(), "lines in file order");
            // The token passes the gateways' check (signature and the
            // device's generation in the store).
            let claims = auth.authenticate(token).await.unwrap();
            assert_eq!((claims.user, claims.device.as_str()), (user.id, "bench"));
            // And the password works as a registered one would.
            assert!(
                hasher
                    .verify("imported secret".into(), Some(user.password_hash.clone()))
                    .await
                    .unwrap()
            );
        }
        // Logout of the device revokes its imported token like any other.
        let (id, token) = lines[0].split_once(' ').unwrap();
        store
            .bump_token_generation(id.parse().unwrap(), "bench")
            .await
            .unwrap();
        assert!(auth.authenticate(token).await.is_err());
    }

    #[test]
    fn a_bad_line_fails_the_whole_file_with_its_number() {
        let good = "$argon2id$v=19$m=64,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$\
                    MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI";
        for (file, expected) in [
            (hash_line("Bad Name", good), "line 1: username"),
            (
                hash_line("plain", "hunter2hunter2"),
                "line 1: password_hash",
            ),
            (
                format!("{}{}", hash_line("twice", good), hash_line("twice", good)),
                "line 2: username \"twice\" appears twice",
            ),
            (
                "{\"username\": \"x1x\", \"password\": \"p\"}".to_string(),
                "line 1: not",
            ),
        ] {
            let error = read_accounts(file.as_bytes()).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} for {file:?}");
        }
    }

    #[tokio::test]
    async fn tokens_need_the_configured_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn UserStore> = Arc::new(
            EmbeddedStore::open(dir.path(), Durability::UnsafeNoSyncForBenchmarks).unwrap(),
        );
        let config = crate::config::Config::default().auth;
        assert!(config.jwt_secret.is_empty());
        assert!(authenticator(&config, store).is_err());
    }
}
