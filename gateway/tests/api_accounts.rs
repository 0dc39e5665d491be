//! Accounts over HTTP: register, login, refresh, logout, bearer checks and
//! login throttling, each error asserted by its exact code.

mod api_support;

use api_support::start;
use pingme_gateway::auth::Authenticator;
use pingme_gateway::auth::jwt::{JwtAuthenticator, TokenKind};
use pingme_protocol::v1::{GoAwayReason, server_frame};
use pingme_protocol::{ErrorCode, ServerFrame};
use serde_json::json;

const MALFORMED: u64 = 20001;
const INVALID_ARGUMENT: u64 = 20006;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn register_validates_and_refuses_taken_names() {
    let api = start().await;
    let a = api
        .post(
            "/v1/auth/register",
            None,
            json!({"username": "alice", "password": "long enough"}),
        )
        .await;
    assert_eq!(a.status, 201);
    assert!(a.body["user_id"].as_u64().unwrap() > 0);
    assert_eq!(a.body["username"], "alice");

    let again = api
        .post(
            "/v1/auth/register",
            None,
            json!({"username": "alice", "password": "another one"}),
        )
        .await;
    again.assert_error(409, 10008);

    for bad in ["al", "Alice", "al ice", "a/b", &"x".repeat(33)] {
        api.post(
            "/v1/auth/register",
            None,
            json!({"username": bad, "password": "long enough"}),
        )
        .await
        .assert_error(400, INVALID_ARGUMENT);
    }
    api.post(
        "/v1/auth/register",
        None,
        json!({"username": "bob", "password": "short"}),
    )
    .await
    .assert_error(400, INVALID_ARGUMENT);
    api.post("/v1/auth/register", None, json!({"username": "bob"}))
        .await
        .assert_error(400, INVALID_ARGUMENT);
    api.post(
        "/v1/auth/register",
        None,
        json!({"username": "bob", "password": 12345678}),
    )
    .await
    .assert_error(400, INVALID_ARGUMENT);
    api.post_raw("/v1/auth/register", "{\"username\": \"bob\",")
        .await
        .assert_error(400, MALFORMED);
    api.post_raw("/v1/auth/register", "not json at all")
        .await
        .assert_error(400, MALFORMED);
    // Without a JSON content type.
    let a = api
        .answer_raw_text(
            "/v1/auth/register",
            "{\"username\":\"bob\",\"password\":\"long enough\"}",
        )
        .await;
    a.assert_error(400, MALFORMED);
}

trait RawText {
    async fn answer_raw_text(&self, path: &str, body: &'static str) -> api_support::Answer;
}

impl RawText for api_support::TestApi {
    async fn answer_raw_text(&self, path: &str, body: &'static str) -> api_support::Answer {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap();
        api_support::Answer { status, body }
    }
}

#[tokio::test]
async fn login_issues_tokens_that_authenticate() {
    let api = start().await;
    let id = api.register("carol").await;
    let login = api.login("carol", "phone-1").await;
    assert_eq!(login["user_id"], id);
    let token = login["token"].as_str().unwrap();
    assert!(login["refresh_token"].is_string());
    let expires_at = login["expires_at"].as_i64().unwrap();
    assert!(expires_at > now() && expires_at <= now() + 15 * 60 + 5);

    let me = api.get("/v1/me", Some(token)).await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.body["user_id"], id);
    assert_eq!(me.body["username"], "carol");
    assert_eq!(me.body["device_id"], "phone-1");

    // The same token is accepted by the gateway sessions' authenticator.
    let claims = api.auth.authenticate(token).await.unwrap();
    assert_eq!((claims.user, claims.device.as_str()), (id, "phone-1"));

    let found = api.get("/v1/users/carol", Some(token)).await;
    assert_eq!(
        (found.status, found.body["user_id"].as_u64()),
        (200, Some(id))
    );
    api.get("/v1/users/nobody", Some(token))
        .await
        .assert_error(404, 20008);
    api.get("/v1/users/NOPE", Some(token))
        .await
        .assert_error(400, INVALID_ARGUMENT);

    let by_id = api.get(&format!("/v1/users/by-id/{id}"), Some(token)).await;
    assert_eq!(
        (by_id.status, by_id.body["username"].as_str()),
        (200, Some("carol"))
    );
    api.get("/v1/users/by-id/999999", Some(token))
        .await
        .assert_error(404, 20008);
    api.get("/v1/users/by-id/carol", Some(token))
        .await
        .assert_error(400, INVALID_ARGUMENT);
    api.get(&format!("/v1/users/by-id/{id}"), None)
        .await
        .assert_error(401, 10001);
}

