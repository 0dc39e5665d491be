//! Large-group fanout, retry and dead letters, offline push through a
//! webhook, read receipts and typing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use pingme_protocol::ErrorCode;
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_router::port::{Dispatch, UserId};
use pingme_router::{
    Directory, DirectoryError, LocalDirectory, Located, Presence, Registration, ReplayError,
    Router, RouterConfig,
};
use pingme_storage::Stores;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The local directory, with a gate and a fault switch for lookups of at
/// least `cutoff` users (only large-group fanout pages are that big).
struct ControlledDirectory {
    inner: LocalDirectory,
    cutoff: usize,
    gate: watch::Receiver<bool>,
    failing: AtomicBool,
    large_lookups: AtomicUsize,
}

#[async_trait]
impl Directory for ControlledDirectory {
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.inner.register(connection).await
    }
    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.inner.unregister(connection).await
    }
    fn renew_every(&self) -> Option<Duration> {
        self.inner.renew_every()
    }
    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError> {
        self.inner.renew_lease(gateway).await
    }
    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError> {
        self.inner.presence(users).await
    }
    async fn locate(
        &self,
        users: &[UserId],
        need_offline: bool,
    ) -> Result<Located, DirectoryError> {
        if users.len() >= self.cutoff {
            self.large_lookups.fetch_add(1, Ordering::SeqCst);
            let mut gate = self.gate.clone();
            gate.wait_for(|open| *open)
                .await
                .map_err(|e| DirectoryError::Unavailable(e.to_string()))?;
            if self.failing.load(Ordering::SeqCst) {
                return Err(DirectoryError::Unavailable(
                    "injected directory failure".into(),
                ));
            }
        }
        self.inner.locate(users, need_offline).await
    }
}

struct Controlled {
    h: Harness,
    directory: Arc<ControlledDirectory>,
    open: watch::Sender<bool>,
}

