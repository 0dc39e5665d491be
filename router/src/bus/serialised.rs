//! A bus for several nodes in one process, shaped like a broker: every
//! record is encoded when published and decoded when polled (the bytes a
//! Kafka bus will carry), each partition is an offset-addressed log, and a
//! small coordinator ([`BusCluster`]) runs the consumer groups: it assigns
//! partitions to members, moves them when a member joins, leaves or its
//! node is dropped without notice, and keeps each group's committed
//! offsets, from which a partition's next owner reads.
//!
//! Hand-over is cooperative, as with Kafka's eager rebalance: a partition
//! leaves its owner when the owner next polls (it gets
//! [`Polled::Revoked`] between batches, after committing the last one), and
//! only then is it [`Polled::Assigned`] to its new owner. A dropped node's
//! partitions move at once; what its members polled and did not commit is
//! read again by the new owners (at least once). A dropped node is fenced:
//! its publishes and commits fail, so work still in flight on it changes
//! nothing on the bus.
//!
//! For tests, not production: logs live in memory, bounded per partition
//! by `retention` records (the oldest go first, like a broker's retention),
//! and what every group committed is trimmed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, BusRecord, Consumed, GroupMember, Partition, Polled, Topic};

/// A member's id: unique in the cluster, in join order.
type MemberId = u64;

/// One partition's log.
#[derive(Default)]
struct PartitionLog {
    /// Offset of `records[0]`.
    start: u64,
    records: VecDeque<Bytes>,
}

impl PartitionLog {
    fn end(&self) -> u64 {
        self.start + self.records.len() as u64
    }
}

struct TopicLog {
    partitions: Vec<PartitionLog>,
    /// Nodes that stopped producing to this topic.
    stopped: HashSet<String>,
}

struct MemberState {
    node: String,
    name: String,
    /// Owned partitions and the next offset to poll in each.
    positions: BTreeMap<Partition, u64>,
    /// Set when the member's leave token fired: the offsets up to which it
    /// still consumes before it leaves.
    drain_to: Option<BTreeMap<Partition, u64>>,
}

struct Group {
    committed: Vec<u64>,
    members: BTreeMap<MemberId, MemberState>,
    /// Who should own each partition (the last rebalance's plan).
    target: Vec<Option<MemberId>>,
    /// Who owns it now (until it polls its revocation).
    holder: Vec<Option<MemberId>>,
}

impl Group {
    /// Plans partitions round-robin over the members in join order.
    fn rebalance(&mut self) {
        let members: Vec<MemberId> = self.members.keys().copied().collect();
        for (partition, target) in self.target.iter_mut().enumerate() {
            *target = (!members.is_empty()).then(|| members[partition % members.len()]);
        }
    }

    /// Removes a member; its partitions are free at once.
    fn remove(&mut self, member: MemberId) {
        self.members.remove(&member);
        for holder in &mut self.holder {
            if *holder == Some(member) {
                *holder = None;
            }
        }
        self.rebalance();
    }
}

#[derive(Default)]
struct ClusterState {
    topics: HashMap<String, TopicLog>,
    /// (topic, group) -> group.
    groups: HashMap<(String, String), Group>,
    /// Nodes dropped without notice.
    down: HashSet<String>,
    next_member: MemberId,
    rebalances: u64,
}

impl ClusterState {
    fn topic(&mut self, name: &str, partitions: Partition) -> &mut TopicLog {
        self.topics
            .entry(name.to_string())
            .or_insert_with(|| TopicLog {
                partitions: (0..partitions).map(|_| PartitionLog::default()).collect(),
                stopped: HashSet::new(),
            })
    }

    /// Drops what every group of `topic` committed.
    fn trim(&mut self, topic: &str) {
        let Some(log) = self.topics.get_mut(topic) else {
            return;
        };
        for (partition, log) in log.partitions.iter_mut().enumerate() {
            let committed = self
                .groups
                .iter()
                .filter(|((name, _), _)| name == topic)
                .map(|(_, group)| group.committed.get(partition).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            while log.start < committed && !log.records.is_empty() {
                log.records.pop_front();
                log.start += 1;
            }
        }
    }
}

/// The coordinator and the logs shared by the nodes of one test cluster.
pub struct BusCluster {
    state: Mutex<ClusterState>,
    /// Woken on every publish, join, leave, commit and rebalance.
    changed: Notify,
    retention: usize,
}

impl std::fmt::Debug for BusCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusCluster")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl BusCluster {
    /// A cluster keeping up to 100,000 records per partition.
    pub fn new() -> Arc<BusCluster> {
        Self::with_retention(100_000)
    }

