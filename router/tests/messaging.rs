//! End-to-end behaviour of the router over the embedded store: sends,
//! acks, deliveries, sync and fetch, idempotency, ordering, bad input.

mod common;

use std::collections::HashSet;

use common::*;
use pingme_protocol::ErrorCode;
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_router::RouterConfig;
use pingme_storage::{ConversationId, MessageStore, WatermarkStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_online_delivery_and_ack() {
    let h = Harness::start(RouterConfig::default());
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let a = h.online(alice, "phone", 1);
    let b = h.online(bob, "phone", 2);
    h.send(&a, 7, &dm(alice, bob), "c-1", "hello bob");

    let ack = ack(&h.answer(a.conn, 7).await);
    assert_eq!((ack.client_msg_id.as_str(), ack.seq), ("c-1", 1));
    assert_eq!(ack.conversation_id, dm(alice, bob));
    let msg_id = uuid::Uuid::parse_str(&ack.msg_id).expect("msg_id is a UUID");
    assert_eq!(msg_id.get_version_num(), 7);
    assert!(ack.server_time_ms > 0);

    let got = h.deliveries(b.conn, 1).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(
        (m.seq, m.sender_id, m.msg_id.as_str()),
        (1, alice, ack.msg_id.as_str())
    );
    assert_eq!(
        (&m.body[..], m.sender_device.as_str()),
        (&b"hello bob"[..], "phone")
    );
    assert_eq!(m.server_time_ms, ack.server_time_ms);
    // The sending connection has its ack and gets no copy.
    assert!(delivered(&h.outbox.frames(a.conn)).is_empty());
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_syncs_then_fetches_in_pages() {
    let h = Harness::start(RouterConfig::default());
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let a = h.online(alice, "phone", 1);
    let conversation = dm(alice, bob);
    for i in 0..250u64 {
        h.send(
            &a,
            i + 1,
            &conversation,
            &format!("c-{i}"),
            &format!("m{i}"),
        );
    }
    h.answer(a.conn, 250).await;
    assert_eq!(h.outbox.count(a.conn), 250, "only acks reach alice");

    // Bob comes online later: nothing was pushed to him, sync tells him.
    let b = h.online(bob, "laptop", 2);
    h.request(&b, 1, client_frame::Body::Sync(v1::SyncRequest::default()));
    let Some(server_frame::Body::Sync(sync)) = h.answer(b.conn, 1).await.body else {
        panic!("expected a SyncResponse")
    };
    assert_eq!(sync.conversations.len(), 1);
    let state = &sync.conversations[0];
    assert_eq!(state.conversation_id, conversation);
    assert_eq!(
        (state.latest_seq, state.delivered_seq, state.read_seq),
        (250, 0, 0)
    );
    assert!(!sync.has_more);

    // Fetch in pages of 100 (asking for 1000 is capped at 200).
    let mut fetched = Vec::new();
    let mut after = 0;
    let mut request_id = 10;
    loop {
        request_id += 1;
        h.request(
            &b,
            request_id,
            client_frame::Body::Fetch(v1::FetchMessages {
                conversation_id: conversation.clone(),
                after_seq: after,
                until_seq: 0,
                limit: 100,
            }),
        );
        let Some(server_frame::Body::Page(page)) = h.answer(b.conn, request_id).await.body else {
            panic!("expected a MessagePage")
        };
        assert!(page.messages.len() <= 100);
        after = page.messages.last().map_or(after, |m| m.seq);
        fetched.extend(page.messages);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(
        fetched.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=250).collect::<Vec<_>>()
    );
    assert_eq!(&fetched[249].body[..], b"m249");

    h.request(
        &b,
        90,
        client_frame::Body::Fetch(v1::FetchMessages {
            conversation_id: conversation.clone(),
            after_seq: 0,
            until_seq: 0,
            limit: 1000,
        }),
    );
    let Some(server_frame::Body::Page(page)) = h.answer(b.conn, 90).await.body else {
        panic!("expected a MessagePage")
    };
    assert_eq!((page.messages.len(), page.has_more), (200, true));

    // After a delivery ack (too high a seq is clamped), sync is empty.
    h.request(
        &b,
        0,
        client_frame::Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: conversation.clone(),
            seq: 9999,
        }),
    );
    // One sync right after, no retries: acks are coalesced for a short
    // window, and the device's own sync must see its pending ack.
    h.request(&b, 91, client_frame::Body::Sync(v1::SyncRequest::default()));
    let Some(server_frame::Body::Sync(sync)) = h.answer(b.conn, 91).await.body else {
        panic!("expected a SyncResponse")
    };
    assert!(sync.conversations.is_empty(), "{sync:?}");
    assert!(!sync.has_more);
    // New message after the ack: sync shows it with delivered = 250 (not 9999).
    h.send(&a, 500, &conversation, "c-late", "late");
    h.answer(a.conn, 500).await;
    let sync = eventually_sync(&h, &b, |s| !s.conversations.is_empty()).await;
    assert_eq!(
        (
            sync.conversations[0].latest_seq,
            sync.conversations[0].delivered_seq
        ),
        (251, 250)
    );
    h.router.shutdown().await;
}

