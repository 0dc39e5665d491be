//! Account routes: register, login (throttled), refresh, logout (revokes
//! the device's tokens and disconnects it), who-am-I and user lookup.

use axum::http::StatusCode;
use pingme_protocol::v1::{GoAway, GoAwayReason, server_frame};
use pingme_protocol::{ErrorCode, ServerFrame, encode_frame};
use pingme_storage::{StoreError, UserId, UserRecord};
use serde::{Deserialize, Serialize};

use super::{
    ApiError, ApiJson, ApiPath, ApiResult, ApiStateExt, Caller, ClientIp, now_instant, now_ms,
};
use crate::auth::jwt::{RefreshError, TokenPair, valid_device_id};
use crate::auth::password::{self, HashError};
use crate::ops;

/// Shortest username.
pub const MIN_USERNAME_LEN: usize = 3;
/// Longest username.
pub const MAX_USERNAME_LEN: usize = 32;

/// Whether a username is acceptable: 3..=32 of `[a-z0-9_.-]`.
pub fn valid_username(name: &str) -> bool {
    (MIN_USERNAME_LEN..=MAX_USERNAME_LEN).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

fn check_password_len(password: &str) -> ApiResult<()> {
    let len = password.chars().count();
    if (password::MIN_PASSWORD_LEN..=password::MAX_PASSWORD_LEN).contains(&len) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "password: must be {} to {} characters",
            password::MIN_PASSWORD_LEN,
            password::MAX_PASSWORD_LEN
        )))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterRequest {
    username: String,
    password: String,
}

#[derive(Serialize)]
pub(super) struct RegisterResponse {
    user_id: UserId,
    username: String,
}

fn count_registration(result: &'static str) {
    metrics::counter!(ops::REGISTRATIONS, "result" => result).increment(1);
}

