//! Sessions over real sockets: every transport's round trip, and every way
//! a session ends badly (auth timeout, bad token, malformed and oversize
//! frames, floods, slow readers, idleness, replacement, shutdown).

mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{Harness, Kind, TestClient, error_of, limits, send_message};
use pingme_gateway::SessionLimits;
use pingme_protocol::v1::{self, GoAwayReason, client_frame, server_frame};
use pingme_protocol::{ErrorCode, ServerFrame, encode_frame};
use pingme_router::port::Outbox;

async fn round_trip(kind: Kind) {
    let harness = Harness::start(limits(), 2).await;
    let mut alice = harness.connect(kind).await;
    let ack = alice.hello().await;
    assert_eq!(ack.version, 1);
    assert_eq!(ack.max_frame_size, 64 * 1024);
    // The limits an SDK cannot learn otherwise.
    let limits = limits();
    assert_eq!(
        (
            ack.messages_per_second,
            ack.send_burst,
            ack.refusals_before_disconnect
        ),
        (limits.messages_per_second, limits.burst, limits.burst)
    );
    assert_eq!(ack.max_body_bytes, 64 * 1024);
    assert_eq!(ack.max_queued_bytes as usize, limits.max_queued_bytes);
    let ok = {
        let id = alice
            .send(client_frame::Body::Authenticate(v1::Authenticate {
                token: "7:phone".into(),
            }))
            .await;
        match alice.recv_body().await {
            (rid, server_frame::Body::AuthOk(ok)) if rid == id => ok,
            other => panic!("expected AuthOk, got {other:?}"),
        }
    };
    assert_eq!((ok.user_id, ok.device_id.as_str()), (7, "phone"));
    assert_eq!(alice.ping().await.client_time_ms, 42);

    let mut bob = harness.connect(kind).await;
    bob.login(8, "laptop").await;
    let sent = alice.send(send_message("dm:7:8", "c-1")).await;
    match alice.recv_body().await {
        (id, server_frame::Body::SendAck(ack)) => {
            assert_eq!(id, sent);
            assert_eq!(ack.client_msg_id, "c-1");
        }
        other => panic!("expected SendAck, got {other:?}"),
    }
    match bob.recv_body().await {
        (0, server_frame::Body::Deliver(deliver)) => {
            let message = deliver.message.unwrap();
            assert_eq!(message.sender_id, 7);
            assert_eq!(&message.body[..], b"hello");
        }
        other => panic!("expected Deliver, got {other:?}"),
    }
    let sessions = harness.dispatch.connected_sessions();
    assert!(
        sessions
            .iter()
            .any(|s| s.user == 7 && &*s.device == "phone")
    );
    assert_eq!(
        harness.connections.online(&[7, 8, 9]),
        vec![true, true, false]
    );

    drop(alice);
    harness
        .dispatch
        .wait_for("alice's disconnect", |seen| {
            seen.disconnected.iter().any(|s| s.user == 7)
        })
        .await;
    assert_eq!(harness.connections.online(&[7, 8]), vec![false, true]);
}

#[tokio::test]
async fn tcp_round_trip() {
    round_trip(Kind::Tcp).await;
}

#[tokio::test]
async fn tls_round_trip() {
    round_trip(Kind::Tls).await;
}

#[tokio::test]
async fn quic_round_trip() {
    round_trip(Kind::Quic).await;
}

#[tokio::test]
async fn websocket_round_trip() {
    round_trip(Kind::Ws).await;
}

