//! Shutdown order against a real `pingme serve` (issue 15, items 4 and 6):
//! while the process drains, `/health` answers 503 on both ports instead of
//! disappearing; a send in flight at SIGTERM is either acknowledged or
//! refused with an error, nothing is stored without its sender having been
//! told; and HTTP requests still half sent when the HTTP API stops do not
//! hold the exit (the one whose body was arriving is told `SHUTTING_DOWN`).

mod e2e;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use e2e::{Conn, Server, WAIT};
use futures::{SinkExt, StreamExt};
use pingme_protocol::v1::{self, ContentType, client_frame, server_frame};
use pingme_protocol::{ClientCodec, ClientFrame, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const SENDS: u64 = 300;

/// A push webhook that holds every call until released. The router
/// finishes the pushes it took before it stops, so a held push keeps the
/// process draining for as long as the test looks at it.
struct HeldWebhook {
    url: String,
    /// Notified at the first call.
    called: Arc<Notify>,
    release: CancellationToken,
}

impl HeldWebhook {
    async fn start() -> HeldWebhook {
        let called = Arc::new(Notify::new());
        let release = CancellationToken::new();
        let push = {
            let (called, release) = (called.clone(), release.clone());
            move || {
                let (called, release) = (called.clone(), release.clone());
                async move {
                    called.notify_one();
                    release.cancelled().await;
                    StatusCode::OK
                }
            }
        };
        let app = axum::Router::new().route("/push", post(push));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/push", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        HeldWebhook {
            url,
            called,
            release,
        }
    }
}

/// Reads until the server closes the connection (a reset counts too);
/// what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut received)).await;
    assert!(closed.is_ok(), "the server never closed the connection");
    String::from_utf8_lossy(&received).into_owned()
}

