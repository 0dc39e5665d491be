//! What a hostile or careless HTTP client can no longer do: guess passwords
//! in parallel past the throttle, make the server hash without bound,
//! register without limit, hold connections with half-sent requests, open
//! connections without limit. Every answer is asserted by its code; every
//! wait is for an event, with a generous bound that only a broken server
//! reaches.

mod api_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_support::{Answer, TestApi, start_full, start_with, test_auth_config};
use futures::future::join_all;
use pingme_gateway::config::AuthConfig;
use pingme_gateway::http::server::HttpLimits;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BAD_CREDENTIALS: u64 = 10006;
const LOGIN_RATE_LIMITED: u64 = 10007;
const AUTH_BUSY: u64 = 10010;
const RATE_LIMITED: u64 = 20005;
const METHOD_NOT_ALLOWED: u64 = 20010;
const REQUEST_TIMEOUT: u64 = 20011;

/// Longest a test waits for something that must happen; only a server
/// without the behaviour under test reaches it.
const GENEROUS: Duration = Duration::from_secs(60);

async fn login(api: &TestApi, username: &str, password: &str) -> Answer {
    api.post(
        "/v1/auth/login",
        None,
        json!({"username": username, "password": password, "device_id": "d"}),
    )
    .await
}

fn count(answers: &[Answer], status: u16, code: u64) -> usize {
    answers
        .iter()
        .filter(|a| a.status == status && a.code() == code)
        .count()
}

/// 40 wrong guesses for one username at once, limit 3: exactly 3 are
/// verified (401), every other one is refused unverified (429), and the
/// right password afterwards is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_for_one_user_get_at_most_the_limit_verified() {
    let api = start_with(AuthConfig {
        max_login_failures_per_user: 3,
        max_login_failures_per_ip: 1000,
        ..test_auth_config()
    })
    .await;
    api.register("lena").await;
    let answers = join_all((0..40).map(|n| {
        login(
            &api,
            "lena",
            if n % 2 == 0 { "wrong one" } else { "wrong two" },
        )
    }))
    .await;
    assert_eq!(count(&answers, 401, BAD_CREDENTIALS), 3, "{answers:?}");
    assert_eq!(count(&answers, 429, LOGIN_RATE_LIMITED), 37, "{answers:?}");
    login(&api, "lena", "password-lena")
        .await
        .assert_error(429, LOGIN_RATE_LIMITED);
}

