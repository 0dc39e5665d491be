//! `pingme serve` as a cluster: several processes on one Kafka broker
//! (`KAFKA_BROKERS`), one Redis (`REDIS_URL`) and one MariaDB/MySQL
//! database (`MYSQL_URL`), in the roles `gateway` and `worker`, driven over
//! real sockets. Users on different gateways chat one to one and in a group
//! that fans out through the task topic; a worker joining mid-conversation
//! and another killed with SIGKILL lose no acknowledged message and give no
//! seq twice (partitions move between live workers, then to the one that
//! stays); a gateway killed with SIGKILL: its users reconnect to another
//! and sync what was sent meanwhile, and the ones who stay away are shown
//! offline once its lease lapses, and its downstream topic is reported as
//! stale.
//!
//! Each test has topics, groups, a Redis key prefix and a database of its
//! own. Without the three variables these tests skip outside CI, naming
//! what to set, and fail under `CI=true`.

mod e2e;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use e2e::{Conn, Server, dm};
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_storage::mysql::{MysqlConfig, TestDatabase, server_from_env};

/// Replies and deliveries may wait for a rebalance (a killed member's
/// session timeout, 6 s here, plus Tansu's join of about 3 s).
const PATIENCE: Duration = Duration::from_secs(90);

/// The broker and Redis of the environment, or `None` (with a note) when
/// one is unset outside CI.
fn services() -> Option<(String, String, u16)> {
    let ci = std::env::var("CI").is_ok_and(|ci| ci == "true" || ci == "1");
    let brokers = std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty());
    let redis = std::env::var("REDIS_URL").ok().filter(|r| !r.is_empty());
    let (Some(brokers), Some(redis)) = (brokers, redis) else {
        let why = "set KAFKA_BROKERS (bash .ci/kafka.sh) and REDIS_URL=redis://127.0.0.1:6379 \
                   to run the cluster tests";
        assert!(!ci, "CI is set but the cluster's services are not: {why}");
        eprintln!("skipped: {why}");
        return None;
    };
    let address = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let (host, port) = address
        .rsplit_once(':')
        .map_or((address.as_str(), "6379"), |(h, p)| (h, p));
    Some((
        brokers,
        host.to_string(),
        port.parse().expect("REDIS_URL port"),
    ))
}

/// One test's cluster: what its nodes share.
struct Cluster {
    /// Names this test's topics, groups and Redis keys.
    suffix: String,
    mysql: MysqlConfig,
    _database: TestDatabase,
    yaml: String,
}

impl Cluster {
    fn new() -> Option<Cluster> {
        let (brokers, redis_host, redis_port) = services()?;
        let server = server_from_env("the cluster tests")?;
        let database = TestDatabase::new(server);
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let yaml = format!(
            "redis:\n  enabled: true\n  host: {redis_host}\n  port: {redis_port}\n  key_prefix: \"cluster-{suffix}:\"\n  lease: 3s\n  timeout: 1s\n\
             kafka:\n  brokers: {brokers}\n  downstream_topic_prefix: down-{suffix}-\n  push_topic: push-{suffix}\n  dlq_topic: dlq-{suffix}\n  \
             partitions: 4\n  push_partitions: 1\n  downstream_partitions: 2\n  session_timeout: 6s\n  heartbeat_interval: 500ms\n  startup_timeout: 30s\n  stale_downstream_after: 1s\n  shutdown_answers_wait: 60s\n\
             task:\n  task_topic: task-{suffix}\n  persistence_topic: persist-{suffix}\n  consumer_group: task-{suffix}-group\n  \
             persistence_group: persist-{suffix}-group\n  large_group_threshold: 2\n"
        );
        Some(Cluster {
            suffix,
            mysql: database.config.clone(),
            _database: database,
            yaml,
        })
    }

    async fn node(&self, dir: &Path, name: &str, role: &str) -> Server {
        Server::start_node(&dir.join(name), role, &self.mysql, &self.yaml).await
    }
}

