//! Three routers (`gw-a`, `gw-b`, `gw-c`) in one process, as a cluster:
//! the serialising bus (every record crosses encoded, partitions move
//! between nodes), one [`SharedDirectory`] of who is connected where (each
//! router registers its connections in it and renews its lease; a killed
//! node's lease is ended), and one store.
//! Each node runs on its own runtime, so dropping a node without notice
//! stops all of its work at once, as a crash would.
//!
//! Delivery is at least once: a client de-duplicates by seq, so these tests
//! compare the sets of seqs each device received, never counts of frames.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use pingme_protocol::ErrorCode;
use pingme_router::port::{ConnRef, Dispatch, Outbox, SessionInfo, UserId};
use pingme_router::{
    BusCluster, BusTopics, Directory, DirectoryError, Located, ManualClock, Presence, Registration,
    Router, RouterConfig, SharedDirectory, text_key,
};
use pingme_storage::embedded::EmbeddedStore;
use pingme_storage::{MessageStore, Stores, UserStore};

/// One node's view of the cluster's [`SharedDirectory`] (what Redis is in
/// production). It can hold the node's fanout pages after the first `pass`
/// of them, leaving the node stuck mid-fanout; everything else goes
/// straight to the shared directory.
struct NodeDirectory {
    shared: Arc<SharedDirectory>,
    /// A lookup of at least this many users is a fanout page.
    page: usize,
    /// Pages let through before the rest are held (None: never held).
    pass: Option<usize>,
    pages: AtomicUsize,
    held: AtomicUsize,
}

#[async_trait]
impl Directory for NodeDirectory {
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.shared.register(connection).await
    }
    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.shared.unregister(connection).await
    }
    fn renew_every(&self) -> Option<Duration> {
        self.shared.renew_every()
    }
    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError> {
        self.shared.renew_lease(gateway).await
    }
    async fn locate(
        &self,
        users: &[UserId],
        need_offline: bool,
    ) -> Result<Located, DirectoryError> {
        if users.len() >= self.page {
            let seen = self.pages.fetch_add(1, Ordering::SeqCst);
            if self.pass.is_some_and(|pass| seen >= pass) {
                self.held.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
        }
        self.shared.locate(users, need_offline).await
    }
    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError> {
        self.shared.presence(users).await
    }
}

struct Node {
    name: &'static str,
    outbox: Arc<RecordingOutbox>,
    router: Arc<Router>,
    directory: Arc<NodeDirectory>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Node {
    /// `user` connects here on connection `conn_id`, once the cluster's
    /// directory knows it.
    async fn online(&self, user: UserId, conn_id: u64) -> SessionInfo {
        let session = offline_session(user, "phone", conn_id);
        self.outbox.connect(user, session.conn);
        self.router.connected(&session);
        registered(&*self.directory.shared, user, self.name).await;
        session
    }

    fn send(&self, session: &SessionInfo, request_id: u64, conversation: &str, body: &str) {
        self.router.frame(
            session,
            request_id,
            send_body(
                conversation,
                &format!("{}-{request_id}", session.conn.conn_id),
                1,
                body.as_bytes(),
            ),
        );
    }

    async fn answer(&self, conn: ConnRef, request_id: u64) -> pingme_protocol::ServerFrame {
        eventually(|| {
            self.outbox
                .frames(conn)
                .into_iter()
                .find(|frame| frame.request_id == request_id)
        })
        .await
    }

    /// The distinct (conversation, seq) pairs delivered to `conn`.
    fn seqs(&self, conn: ConnRef) -> BTreeSet<(String, u64)> {
        delivered(&self.outbox.frames(conn))
            .into_iter()
            .map(|message| (message.conversation_id, message.seq))
            .collect()
    }
}

struct TestCluster {
    bus: Arc<BusCluster>,
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
    directory: Arc<SharedDirectory>,
    nodes: HashMap<&'static str, Node>,
    config: RouterConfig,
}

const PERSISTENCE: &str = "im-persistence";
const TASKS: &str = "im-task";

fn config() -> RouterConfig {
    RouterConfig {
        workers: 2,
        fanout_workers: 1,
        push_workers: 1,
        large_group_threshold: 3,
        fanout_batch_size: 4,
        topics: BusTopics {
            persistence_partitions: 6,
            task_partitions: 3,
            push_partitions: 1,
            dlq_partitions: 1,
            downstream_partitions: 2,
            ..BusTopics::default()
        },
        retry_initial_backoff: Duration::from_millis(1),
        retry_max_backoff: Duration::from_millis(5),
        ..RouterConfig::default()
    }
}

impl TestCluster {
    fn new() -> Self {
        let (dir, store) = open_store();
        Self {
            bus: BusCluster::new(),
            _dir: dir,
            store,
            // Leases end only when a test says so (`end_lease`): the
            // clock never moves.
            directory: Arc::new(SharedDirectory::new(
                Duration::from_secs(60),
                Arc::new(ManualClock::new(1_700_000_000_000)),
            )),
            nodes: HashMap::new(),
            config: config(),
        }
    }

