//! Shared by the `api_*` tests: an in-process HTTP API over a fresh
//! embedded store in a temporary directory, on 127.0.0.1:0, with an outbox
//! that records disconnects, and small JSON request helpers.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use pingme_gateway::auth::jwt::JwtAuthenticator;
use pingme_gateway::config::AuthConfig;
use pingme_gateway::http::server::HttpLimits;
use pingme_gateway::http::{self, ApiState};
use pingme_gateway::ops::Readiness;
use pingme_storage::embedded::EmbeddedStore;
use pingme_storage::{Stores, UserStore};
pub use pingme_testkit::RecordingOutbox;
use pingme_testkit::temp_store;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The secret the test servers sign with.
pub const SECRET: &[u8] = b"test-secret-0123456789abcdef";

/// A running API.
pub struct TestApi {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Arc<EmbeddedStore>,
    pub auth: Arc<JwtAuthenticator>,
    pub outbox: Arc<RecordingOutbox>,
    pub readiness: Readiness,
    /// The API's state (its password hasher, for the hashing bound).
    pub state: ApiState,
    /// The API's address.
    pub addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Auth settings for tests: small failure limits so throttling is reachable.
pub fn test_auth_config() -> AuthConfig {
    AuthConfig {
        jwt_secret: String::from_utf8(SECRET.to_vec()).unwrap(),
        max_login_failures_per_user: 3,
        max_login_failures_per_ip: 8,
        // Cheap hashes keep the tests fast; the cost is covered by a unit test.
        password_hash_memory_kib: 256,
        password_hash_iterations: 1,
        // Never AUTH_BUSY on a loaded machine unless a test asks for it.
        password_hash_queue_timeout: Duration::from_secs(300),
        max_registrations_per_ip: 1000,
        ..AuthConfig::default()
    }
}

/// Starts the API with [`test_auth_config`].
pub async fn start() -> TestApi {
    start_with(test_auth_config()).await
}

/// Starts the API with the given auth settings.
pub async fn start_with(config: AuthConfig) -> TestApi {
    start_full(config, HttpLimits::default()).await
}

/// Starts the API with the given auth settings and HTTP limits.
pub async fn start_full(config: AuthConfig, limits: HttpLimits) -> TestApi {
    let (dir, store) = temp_store();
    let auth = Arc::new(JwtAuthenticator::new(
        config.jwt_secret.as_bytes(),
        config.access_token_ttl,
        config.refresh_token_ttl,
        store.clone(),
    ));
    let stores = Stores::all_from(store.clone());
    let outbox = Arc::new(RecordingOutbox::default());
    let readiness = Readiness::new();
    let state = ApiState::new(
        stores,
        auth.clone(),
        outbox.clone(),
        &config,
        readiness.clone(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let shutdown = CancellationToken::new();
    tokio::spawn(http::serve(
        listener,
        http::router(state.clone()),
        limits,
        shutdown.clone(),
    ));
    readiness.set(true);
    TestApi {
        base,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        store,
        auth,
        outbox,
        readiness,
        state,
        addr,
        shutdown,
        _dir: dir,
    }
}

/// A response: status and JSON body (`Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// The `code` of an error body.
    pub fn code(&self) -> u64 {
        self.body["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {self:?}"))
    }

    /// Asserts an error with `status` and `code`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: u64) {
        assert_eq!((self.status, self.code()), (status, code), "{self:?}");
        assert!(self.body["message"].is_string(), "{self:?}");
    }
}

impl TestApi {
    async fn answer(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Answer { status, body }
    }

    fn with_token(
        request: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Answer {
        let request = self.client.post(format!("{}{path}", self.base)).json(&body);
        self.answer(Self::with_token(request, token)).await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> Answer {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        self.answer(request).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let request = self.client.get(format!("{}{path}", self.base));
        self.answer(Self::with_token(request, token)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Answer {
        let request = self.client.delete(format!("{}{path}", self.base));
        self.answer(Self::with_token(request, token)).await
    }

    /// Registers `username` (password `password-{username}`) and returns its id.
    pub async fn register(&self, username: &str) -> u64 {
        let a = self
            .post(
                "/v1/auth/register",
                None,
                json!({"username": username, "password": format!("password-{username}")}),
            )
            .await;
        assert_eq!(a.status, 201, "{a:?}");
        a.body["user_id"].as_u64().unwrap()
    }

    /// Logs `username` in on `device` and returns the login answer body.
    pub async fn login(&self, username: &str, device: &str) -> Value {
        let a = self
            .post(
                "/v1/auth/login",
                None,
                json!({"username": username, "password": format!("password-{username}"), "device_id": device}),
            )
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    }

    /// Registers and logs in; returns (user id, access token).
    pub async fn user(&self, username: &str) -> (u64, String) {
        let id = self.register(username).await;
        let login = self.login(username, "dev-1").await;
        (id, login["token"].as_str().unwrap().to_string())
    }

    /// Creates `n` users straight in the store (no password hashing), ids ascending.
    pub async fn bulk_users(&self, prefix: &str, n: usize) -> Vec<u64> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let user = self
                .store
                .create_user(&format!("{prefix}{i}"), "$argon2id$unused", 0)
                .await
                .unwrap();
            ids.push(user.id);
        }
        ids
    }
}