/// QUIC stacks require ALPN: the server speaks only `pingme/1` and refuses
/// a handshake that offers nothing or something else.
#[tokio::test]
async fn quic_requires_the_pingme_alpn() {
    let harness = Harness::start(limits(), 1).await;
    let addr = harness.gateway().local_addrs().quic.unwrap();
    let (_endpoint, connection) =
        common::quic_connect(addr, &harness.cert, &[b"h3", pingme_protocol::QUIC_ALPN])
            .await
            .expect("pingme/1 is accepted");
    let negotiated = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    assert_eq!(negotiated.as_deref(), Some(pingme_protocol::QUIC_ALPN));
    for offered in [&[][..], &[&b"h3"[..]][..]] {
        let refused = common::quic_connect(addr, &harness.cert, offered).await;
        assert!(refused.is_err(), "ALPN {offered:?} must be refused");
    }
}

/// Expects a fatal error with `code` and then the end of the stream;
/// returns the error's request id.
async fn expect_fatal(client: &mut TestClient, code: ErrorCode) -> u64 {
    let frames = client.drain_to_end().await;
    let last = frames
        .last()
        .and_then(|f| f.body.as_ref())
        .and_then(error_of);
    assert_eq!(last, Some((code, true)), "frames before close: {frames:?}");
    frames.last().map_or(0, |f| f.request_id)
}

#[tokio::test]
async fn silent_after_hello_gets_auth_timeout() {
    let harness = Harness::start(limits(), 1).await;
    for kind in [Kind::Tcp, Kind::Ws] {
        let mut client = harness.connect(kind).await;
        client.hello().await;
        expect_fatal(&mut client, ErrorCode::AuthTimeout).await;
    }
    assert!(harness.dispatch.connected_sessions().is_empty());
}