async fn connect(server: &Server, token: &str) -> Conn {
    let mut conn = Conn::connect(server.tcp, token).await;
    conn.wait = PATIENCE;
    conn
}

/// Every delivered message of `conversation` until `count` distinct seqs
/// came; a re-delivery (same seq, after a rebalance) is allowed, another
/// body under a seq is not. Returns the seqs with their bodies.
async fn delivered(conn: &mut Conn, conversation: &str, count: usize) -> Vec<(u64, String)> {
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < count {
        let message = conn.deliver().await;
        assert_eq!(message.conversation_id, conversation);
        let body = String::from_utf8(message.body.to_vec()).unwrap();
        if let Some(earlier) = seen.insert(message.seq, body.clone()) {
            assert_eq!(
                earlier, body,
                "seq {} delivered with two bodies",
                message.seq
            );
        }
    }
    seen.into_iter().collect()
}

/// The stored timeline of `conversation` as (seq, body).
async fn history(conn: &mut Conn, conversation: &str) -> Vec<(u64, String)> {
    conn.history(conversation)
        .await
        .into_iter()
        .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_gateways_chat_through_kafka() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let worker = cluster.node(dir.path(), "worker", "worker").await;
    let gateway_a = cluster.node(dir.path(), "gw-a", "gateway").await;
    let gateway_b = cluster.node(dir.path(), "gw-b", "gateway").await;

    // Accounts and groups live in the shared store: made through one
    // gateway, valid on the other.
    let http = gateway_a.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "laptop").await;
    let (carol, carol_token) = http.user("carol", "tablet").await;
    // Three members, above the threshold of 2: fanned out by task.
    let team = http.group(&alice_token, "team", &[bob, carol]).await;

    let mut a = connect(&gateway_a, &alice_token).await;
    let mut b = connect(&gateway_b, &bob_token).await;
    let mut c = connect(&gateway_b, &carol_token).await;

    let direct = dm(alice, bob);
    assert_eq!(a.send(&direct, "a-1", "hi bob").await.unwrap().seq, 1);
    assert_eq!(delivered(&mut b, &direct, 1).await, [(1, "hi bob".into())]);
    assert_eq!(b.send(&direct, "b-1", "hi alice").await.unwrap().seq, 2);
    assert_eq!(
        delivered(&mut a, &direct, 1).await,
        [(2, "hi alice".into())]
    );

    assert_eq!(c.send(&team, "c-1", "team 1").await.unwrap().seq, 1);
    assert_eq!(delivered(&mut a, &team, 1).await, [(1, "team 1".into())]);
    assert_eq!(delivered(&mut b, &team, 1).await, [(1, "team 1".into())]);

    // Presence comes from Redis: bob is on the other gateway.
    presence_becomes(&mut a, bob, true).await;

    // The worker exports its consumer lag per topic and partition (from
    // the consumers' statistics, every second): asked until it shows.
    let wanted = format!(
        "pingme_kafka_consumer_lag{{topic=\"persist-{}\",group=\"persist-{}-group\",partition=\"",
        cluster.suffix, cluster.suffix
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = worker.metrics_text().await;
        let partitions = text.lines().filter(|l| l.starts_with(&wanted)).count();
        if partitions == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{partitions} lag series of 4 partitions in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_joining_and_dying_lose_no_acknowledged_message() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut first = cluster.node(dir.path(), "worker-1", "worker").await;
    let gateway_a = cluster.node(dir.path(), "gw-a", "gateway").await;
    let gateway_b = cluster.node(dir.path(), "gw-b", "gateway").await;

    let http = gateway_a.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "laptop").await;
    let mut a = connect(&gateway_a, &alice_token).await;
    let mut b = connect(&gateway_b, &bob_token).await;
    let direct = dm(alice, bob);

    // Each send waits for its ack. 1-20: worker-1 alone holds every
    // partition. 21-30: worker-2 has joined (a rebalance while sending).
    // 31-40: worker-1 was killed, so worker-2 alone runs the conversation,
    // from worker-1's last commit on.
    let mut acked = BTreeSet::new();
    let mut second = None;
    for i in 1..=40u64 {
        if i == 21 {
            second = Some(cluster.node(dir.path(), "worker-2", "worker").await);
        }
        if i == 31 {
            first.kill();
        }
        let ack = a
            .send(&direct, &format!("m-{i}"), &format!("message {i}"))
            .await
            .unwrap();
        assert!(acked.insert(ack.seq), "seq {} acknowledged twice", ack.seq);
    }
    assert!(second.is_some());
    assert_eq!(acked, (1..=40).collect(), "dense seqs, each once");
    let expected: Vec<(u64, String)> = (1..=40).map(|i| (i, format!("message {i}"))).collect();
    assert_eq!(delivered(&mut b, &direct, 40).await, expected);
    assert_eq!(history(&mut b, &direct).await, expected);
}