#[tokio::test]
async fn login_refuses_bad_credentials_and_bad_input() {
    let api = start().await;
    api.register("dave").await;
    let wrong = |user: &str, password: &str| json!({"username": user, "password": password, "device_id": "d1"});
    api.post("/v1/auth/login", None, wrong("dave", "not the password"))
        .await
        .assert_error(401, 10006);
    api.post("/v1/auth/login", None, wrong("nobody", "password-nobody"))
        .await
        .assert_error(401, 10006);
    api.post(
        "/v1/auth/login",
        None,
        json!({"username": "dave", "password": "password-dave"}),
    )
    .await
    .assert_error(400, INVALID_ARGUMENT);
    for device in ["", "has space", &"d".repeat(65)] {
        api.post(
            "/v1/auth/login",
            None,
            json!({"username": "dave", "password": "password-dave", "device_id": device}),
        )
        .await
        .assert_error(400, INVALID_ARGUMENT);
    }
    api.post_raw("/v1/auth/login", "{\"username\": ")
        .await
        .assert_error(400, MALFORMED);
}

#[tokio::test]
async fn bearer_tokens_are_checked() {
    let api = start().await;
    let (id, token) = api.user("erin").await;

    api.get("/v1/me", None).await.assert_error(401, 10001);
    let basic = api
        .client
        .get(format!("{}/v1/me", api.base))
        .header("authorization", "Basic ZXJpbjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 401);
    let body: serde_json::Value = basic.json().await.unwrap();
    assert_eq!(body["code"], 10001);

    api.get("/v1/me", Some("not.a.jwt"))
        .await
        .assert_error(401, 10002);

    // Signed with another secret: forged.
    let forger = JwtAuthenticator::new(
        b"some-other-secret-entirely",
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
        api.store.clone(),
    );
    let forged = forger.sign(id, "dev-1", 0, TokenKind::Access, now(), now() + 600);
    api.get("/v1/me", Some(&forged))
        .await
        .assert_error(401, 10002);

    // Our secret, but expired.
    let expired = api.auth.sign(
        id,
        "dev-1",
        0,
        TokenKind::Access,
        now() - 7200,
        now() - 3600,
    );
    api.get("/v1/me", Some(&expired))
        .await
        .assert_error(401, 10003);
    assert_eq!(
        api.auth.authenticate(&expired).await,
        Err(ErrorCode::TokenExpired)
    );

    // A refresh token is not an access token.
    let login = api.login("erin", "dev-2").await;
    api.get("/v1/me", login["refresh_token"].as_str())
        .await
        .assert_error(401, 10002);

    // A token for a device that never logged in is not valid.
    let ghost = api
        .auth
        .sign(id, "ghost-device", 0, TokenKind::Access, now(), now() + 600);
    api.get("/v1/me", Some(&ghost))
        .await
        .assert_error(401, 10004);

    assert_eq!(api.get("/v1/me", Some(&token)).await.status, 200);
}

#[tokio::test]
async fn refresh_exchanges_a_refresh_token_for_a_new_pair() {
    let api = start().await;
    api.register("frank").await;
    let login = api.login("frank", "laptop").await;
    let refreshed = api
        .post(
            "/v1/auth/refresh",
            None,
            json!({"refresh_token": login["refresh_token"]}),
        )
        .await;
    assert_eq!(refreshed.status, 200, "{refreshed:?}");
    assert_eq!(refreshed.body["user_id"], login["user_id"]);
    let new_token = refreshed.body["token"].as_str().unwrap();
    assert_eq!(api.get("/v1/me", Some(new_token)).await.status, 200);

    api.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": login["token"]}),
    )
    .await
    .assert_error(401, 10002);
    api.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": "garbage"}),
    )
    .await
    .assert_error(401, 10002);
    api.post("/v1/auth/refresh", None, json!({}))
        .await
        .assert_error(400, INVALID_ARGUMENT);
    let user = login["user_id"].as_u64().unwrap();
    let expired = api.auth.sign(
        user,
        "laptop",
        0,
        TokenKind::Refresh,
        now() - 100,
        now() - 10,
    );
    api.post("/v1/auth/refresh", None, json!({"refresh_token": expired}))
        .await
        .assert_error(401, 10003);
}