pub(super) async fn register(
    state: ApiStateExt,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> ApiResult<(StatusCode, ApiJson<RegisterResponse>)> {
    if !valid_username(&req.username) {
        count_registration("invalid");
        return Err(ApiError::invalid(
            "username: must be 3 to 32 characters of a-z, 0-9, '_', '.', '-'",
        ));
    }
    check_password_len(&req.password).inspect_err(|_| count_registration("invalid"))?;
    // The IP's slot is taken before hashing, so parallel registrations
    // cannot all slip under the limit.
    let Some(registration) = state.inner.registrations.begin(ip, now_instant()) else {
        count_registration("rate_limited");
        tracing::warn!(ip = ?ip, "registration refused: too many from this address");
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many registrations from this address; try again later",
        ));
    };
    let hash = match state.inner.passwords.hash(req.password).await {
        Ok(hash) => hash,
        Err(HashError::Busy(busy)) => {
            count_registration("busy");
            return Err(ApiError::new(ErrorCode::AuthBusy, busy.to_string()));
        }
        Err(e) => {
            count_registration("error");
            return Err(ApiError::new(ErrorCode::Internal, e.to_string()));
        }
    };
    registration.spent(now_instant());
    match state
        .stores()
        .users
        .create_user(&req.username, &hash, now_ms())
        .await
    {
        Ok(user) => {
            count_registration("ok");
            tracing::info!(user = user.id, username = %user.username, "registered");
            Ok((
                StatusCode::CREATED,
                ApiJson(RegisterResponse {
                    user_id: user.id,
                    username: user.username,
                }),
            ))
        }
        Err(StoreError::Conflict(_)) => {
            count_registration("taken");
            Err(ApiError::new(
                ErrorCode::UsernameTaken,
                format!("username {:?} is already registered", req.username),
            ))
        }
        Err(e) => {
            count_registration("error");
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginRequest {
    username: String,
    password: String,
    device_id: String,
}

fn count_login(result: &'static str) {
    metrics::counter!(ops::LOGINS, "result" => result).increment(1);
}

pub(super) async fn login(
    state: ApiStateExt,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<ApiJson<TokenPair>> {
    if !valid_device_id(&req.device_id) {
        return Err(ApiError::invalid(
            "device_id: must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'",
        ));
    }
    if req.username.len() > MAX_USERNAME_LEN || req.password.len() > 4 * password::MAX_PASSWORD_LEN
    {
        return Err(ApiError::invalid("username or password too long"));
    }
    // A slot of the username's and the IP's failure budgets is taken
    // before the password is verified, so parallel guesses cannot all be
    // verified while the first failures are still being counted.
    let Some(attempt) = state.inner.throttle.begin(&req.username, ip, now_instant()) else {
        count_login("rate_limited");
        tracing::warn!(username = ?req.username, ip = ?ip, "login refused: too many failures");
        return Err(ApiError::new(
            ErrorCode::LoginRateLimited,
            "too many failed logins; try again later",
        ));
    };
    let user = state
        .stores()
        .users
        .user_by_name(&req.username)
        .await
        .inspect_err(|_| count_login("error"))?;
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let verified = match state.inner.passwords.verify(req.password, hash).await {
        Ok(verified) => verified,
        Err(busy) => {
            // Not the caller's failure: the attempt hands its slots back.
            count_login("busy");
            return Err(ApiError::new(ErrorCode::AuthBusy, busy.to_string()));
        }
    };
    let user = match (verified, user) {
        (true, Some(user)) => user,
        _ => {
            attempt.failed(now_instant());
            count_login("bad_credentials");
            // Who and from where, never what was typed.
            tracing::warn!(username = ?req.username, ip = ?ip, "login failed: wrong username or password");
            return Err(ApiError::new(
                ErrorCode::BadCredentials,
                "wrong username or password",
            ));
        }
    };
    attempt.succeeded(now_instant());
    let device = state
        .stores()
        .users
        .touch_device(user.id, &req.device_id, now_ms())
        .await
        .inspect_err(|_| count_login("error"))?;
    count_login("ok");
    tracing::info!(user = user.id, device = %device.device_id, "login");
    Ok(ApiJson(state.inner.auth.issue(
        user.id,
        &device.device_id,
        device.token_generation,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RefreshRequest {
    refresh_token: String,
}

pub(super) async fn refresh(
    state: ApiStateExt,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<ApiJson<TokenPair>> {
    match state.inner.auth.refresh(&req.refresh_token).await {
        Ok(pair) => Ok(ApiJson(pair)),
        Err(RefreshError::Reused(claims)) => {
            // Someone holds a copy of a rotated refresh token: the device's
            // tokens are revoked, so its connections go too, as on logout.
            let disconnected = state.inner.outbox.disconnect(
                claims.user,
                Some(&claims.device),
                logged_out_frame(),
            );
            tracing::warn!(
                user = claims.user,
                device = %claims.device,
                disconnected,
                "refresh token reused: every token of the device revoked"
            );
            Err(ApiError::new(
                ErrorCode::TokenRevoked,
                "refresh token already used; the device's tokens are revoked, log in again",
            ))
        }
        Err(RefreshError::Refused(code)) => Err(ApiError::from_code(code)),
    }
}

/// The frame a logged-out device's connections get before they close.
fn logged_out_frame() -> bytes::Bytes {
    encode_frame(&ServerFrame {
        request_id: 0,
        body: Some(server_frame::Body::GoAway(GoAway {
            reason: GoAwayReason::LoggedOut as i32,
            retry_after_ms: 0,
            reconnect_to: String::new(),
            message: "logged out".into(),
        })),
    })
}

#[derive(Serialize)]
pub(super) struct LogoutResponse {
    /// Connections of the device that were closed on this gateway.
    disconnected: usize,
}

pub(super) async fn logout(
    state: ApiStateExt,
    Caller(claims): Caller,
) -> ApiResult<ApiJson<LogoutResponse>> {
    state
        .stores()
        .users
        .bump_token_generation(claims.user, &claims.device)
        .await?;
    let disconnected =
        state
            .inner
            .outbox
            .disconnect(claims.user, Some(&claims.device), logged_out_frame());
    tracing::info!(user = claims.user, device = %claims.device, disconnected, "logout");
    Ok(ApiJson(LogoutResponse { disconnected }))
}

#[derive(Serialize)]
pub(super) struct UserView {
    user_id: UserId,
    username: String,
    created_ms: i64,
}

impl From<UserRecord> for UserView {
    fn from(user: UserRecord) -> Self {
        UserView {
            user_id: user.id,
            username: user.username,
            created_ms: user.created_ms,
        }
    }
}

#[derive(Serialize)]
pub(super) struct MeResponse {
    #[serde(flatten)]
    user: UserView,
    device_id: String,
    expires_at: i64,
}

pub(super) async fn me(
    state: ApiStateExt,
    Caller(claims): Caller,
) -> ApiResult<ApiJson<MeResponse>> {
    let user = state
        .stores()
        .users
        .user_by_id(claims.user)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "user not found"))?;
    Ok(ApiJson(MeResponse {
        user: user.into(),
        device_id: claims.device,
        expires_at: claims.expires_at,
    }))
}

pub(super) async fn user_by_name(
    state: ApiStateExt,
    _caller: Caller,
    ApiPath(username): ApiPath<String>,
) -> ApiResult<ApiJson<UserView>> {
    if !valid_username(&username) {
        return Err(ApiError::invalid("username: not a valid username"));
    }
    let user = state
        .stores()
        .users
        .user_by_name(&username)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no user {username:?}")))?;
    Ok(ApiJson(user.into()))
}

/// `GET /v1/users/by-id/{user_id}`: a user's name from their id (senders
/// and members arrive as ids).
pub(super) async fn user_by_id(
    state: ApiStateExt,
    _caller: Caller,
    ApiPath(user_id): ApiPath<UserId>,
) -> ApiResult<ApiJson<UserView>> {
    let user = state
        .stores()
        .users
        .user_by_id(user_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no user {user_id}")))?;
    Ok(ApiJson(user.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_3_to_32_of_a_small_alphabet() {
        for good in ["bob", "alice_1", "a.b-c", &"x".repeat(32)] {
            assert!(valid_username(good), "{good}");
        }
        for bad in [
            "",
            "ab",
            "Alice",
            "al ice",
            "al@ce",
            "élan",
            &"x".repeat(33),
        ] {
            assert!(!valid_username(bad), "{bad}");
        }
    }

    #[test]
    fn the_logout_frame_is_a_logged_out_go_away() {
        let frame = logged_out_frame();
        let decoded: ServerFrame =
            pingme_protocol::decode_message(frame.slice(pingme_protocol::LENGTH_PREFIX..)).unwrap();
        match decoded.body {
            Some(server_frame::Body::GoAway(g)) => {
                assert_eq!(g.reason, GoAwayReason::LoggedOut as i32)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