/// A gateway told to stop (SIGTERM) while the sends it took wait for a
/// worker answers them all before it says go-away: their answers come back
/// through its downstream topic, which it keeps consuming until then. The
/// sends wait because the worker is frozen (SIGSTOP) until the gateway is
/// draining (its `/health` says 503); it then goes on within its session
/// (no rebalance) and answers. The gateway waits up to
/// `kafka.shutdown_answers_wait`, 60 s here.
/// Frames the node's TCP connections have read (`/metrics`).
async fn tcp_frames_read(node: &Server) -> u64 {
    let text = node.metrics_text().await;
    text.lines()
        .find_map(|line| line.strip_prefix(r#"pingme_gateway_frames_in_total{transport="tcp"} "#))
        .map_or(0, |count| count.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_answers_the_sends_it_took() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let worker = cluster.node(dir.path(), "worker", "worker").await;
    let mut gateway = cluster.node(dir.path(), "gw-a", "gateway").await;
    let http = gateway.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, _) = http.user("bob", "laptop").await;
    let mut a = connect(&gateway, &alice_token).await;
    let direct = dm(alice, bob);
    assert_eq!(a.send(&direct, "warm", "warm").await.unwrap().seq, 1);

    // The worker is frozen: the next sends wait on the persistence topic.
    worker.pause();
    let read_before = tcp_frames_read(&gateway).await;
    let mut waiting = std::collections::BTreeMap::new();
    for i in 0..5 {
        let id = format!("in-flight-{i}");
        waiting.insert(a.send_unanswered(&direct, &id, "wait").await, id);
    }
    // The gateway has read (and so taken: reading a frame and handing it to
    // the router is one step on its shard) all five before it is told to
    // stop; a send it had not read yet would be refused as shutting down.
    let deadline = std::time::Instant::now() + PATIENCE;
    while tcp_frames_read(&gateway).await < read_before + 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway never read the sends"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.signal_term();
    // Draining: /health answers 503 from the first moment of the shutdown.
    let health = format!("http://{}/health", gateway.metrics);
    let deadline = std::time::Instant::now() + PATIENCE;
    while reqwest::get(&health)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway never began draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still waiting for the answers: no go-away yet (without the wait the
    // gateway stops consuming and says go-away at once). Two seconds keep
    // the frozen worker well inside its 6-s session.
    let early = a.event(Duration::from_secs(2)).await;
    assert!(early.is_none(), "nothing before the answers: {early:?}");
    worker.resume();

    // Every send is answered (acked) before the connection closes.
    let mut seqs = BTreeSet::new();
    while let Some(frame) = a.event(PATIENCE).await {
        if let Some(server_frame::Body::SendAck(ack)) = &frame.body
            && let Some(id) = waiting.remove(&frame.request_id)
        {
            assert_eq!(ack.client_msg_id, id);
            seqs.insert(ack.seq);
        }
    }
    assert!(waiting.is_empty(), "unanswered: {waiting:?}");
    assert_eq!(seqs, (2..=6).collect());
    assert!(gateway.terminate().success(), "a clean exit");
}

/// Whether `user` is online, asked through `conn`.
async fn online(conn: &mut Conn, user: u64) -> bool {
    let reply = conn
        .request(client_frame::Body::PresenceQuery(v1::PresenceQuery {
            user_ids: vec![user],
        }))
        .await;
    let Some(server_frame::Body::PresenceList(list)) = reply.body else {
        panic!("presence: {reply:?}")
    };
    list.users.iter().any(|u| u.user_id == user && u.online)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_s_users_reconnect_elsewhere_and_sync() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let worker = cluster.node(dir.path(), "worker", "worker").await;
    let gateway_a = cluster.node(dir.path(), "gw-a", "gateway").await;
    let mut gateway_b = cluster.node(dir.path(), "gw-b", "gateway").await;

    let http = gateway_a.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "laptop").await;
    let (carol, carol_token) = http.user("carol", "tablet").await;
    let mut a = connect(&gateway_a, &alice_token).await;
    let mut b = connect(&gateway_b, &bob_token).await;
    // alice may see carol's presence: they share a group.
    http.group(&alice_token, "pals", &[carol]).await;
    let _c = connect(&gateway_b, &carol_token).await;
    let direct = dm(alice, bob);
    for i in 1..=5u64 {
        assert_eq!(
            a.send(&direct, &format!("m-{i}"), &format!("message {i}"))
                .await
                .unwrap()
                .seq,
            i
        );
    }
    assert_eq!(delivered(&mut b, &direct, 5).await.len(), 5);
    // Registration in Redis follows the connection: asked until it shows.
    presence_becomes(&mut a, carol, true).await;

    // gw-b dies without a word; alice goes on writing.
    gateway_b.kill();
    drop(b);
    for i in 6..=10u64 {
        assert_eq!(
            a.send(&direct, &format!("m-{i}"), &format!("message {i}"))
                .await
                .unwrap()
                .seq,
            i
        );
    }
    // bob comes back through gw-a: sync brings what he missed, and
    // everything he had not acknowledged, each seq once and in order.
    let mut b = connect(&gateway_a, &bob_token).await;
    let synced: Vec<(u64, String)> = b
        .sync()
        .await
        .into_iter()
        .filter(|m| m.conversation_id == direct)
        .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned()))
        .collect();
    let first = synced.first().map_or(0, |(seq, _)| *seq);
    let expected: Vec<(u64, String)> = (first..=10).map(|i| (i, format!("message {i}"))).collect();
    assert!(first <= 6, "missed messages synced: {synced:?}");
    assert_eq!(synced, expected);
    // And he chats on from there.
    assert_eq!(b.send(&direct, "b-1", "back").await.unwrap().seq, 11);
    assert_eq!(delivered(&mut a, &direct, 1).await, [(11, "back".into())]);

    // carol stayed away: offline once gw-b's lease (3 s) lapsed.
    presence_becomes(&mut a, carol, false).await;

    // gw-b's downstream topic is reported once its lease ended longer ago
    // than kafka.stale_downstream_after (1 s here); gw-a's is not.
    metric_becomes(&worker, "pingme_kafka_stale_downstream_topics", "1").await;
}

/// Reads `server`'s `/metrics` until `name` (without labels) shows
/// `value`, failing after [`PATIENCE`].
async fn metric_becomes(server: &Server, name: &str, value: &str) {
    let wanted = format!("{name} {value}");
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = server.metrics_text().await;
        if text.lines().any(|line| line == wanted) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {wanted:?} within {PATIENCE:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Asks for `user`'s presence until it is `wanted` (each answer is a real
/// query; no fixed sleep decides), failing after [`PATIENCE`].
async fn presence_becomes(conn: &mut Conn, user: u64, wanted: bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while online(conn, user).await != wanted {
        assert!(
            std::time::Instant::now() < deadline,
            "user {user} not online={wanted} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
