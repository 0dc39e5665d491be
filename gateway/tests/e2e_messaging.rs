//! End-to-end messaging over real sockets against a real `pingme serve`
//! process: one-to-one, offline sync, groups, several devices,
//! idempotent sends, receipts, typing, membership checks.

mod e2e;

use std::time::Duration;

use e2e::{Conn, Server, dm};
use pingme_protocol::ErrorCode;
use pingme_protocol::v1::{self, FetchMessages, client_frame, server_frame};

const QUIET: Duration = Duration::from_millis(300);

async fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    (dir, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_online_is_acked_then_delivered() {
    let (_dir, server) = server().await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;

    let ack = a.send(&dm(alice, bob), "m1", "hello bob").await.unwrap();
    assert_eq!(ack.seq, 1);
    assert!(!ack.msg_id.is_empty());
    let message = b.deliver().await;
    assert_eq!(
        (message.seq, message.sender_id, &message.body[..]),
        (1, alice, &b"hello bob"[..])
    );
    assert_eq!(message.msg_id, ack.msg_id);
    // The sender's own connection has the ack, not a copy of its message.
    assert!(a.event(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_catches_up_by_sync() {
    let (_dir, server) = server().await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    for i in 1..=250u64 {
        let ack = a
            .send(&dm(alice, bob), &format!("m{i}"), &format!("text {i}"))
            .await
            .unwrap();
        assert_eq!(ack.seq, i);
    }
    let mut b = Conn::connect(server.tcp, &bob_token).await;
    let synced = b.sync().await;
    let seqs: Vec<u64> = synced.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=250).collect::<Vec<_>>(),
        "every message once, in order, across pages"
    );
    // After acknowledging, a new sync has nothing.
    assert!(b.sync().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_three_with_one_member_offline() {
    let (_dir, server) = server().await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let (carol, carol_token) = http.user("carol", "phone").await;
    let group = http.group(&alice_token, "trio", &[bob, carol]).await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;

    for i in 1..=3u64 {
        assert_eq!(
            a.send(&group, &format!("g{i}"), "hi all")
                .await
                .unwrap()
                .seq,
            i
        );
    }
    for i in 1..=3u64 {
        let m = b.deliver().await;
        assert_eq!(
            (m.seq, m.sender_id, m.conversation_id.as_str()),
            (i, alice, group.as_str())
        );
    }
    let mut c = Conn::connect(server.tcp, &carol_token).await;
    let synced: Vec<u64> = c.sync().await.iter().map(|m| m.seq).collect();
    assert_eq!(synced, vec![1, 2, 3]);
    let _ = carol;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_of_a_user_gets_the_message() {
    let (_dir, server) = server().await;
    let http = server.http();
    let (alice, alice_phone) = http.user("alice", "phone").await;
    let (_, alice_laptop) = http.login("alice", "laptop").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let mut phone = Conn::connect(server.tcp, &alice_phone).await;
    let mut laptop = Conn::connect(server.tcp, &alice_laptop).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;

    b.send(&dm(alice, bob), "b1", "to both devices")
        .await
        .unwrap();
    assert_eq!(phone.deliver().await.seq, 1);
    assert_eq!(laptop.deliver().await.seq, 1);
    // The sender's other devices see what it sent from the phone.
    phone
        .send(&dm(alice, bob), "a1", "from phone")
        .await
        .unwrap();
    let echoed = laptop.deliver().await;
    assert_eq!((echoed.seq, echoed.sender_device.as_str()), (2, "phone"));
    assert_eq!(b.deliver().await.seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_is_stored_once_and_acked_the_same() {
    let (_dir, server) = server().await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let first = a.send(&dm(alice, bob), "same-id", "once").await.unwrap();
    // A retry on a new connection, as after a reconnect.
    let mut a2 = Conn::connect(server.tcp, &alice_token).await;
    let second = a2.send(&dm(alice, bob), "same-id", "once").await.unwrap();
    assert_eq!(first, second);
    let next = a2.send(&dm(alice, bob), "other-id", "twice").await.unwrap();
    assert_eq!(next.seq, 2, "the duplicate took no seq");
    let mut b = Conn::connect(server.tcp, &bob_token).await;
    let synced: Vec<(u64, String)> = b
        .sync()
        .await
        .into_iter()
        .map(|m| (m.seq, m.client_msg_id))
        .collect();
    assert_eq!(
        synced,
        vec![(1, "same-id".to_string()), (2, "other-id".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_and_typing_reach_members_only() {
    let (_dir, server) = server().await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let (_eve, eve_token) = http.user("eve", "phone").await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;
    let mut e = Conn::connect(server.tcp, &eve_token).await;
    let conversation = dm(alice, bob);

    a.send(&conversation, "m1", "read me").await.unwrap();
    b.deliver().await;
    b.push(client_frame::Body::ReadMarker(v1::ReadMarker {
        conversation_id: conversation.clone(),
        seq: 1,
    }))
    .await;
    b.push(client_frame::Body::Typing(v1::Typing {
        conversation_id: conversation.clone(),
        active: true,
    }))
    .await;
    let mut saw_receipt = false;
    let mut saw_typing = false;
    while let Some(frame) = a.event(Duration::from_secs(2)).await {
        match frame.body {
            Some(server_frame::Body::ReadReceipt(r)) => {
                assert_eq!(
                    (r.conversation_id.as_str(), r.user_id, r.seq),
                    (conversation.as_str(), bob, 1)
                );
                saw_receipt = true;
            }
            Some(server_frame::Body::Typing(t)) => {
                assert_eq!(
                    (t.conversation_id.as_str(), t.user_id, t.active),
                    (conversation.as_str(), bob, true)
                );
                saw_typing = true;
            }
            _ => {}
        }
        if saw_receipt && saw_typing {
            break;
        }
    }
    assert!(saw_receipt && saw_typing);
    // Eve is in no conversation with them and hears nothing.
    assert!(e.event(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_can_neither_send_nor_read() {
    let (_dir, server) = server().await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, _) = http.user("bob", "phone").await;
    let (_eve, eve_token) = http.user("eve", "phone").await;
    let group = http.group(&alice_token, "private", &[bob]).await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    a.send(&group, "secret", "members only").await.unwrap();
    a.send(&dm(alice, bob), "secret2", "just us").await.unwrap();

    let mut e = Conn::connect(server.tcp, &eve_token).await;
    assert_eq!(
        e.send(&group, "e1", "let me in").await,
        Err(ErrorCode::Forbidden)
    );
    for conversation in [group.clone(), dm(alice, bob)] {
        let reply = e
            .request(client_frame::Body::Fetch(FetchMessages {
                conversation_id: conversation,
                after_seq: 0,
                until_seq: 0,
                limit: 10,
            }))
            .await;
        match reply.body {
            Some(server_frame::Body::Error(error)) => {
                assert_eq!(error.code, ErrorCode::Forbidden.code())
            }
            other => panic!("a non-member read something: {other:?}"),
        }
    }
    assert!(e.sync().await.is_empty(), "sync shows a non-member nothing");
    assert!(e.event(QUIET).await.is_none());
}
