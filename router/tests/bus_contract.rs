//! The bus contract, one body run over every implementation: the
//! in-process bus (single node), the serialising bus (several nodes in one
//! process) and Kafka (`KafkaBus` against the broker in `KAFKA_BROKERS`,
//! Tansu in CI). Order per key runs on all three; resuming from the
//! committed offset, rebalancing to a second member and stopping apart
//! from leaving need several nodes, and lag as published minus committed
//! needs committed offsets, so they run on the serialising bus and Kafka
//! (the in-process bus has its own tests of its fixed group).
//!
//! Nothing waits a fixed time: every step waits for an event (an
//! assignment, a record, the member's leave), bounded by a timeout that
//! only fails the test.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::select_all;
use pingme_router::{
    Bus, BusCluster, BusError, DeadLetterRecord, GroupMember, InProcessBus, Partition, Polled,
    SerialisedBus, Topic,
};
#[cfg(feature = "kafka")]
use pingme_router::{KafkaBus, KafkaSettings};
use tokio_util::sync::CancellationToken;

type Member = Box<dyn GroupMember<DeadLetterRecord>>;

/// How long any one step may take (a Kafka group join takes about half
/// of the session timeout).
const STEP: Duration = Duration::from_secs(30);

/// A record numbered `n` (its `attempts`), so tests compare sequences.
fn numbered(n: u32) -> DeadLetterRecord {
    DeadLetterRecord {
        kind: "push".into(),
        payload: Bytes::from_static(b"work"),
        code: 50006,
        error: String::new(),
        attempts: n,
    }
}

/// Nodes of one bus implementation that share their topics and groups.
trait Cluster {
    type Node: Bus<DeadLetterRecord>;

    /// The bus client of node `name`.
    fn node(&self, name: &str) -> Arc<Self::Node>;

    /// A name for this test's topic or group (unique on a shared broker).
    fn name(&self, base: &str) -> String;

    /// `member` of node `node` dies without committing more.
    fn crash(&self, node: &str, member: Member);
}

struct InProcess(Arc<InProcessBus>);

impl Cluster for InProcess {
    type Node = InProcessBus;

    fn node(&self, _name: &str) -> Arc<InProcessBus> {
        self.0.clone()
    }

    fn name(&self, base: &str) -> String {
        base.to_string()
    }

    fn crash(&self, _node: &str, member: Member) {
        drop(member);
    }
}

struct Serialised(Arc<BusCluster>);

impl Cluster for Serialised {
    type Node = SerialisedBus;

    fn node(&self, name: &str) -> Arc<SerialisedBus> {
        self.0.node(name)
    }

    fn name(&self, base: &str) -> String {
        base.to_string()
    }

    fn crash(&self, node: &str, member: Member) {
        self.0.drop_node(node);
        drop(member);
    }
}

#[cfg(feature = "kafka")]
struct Kafka {
    settings: KafkaSettings,
    suffix: String,
}

#[cfg(feature = "kafka")]
impl Kafka {
    fn from_env() -> Option<Kafka> {
        Some(Kafka {
            settings: common::kafka_from_env()?,
            suffix: common::unique_suffix(),
        })
    }
}

#[cfg(feature = "kafka")]
impl Cluster for Kafka {
    type Node = KafkaBus;

    fn node(&self, _name: &str) -> Arc<KafkaBus> {
        Arc::new(KafkaBus::new(self.settings.clone()).expect("kafka client"))
    }

    fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.suffix)
    }

    fn crash(&self, _node: &str, member: Member) {
        drop(member);
    }
}

async fn step<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn join<B: Bus<DeadLetterRecord> + ?Sized>(
    bus: &B,
    topic: &Topic<DeadLetterRecord>,
    group: &str,
    name: &str,
) -> (Member, CancellationToken) {
    let leave = CancellationToken::new();
    let member = bus.join(topic, group, name, leave.clone()).expect("join");
    (member, leave)
}

