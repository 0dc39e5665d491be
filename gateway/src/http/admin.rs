//! Operator routes for the router's dead letters: list them and replay one.
//! They are served on the ops port (loopback by default, beside
//! `/metrics`), never on the public API port: an operator, not an app user,
//! decides when failed work runs again. They need `Authorization: Bearer
//! <ops.admin_token>`; without a configured token they are disabled (403),
//! so an ops port opened to a network never serves them unauthenticated.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pingme_protocol::ErrorCode;
use pingme_router::Router as MessageRouter;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::ApiJson;
use super::error::ApiError;

/// Largest page of dead letters one call returns.
const MAX_LIST: usize = 500;

/// The admin routes, to nest under `/admin` on the ops app, behind the
/// admin token (`admin_token`; empty: every admin route answers 403).
pub fn routes(router: Arc<MessageRouter>, admin_token: &str) -> Router {
    let routes = Router::new()
        .route("/dead-letters", get(list))
        .route("/dead-letters/{id}/replay", post(replay))
        .with_state(router);
    let token: Option<Arc<str>> = (!admin_token.is_empty()).then(|| admin_token.into());
    routes.route_layer(middleware::from_fn_with_state(token, require_admin_token))
}

/// Lets a request through only with the configured admin token.
async fn require_admin_token(
    State(token): State<Option<Arc<str>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return ApiError::forbidden("the admin routes are disabled: set ops.admin_token")
            .into_response();
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    match presented {
        None => ApiError::new(
            ErrorCode::AuthRequired,
            "expected Authorization: Bearer <ops.admin_token>",
        )
        .into_response(),
        // Constant time: the comparison must not tell how much of a guess was right.
        Some(presented) if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(ErrorCode::TokenInvalid, "wrong admin token").into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

#[derive(Debug, Serialize)]
struct DeadLetterView {
    id: u64,
    kind: String,
    code: u32,
    error: String,
    attempts: u32,
    created_ms: i64,
    payload_bytes: usize,
}

#[derive(Debug, Serialize)]
struct DeadLetterPage {
    /// Dead letters stored in all.
    count: u64,
    dead_letters: Vec<DeadLetterView>,
}

async fn list(
    State(router): State<Arc<MessageRouter>>,
    Query(query): Query<ListQuery>,
) -> Result<ApiJson<DeadLetterPage>, ApiError> {
    let letters = router
        .dead_letters(query.after, query.limit.min(MAX_LIST))
        .await?;
    let count = router.dead_letter_count().await?;
    let dead_letters = letters
        .into_iter()
        .map(|letter| DeadLetterView {
            id: letter.id,
            kind: letter.kind,
            code: letter.code,
            error: letter.error,
            attempts: letter.attempts,
            created_ms: letter.created_ms,
            payload_bytes: letter.payload.len(),
        })
        .collect();
    Ok(ApiJson(DeadLetterPage {
        count,
        dead_letters,
    }))
}

#[derive(Debug, Serialize)]
struct Replayed {
    replayed: u64,
}

async fn replay(
    State(router): State<Arc<MessageRouter>>,
    Path(id): Path<u64>,
) -> Result<ApiJson<Replayed>, ApiError> {
    router
        .replay_dead_letter(id)
        .await
        .map_err(|error| ApiError::new(error.code(), error.to_string()))?;
    Ok(ApiJson(Replayed { replayed: id }))
}
