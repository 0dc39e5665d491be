//! Test doubles and helpers for the router's integration tests: a router
//! over a temp store with a recording outbox ([`Harness`]), frames to send
//! and to read answers from, and, from `pingme-testkit`, the waiting
//! helpers, the recording [`Outbox`] and the temp store.

#![allow(dead_code)]

// Each test binary uses its own part of the kit.
#[allow(unused_imports)]
pub use pingme_testkit::{
    Disconnect, PATIENCE, RecordingOutbox, eventually, eventually_async, temp_store, unique_suffix,
};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingme_protocol::ServerFrame;
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_router::port::{ConnRef, Dispatch, SessionInfo, UserId};
use pingme_router::{Directory, Router, RouterConfig};
use pingme_storage::embedded::EmbeddedStore;
use pingme_storage::{ConversationStore, Member, Role, Stores, UserStore};

/// Creates a group of `owner` and `members` in `store`; its conversation id.
pub async fn create_group(store: &EmbeddedStore, owner: UserId, members: &[UserId]) -> String {
    let group = store.create_group(owner, "g", &[], 1).await.unwrap();
    for page in members.chunks(1000) {
        let page: Vec<Member> = page
            .iter()
            .map(|&user| Member {
                user,
                role: Role::Member,
            })
            .collect();
        store.add_members(group.id, &page).await.unwrap();
    }
    format!("g:{}", group.id)
}

/// A router over an embedded store in a temp dir, with a recording outbox.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub store: Arc<EmbeddedStore>,
    pub outbox: Arc<RecordingOutbox>,
    pub router: Arc<Router>,
}

/// An embedded store in a fresh temp dir.
pub fn open_store() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    temp_store()
}

impl Harness {
    pub fn start(config: RouterConfig) -> Harness {
        let (dir, store) = open_store();
        let outbox = Arc::new(RecordingOutbox::default());
        let router = Router::start(Stores::all_from(store.clone()), outbox.clone(), config);
        Harness {
            dir,
            store,
            outbox,
            router,
        }
    }

    /// Registers a user.
    pub async fn user(&self, name: &str) -> UserId {
        self.store
            .create_user(name, "$argon2id$x", 1)
            .await
            .unwrap()
            .id
    }

    /// Registers `count` users concurrently (the store group-commits).
    pub async fn users(&self, prefix: &str, count: usize) -> Vec<UserId> {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let store = self.store.clone();
            let name = format!("{prefix}-{i}");
            tasks
                .spawn(async move { store.create_user(&name, "$argon2id$x", 1).await.unwrap().id });
        }
        let mut users: Vec<UserId> = tasks.join_all().await;
        users.sort_unstable();
        users
    }

    /// Creates a group of `owner` and `members`.
    pub async fn group(&self, owner: UserId, members: &[UserId]) -> String {
        create_group(&self.store, owner, members).await
    }

    /// An online session of `user` on connection `conn_id`.
    pub fn online(&self, user: UserId, device: &str, conn_id: u64) -> SessionInfo {
        let session = offline_session(user, device, conn_id);
        self.outbox.connect(user, session.conn);
        self.router.connected(&session);
        session
    }

    pub fn send(
        &self,
        session: &SessionInfo,
        request_id: u64,
        conversation: &str,
        client_msg_id: &str,
        body: &str,
    ) {
        self.router.frame(
            session,
            request_id,
            send_body(conversation, client_msg_id, 1, body.as_bytes()),
        );
    }

    pub fn request(&self, session: &SessionInfo, request_id: u64, body: client_frame::Body) {
        self.router.frame(session, request_id, body);
    }

    /// Waits until `conn` holds a frame answering `request_id` and returns it.
    pub async fn answer(&self, conn: ConnRef, request_id: u64) -> ServerFrame {
        eventually(|| {
            self.outbox
                .frames(conn)
                .into_iter()
                .find(|f| f.request_id == request_id)
        })
        .await
    }

    /// Waits until `conn` holds at least `count` deliveries and returns all.
    pub async fn deliveries(&self, conn: ConnRef, count: usize) -> Vec<v1::Message> {
        eventually(|| {
            let delivered = delivered(&self.outbox.frames(conn));
            (delivered.len() >= count).then_some(delivered)
        })
        .await
    }
}

