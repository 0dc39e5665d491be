//! The directory owns presence: the router registers every connection in
//! it and unregisters it on close (never before its register finished),
//! presence queries are answered from it for users on any gateway, and a
//! directory with leases gets them renewed.
//!
//! One contract, one test body per behaviour, run against every directory
//! that can take part: [`SharedDirectory`] (in memory), [`RedisDirectory`]
//! (against the server `REDIS_URL` names, e.g. `redis://127.0.0.1:6379`,
//! each test under a key prefix of its own, deleted at the end) and, for
//! what one gateway without leases can show, [`LocalDirectory`]. Without
//! `REDIS_URL`, or with the server unreachable, the Redis tests skip with a
//! note, except under `CI=true`, where they fail.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_router::port::{Dispatch, Outbox, UserId};
use pingme_router::{
    Clock, ConnAddress, Directory, DirectoryError, LocalDirectory, Located, ManualClock, Presence,
    RedisDirectory, RedisDirectorySettings, Registration, Router, RouterConfig, SharedDirectory,
};
use pingme_storage::{Stores, UserStore};
use tokio::sync::watch;

/// The lease every fixture's directory holds.
const LEASE: Duration = Duration::from_secs(30);

/// A directory under test as two gateways, `gw-a` and `gw-b`, see it (one
/// shared instance, or one Redis directory per gateway), on one clock.
struct Fixture {
    clock: Arc<ManualClock>,
    gw_a: Arc<dyn Directory>,
    gw_b: Arc<dyn Directory>,
    /// Redis calls made by both gateways' directories, where counted.
    calls: Option<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// Whether a gateway whose lease lapsed writes its registrations again
    /// when it renews (Redis), rather than losing them (in memory).
    rewrites_after_lapse: bool,
    _keys: Option<RedisKeys>,
}

impl Fixture {
    /// The single-node directory of `gw-a` (no `gw-b`: one gateway).
    fn local() -> Fixture {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let outbox: Arc<dyn Outbox> = Arc::new(RecordingOutbox::default());
        let directory: Arc<dyn Directory> = Arc::new(LocalDirectory::with_clock(
            "gw-a".into(),
            outbox,
            clock.clone(),
        ));
        Fixture {
            clock,
            gw_a: directory.clone(),
            gw_b: directory,
            calls: None,
            rewrites_after_lapse: false,
            _keys: None,
        }
    }

    fn shared() -> Fixture {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let directory = Arc::new(SharedDirectory::new(LEASE, clock.clone()));
        Fixture {
            clock,
            gw_a: directory.clone(),
            gw_b: directory,
            calls: None,
            rewrites_after_lapse: false,
            _keys: None,
        }
    }

    /// Two Redis directories under a prefix of this test's own, or `None`
    /// (skip) outside CI without a reachable server.
    async fn redis() -> Option<Fixture> {
        let url = redis_url()?;
        let keys = RedisKeys::new(&url);
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let settings = RedisDirectorySettings {
            url,
            key_prefix: keys.prefix.clone(),
            lease: LEASE,
            ..RedisDirectorySettings::default()
        };
        let gw_a = Arc::new(RedisDirectory::new(&settings, "gw-a", clock.clone()).unwrap());
        let gw_b = Arc::new(RedisDirectory::new(&settings, "gw-b", clock.clone()).unwrap());
        if let Err(error) = gw_a.check().await {
            unreachable_redis(&settings.url, &error);
            return None;
        }
        let (a, b) = (gw_a.clone(), gw_b.clone());
        Some(Fixture {
            clock,
            gw_a,
            gw_b,
            calls: Some(Box::new(move || a.calls() + b.calls())),
            rewrites_after_lapse: true,
            _keys: Some(keys),
        })
    }

    /// The directory of `gateway`.
    fn of(&self, gateway: &str) -> &Arc<dyn Directory> {
        match gateway {
            "gw-a" => &self.gw_a,
            "gw-b" => &self.gw_b,
            other => panic!("no gateway {other} in the fixture"),
        }
    }

    async fn register(&self, user: UserId, gateway: &str, conn_id: u64) -> Registration {
        let registration = registration(user, gateway, conn_id);
        self.of(gateway).register(&registration).await.unwrap();
        registration
    }
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true" || ci == "1")
}

/// `REDIS_URL`, or `None` (skip, with a note) outside CI.
fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) => Some(url),
        Err(_) if under_ci() => {
            panic!("CI is set but REDIS_URL is not: the Redis directory tests must run in CI")
        }
        Err(_) => {
            eprintln!(
                "skipped: set REDIS_URL=redis://127.0.0.1:6379 to run the Redis directory tests"
            );
            None
        }
    }
}