/// The race of the issue: the right password sent while the limit's worth
/// of wrong guesses are still being verified gets no token, because those
/// guesses hold every slot. Determinism: the only hashing slot is held by
/// the test, so the guesses wait inside verification until it lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_right_password_behind_guesses_in_flight_gets_no_token() {
    let api = start_with(AuthConfig {
        max_login_failures_per_user: 5,
        max_login_failures_per_ip: 1000,
        password_hash_concurrency: 1,
        ..test_auth_config()
    })
    .await;
    api.register("lena").await;
    let held = api.state.passwords().slot().await.unwrap();
    let guesses: Vec<_> = (0..20)
        .map(|_| {
            let client = api.client.clone();
            let url = format!("{}/v1/auth/login", api.base);
            tokio::spawn(async move {
                let body =
                    json!({"username": "lena", "password": "a wrong guess", "device_id": "d"});
                let response = client.post(url).json(&body).send().await.unwrap();
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap();
                (status, body["code"].as_u64().unwrap())
            })
        })
        .collect();
    // Wait (bounded) until five guesses hold lena's five slots.
    let throttle = api.state.login_throttle();
    let filled = tokio::time::timeout(GENEROUS, async {
        while throttle.in_flight("lena") < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(filled.is_ok(), "the guesses never reached verification");
    login(&api, "lena", "password-lena")
        .await
        .assert_error(429, LOGIN_RATE_LIMITED);
    drop(held);
    let mut verified = 0;
    for guess in guesses {
        match guess.await.unwrap() {
            (401, BAD_CREDENTIALS) => verified += 1,
            (429, LOGIN_RATE_LIMITED) => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(verified, 5);
    assert_eq!(throttle.in_flight("lena"), 0);
}

/// 30 wrong guesses from one address for 30 usernames at once, limit 8:
/// exactly 8 verified; a real user's right password is refused after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_from_one_ip_get_at_most_the_limit_verified() {
    let api = start_with(AuthConfig {
        max_login_failures_per_user: 1000,
        max_login_failures_per_ip: 8,
        ..test_auth_config()
    })
    .await;
    api.register("mike").await;
    let api_ref = &api;
    let answers = join_all(
        (0..30).map(|n| async move { login(api_ref, &format!("guess{n}"), "whatever1").await }),
    )
    .await;
    assert_eq!(count(&answers, 401, BAD_CREDENTIALS), 8, "{answers:?}");
    assert_eq!(count(&answers, 429, LOGIN_RATE_LIMITED), 22, "{answers:?}");
    login(&api, "mike", "password-mike")
        .await
        .assert_error(429, LOGIN_RATE_LIMITED);
}

/// 16 registrations at once with a bound of 2 concurrent hashes: all
/// succeed (they queue), and no more than 2 hashes ever ran at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_hashes_never_exceed_the_bound() {
    let api = start_with(AuthConfig {
        password_hash_concurrency: 2,
        // Enough memory per hash that runs overlap when they can.
        password_hash_memory_kib: 4096,
        ..test_auth_config()
    })
    .await;
    let answers = join_all((0..16).map(|n| {
        let api = &api;
        async move {
            api.post(
                "/v1/auth/register",
                None,
                json!({"username": format!("hasher{n}"), "password": "long enough"}),
            )
            .await
        }
    }))
    .await;
    assert!(answers.iter().all(|a| a.status == 201), "{answers:?}");
    let peak = api.state.passwords().peak_concurrent();
    assert!((1..=2).contains(&peak), "peak of {peak} concurrent hashes");
}

/// While every hashing slot is taken, registrations and logins wait the
/// queue timeout and get 503 AUTH_BUSY; a busy login does not count as a
/// failure; once a slot is free, both work.
#[tokio::test]
async fn hashing_answers_auth_busy_when_every_slot_stays_taken() {
    let api = start_with(AuthConfig {
        password_hash_concurrency: 1,
        password_hash_queue_timeout: Duration::from_millis(50),
        max_login_failures_per_user: 1,
        ..test_auth_config()
    })
    .await;
    api.register("nina").await;
    let held = api.state.passwords().slot().await.unwrap();
    let answers = join_all((0..4).map(|n| {
        api.post(
            "/v1/auth/register",
            None,
            json!({"username": format!("busy{n}"), "password": "long enough"}),
        )
    }))
    .await;
    for answer in &answers {
        answer.assert_error(503, AUTH_BUSY);
    }
    login(&api, "nina", "wrong password")
        .await
        .assert_error(503, AUTH_BUSY);
    drop(held);
    // The busy login used none of nina's single allowed failure.
    let answer = login(&api, "nina", "password-nina").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        api.post(
            "/v1/auth/register",
            None,
            json!({"username": "busy0", "password": "long enough"}),
        )
        .await
        .status,
        201
    );
}

/// Registrations per address: 10 at once with a limit of 3 give exactly 3
/// accounts and 7 RATE_LIMITED answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registrations_are_throttled_per_ip() {
    let api = start_with(AuthConfig {
        max_registrations_per_ip: 3,
        ..test_auth_config()
    })
    .await;
    let answers = join_all((0..10).map(|n| {
        api.post(
            "/v1/auth/register",
            None,
            json!({"username": format!("signup{n}"), "password": "long enough"}),
        )
    }))
    .await;
    assert_eq!(
        answers.iter().filter(|a| a.status == 201).count(),
        3,
        "{answers:?}"
    );
    assert_eq!(count(&answers, 429, RATE_LIMITED), 7, "{answers:?}");
    // Invalid input is refused before it spends anything.
    api.post(
        "/v1/auth/register",
        None,
        json!({"username": "X", "password": "long enough"}),
    )
    .await
    .assert_error(400, 20006);
}

