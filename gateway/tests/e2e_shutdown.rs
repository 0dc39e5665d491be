//! Shutdown order against a real `pingme serve` (issue 15, item 6): while
//! the process drains, `/health` answers 503 instead of disappearing, and a
//! send in flight at SIGTERM is either acknowledged or refused with an
//! error; nothing is stored without its sender having been told.

mod e2e;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::{Conn, Server, WAIT};
use futures::{SinkExt, StreamExt};
use pingme_protocol::v1::{self, ContentType, client_frame, server_frame};
use pingme_protocol::{ClientCodec, ClientFrame, ErrorCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const SENDS: u64 = 300;

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
    let mut server = Server::start(&data).await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let conversation = format!("dm:{}:{}", alice.min(bob), alice.max(bob));

    // An HTTP request held half-sent keeps the HTTP API draining, so the
    // process cannot exit before this test has looked at /health.
    let mut held = TcpStream::connect(server.http).await.unwrap();
    held.write_all(
        format!(
            "POST /v1/auth/login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n{{",
            server.http
        )
        .as_bytes(),
    )
    .await
    .unwrap();

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
    let mut signalled = false;
    loop {
        let frame = match tokio::time::timeout(WAIT, replies.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => break,
            Err(_) => panic!("the server neither answered nor closed"),
        };
        match frame.body {
            Some(server_frame::Body::SendAck(ack)) => {
                acked.insert(ack.client_msg_id, ack.seq);
                if !signalled {
                    signalled = true;
                    server.signal_term();
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
    assert!(signalled && went_away, "go-away after the drain");

    // Draining (the held request keeps it so): both health endpoints say 503.
    let metrics = server.metrics;
    assert_eq!(
        wait_for_unready(&format!("http://{metrics}/health")).await,
        503
    );
    drop(held);
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