    /// Starts node `name`; its fanout pages after the first `pass` hang.
    fn start(&mut self, name: &'static str, pass: Option<usize>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap();
        let outbox = Arc::new(RecordingOutbox::default());
        let directory = Arc::new(NodeDirectory {
            shared: self.directory.clone(),
            page: self.config.fanout_batch_size,
            pass,
            pages: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        });
        let router = {
            let _inside = runtime.enter();
            Router::start_with(
                Stores::all_from(self.store.clone()),
                outbox.clone() as Arc<dyn Outbox>,
                RouterConfig {
                    gateway_id: name.to_string(),
                    ..self.config.clone()
                },
                self.bus.node(name),
                directory.clone(),
            )
            .unwrap()
        };
        self.nodes.insert(
            name,
            Node {
                name,
                outbox,
                router,
                directory,
                runtime: Some(runtime),
            },
        );
    }

    fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    /// `name` stops renewing its lease and its lease ends: its users are
    /// offline to the other nodes.
    fn leave_directory(&self, name: &str) {
        self.directory.end_lease(name);
    }

    /// Kills `name` without notice: the bus fences it, its work stops.
    fn kill(&mut self, name: &str) {
        self.bus.drop_node(name);
        self.leave_directory(name);
        self.nodes.remove(name);
    }

    /// The node holding each partition of `topic` in `group`.
    fn holders(&self, topic: &str, group: &str) -> Vec<Option<String>> {
        self.bus
            .holders(topic, group)
            .into_iter()
            .map(|holder| holder.map(|member| member[..4].to_string()))
            .collect()
    }

    /// Waits until every partition of the persistence and task topics is
    /// held, each by a different member (nodes x workers of them).
    async fn settled(&self) {
        let nodes = self.nodes.len();
        for (topic, group, members) in [
            (
                PERSISTENCE,
                "im-persistence-group",
                nodes * self.config.workers,
            ),
            (TASKS, "im-task-group", nodes * self.config.fanout_workers),
        ] {
            eventually(|| {
                let holders = self.bus.holders(topic, group);
                let distinct: BTreeSet<_> = holders.iter().flatten().collect();
                (holders.iter().all(Option::is_some) && distinct.len() == members).then_some(())
            })
            .await;
        }
    }

    async fn users(&self, count: usize) -> Vec<UserId> {
        let mut users = Vec::new();
        for _ in 0..count {
            let name = uuid_like(users.len());
            users.push(
                self.store
                    .create_user(&name, "$argon2id$x", 1)
                    .await
                    .unwrap()
                    .id,
            );
        }
        users
    }

    async fn group(&self, members: &[UserId]) -> String {
        create_group(&self.store, members[0], &members[1..]).await
    }