/// The member's first event: its assignment.
async fn assigned(member: &mut Member) -> Vec<Partition> {
    match step("an assignment", member.poll(10)).await {
        Polled::Assigned(partitions) => partitions,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

/// Polls until `count` records came (rebalance events are not expected);
/// returns their numbers.
async fn records(member: &mut Member, max: usize, count: usize) -> Vec<u32> {
    let mut numbers = Vec::new();
    while numbers.len() < count {
        match step("records", member.poll(max)).await {
            Polled::Records(records) => {
                numbers.extend(records.into_iter().map(|c| c.record.attempts));
            }
            other => panic!("expected records, got {other:?}"),
        }
    }
    numbers
}

#[derive(Default)]
struct Owned(BTreeSet<Partition>);

impl Owned {
    fn apply(&mut self, polled: Polled<DeadLetterRecord>) {
        match polled {
            Polled::Assigned(partitions) => self.0.extend(partitions),
            Polled::Revoked(partitions) => {
                for partition in partitions {
                    self.0.remove(&partition);
                }
            }
            other => panic!("expected a rebalance event, got {other:?}"),
        }
    }
}

// ---- the contract ----

/// Records of one key arrive in the order published, on the partition
/// `key % partitions`, on whichever node they were published (two nodes
/// publish here, each its own keys).
async fn records_of_a_key_arrive_in_order_on_its_partition<C: Cluster>(cluster: C) {
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let topic = Topic::new(cluster.name("contract-order"), 3);
    let group = cluster.name("order");
    a.declare(&topic).unwrap();
    b.declare(&topic).unwrap();
    // As many members as it takes to own every partition (one on a bus
    // with groups, one per partition in process).
    let mut members = Vec::new();
    let mut owned = BTreeSet::new();
    while owned.len() < 3 {
        let (mut member, _) = join(&*a, &topic, &group, &format!("m{}", members.len()));
        owned.extend(assigned(&mut member).await);
        members.push(member);
    }
    for n in 0..60u32 {
        let node = if n % 2 == 0 { &a } else { &b };
        node.publish(&topic, u64::from(n % 4), numbered(n))
            .await
            .unwrap();
    }
    let mut by_key: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut received = 0;
    while received < 60 {
        let polls = members.iter_mut().map(|member| member.poll(7));
        let polled = tokio::time::timeout(STEP, select_all(polls)).await;
        let Ok((polled, _, _)) = polled else {
            panic!("timed out waiting for records; received by key: {by_key:?}");
        };
        let Polled::Records(records) = polled else {
            panic!("expected records, got {polled:?}");
        };
        for consumed in records {
            let n = consumed.record.attempts;
            assert_eq!(
                consumed.partition,
                (n % 4) % 3,
                "record {n} on its key's partition"
            );
            by_key[(n % 4) as usize].push(n);
            received += 1;
        }
    }
    for (key, numbers) in by_key.iter().enumerate() {
        let expected: Vec<u32> = (0..60).filter(|n| n % 4 == key as u32).collect();
        assert_eq!(numbers, &expected, "key {key} in order");
    }
}

/// A member that dies re-delivers, through the partition's next owner on
/// another node, everything after its last commit, and nothing before.
async fn a_new_member_resumes_from_the_committed_offset<C: Cluster>(cluster: C) {
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let topic = Topic::new(cluster.name("contract-resume"), 1);
    let group = cluster.name("resume");
    a.declare(&topic).unwrap();
    let (mut first, _) = join(&*a, &topic, &group, "a-0");
    assert_eq!(assigned(&mut first).await, vec![0]);
    for n in 1..=4 {
        b.publish(&topic, 0, numbered(n)).await.unwrap();
    }
    assert_eq!(records(&mut first, 1, 1).await, vec![1]);
    assert_eq!(records(&mut first, 1, 1).await, vec![2]);
    first.commit().await.unwrap();
    // Polled, never committed: the next owner gets it again.
    assert_eq!(records(&mut first, 1, 1).await, vec![3]);
    cluster.crash("a", first);
    let (mut next, _) = join(&*b, &topic, &group, "b-0");
    assert_eq!(assigned(&mut next).await, vec![0]);
    assert_eq!(records(&mut next, 10, 2).await, vec![3, 4]);
    next.commit().await.unwrap();
    b.publish(&topic, 0, numbered(5)).await.unwrap();
    assert_eq!(records(&mut next, 10, 1).await, vec![5]);
}

/// A second member joining takes some of the partitions: both own a
/// disjoint share of all of them (after revocations, however the
/// implementation hands over), and each gets its partitions' records.
async fn a_second_member_takes_partitions_over<C: Cluster>(cluster: C) {
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let topic = Topic::new(cluster.name("contract-rebalance"), 2);
    let group = cluster.name("rebalance");
    a.declare(&topic).unwrap();
    let (mut first, _) = join(&*a, &topic, &group, "a-0");
    let mut first_owns = Owned::default();
    first_owns.0.extend(assigned(&mut first).await);
    assert_eq!(first_owns.0, BTreeSet::from([0, 1]));
    let (mut second, _) = join(&*b, &topic, &group, "b-0");
    let mut second_owns = Owned::default();
    // Both are polled: the first must see the rebalance for it to finish.
    loop {
        let (one, two) = (&first_owns.0, &second_owns.0);
        if !one.is_empty() && !two.is_empty() && one.is_disjoint(two) && one.len() + two.len() == 2
        {
            break;
        }
        tokio::select! {
            polled = step("a rebalance", first.poll(10)) => first_owns.apply(polled),
            polled = step("a rebalance", second.poll(10)) => second_owns.apply(polled),
        }
    }
    for partition in 0..2u32 {
        a.publish(&topic, u64::from(partition), numbered(partition + 1))
            .await
            .unwrap();
    }
    let first_partition = *first_owns.0.first().unwrap();
    let second_partition = *second_owns.0.first().unwrap();
    assert_eq!(records(&mut first, 10, 1).await, vec![first_partition + 1]);
    assert_eq!(
        records(&mut second, 10, 1).await,
        vec![second_partition + 1]
    );
}

/// Stopping production is per node and per topic (others go on), and is
/// apart from leaving: the member still consumes until it is told to
/// leave, then its partition moves to the member that stays, from its
/// last commit.
async fn stop_producing_is_apart_from_leaving<C: Cluster>(cluster: C) {
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let topic = Topic::new(cluster.name("contract-stop"), 1);
    let group = cluster.name("stop");
    a.declare(&topic).unwrap();
    let (mut leaving, leave) = join(&*a, &topic, &group, "a-0");
    assert_eq!(assigned(&mut leaving).await, vec![0]);
    a.publish(&topic, 0, numbered(1)).await.unwrap();
    Bus::<DeadLetterRecord>::stop_producing(&*a, &topic);
    assert!(matches!(
        a.publish(&topic, 0, numbered(9)).await,
        Err(BusError::Closed(_))
    ));
    assert!(matches!(
        a.try_publish(&topic, 0, numbered(9)),
        Err(BusError::Closed(_))
    ));
    b.publish(&topic, 0, numbered(2)).await.unwrap();
    // Still consuming: what node b publishes too.
    assert_eq!(records(&mut leaving, 10, 2).await, vec![1, 2]);
    leaving.commit().await.unwrap();
    leave.cancel();
    assert_eq!(
        step("the member's leave", leaving.poll(10)).await,
        Polled::Left
    );
    let (mut staying, _) = join(&*b, &topic, &group, "b-0");
    assert_eq!(assigned(&mut staying).await, vec![0]);
    b.publish(&topic, 0, numbered(3)).await.unwrap();
    // Nothing committed comes again.
    assert_eq!(records(&mut staying, 10, 1).await, vec![3]);
}

/// Lag is what was published and not yet committed by the group: it
/// falls as the member commits. (Kafka reports it from the consumers'
/// statistics, so the member keeps polling while the test waits.)
async fn lag_is_published_minus_committed<C: Cluster>(cluster: C) {
    let a = cluster.node("a");
    let topic = Topic::new(cluster.name("contract-lag"), 1);
    let group = cluster.name("lag");
    a.declare(&topic).unwrap();
    let (mut member, _) = join(&*a, &topic, &group, "a-0");
    assert_eq!(assigned(&mut member).await, vec![0]);
    for n in 1..=3 {
        a.publish(&topic, 0, numbered(n)).await.unwrap();
    }
    assert_eq!(records(&mut member, 1, 1).await, vec![1]);
    member.commit().await.unwrap();
    let mut polled = 1;
    for expected in [2, 0] {
        step("the lag", async {
            while a.lag(&topic, &group) != expected {
                tokio::select! {
                    event = member.poll(10) => match event {
                        Polled::Records(records) => polled += records.len(),
                        other => panic!("expected records, got {other:?}"),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
        .await;
        if expected == 2 {
            while polled < 3 {
                polled += records(&mut member, 10, 1).await.len();
            }
            member.commit().await.unwrap();
        }
    }
}

// ---- over each implementation ----

mod in_process {
    use super::*;

    #[tokio::test]
    async fn records_of_a_key_arrive_in_order_on_its_partition() {
        super::records_of_a_key_arrive_in_order_on_its_partition(InProcess(Arc::new(
            InProcessBus::new(1024),
        )))
        .await;
    }
}

mod serialised {
    use super::*;

    #[tokio::test]
    async fn records_of_a_key_arrive_in_order_on_its_partition() {
        super::records_of_a_key_arrive_in_order_on_its_partition(Serialised(BusCluster::new()))
            .await;
    }

    #[tokio::test]
    async fn a_new_member_resumes_from_the_committed_offset() {
        super::a_new_member_resumes_from_the_committed_offset(Serialised(BusCluster::new())).await;
    }

    #[tokio::test]
    async fn a_second_member_takes_partitions_over() {
        super::a_second_member_takes_partitions_over(Serialised(BusCluster::new())).await;
    }

    #[tokio::test]
    async fn stop_producing_is_apart_from_leaving() {
        super::stop_producing_is_apart_from_leaving(Serialised(BusCluster::new())).await;
    }

    #[tokio::test]
    async fn lag_is_published_minus_committed() {
        super::lag_is_published_minus_committed(Serialised(BusCluster::new())).await;
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_of_a_key_arrive_in_order_on_its_partition() {
        if let Some(kafka) = Kafka::from_env() {
            super::records_of_a_key_arrive_in_order_on_its_partition(kafka).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_member_resumes_from_the_committed_offset() {
        if let Some(kafka) = Kafka::from_env() {
            super::a_new_member_resumes_from_the_committed_offset(kafka).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_member_takes_partitions_over() {
        if let Some(kafka) = Kafka::from_env() {
            super::a_second_member_takes_partitions_over(kafka).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_producing_is_apart_from_leaving() {
        if let Some(kafka) = Kafka::from_env() {
            super::stop_producing_is_apart_from_leaving(kafka).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lag_is_published_minus_committed() {
        if let Some(kafka) = Kafka::from_env() {
            super::lag_is_published_minus_committed(kafka).await;
        }
    }
}