fn unreachable_redis(url: &str, error: &DirectoryError) {
    assert!(
        !under_ci(),
        "REDIS_URL={url} is unreachable under CI: {error}"
    );
    eprintln!("skipped: REDIS_URL={url} is unreachable ({error})");
}

/// A key prefix of one test's own; its keys are deleted when this goes,
/// also when the test panics.
struct RedisKeys {
    url: String,
    prefix: String,
}

impl RedisKeys {
    fn new(url: &str) -> RedisKeys {
        RedisKeys {
            url: url.to_string(),
            prefix: format!(
                "pingme-test-redis:{}:",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
        }
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let Ok(mut redis) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        else {
            return;
        };
        let pattern = format!("{}*", self.prefix);
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut redis)
            else {
                return;
            };
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut redis);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

fn registration(user: UserId, gateway: &str, conn_id: u64) -> Registration {
    Registration {
        user,
        device: Arc::from("phone"),
        gateway: Arc::from(gateway),
        conn: ConnAddress {
            shard: (conn_id % 4) as u16,
            conn_id,
        },
    }
}

/// Runs each named contract test against the directories of `$fixture`
/// (a module per implementation).
macro_rules! contract {
    ($implementation:ident: $fixture:expr => $($name:ident),* $(,)?) => {
        mod $implementation {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(fixture) = $fixture {
                        super::$name(fixture).await;
                    }
                }
            )*
        }
    };
}

contract!(shared: Some(super::Fixture::shared()) =>
    presence_counts_every_connection_of_a_user,
    locates_a_page_of_users_per_gateway,
    presence_and_last_seen_span_gateways,
    a_gateway_that_stops_renewing_loses_its_users_when_the_lease_ends,
    a_fanout_page_of_a_thousand_users_is_located_in_one_call,
    connections_register_and_presence_spans_gateways,
);

contract!(redis_directory: super::Fixture::redis().await =>
    presence_counts_every_connection_of_a_user,
    locates_a_page_of_users_per_gateway,
    presence_and_last_seen_span_gateways,
    a_gateway_that_stops_renewing_loses_its_users_when_the_lease_ends,
    a_fanout_page_of_a_thousand_users_is_located_in_one_call,
    connections_register_and_presence_spans_gateways,
);

// One gateway, no leases, delivery by the gateway's own index: what the
// single-node directory shares with the others is presence.
contract!(local: Some(super::Fixture::local()) =>
    presence_counts_every_connection_of_a_user,
);

async fn presence_counts_every_connection_of_a_user(fixture: Fixture) {
    let clock = &fixture.clock;
    let directory = &fixture.gw_a;
    assert_eq!(
        directory.presence(&[1]).await.unwrap(),
        [Presence::default()],
        "never seen"
    );
    let phone = fixture.register(1, "gw-a", 1).await;
    let laptop = fixture.register(1, "gw-a", 2).await;
    clock.advance(Duration::from_millis(10));
    directory.unregister(&phone).await.unwrap();
    assert_eq!(
        directory.presence(&[1]).await.unwrap(),
        [Presence {
            online: true,
            last_seen_ms: clock.now_ms()
        }],
        "online while one connection is left"
    );
    clock.advance(Duration::from_millis(20));
    directory.unregister(&laptop).await.unwrap();
    let left = clock.now_ms();
    clock.advance(Duration::from_millis(10));
    assert_eq!(
        directory.presence(&[1]).await.unwrap(),
        [Presence {
            online: false,
            last_seen_ms: left
        }]
    );
    directory.register(&phone).await.unwrap();
    assert!(directory.presence(&[1]).await.unwrap()[0].online);
}

async fn locates_a_page_of_users_per_gateway(fixture: Fixture) {
    fixture.register(1, "gw-a", 1).await;
    fixture.register(2, "gw-b", 1).await;
    fixture.register(3, "gw-a", 2).await;
    // User 2 on two gateways, and twice on gw-b.
    fixture.register(2, "gw-a", 3).await;
    fixture.register(2, "gw-b", 4).await;

    for asking in [&fixture.gw_a, &fixture.gw_b] {
        let located = asking.locate(&[1, 2, 3, 4], true).await.unwrap();
        assert_eq!(
            located.online,
            [
                ("gw-a".to_string(), vec![1, 2, 3]),
                ("gw-b".to_string(), vec![2]),
            ]
        );
        assert_eq!(located.offline, [4]);
        // Offline users are only listed when asked for.
        let located = asking.locate(&[4], false).await.unwrap();
        assert_eq!(located, Located::default());
    }
}