    /// `count` users, connected round robin to gw-a, gw-b and gw-c
    /// (connection ids from 100).
    async fn spread_users(&self, count: usize) -> (Vec<UserId>, Vec<(&'static str, SessionInfo)>) {
        let users = self.users(count).await;
        let mut sessions = Vec::new();
        for (i, &user) in users.iter().enumerate() {
            let gateway = GATEWAYS[i % GATEWAYS.len()];
            sessions.push((
                gateway,
                self.node(gateway).online(user, 100 + i as u64).await,
            ));
        }
        (users, sessions)
    }
}

const GATEWAYS: [&str; 3] = ["gw-a", "gw-b", "gw-c"];

fn uuid_like(index: usize) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("user-{index}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The partition of a conversation in a topic of `partitions`.
fn partition(conversation: &str, partitions: u32) -> usize {
    (text_key(conversation) % u64::from(partitions)) as usize
}

fn expected(conversation: &str, seqs: impl IntoIterator<Item = u64>) -> BTreeSet<(String, u64)> {
    seqs.into_iter()
        .map(|seq| (conversation.to_string(), seq))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_gateways_chat_one_to_one_and_in_small_and_large_groups() {
    let mut cluster = TestCluster::new();
    for name in GATEWAYS {
        cluster.start(name, None);
    }
    cluster.settled().await;
    let (users, sessions) = cluster.spread_users(9).await;
    let (a, b, c) = (&sessions[0].1, &sessions[1].1, &sessions[2].1);

    // 1:1 from gw-a to gw-b.
    let direct = dm(users[0], users[1]);
    cluster.node("gw-a").send(a, 1, &direct, "hi bob");
    assert_eq!(ack(&cluster.node("gw-a").answer(a.conn, 1).await).seq, 1);
    eventually(|| (cluster.node("gw-b").seqs(b.conn) == expected(&direct, [1])).then_some(()))
        .await;

    // A small group (three members, at the threshold) from gw-c.
    let small = cluster.group(&users[0..3]).await;
    cluster.node("gw-c").send(c, 1, &small, "hi all");
    assert_eq!(ack(&cluster.node("gw-c").answer(c.conn, 1).await).seq, 1);
    for (gateway, session) in &sessions[0..2] {
        eventually(|| {
            cluster
                .node(gateway)
                .seqs(session.conn)
                .contains(&(small.clone(), 1))
                .then_some(())
        })
        .await;
    }

    // A large group of all nine, through fanout tasks, from gw-a.
    let large = cluster.group(&users).await;
    for request in 2..=4 {
        cluster.node("gw-a").send(a, request, &large, "to everyone");
    }
    for request in 2..=4 {
        ack(&cluster.node("gw-a").answer(a.conn, request).await);
    }
    for (gateway, session) in &sessions[1..] {
        eventually(|| {
            let got = cluster.node(gateway).seqs(session.conn);
            expected(&large, 1..=3).is_subset(&got).then_some(())
        })
        .await;
    }
    // The sender's own connection has its acks, not deliveries.
    assert!(
        !cluster
            .node("gw-a")
            .seqs(a.conn)
            .iter()
            .any(|(conversation, _)| *conversation == large)
    );
    for name in GATEWAYS {
        cluster.node(name).router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dropped_mid_fanout_loses_no_acked_message() {
    let mut cluster = TestCluster::new();
    cluster.start("gw-a", None);
    // gw-b delivers the first fanout page, then hangs on the next one.
    cluster.start("gw-b", Some(1));
    cluster.start("gw-c", None);
    cluster.settled().await;
    let (users, sessions) = cluster.spread_users(9).await;
    // A large group whose fanout tasks are gw-b's.
    let tasks_of_b = cluster
        .holders(TASKS, "im-task-group")
        .iter()
        .position(|holder| holder.as_deref() == Some("gw-b"))
        .unwrap();
    let mut large = cluster.group(&users).await;
    while partition(&large, 3) != tasks_of_b {
        large = cluster.group(&users).await;
    }

    let sender = &sessions[0].1;
    let gw_a = cluster.node("gw-a");
    for request in 1..=3 {
        gw_a.send(sender, request, &large, "before");
    }
    for request in 1..=3 {
        ack(&gw_a.answer(sender.conn, request).await);
    }
    // gw-b is mid-fanout: one page out, the next one stuck.
    let stuck = cluster.node("gw-b").directory.clone();
    eventually(|| (stuck.held.load(Ordering::SeqCst) > 0).then_some(())).await;

    cluster.kill("gw-b");
    let gw_a = cluster.node("gw-a");
    for request in 4..=5 {
        gw_a.send(sender, request, &large, "after");
    }
    for request in 4..=5 {
        ack(&gw_a.answer(sender.conn, request).await);
    }
    // gw-b's fanout partition moved, and every acked message reached every
    // member still online (gw-b's users went down with it).
    eventually(|| {
        let holder = cluster.holders(TASKS, "im-task-group")[tasks_of_b].clone();
        holder.filter(|node| node != "gw-b").map(|_| ())
    })
    .await;
    for (gateway, session) in sessions[1..].iter().filter(|(g, _)| *g != "gw-b") {
        eventually(|| {
            let got = cluster.node(gateway).seqs(session.conn);
            expected(&large, 1..=5).is_subset(&got).then_some(())
        })
        .await;
    }
    let conversation = large.parse().unwrap();
    assert_eq!(
        cluster
            .store
            .messages(conversation, 0, 0, 100)
            .await
            .unwrap()
            .len(),
        5
    );
    for name in ["gw-a", "gw-c"] {
        cluster.node(name).router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_while_sending_duplicates_no_seq_and_loses_no_acked_message() {
    let mut cluster = TestCluster::new();
    cluster.start("gw-a", None);
    cluster.start("gw-b", None);
    cluster.settled().await;
    let users = cluster.users(6).await;
    // Senders 0..3 on gw-a and gw-b; recipients 3..6 on gw-b and gw-a.
    let place = |i: usize| if i.is_multiple_of(2) { "gw-a" } else { "gw-b" };
    let mut sessions: Vec<SessionInfo> = Vec::new();
    for (i, &user) in users.iter().enumerate() {
        sessions.push(cluster.node(place(i)).online(user, 100 + i as u64).await);
    }
    let mut conversations: Vec<String> = (0..3).map(|i| dm(users[i], users[i + 3])).collect();
    conversations.push(cluster.group(&users[0..3]).await);
    let rebalances = cluster.bus.rebalances();

    let mut sent: Vec<(usize, u64, String)> = Vec::new();
    let mut request = 0;
    let mut send_round = |cluster: &TestCluster| {
        for _ in 0..8 {
            request += 1;
            for sender in 0..3 {
                let conversation = if request % 2 == 0 {
                    conversations[sender].clone()
                } else {
                    conversations[3].clone()
                };
                cluster
                    .node(place(sender))
                    .send(&sessions[sender], request, &conversation, "m");
                sent.push((sender, request, conversation));
            }
        }
    };
    send_round(&cluster);
    // gw-c joins while those are in flight: partitions move under them.
    cluster.start("gw-c", None);
    send_round(&cluster);

    let mut acked: Vec<(usize, String, u64)> = Vec::new();
    for (sender, request, conversation) in &sent {
        let node = cluster.node(place(*sender));
        let seq = ack(&node.answer(sessions[*sender].conn, *request).await).seq;
        acked.push((*sender, conversation.clone(), seq));
    }
    cluster.settled().await;
    assert!(cluster.bus.rebalances() > rebalances);
    assert!(
        cluster
            .holders(PERSISTENCE, "im-persistence-group")
            .contains(&Some("gw-c".to_string()))
    );
    // No seq twice, none skipped: each conversation's acks are 1..=n.
    for conversation in &conversations {
        let mut seqs: Vec<u64> = acked
            .iter()
            .filter(|(_, acked_in, _)| acked_in == conversation)
            .map(|(_, _, seq)| *seq)
            .collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{conversation}"
        );
    }
    // Every acked message reached every other member (de-duplicated by seq).
    let is_member = |i: usize, conversation: &String| {
        if *conversation == conversations[3] {
            i < 3
        } else {
            conversations[i % 3] == *conversation
        }
    };
    for (i, session) in sessions.iter().enumerate() {
        let want: BTreeSet<(String, u64)> = acked
            .iter()
            .filter(|(sender, conversation, _)| *sender != i && is_member(i, conversation))
            .map(|(_, conversation, seq)| (conversation.clone(), *seq))
            .collect();
        eventually(|| {
            want.is_subset(&cluster.node(place(i)).seqs(session.conn))
                .then_some(())
        })
        .await;
    }
    for name in GATEWAYS {
        cluster.node(name).router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_gracefully_drains_and_its_partitions_move() {
    let mut cluster = TestCluster::new();
    for name in GATEWAYS {
        cluster.start(name, None);
    }
    cluster.settled().await;
    let persistence_of_b: BTreeSet<usize> = cluster
        .holders(PERSISTENCE, "im-persistence-group")
        .iter()
        .enumerate()
        .filter(|(_, holder)| holder.as_deref() == Some("gw-b"))
        .map(|(partition, _)| partition)
        .collect();
    let sender_id = cluster.users(1).await[0];
    let sender = cluster.node("gw-a").online(sender_id, 1).await;
    // Recipients on gw-c until one conversation is gw-b's to persist.
    let mut recipients = Vec::new();
    while !recipients
        .iter()
        .any(|(_, conversation): &(SessionInfo, String)| {
            persistence_of_b.contains(&partition(conversation, 6))
        })
    {
        let user = cluster.users(1).await[0];
        let session = cluster
            .node("gw-c")
            .online(user, 10 + recipients.len() as u64)
            .await;
        recipients.push((session, dm(sender_id, user)));
    }
    let gw_b_user = cluster.users(1).await[0];
    let on_b = cluster.node("gw-b").online(gw_b_user, 2).await;

    let gw_a = cluster.node("gw-a");
    let mut request = 0;
    for _ in 0..5 {
        for (_, conversation) in &recipients {
            request += 1;
            gw_a.send(&sender, request, conversation, "drain me");
        }
    }
    // gw-b stops while those are queued: it finishes what is queued for
    // it, hands its partitions over, and answers nothing new.
    cluster.node("gw-b").router.shutdown().await;
    cluster.leave_directory("gw-b");
    cluster
        .node("gw-b")
        .send(&on_b, 1, &dm(gw_b_user, sender_id), "too late");
    let refused = error(&cluster.node("gw-b").answer(on_b.conn, 1).await);
    assert_eq!(refused.code, ErrorCode::ShuttingDown.code());
    for _ in 0..2 {
        for (_, conversation) in &recipients {
            request += 1;
            gw_a.send(&sender, request, conversation, "after");
        }
    }
    for request in 1..=request {
        ack(&gw_a.answer(sender.conn, request).await);
    }
    assert!(
        !cluster
            .holders(PERSISTENCE, "im-persistence-group")
            .contains(&Some("gw-b".to_string()))
    );
    for (session, conversation) in &recipients {
        eventually(|| {
            (cluster.node("gw-c").seqs(session.conn) == expected(conversation, 1..=7)).then_some(())
        })
        .await;
    }
    for name in ["gw-a", "gw-c"] {
        cluster.node(name).router.shutdown().await;
    }
}