    /// A cluster keeping up to `retention` records per partition.
    pub fn with_retention(retention: usize) -> Arc<BusCluster> {
        Arc::new(BusCluster {
            state: Mutex::new(ClusterState::default()),
            changed: Notify::new(),
            retention: retention.max(1),
        })
    }

    /// The bus client of node `node` (a gateway id).
    pub fn node(self: &Arc<Self>, node: &str) -> Arc<SerialisedBus> {
        Arc::new(SerialisedBus {
            cluster: self.clone(),
            node: node.to_string(),
        })
    }

    /// Drops `node` without notice, as if its process died: its members
    /// leave every group at once (their partitions move and are read again
    /// from the committed offsets), and its publishes and commits fail from
    /// now on.
    pub fn drop_node(&self, node: &str) {
        let mut state = self.lock();
        state.down.insert(node.to_string());
        let mut moved = 0;
        for group in state.groups.values_mut() {
            let gone: Vec<MemberId> = group
                .members
                .iter()
                .filter(|(_, member)| member.node == node)
                .map(|(id, _)| *id)
                .collect();
            for member in gone {
                group.remove(member);
                moved += 1;
            }
        }
        state.rebalances += moved;
        drop(state);
        self.changed.notify_waiters();
    }

    /// Who holds each partition of `topic` in `group` now (member names).
    pub fn holders(&self, topic: &str, group: &str) -> Vec<Option<String>> {
        let state = self.lock();
        let Some(group) = state.groups.get(&(topic.to_string(), group.to_string())) else {
            return Vec::new();
        };
        group
            .holder
            .iter()
            .map(|holder| {
                holder
                    .and_then(|id| group.members.get(&id))
                    .map(|member| member.name.clone())
            })
            .collect()
    }

    /// The committed offset of each partition of `topic` in `group`.
    pub fn committed(&self, topic: &str, group: &str) -> Vec<u64> {
        self.lock()
            .groups
            .get(&(topic.to_string(), group.to_string()))
            .map(|group| group.committed.clone())
            .unwrap_or_default()
    }

    /// How many membership changes made a group plan again.
    pub fn rebalances(&self) -> u64 {
        self.lock().rebalances
    }

    fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One node's client of a [`BusCluster`].
pub struct SerialisedBus {
    cluster: Arc<BusCluster>,
    node: String,
}

impl std::fmt::Debug for SerialisedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialisedBus")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl SerialisedBus {
    fn append(
        &self,
        topic: &str,
        partitions: Partition,
        key: u64,
        bytes: Bytes,
    ) -> Result<(), BusError> {
        let mut state = self.cluster.lock();
        if state.down.contains(&self.node) {
            return Err(BusError::Broker(format!("node {} is down", self.node)));
        }
        let log = state.topic(topic, partitions);
        if log.stopped.contains(&self.node) {
            return Err(BusError::Closed(topic.to_string()));
        }
        let partition = (key % log.partitions.len() as u64) as usize;
        let log = &mut log.partitions[partition];
        log.records.push_back(bytes);
        if log.records.len() > self.cluster.retention {
            log.records.pop_front();
            log.start += 1;
            tracing::warn!(
                topic,
                partition,
                "retention reached: the oldest record is gone"
            );
        }
        drop(state);
        self.cluster.changed.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl<R: BusRecord> Bus<R> for SerialisedBus {
    fn declare(&self, topic: &Topic<R>) -> Result<(), BusError> {
        let mut state = self.cluster.lock();
        let log = state.topic(topic.name(), topic.partitions());
        if log.partitions.len() != topic.partitions() as usize {
            return Err(BusError::Unknown(format!(
                "{} has {} partitions, not {}",
                topic.name(),
                log.partitions.len(),
                topic.partitions()
            )));
        }
        Ok(())
    }

    fn try_publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError> {
        self.append(topic.name(), topic.partitions(), key, record.encode())
    }

    async fn publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError> {
        self.append(topic.name(), topic.partitions(), key, record.encode())
    }

    fn stop_producing(&self, topic: &Topic<R>) {
        let mut state = self.cluster.lock();
        state
            .topic(topic.name(), topic.partitions())
            .stopped
            .insert(self.node.clone());
    }

    fn join(
        &self,
        topic: &Topic<R>,
        group: &str,
        member: &str,
        leave: CancellationToken,
    ) -> Result<Box<dyn GroupMember<R>>, BusError> {
        let mut state = self.cluster.lock();
        if state.down.contains(&self.node) {
            return Err(BusError::Broker(format!("node {} is down", self.node)));
        }
        let partitions = state
            .topic(topic.name(), topic.partitions())
            .partitions
            .len();
        state.next_member += 1;
        state.rebalances += 1;
        let id = state.next_member;
        let entry = state
            .groups
            .entry((topic.name().to_string(), group.to_string()))
            .or_insert_with(|| Group {
                committed: vec![0; partitions],
                members: BTreeMap::new(),
                target: vec![None; partitions],
                holder: vec![None; partitions],
            });
        entry.members.insert(
            id,
            MemberState {
                node: self.node.clone(),
                name: member.to_string(),
                positions: BTreeMap::new(),
                drain_to: None,
            },
        );
        entry.rebalance();
        drop(state);
        self.cluster.changed.notify_waiters();
        Ok(Box::new(SerialisedMember {
            cluster: self.cluster.clone(),
            key: (topic.name().to_string(), group.to_string()),
            id,
            leave,
            record: std::marker::PhantomData,
        }))
    }

    fn lag(&self, topic: &Topic<R>, group: &str) -> u64 {
        let state = self.cluster.lock();
        let (Some(log), Some(group)) = (
            state.topics.get(topic.name()),
            state
                .groups
                .get(&(topic.name().to_string(), group.to_string())),
        ) else {
            return 0;
        };
        log.partitions
            .iter()
            .zip(&group.committed)
            .map(|(log, committed)| log.end().saturating_sub(*committed))
            .sum()
    }
}

/// One member of a group on a [`BusCluster`].
struct SerialisedMember<R> {
    cluster: Arc<BusCluster>,
    /// (topic, group).
    key: (String, String),
    id: MemberId,
    leave: CancellationToken,
    record: std::marker::PhantomData<fn() -> R>,
}

/// What one look at the coordinator found for a member.
enum Step {
    /// Something to return.
    Ready(Polled<Bytes>),
    /// Nothing yet: wait for a change.
    Wait,
}

impl<R> SerialisedMember<R> {
    fn step(&self, max: usize) -> (Step, bool) {
        let mut state = self.cluster.lock();
        let state = &mut *state;
        let leaving = self.leave.is_cancelled();
        let Some(group) = state.groups.get_mut(&self.key) else {
            return (Step::Ready(Polled::Left), false);
        };
        let Some(member) = group.members.get_mut(&self.id) else {
            return (Step::Ready(Polled::Left), false);
        };
        // Revocations first: state of a partition goes before anything else
        // is processed.
        let revoked: Vec<Partition> = member
            .positions
            .keys()
            .copied()
            .filter(|p| group.target[*p as usize] != Some(self.id))
            .collect();
        if !revoked.is_empty() {
            for partition in &revoked {
                member.positions.remove(partition);
                if let Some(drain) = member.drain_to.as_mut() {
                    drain.remove(partition);
                }
                group.holder[*partition as usize] = None;
            }
            return (Step::Ready(Polled::Revoked(revoked)), true);
        }
        let log = state.topics.get(&self.key.0);
        if !leaving {
            let assigned: Vec<Partition> = (0..group.target.len())
                .filter(|p| group.target[*p] == Some(self.id) && group.holder[*p].is_none())
                .map(|p| p as Partition)
                .collect();
            if !assigned.is_empty() {
                for partition in &assigned {
                    let p = *partition as usize;
                    group.holder[p] = Some(self.id);
                    let start = log.map_or(0, |log| log.partitions[p].start);
                    member
                        .positions
                        .insert(*partition, group.committed[p].max(start));
                }
                return (Step::Ready(Polled::Assigned(assigned)), false);
            }
        } else if member.drain_to.is_none() {
            // What is queued when the member is told to leave is its to finish.
            member.drain_to = Some(
                member
                    .positions
                    .keys()
                    .map(|p| (*p, log.map_or(0, |log| log.partitions[*p as usize].end())))
                    .collect(),
            );
        }
        let mut records = Vec::new();
        if let Some(log) = log {
            for (partition, position) in member.positions.iter_mut() {
                let partition_log = &log.partitions[*partition as usize];
                let until = member
                    .drain_to
                    .as_ref()
                    .and_then(|drain| drain.get(partition).copied())
                    .unwrap_or(u64::MAX)
                    .min(partition_log.end());
                *position = (*position).max(partition_log.start);
                while *position < until && records.len() < max {
                    let index = (*position - partition_log.start) as usize;
                    records.push(Consumed {
                        partition: *partition,
                        record: partition_log.records[index].clone(),
                    });
                    *position += 1;
                }
            }
        }
        if !records.is_empty() {
            return (Step::Ready(Polled::Records(records)), false);
        }
        if leaving {
            group.remove(self.id);
            state.rebalances += 1;
            return (Step::Ready(Polled::Left), true);
        }
        (Step::Wait, false)
    }
}

#[async_trait]
impl<R: BusRecord> GroupMember<R> for SerialisedMember<R> {
    async fn poll(&mut self, max: usize) -> Polled<R> {
        let max = max.max(1);
        loop {
            // Registered before looking, so a change made in between wakes us.
            let changed = self.cluster.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (step, wake_others) = self.step(max);
            if wake_others {
                self.cluster.changed.notify_waiters();
            }
            match step {
                Step::Ready(Polled::Records(encoded)) => {
                    let records = decode_all::<R>(&self.key.0, encoded);
                    // Only undecodable records: skipped (logged), look again.
                    if !records.is_empty() {
                        return Polled::Records(records);
                    }
                }
                Step::Ready(Polled::Assigned(partitions)) => return Polled::Assigned(partitions),
                Step::Ready(Polled::Revoked(partitions)) => return Polled::Revoked(partitions),
                Step::Ready(Polled::Left) => return Polled::Left,
                Step::Wait => {
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = self.leave.cancelled() => {}
                    }
                }
            }
        }
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        let mut state = self.cluster.lock();
        let member_name = || format!("{} in {}", self.id, self.key.1);
        let Some(group) = state.groups.get_mut(&self.key) else {
            return Err(BusError::Fenced(member_name()));
        };
        let Some(member) = group.members.get(&self.id) else {
            return Err(BusError::Fenced(member_name()));
        };
        for (partition, position) in &member.positions {
            let committed = &mut group.committed[*partition as usize];
            *committed = (*committed).max(*position);
        }
        state.trim(&self.key.0);
        Ok(())
    }
}

/// Decodes polled records; one that does not decode is logged with the
/// unmarshal code (50002) and skipped, as a broker consumer must (it can
/// never decode, so retrying it would stall the partition).
fn decode_all<R: BusRecord>(topic: &str, encoded: Vec<Consumed<Bytes>>) -> Vec<Consumed<R>> {
    encoded
        .into_iter()
        .filter_map(|consumed| match R::decode(consumed.record) {
            Ok(record) => Some(Consumed {
                partition: consumed.partition,
                record,
            }),
            Err(error) => {
                crate::telemetry::failed(error.code(), 1);
                tracing::error!(%error, topic, partition = consumed.partition,
                    code = error.code().code(), "record skipped");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DeadLetterRecord, letter};

    type Member = Box<dyn GroupMember<DeadLetterRecord>>;

    fn join(
        bus: &SerialisedBus,
        topic: &Topic<DeadLetterRecord>,
        name: &str,
    ) -> (Member, CancellationToken) {
        let leave = CancellationToken::new();
        (bus.join(topic, "g", name, leave.clone()).unwrap(), leave)
    }

    /// Polls until records come, answering rebalance events; returns the
    /// attempts of the records.
    async fn next_records(member: &mut Member, max: usize) -> Vec<u32> {
        loop {
            match member.poll(max).await {
                Polled::Records(records) => {
                    return records.into_iter().map(|c| c.record.attempts).collect();
                }
                Polled::Left => panic!("member left"),
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn records_cross_encoded_and_a_new_member_takes_half_the_partitions() {
        let cluster = BusCluster::new();
        let (a, b) = (cluster.node("a"), cluster.node("b"));
        let topic = Topic::new("im-dlq", 2);
        Bus::<DeadLetterRecord>::declare(&*a, &topic).unwrap();
        let (mut first, _) = join(&a, &topic, "a-0");
        assert_eq!(first.poll(10).await, Polled::Assigned(vec![0, 1]));
        // Keys 0 and 1 land on partitions 0 and 1.
        a.publish(&topic, 0, letter(1)).await.unwrap();
        b.publish(&topic, 1, letter(2)).await.unwrap();
        assert_eq!(next_records(&mut first, 10).await, vec![1, 2]);
        first.commit().await.unwrap();
        assert_eq!(Bus::<DeadLetterRecord>::lag(&*a, &topic, "g"), 0);

        let (mut second, _) = join(&b, &topic, "b-0");
        // The newcomer waits until the owner hands partition 1 over, which
        // happens when the owner next polls.
        assert_eq!(first.poll(10).await, Polled::Revoked(vec![1]));
        assert_eq!(second.poll(10).await, Polled::Assigned(vec![1]));
        a.publish(&topic, 1, letter(3)).await.unwrap();
        a.publish(&topic, 0, letter(4)).await.unwrap();
        assert_eq!(next_records(&mut second, 10).await, vec![3]);
        assert_eq!(next_records(&mut first, 10).await, vec![4]);
        assert_eq!(
            cluster.holders("im-dlq", "g"),
            vec![Some("a-0".to_string()), Some("b-0".to_string())]
        );
    }

    #[tokio::test]
    async fn a_dropped_node_is_fenced_and_its_uncommitted_records_go_to_the_next_owner() {
        let cluster = BusCluster::new();
        let (a, b) = (cluster.node("a"), cluster.node("b"));
        let topic = Topic::new("im-dlq", 1);
        let (mut doomed, _) = join(&a, &topic, "a-0");
        let (mut survivor, _) = join(&b, &topic, "b-0");
        assert_eq!(doomed.poll(10).await, Polled::Assigned(vec![0]));
        for attempts in 1..=3 {
            b.publish(&topic, 0, letter(attempts)).await.unwrap();
        }
        assert_eq!(next_records(&mut doomed, 1).await, vec![1]);
        doomed.commit().await.unwrap();
        assert_eq!(next_records(&mut doomed, 1).await, vec![2]);
        // Record 2 was polled, never committed: its node dies.
        cluster.drop_node("a");
        assert!(matches!(doomed.commit().await, Err(BusError::Fenced(_))));
        assert!(matches!(
            a.publish(&topic, 0, letter(9)).await,
            Err(BusError::Broker(_))
        ));
        assert_eq!(doomed.poll(10).await, Polled::Left);
        assert_eq!(survivor.poll(10).await, Polled::Assigned(vec![0]));
        assert_eq!(next_records(&mut survivor, 10).await, vec![2, 3]);
    }

    #[tokio::test]
    async fn a_leaving_member_finishes_what_is_queued_then_hands_its_partitions_over() {
        let cluster = BusCluster::new();
        let (a, b) = (cluster.node("a"), cluster.node("b"));
        let topic = Topic::new("im-dlq", 1);
        let (mut leaving, leave) = join(&a, &topic, "a-0");
        assert_eq!(leaving.poll(10).await, Polled::Assigned(vec![0]));
        a.publish(&topic, 0, letter(1)).await.unwrap();
        Bus::<DeadLetterRecord>::stop_producing(&*a, &topic);
        assert!(matches!(
            a.publish(&topic, 0, letter(9)).await,
            Err(BusError::Closed(_))
        ));
        let (mut staying, _) = join(&b, &topic, "b-0");
        leave.cancel();
        // Queued before the leave: still the leaving member's; it commits.
        assert_eq!(next_records(&mut leaving, 10).await, vec![1]);
        leaving.commit().await.unwrap();
        // Published after: the next owner's (b still produces).
        b.publish(&topic, 0, letter(2)).await.unwrap();
        assert_eq!(leaving.poll(10).await, Polled::Left);
        assert_eq!(staying.poll(10).await, Polled::Assigned(vec![0]));
        assert_eq!(next_records(&mut staying, 10).await, vec![2]);
    }

    #[tokio::test]
    async fn a_waiting_poll_wakes_for_a_publish_and_undecodable_records_are_skipped() {
        let cluster = BusCluster::new();
        let a = cluster.node("a");
        let topic = Topic::new("im-dlq", 1);
        let (mut member, _) = join(&a, &topic, "a-0");
        assert_eq!(member.poll(10).await, Polled::Assigned(vec![0]));
        let waiting = tokio::spawn(async move { next_records(&mut member, 10).await });
        tokio::task::yield_now().await;
        a.append("im-dlq", 1, 0, Bytes::from_static(b"\xff\xff"))
            .unwrap();
        a.publish(&topic, 0, letter(7)).await.unwrap();
        assert_eq!(waiting.await.unwrap(), vec![7]);
    }

    #[tokio::test]
    async fn retention_bounds_a_log_nobody_reads() {
        let cluster = BusCluster::with_retention(2);
        let a = cluster.node("a");
        let topic = Topic::new("downstream-topic-gone", 1);
        for attempts in 1..=5 {
            a.publish(&topic, 0, letter(attempts)).await.unwrap();
        }
        let (mut late, _) = join(&a, &topic, "late");
        assert_eq!(late.poll(10).await, Polled::Assigned(vec![0]));
        assert_eq!(next_records(&mut late, 10).await, vec![4, 5]);
    }
}