async fn presence_and_last_seen_span_gateways(fixture: Fixture) {
    let clock = &fixture.clock;
    let on_a = fixture.register(1, "gw-a", 1).await;
    let on_b = fixture.register(1, "gw-b", 1).await;
    clock.advance(Duration::from_secs(1));
    fixture.gw_a.unregister(&on_a).await.unwrap();
    let now = clock.now_ms();
    assert_eq!(
        fixture.gw_b.presence(&[1, 9]).await.unwrap(),
        [
            Presence {
                online: true,
                last_seen_ms: now
            },
            Presence::default()
        ],
        "online while a device is connected on any gateway; unknown users never seen"
    );
    clock.advance(Duration::from_secs(1));
    fixture.gw_b.unregister(&on_b).await.unwrap();
    let left = clock.now_ms();
    clock.advance(Duration::from_secs(5));
    for asking in [&fixture.gw_a, &fixture.gw_b] {
        assert_eq!(
            asking.presence(&[1]).await.unwrap(),
            [Presence {
                online: false,
                last_seen_ms: left
            }]
        );
    }
}

async fn a_gateway_that_stops_renewing_loses_its_users_when_the_lease_ends(fixture: Fixture) {
    let clock = &fixture.clock;
    assert_eq!(fixture.gw_a.renew_every(), Some(LEASE / 3));
    fixture.register(1, "gw-a", 1).await;
    fixture.register(2, "gw-b", 1).await;
    let a_lease_end = clock.now_ms() + LEASE.as_millis() as i64;
    // gw-b renews every 10 s; gw-a has died and does not.
    for _ in 0..2 {
        clock.advance(LEASE / 3);
        assert!(fixture.gw_b.renew_lease("gw-b").await.unwrap());
    }
    clock.advance(LEASE / 3 - Duration::from_millis(1));
    assert_eq!(
        fixture.gw_b.locate(&[1, 2], true).await.unwrap().offline,
        Vec::<UserId>::new(),
        "within the lease gw-a's user is still routed to it"
    );
    clock.advance(Duration::from_millis(1));
    assert!(fixture.gw_b.renew_lease("gw-b").await.unwrap());
    let located = fixture.gw_b.locate(&[1, 2], true).await.unwrap();
    assert_eq!(located.online, [("gw-b".to_string(), vec![2])]);
    assert_eq!(located.offline, [1], "nothing routes to gw-a any more");
    assert_eq!(
        fixture.gw_b.presence(&[1]).await.unwrap(),
        [Presence {
            online: false,
            last_seen_ms: a_lease_end
        }],
        "last seen when the lease ended"
    );
    // gw-a comes back (it had stalled, not died): it learns its lease had
    // lapsed, then holds a new one.
    assert!(!fixture.gw_a.renew_lease("gw-a").await.unwrap());
    assert!(fixture.gw_a.renew_lease("gw-a").await.unwrap());
    let located = fixture.gw_b.locate(&[1], true).await.unwrap();
    if fixture.rewrites_after_lapse {
        assert_eq!(
            located.online,
            [("gw-a".to_string(), vec![1])],
            "its connection was written again under the new lease"
        );
    } else {
        assert_eq!(located.offline, [1], "its connection must register again");
    }
}

async fn a_fanout_page_of_a_thousand_users_is_located_in_one_call(fixture: Fixture) {
    // 1,200 users online (every third on gw-b, every fifth on both), and
    // 300 never seen.
    let online: Vec<UserId> = (1..=1_200).collect();
    for &user in &online {
        let gateway = if user % 3 == 0 { "gw-b" } else { "gw-a" };
        fixture.register(user, gateway, user).await;
        if user % 5 == 0 {
            let other = if gateway == "gw-a" { "gw-b" } else { "gw-a" };
            fixture.register(user, other, 10_000 + user).await;
        }
    }
    let page: Vec<UserId> = (1..=1_500).collect();
    let calls_before = fixture.calls.as_ref().map(|calls| calls());
    let located = fixture.gw_a.locate(&page, true).await.unwrap();
    if let (Some(calls), Some(before)) = (&fixture.calls, calls_before) {
        assert_eq!(calls() - before, 1, "one round trip for the whole page");
    }
    let on = |gateway: &str| {
        located
            .online
            .iter()
            .find(|(g, _)| g == gateway)
            .map(|(_, users)| users.clone())
            .unwrap_or_default()
    };
    let expected_a: Vec<UserId> = online
        .iter()
        .copied()
        .filter(|u| u % 3 != 0 || u % 5 == 0)
        .collect();
    let expected_b: Vec<UserId> = online
        .iter()
        .copied()
        .filter(|u| u % 3 == 0 || u % 5 == 0)
        .collect();
    assert_eq!(on("gw-a"), expected_a);
    assert_eq!(on("gw-b"), expected_b);
    assert_eq!(located.online.len(), 2);
    assert_eq!(located.offline, (1_201..=1_500).collect::<Vec<UserId>>());
}

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