#[tokio::test]
async fn logout_revokes_the_device_and_disconnects_it() {
    let api = start().await;
    let user = api.register("gina").await;
    let phone = api.login("gina", "phone").await;
    let laptop = api.login("gina", "laptop").await;
    let phone_token = phone["token"].as_str().unwrap();
    // The phone has one connection open.
    api.outbox.connect(
        user,
        pingme_router::port::ConnRef {
            shard: 0,
            conn_id: 1,
        },
    );

    let out = api
        .post("/v1/auth/logout", Some(phone_token), json!({}))
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.body["disconnected"], 1);

    // The device's connections were told to go away, with LOGGED_OUT.
    let disconnects = api.outbox.disconnects.lock().unwrap().clone();
    assert_eq!(disconnects.len(), 1);
    assert_eq!(disconnects[0].user, user);
    assert_eq!(disconnects[0].device.as_deref(), Some("phone"));
    let frame: ServerFrame = pingme_protocol::decode_message(
        disconnects[0].frame.slice(pingme_protocol::LENGTH_PREFIX..),
    )
    .unwrap();
    match frame.body {
        Some(server_frame::Body::GoAway(g)) => {
            assert_eq!(g.reason, GoAwayReason::LoggedOut as i32)
        }
        other => panic!("expected GoAway, got {other:?}"),
    }

    // Both of the phone's tokens are revoked; the laptop is untouched.
    api.get("/v1/me", Some(phone_token))
        .await
        .assert_error(401, 10004);
    assert_eq!(
        api.auth.authenticate(phone_token).await,
        Err(ErrorCode::TokenRevoked)
    );
    api.post(
        "/v1/auth/refresh",
        None,
        json!({"refresh_token": phone["refresh_token"]}),
    )
    .await
    .assert_error(401, 10004);
    api.post("/v1/auth/logout", Some(phone_token), json!({}))
        .await
        .assert_error(401, 10004);
    assert_eq!(
        api.get("/v1/me", laptop["token"].as_str()).await.status,
        200
    );

    // Logging in again on the phone gives working tokens.
    let again = api.login("gina", "phone").await;
    assert_eq!(api.get("/v1/me", again["token"].as_str()).await.status, 200);

    api.post("/v1/auth/logout", None, json!({}))
        .await
        .assert_error(401, 10001);
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_username() {
    let api = start().await; // 3 failures per username
    api.register("hank").await;
    api.register("ivy").await;
    let attempt =
        |password: &str| json!({"username": "hank", "password": password, "device_id": "d"});
    for _ in 0..3 {
        api.post("/v1/auth/login", None, attempt("wrong password"))
            .await
            .assert_error(401, 10006);
    }
    api.post("/v1/auth/login", None, attempt("wrong password"))
        .await
        .assert_error(429, 10007);
    // Even the right password is refused until the window ends.
    api.post("/v1/auth/login", None, attempt("password-hank"))
        .await
        .assert_error(429, 10007);
    // Other users are not affected.
    api.login("ivy", "d").await;
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_ip() {
    let api = start().await; // 8 failures per IP
    api.register("jack").await;
    for n in 0..8 {
        api.post(
            "/v1/auth/login",
            None,
            json!({"username": format!("guess{n}"), "password": "whatever1", "device_id": "d"}),
        )
        .await
        .assert_error(401, 10006);
    }
    // A ninth username from the same address, even a real one with its
    // password, is refused.
    api.post(
        "/v1/auth/login",
        None,
        json!({"username": "jack", "password": "password-jack", "device_id": "d"}),
    )
    .await
    .assert_error(429, 10007);
}

#[tokio::test]
async fn successful_logins_are_never_throttled() {
    let api = start().await;
    api.register("kate").await;
    for n in 0..12 {
        api.login("kate", &format!("device-{n}")).await;
    }
}

#[tokio::test]
async fn unknown_routes_are_json_not_found() {
    let api = start().await;
    api.get("/v1/nothing-here", None)
        .await
        .assert_error(404, 20008);
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_parsing() {
    let api = start().await;
    let huge = format!(
        "{{\"username\": \"big\", \"password\": \"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let response = api
        .client
        .post(format!("{}/v1/auth/register", api.base))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], 20007);
}

/// Refresh tokens rotate: each use gives a new pair and ends the old one.
/// A rotated-away refresh token coming back means someone kept a copy:
/// every token of that device is revoked (the newest pair too) and its
/// connections are closed; other devices are untouched.
#[tokio::test]
async fn refresh_rotates_and_a_reused_refresh_token_revokes_the_family() {
    let api = start().await;
    let user = api.register("quinn").await;
    let laptop = api.login("quinn", "laptop").await;
    let first = api.login("quinn", "tablet").await;
    let refresh = |pair: &serde_json::Value| json!({"refresh_token": pair["refresh_token"]});

    let second = api.post("/v1/auth/refresh", None, refresh(&first)).await;
    assert_eq!(second.status, 200, "{second:?}");
    let second = second.body;
    api.get("/v1/me", first["token"].as_str())
        .await
        .assert_error(401, 10004);
    assert_eq!(
        api.get("/v1/me", second["token"].as_str()).await.status,
        200
    );
    let third = api.post("/v1/auth/refresh", None, refresh(&second)).await;
    assert_eq!(third.status, 200, "{third:?}");
    let third = third.body;
    assert!(api.outbox.disconnects.lock().unwrap().is_empty());

    // The first refresh token again: a reuse.
    api.post("/v1/auth/refresh", None, refresh(&first))
        .await
        .assert_error(401, 10004);
    let disconnects = api.outbox.disconnects.lock().unwrap().clone();
    assert_eq!(disconnects.len(), 1);
    assert_eq!(
        (disconnects[0].user, disconnects[0].device.as_deref()),
        (user, Some("tablet"))
    );
    api.get("/v1/me", third["token"].as_str())
        .await
        .assert_error(401, 10004);
    api.post("/v1/auth/refresh", None, refresh(&third))
        .await
        .assert_error(401, 10004);

    assert_eq!(
        api.get("/v1/me", laptop["token"].as_str()).await.status,
        200
    );
    let again = api.login("quinn", "tablet").await;
    assert_eq!(api.get("/v1/me", again["token"].as_str()).await.status, 200);
}