/// One deadline from accept: time spent in the TLS handshake or before
/// the QUIC stream opens counts against `auth_timeout`. The client uses
/// 80% of the timeout before its first frame and authenticates at 160%:
/// with a deadline restarted after the transport handshake it would be let
/// in; with one deadline it is refused. (Scheduling delays only make the
/// client later, so they cannot turn a refusal into a success.)
#[tokio::test]
async fn the_auth_deadline_covers_the_transport_handshake() {
    let auth_timeout = Duration::from_secs(2);
    let harness = Harness::start(
        SessionLimits {
            auth_timeout,
            ..limits()
        },
        1,
    )
    .await;
    let addrs = harness.gateway().local_addrs();
    let pause = auth_timeout * 4 / 5;
    let late_login = |client: TestClient, start: tokio::time::Instant| async move {
        let mut client = client;
        client.hello().await;
        tokio::time::sleep_until(start + pause * 2).await;
        client
            .send(client_frame::Body::Authenticate(v1::Authenticate {
                token: "1:d".into(),
            }))
            .await;
        expect_fatal(&mut client, ErrorCode::AuthTimeout).await;
    };
    let tls = async {
        let start = tokio::time::Instant::now();
        let client = TestClient::tls_after_pause(addrs.tls.unwrap(), &harness.cert, pause).await;
        late_login(client, start).await;
    };
    let quic = async {
        let start = tokio::time::Instant::now();
        let client = TestClient::quic_after_pause(addrs.quic.unwrap(), &harness.cert, pause).await;
        late_login(client, start).await;
    };
    tokio::join!(tls, quic);
    assert!(harness.dispatch.connected_sessions().is_empty());
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_code() {
    let harness = Harness::start(limits(), 1).await;
    for (token, code) in [
        ("not-a-token", ErrorCode::TokenInvalid),
        ("expired", ErrorCode::TokenExpired),
        ("revoked", ErrorCode::TokenRevoked),
    ] {
        let mut client = harness.connect(Kind::Tcp).await;
        client.hello().await;
        let request_id = client
            .send(client_frame::Body::Authenticate(v1::Authenticate {
                token: token.into(),
            }))
            .await;
        // The refusal answers the Authenticate: an SDK matching replies by
        // request id learns why it was refused.
        assert_eq!(expect_fatal(&mut client, code).await, request_id, "{token}");
    }
    assert!(harness.dispatch.connected_sessions().is_empty());
}

#[tokio::test]
async fn frames_before_hello_or_auth_are_unexpected() {
    let harness = Harness::start(limits(), 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    let id = client
        .send(client_frame::Body::Ping(v1::Ping { client_time_ms: 1 }))
        .await;
    let (rid, body) = client.recv_body().await;
    assert_eq!(rid, id);
    assert_eq!(error_of(&body), Some((ErrorCode::UnexpectedMessage, false)));
    client.login(1, "d").await;
    // Authenticating again on an authenticated session is refused too, and
    // the session goes on.
    let id = client
        .send(client_frame::Body::Authenticate(v1::Authenticate {
            token: "1:d".into(),
        }))
        .await;
    let (rid, body) = client.recv_body().await;
    assert_eq!(rid, id);
    assert_eq!(error_of(&body), Some((ErrorCode::UnexpectedMessage, false)));
    client.ping().await;
}

#[tokio::test]
async fn unsupported_version_is_fatal() {
    let harness = Harness::start(limits(), 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    let request_id = client
        .send(client_frame::Body::Hello(v1::Hello {
            max_version: 9,
            min_version: 5,
            client_name: String::new(),
        }))
        .await;
    assert_eq!(
        expect_fatal(&mut client, ErrorCode::UnsupportedVersion).await,
        request_id,
        "the refusal answers the Hello"
    );
}

#[tokio::test]
async fn malformed_frame_closes_the_session() {
    let harness = Harness::start(limits(), 1).await;
    for kind in [Kind::Tcp, Kind::Ws] {
        let mut client = harness.connect(kind).await;
        client.login(1, "d").await;
        let mut garbage = BytesMut::new();
        garbage.put_u32(3);
        garbage.put_slice(&[0xff, 0xff, 0xff]);
        client.send_raw(garbage.freeze()).await;
        expect_fatal(&mut client, ErrorCode::Malformed).await;
    }
    harness
        .dispatch
        .wait_for("both disconnects", |seen| seen.disconnected.len() == 2)
        .await;
}

#[tokio::test]
async fn oversize_frame_is_refused_from_its_prefix() {
    let harness = Harness::start(limits(), 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    client.login(1, "d").await;
    // Only the prefix: the gateway must refuse without waiting for 1 GiB.
    client
        .send_raw(Bytes::from((1u32 << 30).to_be_bytes().to_vec()))
        .await;
    expect_fatal(&mut client, ErrorCode::FrameTooLarge).await;

    let mut before_auth = harness.connect(Kind::Tcp).await;
    before_auth
        .send_raw(Bytes::from(u32::MAX.to_be_bytes().to_vec()))
        .await;
    expect_fatal(&mut before_auth, ErrorCode::FrameTooLarge).await;
}

/// WebSocket: a message over the maximum frame size gets FRAME_TOO_LARGE
/// before the close (the WebSocket library's own limit sits above pingme's),
/// before and after authentication.
#[tokio::test]
async fn websocket_oversize_frame_gets_frame_too_large() {
    let harness = Harness::start(limits(), 1).await;
    let max = limits().max_frame_size;
    let oversize = |len: usize| {
        let mut message = BytesMut::new();
        message.put_u32(len as u32);
        message.put_bytes(0, len);
        message.freeze()
    };
    let mut client = harness.connect(Kind::Ws).await;
    client.login(1, "d").await;
    client.send_raw(oversize(max + 1)).await;
    expect_fatal(&mut client, ErrorCode::FrameTooLarge).await;

    let mut before_auth = harness.connect(Kind::Ws).await;
    before_auth.send_raw(oversize(max + 1024)).await;
    expect_fatal(&mut before_auth, ErrorCode::FrameTooLarge).await;
}

#[tokio::test]
async fn flood_is_rate_limited_then_closed() {
    let limits = SessionLimits {
        messages_per_second: 10,
        burst: 5,
        ..limits()
    };
    let harness = Harness::start(limits, 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    client.login(1, "d").await;
    let mut flood = BytesMut::new();
    for i in 0..200u64 {
        pingme_protocol::encode_frame_into(
            &pingme_protocol::ClientFrame {
                request_id: i + 1,
                body: Some(client_frame::Body::Ping(v1::Ping { client_time_ms: 0 })),
            },
            &mut flood,
        );
    }
    client.send_raw(flood.freeze()).await;
    let frames = client.drain_to_end().await;
    let bodies: Vec<&server_frame::Body> = frames.iter().filter_map(|f| f.body.as_ref()).collect();
    let pongs = bodies
        .iter()
        .filter(|b| matches!(b, server_frame::Body::Pong(_)))
        .count();
    let refused = bodies
        .iter()
        .filter(|b| error_of(b) == Some((ErrorCode::RateLimited, false)))
        .count();
    assert!((5..=7).contains(&pongs), "burst of 5 admitted, got {pongs}");
    assert!(refused >= 1, "over-rate frames are answered RATE_LIMITED");
    assert_eq!(
        bodies.last().and_then(|b| error_of(b)),
        Some((ErrorCode::RateLimited, true)),
        "a sustained flood closes the session"
    );
}

#[tokio::test]
async fn slow_reader_is_cut_off_while_its_shard_keeps_serving() {
    slow_reader(Kind::Tcp).await;
}

#[tokio::test]
async fn slow_websocket_reader_is_cut_off_too() {
    slow_reader(Kind::Ws).await;
}

async fn slow_reader(kind: Kind) {
    let limits = SessionLimits {
        max_queued_bytes: 256 * 1024,
        close_linger: Duration::from_secs(10),
        ..limits()
    };
    // One shard: the slow reader and the healthy client share it.
    let harness = Harness::start(limits, 1).await;
    let addr = harness.gateway().local_addrs().tcp.unwrap();
    let mut slow = match kind {
        Kind::Tcp => TestClient::tcp_small_window(addr).await,
        _ => harness.connect(kind).await,
    };
    slow.login(1, "slow").await;
    let mut healthy = harness.connect(Kind::Tcp).await;
    healthy.login(2, "fine").await;
    let slow_conn = harness
        .dispatch
        .connected_sessions()
        .into_iter()
        .find(|s| s.user == 1)
        .unwrap()
        .conn;

    let big = encode_frame(&ServerFrame {
        request_id: 0,
        body: Some(server_frame::Body::Deliver(v1::Deliver {
            message: Some(v1::Message {
                body: Bytes::from(vec![b'x'; 16 * 1024]),
                ..Default::default()
            }),
        })),
    });
    let healthy_conn = harness
        .dispatch
        .connected_sessions()
        .into_iter()
        .find(|s| s.user == 2)
        .unwrap()
        .conn;
    // Both get the same stream of frames, one at a time; only the one that
    // does not read falls behind.
    let mut pushed = 0;
    while harness.dispatch.disconnected_count() == 0 {
        assert!(pushed < 20_000, "the slow reader was never cut off");
        harness.connections.to_connection(slow_conn, big.clone());
        harness.connections.to_connection(healthy_conn, big.clone());
        pushed += 1;
        match healthy.recv_body().await {
            (0, server_frame::Body::Deliver(_)) => {}
            other => panic!("expected Deliver, got {other:?}"),
        }
        // The shard still answers the healthy client while it pushes.
        if pushed % 16 == 0 {
            healthy.ping().await;
        }
    }
    println!("{kind:?}: cut off after {pushed} frames of 16 KiB");
    let gone = harness.dispatch.seen.lock().unwrap().disconnected[0].clone();
    assert_eq!(gone.user, 1);
    assert!(harness.connections.online(&[1, 2]) == vec![false, true]);
    healthy.ping().await;

    // Now read: what was already written, then SLOW_CONSUMER, then the end.
    let frames = slow.drain_to_end().await;
    let last = frames
        .last()
        .and_then(|f| f.body.as_ref())
        .and_then(error_of);
    assert_eq!(last, Some((ErrorCode::SlowConsumer, true)));
    assert!(
        frames.len() < pushed,
        "the backlog was dropped, not delivered"
    );
}

#[tokio::test]
async fn silent_session_is_closed_after_the_idle_timeout() {
    let limits = SessionLimits {
        idle_timeout: Duration::from_millis(300),
        ..limits()
    };
    let harness = Harness::start(limits, 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    let ack = client.hello().await;
    assert_eq!(ack.idle_timeout_ms, 300);
    client
        .send(client_frame::Body::Authenticate(v1::Authenticate {
            token: "1:d".into(),
        }))
        .await;
    client.recv_body().await;
    expect_fatal(&mut client, ErrorCode::IdleTimeout).await;
}

#[tokio::test]
async fn same_device_login_replaces_the_old_connection() {
    let harness = Harness::start(limits(), 2).await;
    let mut first = harness.connect(Kind::Tcp).await;
    first.login(5, "phone").await;
    let mut other_device = harness.connect(Kind::Tcp).await;
    other_device.login(5, "tablet").await;
    let mut second = harness.connect(Kind::Quic).await;
    second.login(5, "phone").await;

    let frames = first.drain_to_end().await;
    match frames.last().and_then(|f| f.body.as_ref()) {
        Some(server_frame::Body::GoAway(go_away)) => {
            assert_eq!(go_away.reason, GoAwayReason::Replaced as i32);
        }
        other => panic!("expected GoAway REPLACED, got {other:?}"),
    }
    second.ping().await;
    other_device.ping().await;
    harness
        .dispatch
        .wait_for("the replaced session's end", |seen| {
            seen.disconnected.len() == 1
        })
        .await;
    assert_eq!(harness.connections.connections_of(5), 2);
}

#[tokio::test]
async fn router_can_evict_a_device() {
    let harness = Harness::start(limits(), 2).await;
    let mut phone = harness.connect(Kind::Tcp).await;
    phone.login(5, "phone").await;
    let mut laptop = harness.connect(Kind::Ws).await;
    laptop.login(5, "laptop").await;
    let frame = encode_frame(&ServerFrame::fatal(ErrorCode::TokenRevoked, "logged out"));
    assert_eq!(harness.connections.disconnect(5, Some("phone"), frame), 1);
    expect_fatal(&mut phone, ErrorCode::TokenRevoked).await;
    laptop.ping().await;
}

#[tokio::test]
async fn deliveries_reach_devices_on_every_shard() {
    let harness = Harness::start(limits(), 2).await;
    let mut devices = Vec::new();
    for i in 0..16 {
        let mut client = harness.connect(Kind::Tcp).await;
        client.login(2, &format!("d{i}")).await;
        devices.push(client);
    }
    let shards: std::collections::HashSet<u16> = harness
        .dispatch
        .connected_sessions()
        .iter()
        .map(|s| s.conn.shard)
        .collect();
    assert_eq!(
        shards.len(),
        2,
        "SO_REUSEPORT spreads connections over both shards"
    );
    let mut sender = harness.connect(Kind::Tcp).await;
    sender.login(1, "s").await;
    sender.send(send_message("dm:1:2", "c-9")).await;
    for device in &mut devices {
        match device.recv_body().await {
            (_, server_frame::Body::Deliver(deliver)) => {
                assert_eq!(deliver.message.unwrap().client_msg_id, "c-9");
            }
            other => panic!("expected Deliver, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn pipelined_frames_after_authenticate_are_served() {
    let harness = Harness::start(limits(), 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    let mut wire = BytesMut::new();
    for (id, body) in [
        (
            1,
            client_frame::Body::Hello(v1::Hello {
                max_version: 1,
                min_version: 1,
                client_name: String::new(),
            }),
        ),
        (
            2,
            client_frame::Body::Authenticate(v1::Authenticate {
                token: "3:d".into(),
            }),
        ),
        (3, client_frame::Body::Ping(v1::Ping { client_time_ms: 9 })),
    ] {
        pingme_protocol::encode_frame_into(
            &pingme_protocol::ClientFrame {
                request_id: id,
                body: Some(body),
            },
            &mut wire,
        );
    }
    client.send_raw(wire.freeze()).await;
    let ids: Vec<u64> = [
        client.recv_body().await,
        client.recv_body().await,
        client.recv_body().await,
    ]
    .iter()
    .map(|(id, _)| *id)
    .collect();
    assert_eq!(ids, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_pipelined_hello_and_bad_token_get_hello_ack_then_the_refusal() {
    let harness = Harness::start(limits(), 1).await;
    for kind in [Kind::Tcp, Kind::Tls] {
        let mut client = harness.connect(kind).await;
        let mut wire = BytesMut::new();
        for (id, body) in [
            (
                1,
                client_frame::Body::Hello(v1::Hello {
                    max_version: 1,
                    min_version: 1,
                    client_name: String::new(),
                }),
            ),
            (
                2,
                client_frame::Body::Authenticate(v1::Authenticate {
                    token: "not-a-token".into(),
                }),
            ),
        ] {
            pingme_protocol::encode_frame_into(
                &pingme_protocol::ClientFrame {
                    request_id: id,
                    body: Some(body),
                },
                &mut wire,
            );
        }
        client.send_raw(wire.freeze()).await;
        // The HelloAck held back for the Authenticate behind it still
        // goes out, before the refusal.
        assert!(matches!(
            client.recv_body().await,
            (1, server_frame::Body::HelloAck(_))
        ));
        let (id, body) = client.recv_body().await;
        assert_eq!(
            (id, error_of(&body)),
            (2, Some((ErrorCode::TokenInvalid, true))),
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn shutdown_sends_go_away_and_closes_within_grace() {
    let mut harness = Harness::start(limits(), 2).await;
    let mut clients = Vec::new();
    for (i, kind) in [Kind::Tcp, Kind::Tls, Kind::Quic, Kind::Ws]
        .into_iter()
        .enumerate()
    {
        let mut client = harness.connect(kind).await;
        client.login(i as u64 + 1, "d").await;
        clients.push(client);
    }
    let gateway = harness.gateway.take().unwrap();
    let started = std::time::Instant::now();
    gateway.shutdown(Duration::from_secs(3)).await;
    let took = started.elapsed();
    for client in &mut clients {
        let frames = client.drain_to_end().await;
        match frames.last().and_then(|f| f.body.as_ref()) {
            Some(server_frame::Body::GoAway(go_away)) => {
                assert_eq!(go_away.reason, GoAwayReason::Shutdown as i32);
                assert!(go_away.retry_after_ms > 0);
            }
            other => panic!("expected GoAway SHUTDOWN, got {other:?}"),
        }
    }
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    assert_eq!(harness.dispatch.disconnected_count(), 4);
}

#[tokio::test]
async fn frames_split_across_reads_are_reassembled() {
    let harness = Harness::start(limits(), 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    client.login(1, "d").await;
    let big = encode_frame(&pingme_protocol::ClientFrame {
        request_id: 77,
        body: Some(client_frame::Body::Send(v1::SendMessage {
            client_msg_id: "big".into(),
            conversation_id: "dm:1:2".into(),
            content_type: v1::ContentType::Text as i32,
            body: Bytes::from(vec![b'y'; 40 * 1024]),
        })),
    });
    // A prefix cut in two, then the body in uneven pieces.
    for piece in [&big[..2], &big[2..9], &big[9..20_000], &big[20_000..]] {
        client.send_raw(Bytes::copy_from_slice(piece)).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    match client.recv_body().await {
        (77, server_frame::Body::SendAck(ack)) => assert_eq!(ack.client_msg_id, "big"),
        other => panic!("expected SendAck, got {other:?}"),
    }
    client.ping().await;
}
