//! The directory owns presence: the router registers every connection in
//! it and unregisters it on close (never before its register finished),
//! presence queries are answered from it for users on any gateway, and a
//! directory with leases gets them renewed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_router::port::{Dispatch, UserId};
use pingme_router::{
    Clock, Directory, DirectoryError, Located, ManualClock, Presence, Registration, Router,
    RouterConfig, SharedDirectory,
};
use pingme_storage::{Stores, UserStore};
use tokio::sync::watch;

/// A router of gateway `gateway` over `directory`, with its own outbox.
fn router_on(
    stores: &Stores,
    gateway: &str,
    directory: Arc<dyn Directory>,
) -> (Arc<RecordingOutbox>, Arc<Router>) {
    let outbox = Arc::new(RecordingOutbox::default());
    let config = RouterConfig {
        gateway_id: gateway.into(),
        ..RouterConfig::default()
    };
    let router = Router::start_single_node(stores.clone(), outbox.clone(), config, directory);
    (outbox, router)
}

fn presence_list(frame: &pingme_protocol::ServerFrame) -> Vec<v1::PresenceEvent> {
    match &frame.body {
        Some(server_frame::Body::PresenceList(list)) => list.users.clone(),
        other => panic!("expected a PresenceList, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_register_and_presence_spans_gateways() {
    let (_dir, store) = open_store();
    let stores = Stores::all_from(store.clone());
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let directory = Arc::new(SharedDirectory::new(Duration::from_secs(30), clock.clone()));
    let (_, gw_a) = router_on(&stores, "gw-a", directory.clone());
    let (outbox_b, gw_b) = router_on(&stores, "gw-b", directory.clone());
    // Presence is shown only to users who share a conversation.
    let alice = store
        .create_user("alice", "$argon2id$x", 1)
        .await
        .unwrap()
        .id;
    let bob = store.create_user("bob", "$argon2id$x", 1).await.unwrap().id;
    common::create_group(&store, alice, &[bob]).await;

    let alice_phone = offline_session(alice, "phone", 1);
    let bob_laptop = offline_session(bob, "laptop", 1);
    gw_a.connected(&alice_phone);
    gw_b.connected(&bob_laptop);
    let located = located(&directory, &[alice, bob, 3]).await;
    assert_eq!(
        located.online,
        [
            ("gw-a".to_string(), vec![alice]),
            ("gw-b".to_string(), vec![bob])
        ]
    );
    assert_eq!(located.offline, [3]);

    // Bob, on gw-b, asks about Alice, on gw-a.
    let query = |request_id| {
        gw_b.frame(
            &bob_laptop,
            request_id,
            client_frame::Body::PresenceQuery(v1::PresenceQuery {
                user_ids: vec![alice, 3],
            }),
        )
    };
    query(1);
    let answer = answer_on(&outbox_b, bob_laptop.conn, 1).await;
    let now = clock.now_ms();
    assert_eq!(
        presence_list(&answer),
        [
            v1::PresenceEvent {
                user_id: alice,
                online: true,
                last_seen_ms: now
            },
            v1::PresenceEvent {
                user_id: 3,
                online: false,
                last_seen_ms: 0
            },
        ]
    );

    clock.advance(Duration::from_secs(7));
    let left = clock.now_ms();
    gw_a.disconnected(&alice_phone);
    clock.advance(Duration::from_secs(60));
    query(2);
    let answer = answer_on(&outbox_b, bob_laptop.conn, 2).await;
    assert_eq!(
        presence_list(&answer)[0],
        v1::PresenceEvent {
            user_id: alice,
            online: false,
            last_seen_ms: left
        },
        "offline on every gateway, last seen when the connection closed"
    );
    gw_a.shutdown().await;
    gw_b.shutdown().await;
}

/// Where `users` are, each listed once (online somewhere or offline).
async fn located(directory: &SharedDirectory, users: &[UserId]) -> Located {
    let located = directory.locate(users, true).await.unwrap();
    assert_eq!(
        located.online.iter().map(|(_, u)| u.len()).sum::<usize>() + located.offline.len(),
        users.len()
    );
    located
}

async fn answer_on(
    outbox: &RecordingOutbox,
    conn: pingme_router::port::ConnRef,
    request_id: u64,
) -> pingme_protocol::ServerFrame {
    eventually(|| {
        outbox
            .frames(conn)
            .into_iter()
            .find(|f| f.request_id == request_id)
    })
    .await
}

/// A shared directory whose registrations wait for a gate (a slow Redis),
/// counting calls, with a short renewal period.
struct SlowDirectory {
    inner: SharedDirectory,
    gate: watch::Receiver<bool>,
    registered: AtomicUsize,
    unregistered: AtomicUsize,
    renewals: AtomicUsize,
}

#[async_trait]
impl Directory for SlowDirectory {
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError> {
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .map_err(|e| DirectoryError::Unavailable(e.to_string()))?;
        self.registered.fetch_add(1, Ordering::SeqCst);
        self.inner.register(connection).await
    }
    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.unregistered.fetch_add(1, Ordering::SeqCst);
        self.inner.unregister(connection).await
    }
    fn renew_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(10))
    }
    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        self.inner.renew_lease(gateway).await
    }
    async fn locate(
        &self,
        users: &[UserId],
        need_offline: bool,
    ) -> Result<Located, DirectoryError> {
        self.inner.locate(users, need_offline).await
    }
    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError> {
        self.inner.presence(users).await
    }
}

fn slow_directory(gate_open: bool) -> (watch::Sender<bool>, Arc<SlowDirectory>) {
    let (open, gate) = watch::channel(gate_open);
    let directory = Arc::new(SlowDirectory {
        inner: SharedDirectory::new(Duration::from_secs(30), Arc::new(ManualClock::new(0))),
        gate,
        registered: AtomicUsize::new(0),
        unregistered: AtomicUsize::new(0),
        renewals: AtomicUsize::new(0),
    });
    (open, directory)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregister_never_overtakes_its_register() {
    let (_dir, store) = open_store();
    let (open, directory) = slow_directory(false);
    let (_, router) = router_on(&Stores::all_from(store), "gw-a", directory.clone());
    let session = offline_session(7, "phone", 1);
    // The connection closes while its registration is still in flight.
    router.connected(&session);
    router.disconnected(&session);
    open.send(true).unwrap();
    eventually(|| (directory.unregistered.load(Ordering::SeqCst) == 1).then_some(())).await;
    assert_eq!(directory.registered.load(Ordering::SeqCst), 1);
    let located = directory.inner.locate(&[7], true).await.unwrap();
    assert_eq!(
        located.offline,
        [7],
        "the closed connection is not left registered"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_with_leases_is_renewed_until_shutdown() {
    let (_dir, store) = open_store();
    let (_open, directory) = slow_directory(true);
    let (_, router) = router_on(&Stores::all_from(store), "gw-a", directory.clone());
    eventually(|| (directory.renewals.load(Ordering::SeqCst) >= 3).then_some(())).await;
    router.shutdown().await;
}