fn start_controlled(config: RouterConfig, cutoff: usize, gate_open: bool) -> Controlled {
    let (dir, store) = open_store();
    let outbox = Arc::new(RecordingOutbox::default());
    let (open, gate) = watch::channel(gate_open);
    let directory = Arc::new(ControlledDirectory {
        inner: LocalDirectory::new(config.gateway_id.clone(), outbox.clone()),
        cutoff,
        gate,
        failing: AtomicBool::new(false),
        large_lookups: AtomicUsize::new(0),
    });
    let router = Router::start_single_node(
        Stores::all_from(store.clone()),
        outbox.clone(),
        config.clone(),
        directory.clone(),
    );
    Controlled {
        h: Harness {
            dir,
            store,
            outbox,
            router,
        },
        directory,
        open,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10k_member_group_gets_a_burst_in_order_without_holding_up_a_1to1() {
    let Controlled { h, directory, open } = start_controlled(RouterConfig::default(), 100, false);
    let members = h.users("member", 10_000).await;
    let owner = members[0];
    let group = h.group(owner, &members[1..]).await;
    let sessions: Vec<_> = members
        .iter()
        .map(|user| h.online(*user, "d", *user))
        .collect();
    let owner_session = &sessions[0];
    const BURST: u64 = 20;
    for i in 0..BURST {
        h.send(
            owner_session,
            i + 1,
            &group,
            &format!("big-{i}"),
            "to everyone",
        );
    }
    // The fanout is held at its first page; the sender still gets every
    // ack and a 1:1 conversation still flows.
    for i in 0..BURST {
        assert_eq!(ack(&h.answer(owner_session.conn, i + 1).await).seq, i + 1);
    }
    let peer = &sessions[1];
    h.send(owner_session, 500, &dm(owner, peer.user), "dm-1", "psst");
    assert_eq!(ack(&h.answer(owner_session.conn, 500).await).seq, 1);
    let got = h.deliveries(peer.conn, 1).await;
    assert_eq!(
        got.len(),
        1,
        "only the 1:1 message: the group fanout is still held"
    );
    assert_eq!(got[0].conversation_id, dm(owner, peer.user));
    assert!(directory.large_lookups.load(Ordering::SeqCst) >= 1);

    open.send(true).unwrap();
    for session in &sessions[1..] {
        let got = h
            .deliveries(
                session.conn,
                BURST as usize + usize::from(session.user == peer.user),
            )
            .await;
        let group_seqs: Vec<u64> = got
            .iter()
            .filter(|m| m.conversation_id == group)
            .map(|m| m.seq)
            .collect();
        assert_eq!(
            group_seqs,
            (1..=BURST).collect::<Vec<_>>(),
            "member {}",
            session.user
        );
    }
    assert!(delivered(&h.outbox.frames(owner_session.conn)).is_empty());
    // Stored once: the group timeline holds the burst, no per-member copies.
    let timeline =
        pingme_storage::MessageStore::messages(&*h.store, group.parse().unwrap(), 0, 0, 1000)
            .await
            .unwrap();
    assert_eq!(timeline.len() as u64, BURST);
    // Every member's frame for one message is the same shared buffer.
    let first = &h.outbox.raw(sessions[2].conn)[0];
    let other = &h.outbox.raw(sessions[9_999].conn)[0];
    assert_eq!(first.as_ptr(), other.as_ptr(), "deliver frame encoded once");
    h.router.shutdown().await;
}

fn fast_retries() -> RouterConfig {
    RouterConfig {
        retry_initial_backoff: Duration::from_millis(10),
        retry_max_backoff: Duration::from_millis(40),
        ..RouterConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fanout_step_is_retried_then_dead_lettered_then_replayed() {
    let config = RouterConfig {
        large_group_threshold: 100,
        fanout_batch_size: 50,
        ..fast_retries()
    };
    let Controlled { h, directory, .. } = start_controlled(config, 50, true);
    directory.failing.store(true, Ordering::SeqCst);
    let members = h.users("m", 150).await;
    let group = h.group(members[0], &members[1..]).await;
    let sessions: Vec<_> = members.iter().map(|u| h.online(*u, "d", *u)).collect();
    h.send(&sessions[0], 1, &group, "x", "hello");
    assert_eq!(ack(&h.answer(sessions[0].conn, 1).await).seq, 1);

    let letters = eventually_async(|| async {
        let letters = h.router.dead_letters(0, 10).await.unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.kind.as_str(), letter.code, letter.attempts),
        ("fanout", 50006, 3)
    );
    assert_eq!(
        directory.large_lookups.load(Ordering::SeqCst),
        3,
        "three tries"
    );
    assert!(
        sessions
            .iter()
            .all(|s| delivered(&h.outbox.frames(s.conn)).is_empty())
    );

    // Still failing: the replay fails and the letter stays.
    let replay = h.router.replay_dead_letter(letter.id).await;
    assert!(
        matches!(replay, Err(ReplayError::Failed { .. })),
        "{replay:?}"
    );
    assert_eq!(replay.unwrap_err().code(), ErrorCode::KafkaDeliveryFailed);
    assert_eq!(h.router.dead_letter_count().await.unwrap(), 1);

    directory.failing.store(false, Ordering::SeqCst);
    h.router.replay_dead_letter(letter.id).await.unwrap();
    assert_eq!(h.router.dead_letter_count().await.unwrap(), 0);
    // The replayed fanout hands its batches to the downstream topic: the
    // deliveries arrive after the replay returns.
    for session in &sessions[1..] {
        let got = eventually(|| {
            let got = delivered(&h.outbox.frames(session.conn));
            (!got.is_empty()).then_some(got)
        })
        .await;
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1],
            "member {}",
            session.user
        );
    }
    assert!(matches!(
        h.router.replay_dead_letter(letter.id).await,
        Err(ReplayError::NotFound(_))
    ));
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_and_typing_reach_the_other_members_only() {
    let h = Harness::start(RouterConfig::default());
    let (a_id, b_id, c_id, d_id) = (
        h.user("a").await,
        h.user("b").await,
        h.user("c").await,
        h.user("d").await,
    );
    let group = h.group(a_id, &[b_id, c_id]).await;
    let a_phone = h.online(a_id, "phone", 1);
    let a_laptop = h.online(a_id, "laptop", 2);
    let b = h.online(b_id, "phone", 3);
    let c = h.online(c_id, "phone", 4);
    let outsider = h.online(d_id, "phone", 5);
    h.send(&a_phone, 1, &group, "m1", "read me");
    h.answer(a_phone.conn, 1).await;
    h.deliveries(b.conn, 1).await;

    let receipts = |conn| -> Vec<v1::ReadReceipt> {
        h.outbox
            .frames(conn)
            .into_iter()
            .filter_map(|f| match f.body {
                Some(server_frame::Body::ReadReceipt(r)) => Some(r),
                _ => None,
            })
            .collect()
    };
    h.request(
        &b,
        0,
        client_frame::Body::ReadMarker(v1::ReadMarker {
            conversation_id: group.clone(),
            seq: 1,
        }),
    );
    let got = eventually(|| Some(receipts(a_phone.conn)).filter(|r| !r.is_empty())).await;
    assert_eq!(
        (got[0].user_id, got[0].seq, got[0].conversation_id.as_str()),
        (b_id, 1, group.as_str())
    );
    // One relay call reached everyone it was for; nobody else has one.
    assert_eq!(receipts(a_laptop.conn).len(), 1);
    assert_eq!(receipts(c.conn).len(), 1);
    assert!(receipts(b.conn).is_empty() && receipts(outsider.conn).is_empty());

    let typing = |conn| -> Vec<v1::TypingEvent> {
        h.outbox
            .frames(conn)
            .into_iter()
            .filter_map(|f| match f.body {
                Some(server_frame::Body::Typing(t)) => Some(t),
                _ => None,
            })
            .collect()
    };
    h.request(
        &c,
        0,
        client_frame::Body::Typing(v1::Typing {
            conversation_id: group.clone(),
            active: true,
        }),
    );
    let got = eventually(|| Some(typing(b.conn)).filter(|t| !t.is_empty())).await;
    assert_eq!((got[0].user_id, got[0].active), (c_id, true));
    assert_eq!(typing(a_phone.conn).len(), 1);
    assert_eq!(typing(a_laptop.conn).len(), 1);
    assert!(typing(c.conn).is_empty() && typing(outsider.conn).is_empty());

    // A flood of typing frames from one connection is cut by the rate limit.
    for i in 0..20 {
        h.request(
            &b,
            100 + i,
            client_frame::Body::Typing(v1::Typing {
                conversation_id: group.clone(),
                active: i % 2 == 0,
            }),
        );
    }
    let limited = h
        .outbox
        .frames(b.conn)
        .iter()
        .filter(|f| matches!(&f.body, Some(server_frame::Body::Error(e)) if e.code == ErrorCode::RateLimited.code()))
        .count();
    assert!(limited >= 10, "{limited} typing frames rate-limited");
    h.router.shutdown().await;
}

/// Presence follows connections, and is shown only to users who share a
/// conversation with the asked user (a DM with a message, or a group):
/// a stranger reads exactly like an unknown id, online or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_answers_follow_connections_for_contacts_only() {
    let h = Harness::start(RouterConfig::default());
    let (a_id, b_id) = (h.user("a").await, h.user("b").await);
    let (member_id, stranger_id) = (h.user("member").await, h.user("stranger").await);
    h.group(a_id, &[member_id]).await;
    let a = h.online(a_id, "phone", 1);
    let b = h.online(b_id, "phone", 2);
    h.online(member_id, "phone", 3);
    h.online(stranger_id, "phone", 4);
    h.router.disconnected(&b);
    let (h, a) = (&h, &a);
    let ask = |request_id| async move {
        h.request(
            a,
            request_id,
            client_frame::Body::PresenceQuery(v1::PresenceQuery {
                user_ids: vec![a_id, b_id, member_id, stranger_id, 424242],
            }),
        );
        let Some(server_frame::Body::PresenceList(list)) = h.answer(a.conn, request_id).await.body
        else {
            panic!("expected a PresenceList")
        };
        list.users
            .iter()
            .map(|p| (p.user_id, p.online, p.last_seen_ms > 0))
            .collect::<Vec<_>>()
    };
    // b shares only the implicit, empty DM: nothing is shown about b.
    assert_eq!(
        ask(1).await,
        vec![
            (a_id, true, true),
            (b_id, false, false),
            (member_id, true, true),
            (stranger_id, false, false),
            (424242, false, false),
        ]
    );
    // Once the DM has a message, b's last-seen time is shown.
    h.send(a, 2, &dm(a_id, b_id), "c-1", "hi");
    h.answer(a.conn, 2).await;
    assert_eq!(ask(3).await[1], (b_id, false, true));
    h.request(
        a,
        4,
        client_frame::Body::PresenceQuery(v1::PresenceQuery {
            user_ids: (0..501).collect(),
        }),
    );
    assert_eq!(
        error(&h.answer(a.conn, 4).await).code,
        ErrorCode::InvalidArgument.code()
    );
    h.router.shutdown().await;
}

/// A minimal HTTP server: records request bodies, answers with `status`.
struct Webhook {
    url: String,
    bodies: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    status: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
}

async fn webhook() -> Webhook {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let status = Arc::new(AtomicU16::new(200));
    let calls = Arc::new(AtomicUsize::new(0));
    let (b, s, c) = (bodies.clone(), status.clone(), calls.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let (bodies, status, calls) = (b.clone(), s.clone(), c.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body_start = loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < body_start + length {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                calls.fetch_add(1, Ordering::SeqCst);
                let code = status.load(Ordering::SeqCst);
                if code == 200 {
                    let body =
                        serde_json::from_slice(&buf[body_start..body_start + length]).unwrap();
                    bodies.lock().unwrap().push(body);
                }
                let reply =
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    Webhook {
        url,
        bodies,
        status,
        calls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_are_pushed_and_a_failing_webhook_ends_in_the_dlq_until_replayed() {
    let hook = webhook().await;
    let h = Harness::start(RouterConfig {
        push_notification_enabled: true,
        push_webhook_url: Some(hook.url.clone()),
        ..fast_retries()
    });
    let (alice, bob, carol) = (
        h.user("alice").await,
        h.user("bob").await,
        h.user("carol").await,
    );
    let group = h.group(alice, &[bob, carol]).await;
    let a = h.online(alice, "phone", 1);
    let c = h.online(carol, "phone", 3);
    h.send(&a, 1, &group, "t-1", "hello there");
    h.answer(a.conn, 1).await;
    let events = eventually(|| {
        let bodies = hook.bodies.lock().unwrap().clone();
        (!bodies.is_empty()).then_some(bodies)
    })
    .await;
    let event = &events[0];
    assert_eq!(
        event["recipients"],
        serde_json::json!([bob]),
        "only the offline member"
    );
    assert_eq!(event["preview"], "hello there");
    assert_eq!(event["conversation_id"], group.as_str());
    assert_eq!(
        (event["seq"].as_u64(), event["sender_id"].as_u64()),
        (Some(1), Some(alice))
    );
    assert_eq!(
        h.deliveries(c.conn, 1).await.len(),
        1,
        "online members get the frame, not a push"
    );

    hook.status.store(500, Ordering::SeqCst);
    let calls_before = hook.calls.load(Ordering::SeqCst);
    h.router.frame(
        &a,
        2,
        send_body(&group, "i-1", v1::ContentType::Image as i32, b"https://img"),
    );
    h.answer(a.conn, 2).await;
    let letters = eventually_async(|| async {
        let letters = h.router.dead_letters(0, 10).await.unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(
        (
            letters[0].kind.as_str(),
            letters[0].code,
            letters[0].attempts
        ),
        ("push", 50006, 3)
    );
    assert_eq!(hook.calls.load(Ordering::SeqCst) - calls_before, 3);

    assert!(h.router.replay_dead_letter(letters[0].id).await.is_err());
    assert_eq!(h.router.dead_letter_count().await.unwrap(), 1);
    hook.status.store(200, Ordering::SeqCst);
    h.router.replay_dead_letter(letters[0].id).await.unwrap();
    assert_eq!(h.router.dead_letter_count().await.unwrap(), 0);
    let last = hook.bodies.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (last["preview"].as_str(), last["seq"].as_u64()),
        (Some("[image]"), Some(2))
    );
    h.router.shutdown().await;
}