/// Polls `url` until it answers something other than 200; panics if the
/// port stops answering first.
async fn wait_for_unready(url: &str) -> u16 {
    let deadline = Instant::now() + WAIT;
    loop {
        match reqwest::get(url).await {
            Ok(response) if response.status().as_u16() == 200 => {}
            Ok(response) => return response.status().as_u16(),
            Err(error) => panic!("{url} stopped answering during the drain: {error}"),
        }
        assert!(Instant::now() < deadline, "{url} never turned unready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_send_in_flight_and_health_is_503_while_draining() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let webhook = HeldWebhook::start().await;
    // The read timeouts are far away, so only the shutdown closes the
    // half-sent requests below; a held push is retried (5 s per call)
    // rather than dead-lettered while the test looks.
    let mut server = Server::start_with_http(
        &data,
        "  header_read_timeout: 600s\n  body_read_timeout: 600s\n",
        &format!(
            "push:\n  webhook_url: {}\ntask:\n  message_retry_attempts: 100\n",
            webhook.url
        ),
    )
    .await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let conversation = format!("dm:{}:{}", alice.min(bob), alice.max(bob));

    // Two HTTP requests sent in part: headers cut off, and a body of which
    // only the first byte came (after the 100 Continue that says the
    // server is reading it).
    let mut half_headers = TcpStream::connect(server.http).await.unwrap();
    half_headers
        .write_all(b"POST /v1/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-")
        .await
        .unwrap();
    let mut half_body = TcpStream::connect(server.http).await.unwrap();
    half_body
        .write_all(
            b"POST /v1/auth/login HTTP/1.1\r\nHost: localhost\r\n\
              Content-Type: application/json\r\nContent-Length: 64\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut continued = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&continued).contains("100 Continue\r\n\r\n") {
            let mut chunk = [0u8; 256];
            let n = half_body.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before 100 Continue");
            continued.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no 100 Continue");
    half_body.write_all(b"{").await.unwrap();

    // Alice pipelines sends; SIGTERM arrives once the first is acknowledged.
    let stream = TcpStream::connect(server.tcp).await.unwrap();
    let mut framed = Framed::new(stream, ClientCodec::default());
    for (request_id, body) in [
        (
            1,
            client_frame::Body::Hello(v1::Hello {
                max_version: 1,
                min_version: 1,
                client_name: "e2e-shutdown".into(),
            }),
        ),
        (
            2,
            client_frame::Body::Authenticate(v1::Authenticate {
                token: alice_token.clone(),
            }),
        ),
    ] {
        framed
            .send(ClientFrame {
                request_id,
                body: Some(body),
            })
            .await
            .unwrap();
    }
    let (mut sink, mut replies) = framed.split();
    let writer = tokio::spawn(async move {
        for i in 0..SENDS {
            let frame = ClientFrame {
                request_id: 100 + i,
                body: Some(client_frame::Body::Send(v1::SendMessage {
                    client_msg_id: format!("c-{i}"),
                    conversation_id: conversation.clone(),
                    content_type: ContentType::Text as i32,
                    body: Bytes::from(format!("m{i}")),
                })),
            };
            if sink.send(frame).await.is_err() {
                return;
            }
            // A few sends per turn, so many are in flight at SIGTERM.
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });

    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut refused = 0;
    let mut went_away = false;
    let mut watcher = None;
    loop {
        let frame = match tokio::time::timeout(WAIT, replies.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => break,
            Err(_) => panic!("the server neither answered nor closed"),
        };
        match frame.body {
            Some(server_frame::Body::SendAck(ack)) => {
                acked.insert(ack.client_msg_id, ack.seq);
                if watcher.is_none() {
                    server.signal_term();
                    // Bob is offline: the acked message is pushed, and the
                    // held push keeps the router draining (no go-away yet)
                    // until both health endpoints have been seen at 503.
                    let urls = [
                        format!("http://{}/health", server.http),
                        format!("http://{}/health", server.metrics),
                    ];
                    let (called, release) = (webhook.called.clone(), webhook.release.clone());
                    watcher = Some(tokio::spawn(async move {
                        tokio::time::timeout(WAIT, called.notified())
                            .await
                            .expect("no push reached the webhook");
                        let mut statuses = Vec::new();
                        for url in &urls {
                            statuses.push(wait_for_unready(url).await);
                        }
                        release.cancel();
                        statuses
                    }));
                }
            }
            Some(server_frame::Body::Error(error)) if frame.request_id >= 100 => {
                assert_eq!(
                    ErrorCode::from_code(error.code),
                    Some(ErrorCode::ShuttingDown),
                    "{error:?}"
                );
                refused += 1;
            }
            Some(server_frame::Body::GoAway(_)) => went_away = true,
            Some(server_frame::Body::HelloAck(_) | server_frame::Body::AuthOk(_)) => {}
            other => panic!("unexpected frame: {other:?}"),
        }
    }
    writer.abort();
    let watcher = watcher.expect("no send was acknowledged");
    assert!(went_away, "go-away after the drain");
    // Draining: both health endpoints said 503.
    assert_eq!(watcher.await.unwrap(), [503, 503]);

    // The HTTP API stops: the half-sent requests are closed at once, the
    // one whose body was arriving with SHUTTING_DOWN, and the process exits.
    let answer = read_until_closed(&mut half_body).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains(&format!("\"code\":{}", ErrorCode::ShuttingDown.code())),
        "{answer}"
    );
    let answer = read_until_closed(&mut half_headers).await;
    assert!(answer.is_empty(), "{answer}");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = server.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after the drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");

    // What was stored: every message has its ack, and the same seq.
    server.restart().await;
    let mut bob_conn = Conn::connect(server.tcp, &bob_token).await;
    let stored = bob_conn.sync().await;
    let stored_ids: HashSet<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
    for message in &stored {
        assert_eq!(
            acked.get(&message.client_msg_id),
            Some(&message.seq),
            "{} was stored as seq {} but never acknowledged",
            message.client_msg_id,
            message.seq
        );
    }
    assert_eq!(
        stored_ids.len(),
        acked.len(),
        "every ack names a stored message"
    );
    eprintln!(
        "{} acked, {refused} refused, {} unanswered (not read before the go-away)",
        acked.len(),
        SENDS as usize - acked.len() - refused
    );
}