async fn eventually_sync(
    h: &Harness,
    session: &pingme_router::port::SessionInfo,
    done: impl Fn(&v1::SyncResponse) -> bool,
) -> v1::SyncResponse {
    // Ids unique across calls: the recording outbox keeps every answer, so a
    // reused id could hand back a stale sync from an earlier call.
    static NEXT_REQUEST: std::sync::atomic::AtomicU64 =
        std::sync::atomic::AtomicU64::new(1_000_000);
    let first = NEXT_REQUEST.fetch_add(5_000, std::sync::atomic::Ordering::Relaxed);
    let mut request_id = first;
    loop {
        request_id += 1;
        h.request(
            session,
            request_id,
            client_frame::Body::Sync(v1::SyncRequest::default()),
        );
        let Some(server_frame::Body::Sync(sync)) = h.answer(session.conn, request_id).await.body
        else {
            panic!("expected a SyncResponse")
        };
        if done(&sync) {
            return sync;
        }
        assert!(
            request_id < first + 5_000,
            "sync never reached the expected state"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Pages are bounded by bytes, not only by count: each page fits
/// `fetch_page_max_bytes` (the gateway's quarter of a connection's outbound
/// budget), and walking the pages yields every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_pages_stay_within_their_byte_budget() {
    let budget = 200 * 1024;
    let h = Harness::start(RouterConfig {
        fetch_page_max_bytes: budget,
        ..RouterConfig::default()
    });
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let a = h.online(alice, "phone", 1);
    let conversation = dm(alice, bob);
    let big = "x".repeat(60 * 1024);
    for i in 0..20u64 {
        h.send(&a, i + 1, &conversation, &format!("c-{i}"), &big);
    }
    h.answer(a.conn, 20).await;
    let b = h.online(bob, "phone", 2);
    let mut seqs = Vec::new();
    for request_id in 1..=20u64 {
        h.request(
            &b,
            request_id,
            client_frame::Body::Fetch(v1::FetchMessages {
                conversation_id: conversation.clone(),
                after_seq: seqs.last().copied().unwrap_or(0),
                until_seq: 0,
                limit: 100,
            }),
        );
        let frame = h.answer(b.conn, request_id).await;
        let raw = h.outbox.raw(b.conn).pop().unwrap();
        assert!(
            raw.len() <= budget,
            "page frame is {} bytes, budget {budget}",
            raw.len()
        );
        let Some(server_frame::Body::Page(page)) = frame.body else {
            panic!("expected a MessagePage")
        };
        assert!(!page.messages.is_empty());
        seqs.extend(page.messages.iter().map(|m| m.seq));
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    h.router.shutdown().await;
}

/// However small the configured budget, a page holds one message of the
/// maximum body size: such a message is never stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maximum_size_message_always_fits_a_page() {
    let h = Harness::start(RouterConfig {
        fetch_page_max_bytes: 1,
        ..RouterConfig::default()
    });
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let a = h.online(alice, "phone", 1);
    let conversation = dm(alice, bob);
    let max_body = h.router.config().max_body_bytes;
    let big = "x".repeat(max_body);
    for i in 0..2u64 {
        h.send(&a, i + 1, &conversation, &format!("c-{i}"), &big);
    }
    h.answer(a.conn, 2).await;
    let b = h.online(bob, "phone", 2);
    h.request(
        &b,
        1,
        client_frame::Body::Fetch(v1::FetchMessages {
            conversation_id: conversation,
            after_seq: 0,
            until_seq: 0,
            limit: 0,
        }),
    );
    let frame = h.answer(b.conn, 1).await;
    let raw = h.outbox.raw(b.conn).pop().unwrap();
    assert!(raw.len() <= pingme_router::single_message_page_bytes(max_body));
    let Some(server_frame::Body::Page(page)) = frame.body else {
        panic!("expected a MessagePage")
    };
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].body.len(), max_body);
    assert!(page.has_more);
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_three_with_one_member_offline() {
    let h = Harness::start(RouterConfig::default());
    let (a_id, b_id, c_id) = (h.user("a").await, h.user("b").await, h.user("c").await);
    let group = h.group(a_id, &[b_id, c_id]).await;
    let a = h.online(a_id, "d", 1);
    let b = h.online(b_id, "d", 2);
    h.send(&a, 1, &group, "x-1", "hi all");
    h.answer(a.conn, 1).await;
    let got = h.deliveries(b.conn, 1).await;
    assert_eq!(
        (got[0].seq, got[0].conversation_id.as_str()),
        (1, group.as_str())
    );

    let c = h.online(c_id, "d", 3);
    assert!(
        delivered(&h.outbox.frames(c.conn)).is_empty(),
        "c was offline when it was sent"
    );
    let sync = eventually_sync(&h, &c, |_| true).await;
    assert_eq!(sync.conversations.len(), 1);
    assert_eq!(
        (
            sync.conversations[0].conversation_id.as_str(),
            sync.conversations[0].latest_seq
        ),
        (group.as_str(), 1)
    );
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_senders_other_devices_get_the_message() {
    let h = Harness::start(RouterConfig::default());
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let phone = h.online(alice, "phone", 1);
    let laptop = h.online(alice, "laptop", 2);
    let b = h.online(bob, "phone", 3);
    h.send(&phone, 1, &dm(alice, bob), "c-1", "from my phone");
    h.answer(phone.conn, 1).await;
    let on_laptop = h.deliveries(laptop.conn, 1).await;
    assert_eq!(
        (
            on_laptop[0].sender_device.as_str(),
            on_laptop[0].client_msg_id.as_str()
        ),
        ("phone", "c-1")
    );
    assert_eq!(h.deliveries(b.conn, 1).await.len(), 1);
    assert!(delivered(&h.outbox.frames(phone.conn)).is_empty());
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_client_msg_id_is_stored_once_acked_identically_and_delivered_again() {
    let h = Harness::start(RouterConfig::default());
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let a = h.online(alice, "phone", 1);
    let b = h.online(bob, "phone", 2);
    let conversation = dm(alice, bob);
    h.send(&a, 1, &conversation, "same", "once");
    let first = ack(&h.answer(a.conn, 1).await);
    h.send(&a, 2, &conversation, "same", "once");
    let second = ack(&h.answer(a.conn, 2).await);
    assert_eq!(first, second);
    // Whoever stored the first try may have died before delivering it, so
    // the retry delivers the stored message again (same seq, same id);
    // the client drops the seq it already holds.
    h.send(&a, 3, &conversation, "other", "twice?");
    assert_eq!(ack(&h.answer(a.conn, 3).await).seq, 2);
    let got = h.deliveries(b.conn, 3).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 1, 2]);
    assert_eq!(got[0], got[1]);
    assert_eq!(got[0].msg_id, first.msg_id);
    let conv: ConversationId = conversation.parse().unwrap();
    assert_eq!(h.store.messages(conv, 0, 0, 100).await.unwrap().len(), 2);
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_several_senders_gets_dense_seqs_delivered_in_order() {
    let h = std::sync::Arc::new(Harness::start(RouterConfig::default()));
    let users = h.users("member", 5).await;
    let group = h.group(users[0], &users[1..]).await;
    let sessions: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| h.online(*u, "d", i as u64 + 1))
        .collect();
    const PER_SENDER: u64 = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for session in sessions.clone() {
        let (h, group) = (h.clone(), group.clone());
        tasks.spawn(async move {
            for i in 0..PER_SENDER {
                h.send(
                    &session,
                    i + 1,
                    &group,
                    &format!("{}-{i}", session.user),
                    "burst",
                );
                if i % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    tasks.join_all().await;
    let total = PER_SENDER * sessions.len() as u64;
    let mut all_seqs = Vec::new();
    for session in &sessions {
        h.answer(session.conn, PER_SENDER).await;
        let acks: Vec<u64> = h
            .outbox
            .frames(session.conn)
            .iter()
            .filter_map(|f| match &f.body {
                Some(server_frame::Body::SendAck(a)) => Some(a.seq),
                _ => None,
            })
            .collect();
        assert_eq!(acks.len() as u64, PER_SENDER);
        // One connection's sends keep their order.
        assert!(
            acks.windows(2).all(|w| w[0] < w[1]),
            "acks of {} out of order",
            session.user
        );
        all_seqs.extend(acks);
    }
    all_seqs.sort_unstable();
    assert_eq!(all_seqs, (1..=total).collect::<Vec<_>>(), "seqs are dense");
    for session in &sessions {
        let got = h
            .deliveries(session.conn, (total - PER_SENDER) as usize)
            .await;
        assert_eq!(got.len() as u64, total - PER_SENDER);
        assert!(
            got.windows(2).all(|w| w[0].seq < w[1].seq),
            "deliveries in seq order"
        );
        assert!(got.iter().all(|m| m.sender_id != session.user));
    }
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_and_bad_sends_get_typed_errors_and_nothing_else() {
    let h = Harness::start(RouterConfig::default());
    let (a_id, b_id, outsider) = (h.user("a").await, h.user("b").await, h.user("eve").await);
    let group = h.group(a_id, &[b_id]).await;
    let a = h.online(a_id, "d", 1);
    h.send(&a, 1, &group, "ok", "secret");
    h.answer(a.conn, 1).await;
    let eve = h.online(outsider, "d", 9);

    let cases: Vec<(client_frame::Body, ErrorCode)> = vec![
        (
            send_body(&group, "e-1", 1, b"let me in"),
            ErrorCode::Forbidden,
        ),
        (
            send_body(&dm(a_id, b_id), "e-2", 1, b"x"),
            ErrorCode::Forbidden,
        ),
        (
            send_body("g:01", "e-3", 1, b"x"),
            ErrorCode::InvalidArgument,
        ),
        (
            send_body(&dm(outsider, a_id), "e-4", 0, b"x"),
            ErrorCode::InvalidArgument,
        ),
        (
            send_body(&dm(outsider, a_id), "", 1, b"x"),
            ErrorCode::InvalidArgument,
        ),
        (
            send_body(&dm(outsider, a_id), "e-6", 1, &vec![0u8; 64 * 1024 + 1]),
            ErrorCode::BodyTooLarge,
        ),
        (send_body("g:999999", "e-7", 1, b"x"), ErrorCode::NotFound),
        (
            client_frame::Body::Fetch(v1::FetchMessages {
                conversation_id: group.clone(),
                ..Default::default()
            }),
            ErrorCode::Forbidden,
        ),
        (
            client_frame::Body::Fetch(v1::FetchMessages {
                conversation_id: dm(a_id, b_id),
                ..Default::default()
            }),
            ErrorCode::Forbidden,
        ),
        (
            client_frame::Body::ReadMarker(v1::ReadMarker {
                conversation_id: group.clone(),
                seq: 1,
            }),
            ErrorCode::Forbidden,
        ),
        (
            client_frame::Body::Typing(v1::Typing {
                conversation_id: group.clone(),
                active: true,
            }),
            ErrorCode::Forbidden,
        ),
        // Delivery acks are coalesced: a group's membership is checked when
        // the window is written, and the refusal still names the request.
        (
            client_frame::Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: group.clone(),
                seq: 1,
            }),
            ErrorCode::Forbidden,
        ),
        (
            client_frame::Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: dm(a_id, b_id),
                seq: 1,
            }),
            ErrorCode::Forbidden,
        ),
        (
            client_frame::Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: "dm:x".into(),
                seq: 1,
            }),
            ErrorCode::InvalidArgument,
        ),
    ];
    for (i, (body, code)) in cases.into_iter().enumerate() {
        let request_id = 100 + i as u64;
        h.request(&eve, request_id, body);
        let answer = h.answer(eve.conn, request_id).await;
        let e = error(&answer);
        assert_eq!(e.code, code.code(), "case {i}: {e:?}");
        assert!(!e.fatal, "a refused request keeps the connection");
    }
    let failed_send = error(&h.answer(eve.conn, 100).await);
    assert_eq!(failed_send.client_msg_id, "e-1");
    // Eve got errors only, the group got nothing from her.
    assert!(
        h.outbox
            .frames(eve.conn)
            .iter()
            .all(|f| matches!(f.body, Some(server_frame::Body::Error(_))))
    );
    let stored = h
        .store
        .messages(group.parse().unwrap(), 0, 0, 100)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    let marks = h
        .store
        .watermarks(outsider, "d", &[group.parse().unwrap()])
        .await
        .unwrap();
    assert_eq!(marks[0].delivered, 0, "a refused ack moves no watermark");
    // Sync does not list the group to her.
    let sync = eventually_sync(&h, &eve, |_| true).await;
    assert!(
        sync.conversations
            .iter()
            .all(|c| c.conversation_id != group)
    );
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_accepted_sends_then_refuses_new_ones() {
    let h = Harness::start(RouterConfig::default());
    let (alice, bob) = (h.user("alice").await, h.user("bob").await);
    let a = h.online(alice, "phone", 1);
    for i in 0..300u64 {
        h.send(&a, i + 1, &dm(alice, bob), &format!("c-{i}"), "x");
    }
    h.router.shutdown().await;
    let acks: HashSet<u64> = h
        .outbox
        .frames(a.conn)
        .iter()
        .filter(|f| matches!(f.body, Some(server_frame::Body::SendAck(_))))
        .map(|f| f.request_id)
        .collect();
    assert_eq!(
        acks.len(),
        300,
        "every accepted send is acked before shutdown returns"
    );
    h.send(&a, 999, &dm(alice, bob), "late", "x");
    assert_eq!(
        error(&h.answer(a.conn, 999).await).code,
        ErrorCode::ShuttingDown.code()
    );
}