async fn connections_register_and_presence_spans_gateways(fixture: Fixture) {
    let (_dir, store) = open_store();
    let stores = Stores::all_from(store.clone());
    let clock = fixture.clock.clone();
    let (_, gw_a) = router_on(&stores, "gw-a", fixture.gw_a.clone());
    let (outbox_b, gw_b) = router_on(&stores, "gw-b", fixture.gw_b.clone());
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
    // A remote directory registers on a task: wait for both.
    let located = located_when(&*fixture.gw_b, &[alice, bob, 3], |located| {
        located.offline == [3]
    })
    .await;
    assert_eq!(
        located.online,
        [
            ("gw-a".to_string(), vec![alice]),
            ("gw-b".to_string(), vec![bob])
        ]
    );

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
    located_when(&*fixture.gw_b, &[alice], |located| {
        located.offline == [alice]
    })
    .await;
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

/// Where `users` are, each listed once (online somewhere or offline), as
/// soon as `wanted` holds.
async fn located_when(
    directory: &dyn Directory,
    users: &[UserId],
    wanted: impl Fn(&Located) -> bool,
) -> Located {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let located = directory.locate(users, true).await.unwrap();
        assert_eq!(
            located.online.iter().map(|(_, u)| u.len()).sum::<usize>() + located.offline.len(),
            users.len()
        );
        if wanted(&located) {
            return located;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting; last {located:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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

/// A shared directory whose registrations wait for a gate (a slow Redis)
/// and whose renewals fail while it is `down`, counting calls, renewing
/// every `renew_every`.
struct SlowDirectory {
    inner: SharedDirectory,
    gate: watch::Receiver<bool>,
    down: std::sync::atomic::AtomicBool,
    renew_every: Duration,
    registered: AtomicUsize,
    unregistered: AtomicUsize,
    renewals: AtomicUsize,
    failed_renewals: AtomicUsize,
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
        Some(self.renew_every)
    }
    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError> {
        if self.down.load(Ordering::SeqCst) {
            self.failed_renewals.fetch_add(1, Ordering::SeqCst);
            return Err(DirectoryError::Unavailable("down".into()));
        }
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
    test_directory(gate_open, false, Duration::from_millis(10))
}

fn test_directory(
    gate_open: bool,
    down: bool,
    renew_every: Duration,
) -> (watch::Sender<bool>, Arc<SlowDirectory>) {
    let (open, gate) = watch::channel(gate_open);
    let directory = Arc::new(SlowDirectory {
        inner: SharedDirectory::new(Duration::from_secs(30), Arc::new(ManualClock::new(0))),
        gate,
        down: down.into(),
        renew_every,
        registered: AtomicUsize::new(0),
        unregistered: AtomicUsize::new(0),
        renewals: AtomicUsize::new(0),
        failed_renewals: AtomicUsize::new(0),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lease_renewal_is_retried_before_the_next_period() {
    let (_dir, store) = open_store();
    // Down for the first renewal (at start), renewing once an hour: only a
    // retry after the failure renews sooner.
    let (_open, directory) = test_directory(true, true, Duration::from_secs(3600));
    let (_, router) = router_on(&Stores::all_from(store), "gw-a", directory.clone());
    eventually(|| (directory.failed_renewals.load(Ordering::SeqCst) >= 1).then_some(())).await;
    directory.down.store(false, Ordering::SeqCst);
    // Renewed long before the next hourly period.
    eventually(|| (directory.renewals.load(Ordering::SeqCst) >= 1).then_some(())).await;
    router.shutdown().await;
}

#[tokio::test]
async fn with_redis_unreachable_calls_fail_fast_and_deliveries_stay_on_this_gateway() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let outbox = Arc::new(RecordingOutbox::default());
    outbox.connect(1, common::conn(1));
    let settings = RedisDirectorySettings {
        url: format!("redis://127.0.0.1:{port}"),
        timeout: Duration::from_millis(500),
        ..RedisDirectorySettings::default()
    };
    let directory = RedisDirectory::new(&settings, "gw-a", Arc::new(ManualClock::new(0)))
        .unwrap()
        .with_local_fallback(outbox.clone());
    assert!(matches!(
        directory.check().await,
        Err(DirectoryError::Unavailable(_))
    ));
    assert!(
        directory
            .register(&registration(1, "gw-a", 1))
            .await
            .is_err()
    );
    assert!(directory.presence(&[1]).await.is_err());
    let located = directory.locate(&[1, 2], true).await.unwrap();
    assert_eq!(
        located.online,
        [("gw-a".to_string(), vec![1])],
        "the users connected here still get their deliveries"
    );
    assert!(
        located.offline.is_empty(),
        "nobody is reported offline (pushed) on a guess"
    );
}