pub fn conn(conn_id: u64) -> ConnRef {
    ConnRef {
        shard: (conn_id % 4) as u16,
        conn_id,
    }
}

pub fn offline_session(user: UserId, device: &str, conn_id: u64) -> SessionInfo {
    SessionInfo {
        user,
        device: device.into(),
        conn: conn(conn_id),
    }
}

pub fn send_body(
    conversation: &str,
    client_msg_id: &str,
    content_type: i32,
    body: &[u8],
) -> client_frame::Body {
    client_frame::Body::Send(v1::SendMessage {
        client_msg_id: client_msg_id.into(),
        conversation_id: conversation.into(),
        content_type,
        body: Bytes::copy_from_slice(body),
    })
}

/// Waits until `user` is registered on `gateway`: a router registers a
/// connection in the directory on its own time, and a sender on another
/// node finds the user only after that.
pub async fn registered(directory: &dyn Directory, user: UserId, gateway: &str) {
    eventually_async(|| async {
        let located = directory.locate(&[user], false).await.unwrap();
        located
            .online
            .iter()
            .any(|(at, users)| at == gateway && users.contains(&user))
            .then_some(())
    })
    .await;
}

/// The messages of the deliver frames among `frames`, in arrival order.
pub fn delivered(frames: &[ServerFrame]) -> Vec<v1::Message> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(server_frame::Body::Deliver(d)) => d.message.clone(),
            _ => None,
        })
        .collect()
}

pub fn ack(frame: &ServerFrame) -> v1::SendAck {
    match &frame.body {
        Some(server_frame::Body::SendAck(ack)) => ack.clone(),
        other => panic!("expected a SendAck, got {other:?}"),
    }
}

pub fn error(frame: &ServerFrame) -> v1::Error {
    match &frame.body {
        Some(server_frame::Body::Error(error)) => error.clone(),
        other => panic!("expected an Error, got {other:?}"),
    }
}

pub fn dm(a: UserId, b: UserId) -> String {
    format!("dm:{}:{}", a.min(b), a.max(b))
}

/// Settings for the broker in `KAFKA_BROKERS`, tuned for tests (Tansu's
/// group join takes about half the session timeout), or `None` when it is
/// unset or unreachable: only outside CI, where the test then skips and
/// says why; under `CI=true` the test fails.
#[cfg(feature = "kafka")]
pub fn kafka_from_env() -> Option<pingme_router::KafkaSettings> {
    use std::net::ToSocketAddrs;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_default();
    let reachable = brokers.split(',').next().is_some_and(|first| {
        first
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .is_some_and(|addr| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
            })
    });
    if !reachable {
        let state = if brokers.is_empty() {
            "unset".to_string()
        } else {
            format!("{brokers:?}, unreachable")
        };
        let why = format!("KAFKA_BROKERS is {state} (start a broker: `bash .ci/kafka.sh`)");
        assert!(!ci, "the Kafka tests need a broker under CI=true: {why}");
        eprintln!("skipped: {why}");
        return None;
    }
    // The bus's warnings and errors (a record not delivered, a failed
    // rebalance) show in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("pingme_router=info,rdkafka=warn")
        .try_init();
    let mut settings = pingme_router::KafkaSettings::new(brokers);
    // Low for quick joins, yet well above a heartbeat's delay on a loaded
    // two-core machine (a member dropped mid-test rebalances the group).
    settings.session_timeout_ms = 6_000;
    settings.heartbeat_interval_ms = 500;
    // The contract's commits are exact: every call commits.
    settings.commit_interval = Duration::ZERO;
    settings.request_timeout = Duration::from_secs(10);
    Some(settings)
}
