//! The HTTP API calls a client needs around its connection: register, log
//! in, create a group and add members in bulk. JSON over HTTPS (the
//! deployment's front proxy terminates TLS; `http://` stays for local
//! development); errors keep the server's stable code. Passwords travel in
//! these calls, so an `https://` API is verified like a gateway: against
//! Mozilla's roots ([`HttpApi::new`]), or a [`Trust`] policy of the app's
//! ([`HttpApi::with_trust`]).

use serde::{Deserialize, Serialize};

use crate::error::{ClientError, Result};
use crate::transport::{Trust, tls_config};

/// The HTTP API of one pingme deployment.
#[derive(Debug, Clone)]
pub struct HttpApi {
    base_url: String,
    http: reqwest::Client,
}

/// What a successful login returns.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Login {
    /// Access token for `Authenticate`.
    pub token: String,
    /// Token to get a new access token without the password.
    #[serde(default)]
    pub refresh_token: String,
    /// The logged-in user.
    pub user_id: u64,
    /// When `token` expires (as the server sent it: Unix seconds or text).
    #[serde(default)]
    pub expires_at: serde_json::Value,
}

/// A group as the API returns it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Group {
    /// The group's id.
    pub group_id: u64,
    /// Its conversation id (`g:{group_id}`), what sends name.
    pub conversation_id: String,
    /// Members, the owner included.
    pub member_count: u64,
}

#[derive(Deserialize)]
struct MembersAdded {
    member_count: u64,
}

#[derive(Deserialize)]
struct Registered {
    user_id: u64,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    message: String,
}

impl HttpApi {
    /// An API client for `base_url`, e.g. `https://chat.example.com` (its
    /// certificate checked against Mozilla's roots) or, in development,
    /// `http://127.0.0.1:8080`.
    pub fn new(base_url: impl Into<String>) -> HttpApi {
        HttpApi {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// An API client for `base_url` whose `https://` certificate is checked
    /// by `trust`, the policy the app gives its TLS and QUIC connections
    /// (its own CA, or the development certificate).
    pub fn with_trust(base_url: impl Into<String>, trust: &Trust) -> Result<HttpApi> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(trust, false)?)
            .build()?;
        Ok(HttpApi {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            http,
        })
    }

    /// The base URL calls go to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /v1/auth/register`: creates a user, returns its id.
    pub async fn register(&self, username: &str, password: &str) -> Result<u64> {
        let body = serde_json::json!({ "username": username, "password": password });
        let registered: Registered = self.post("/v1/auth/register", &body).await?;
        Ok(registered.user_id)
    }

    /// `POST /v1/auth/login`: a token for `device_id` of this user.
    pub async fn login(&self, username: &str, password: &str, device_id: &str) -> Result<Login> {
        let body = serde_json::json!({
            "username": username,
            "password": password,
            "device_id": device_id,
        });
        self.post("/v1/auth/login", &body).await
    }

    /// `POST /v1/groups`: a new group owned by the caller (`token`) with
    /// `members` (at most 10,000; add more with [`HttpApi::add_members`]).
    pub async fn create_group(&self, token: &str, name: &str, members: &[u64]) -> Result<Group> {
        let body = serde_json::json!({ "name": name, "members": members });
        self.post_as(Some(token), "/v1/groups", &body).await
    }

    /// `POST /v1/groups/{id}/members`: adds up to 10,000 users; returns the
    /// group's member count after.
    pub async fn add_members(&self, token: &str, group_id: u64, user_ids: &[u64]) -> Result<u64> {
        let body = serde_json::json!({ "user_ids": user_ids });
        let added: MembersAdded = self
            .post_as(
                Some(token),
                &format!("/v1/groups/{group_id}/members"),
                &body,
            )
            .await?;
        Ok(added.member_count)
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        self.post_as(None, path, body).await
    }

    async fn post_as<T: serde::de::DeserializeOwned>(
        &self,
        token: Option<&str>,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.json().await?);
        }
        let text = response.text().await.unwrap_or_default();
        let error: ApiErrorBody = serde_json::from_str(&text).unwrap_or(ApiErrorBody {
            code: 0,
            message: text,
        });
        Err(ClientError::Api {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
        })
    }
}
