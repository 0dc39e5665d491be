//! The HTTP API (axum): accounts, groups, conversations and history, plus
//! `/health` and `/version`. Routes and their contracts are documented in
//! `docs/api.md`. Every answer is JSON; every error is
//! `{"code", "message"}` with the status of the code table ([`error`]).
//!
//! Mount points for other teams: [`router`] returns the API's routes; the
//! integrator merges the gateway's WebSocket route (`/v1/ws`) into it. The
//! dead-letter admin routes ([`admin`]) live on the ops port instead.

mod accounts;
pub mod admin;
mod conversations;
pub mod error;
mod groups;
pub mod server;
pub mod throttle;

use std::net::{IpAddr, SocketAddr};

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use pingme_router::port::Outbox;
use pingme_storage::Stores;
use tokio_util::sync::CancellationToken;

pub use accounts::valid_username;
pub use error::{ApiError, ApiResult, http_status};

use crate::auth::jwt::JwtAuthenticator;
use crate::auth::password::{HashError, HashLimits, PasswordHasher};
use crate::auth::{Authenticator, Claims};
use crate::config::AuthConfig;
use crate::ops::{self, Readiness};
use throttle::{LoginThrottle, RegistrationThrottle};

/// Largest request body accepted (a bulk member add of 10,000 ids fits).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    stores: Stores,
    auth: Arc<JwtAuthenticator>,
    outbox: Arc<dyn Outbox>,
    throttle: LoginThrottle,
    registrations: RegistrationThrottle,
    passwords: PasswordHasher,
    readiness: Readiness,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

impl ApiState {
    /// The API's state: what it keeps in `stores`, tokens through `auth`, `outbox` to disconnect devices on logout, login
    /// throttling limits and password hashing cost from `config`, and the
    /// readiness flag `/health` reports. Fails only if the hashing cost is
    /// invalid (config validation prevents that).
    pub fn new(
        stores: Stores,
        auth: Arc<JwtAuthenticator>,
        outbox: Arc<dyn Outbox>,
        config: &AuthConfig,
        readiness: Readiness,
    ) -> Result<ApiState, HashError> {
        let passwords = PasswordHasher::new(
            config.password_hash_memory_kib,
            config.password_hash_iterations,
            HashLimits::new(
                config.password_hash_concurrency,
                config.password_hash_queue_timeout,
            ),
        )?;
        Ok(ApiState {
            inner: Arc::new(Inner {
                stores,
                auth,
                outbox,
                throttle: LoginThrottle::new(config),
                registrations: RegistrationThrottle::new(config),
                passwords,
                readiness,
            }),
        })
    }

    /// The password hasher (its bound on concurrent hashes is observable
    /// through [`PasswordHasher::peak_concurrent`]).
    pub fn passwords(&self) -> &PasswordHasher {
        &self.inner.passwords
    }

    /// The login throttle (tests watch its attempts in flight).
    pub fn login_throttle(&self) -> &LoginThrottle {
        &self.inner.throttle
    }

    fn stores(&self) -> &Stores {
        &self.inner.stores
    }
}

/// The API's routes with their state applied. Add other routers with
/// `.merge(..)` before serving.
pub fn router(state: ApiState) -> Router {
    let readiness = state.inner.readiness.clone();
    let api = Router::new()
        .route("/v1/auth/register", post(accounts::register))
        .route("/v1/auth/login", post(accounts::login))
        .route("/v1/auth/refresh", post(accounts::refresh))
        .route("/v1/auth/logout", post(accounts::logout))
        .route("/v1/me", get(accounts::me))
        .route("/v1/users/{username}", get(accounts::user_by_name))
        .route("/v1/users/by-id/{user_id}", get(accounts::user_by_id))
        .route("/v1/groups", post(groups::create))
        .route("/v1/groups/{group_id}", get(groups::get))
        .route(
            "/v1/groups/{group_id}/members",
            get(groups::members).post(groups::add_members),
        )
        .route(
            "/v1/groups/{group_id}/members/{user_id}",
            delete(groups::remove_member),
        )
        .route("/v1/groups/{group_id}/leave", post(groups::leave))
        .route("/v1/conversations", get(conversations::list))
        .route(
            "/v1/conversations/{conversation_id}/messages",
            get(conversations::history),
        )
        .fallback(|| async { ApiError::new(pingme_protocol::ErrorCode::NotFound, "no such route") })
        .with_state(state);
    let ops_routes = Router::new()
        .route("/health", get(ops::health))
        .with_state(readiness)
        .route("/version", get(ops::version));
    api.merge(ops_routes)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(middleware::from_fn(count_requests))
}

/// The answer to a known route called with a method it does not take: the
/// usual `{code, message}` body, not axum's empty one.
pub async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        pingme_protocol::ErrorCode::MethodNotAllowed,
        format!("method {method} is not allowed on this route"),
    )
}

/// Counts every request by matched route and status, and logs it at debug.
async fn count_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    tracing::debug!(
        %method,
        route = %route,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "http request"
    );
    metrics::counter!(
        ops::HTTP_REQUESTS,
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}

/// Serves `app` on `listener` (with client addresses, for login throttling)
/// under `limits` until `shutdown` is cancelled; in-flight requests finish
/// first. See [`server`] for what the limits bound.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: server::HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    server::serve(listener, app, limits, "http", shutdown).await
}

/// A JSON body whose rejections are [`ApiError`]s (bad JSON: `MALFORMED`,
/// missing or mistyped field: `INVALID_ARGUMENT`).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path parameters whose rejections are `INVALID_ARGUMENT`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Query parameters whose rejections are `INVALID_ARGUMENT`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The authenticated caller of a route: `Authorization: Bearer <access token>`,
/// valid, unexpired and not revoked.
#[derive(Debug, Clone)]
pub struct Caller(pub Claims);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::from_code(pingme_protocol::ErrorCode::AuthRequired))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    pingme_protocol::ErrorCode::AuthRequired,
                    "expected Authorization: Bearer <access token>",
                )
            })?;
        state
            .inner
            .auth
            .authenticate(token)
            .await
            .map(Caller)
            .map_err(ApiError::from_code)
    }
}

/// The client's IP, when the server runs with connect info ([`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip()),
        ))
    }
}

fn now_instant() -> Instant {
    Instant::now()
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A handler's `State`.
type ApiStateExt = State<ApiState>;