/// Log lines written while a test runs, for asserting what was logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// A failed login leaves a log line naming the username and the address,
/// never the password.
// One thread: the server's tasks run where the capturing subscriber is set.
#[tokio::test(flavor = "current_thread")]
async fn failed_logins_are_logged_with_user_and_ip_but_no_secret() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let api = start_with(AuthConfig {
        max_login_failures_per_user: 1,
        ..test_auth_config()
    })
    .await;
    api.register("oscar").await;
    login(&api, "oscar", "hunter2-secret-guess")
        .await
        .assert_error(401, BAD_CREDENTIALS);
    login(&api, "oscar", "another-secret-guess")
        .await
        .assert_error(429, LOGIN_RATE_LIMITED);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let failed = text
        .lines()
        .find(|l| l.contains("login failed"))
        .unwrap_or_else(|| panic!("no failed-login line in:\n{text}"));
    assert!(
        failed.contains("oscar") && failed.contains("127.0.0.1"),
        "{failed}"
    );
    let refused = text
        .lines()
        .find(|l| l.contains("login refused"))
        .unwrap_or_else(|| panic!("no refused-login line in:\n{text}"));
    assert!(
        refused.contains("oscar") && refused.contains("127.0.0.1"),
        "{refused}"
    );
    assert!(
        !text.contains("secret-guess"),
        "a password was logged:\n{text}"
    );
}

fn limits(change: impl FnOnce(&mut HttpLimits)) -> HttpLimits {
    let mut limits = HttpLimits {
        // Long unless a test is about it, so a loaded machine never trips it.
        header_read_timeout: Duration::from_secs(600),
        body_read_timeout: Duration::from_secs(600),
        ..HttpLimits::default()
    };
    change(&mut limits);
    limits
}

/// Reads until the server closes the connection; what it sent first.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = tokio::time::timeout(GENEROUS, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server never closed the connection");
    String::from_utf8_lossy(&received).into_owned()
}

/// Sends one keep-alive request and reads exactly its response.
async fn exchange(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(GENEROUS, async {
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed mid-response: {received:?}");
            received.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&received);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return;
                }
            }
        }
    })
    .await
    .expect("a response");
    String::from_utf8_lossy(&received).into_owned()
}

/// A request whose headers never finish is closed by the server once the
/// header timeout passes (the test waits for the close, not for a time).
#[tokio::test]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    let api = start_full(
        test_auth_config(),
        limits(|l| l.header_read_timeout = Duration::from_millis(200)),
    )
    .await;
    let mut stream = TcpStream::connect(api.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(!answer.contains("200 OK"), "{answer}");

    // A connection that sends nothing at all is closed the same way.
    let mut silent = TcpStream::connect(api.addr).await.unwrap();
    read_until_closed(&mut silent).await;
}

/// A body that stops arriving gets 408 REQUEST_TIMEOUT and a closed
/// connection.
#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_and_a_close() {
    let api = start_full(
        test_auth_config(),
        limits(|l| l.body_read_timeout = Duration::from_millis(200)),
    )
    .await;
    let mut stream = TcpStream::connect(api.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/auth/login HTTP/1.1\r\nHost: localhost\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"username\":",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(&format!("\"code\":{REQUEST_TIMEOUT}")),
        "{answer}"
    );
}

/// Past the per-IP cap a new connection is told 503 OVERLOADED and closed;
/// the admitted ones keep working, and a freed place admits again.
#[tokio::test]
async fn connections_over_the_per_ip_cap_are_refused() {
    let api = start_full(test_auth_config(), limits(|l| l.max_connections_per_ip = 2)).await;
    let mut first = TcpStream::connect(api.addr).await.unwrap();
    let mut second = TcpStream::connect(api.addr).await.unwrap();
    // Answered: both were admitted (the server accepts in arrival order).
    assert!(
        exchange(&mut first, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        exchange(&mut second, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );

    let mut third = TcpStream::connect(api.addr).await.unwrap();
    let refused = read_until_closed(&mut third).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("\"code\":40002"), "{refused}");
    assert!(
        exchange(&mut first, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );

    // Closing one frees its place once the server notices.
    drop(first);
    let admitted = tokio::time::timeout(GENEROUS, async {
        loop {
            let mut next = TcpStream::connect(api.addr).await.unwrap();
            let written = next
                .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            if written.is_ok()
                && read_until_closed(&mut next)
                    .await
                    .starts_with("HTTP/1.1 200")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(admitted.is_ok(), "a freed place was never reused");
}

/// A known route with a method it does not take answers 405 with the
/// usual error body.
#[tokio::test]
async fn wrong_methods_get_405_with_a_json_error() {
    let api = start_with(test_auth_config()).await;
    api.get("/v1/auth/login", None)
        .await
        .assert_error(405, METHOD_NOT_ALLOWED);
    api.delete("/v1/me", None)
        .await
        .assert_error(405, METHOD_NOT_ALLOWED);
}
