//! The bus over Kafka (rdkafka, the bundled librdkafka): what several
//! `pingme` processes share. One idempotent producer per node (`acks=all`,
//! so a record is on the broker, in order per partition, once it is
//! reported delivered), one consumer per group member (classic group
//! protocol, eager rebalances), an admin client that creates topics.
//!
//! - Partitions are picked here, `key % partitions` ([`Topic::partition_of`]),
//!   never by librdkafka's partitioner, so every bus implementation and
//!   every node agree on where a conversation's records go.
//! - [`Bus::publish`] hands the record to the producer's queue (waiting
//!   for room), [`Bus::try_publish`] answers `Full` when the queue is
//!   full. A member's [`GroupMember::commit`] first waits until everything
//!   this node published before it is acknowledged by the broker, then
//!   commits its offsets synchronously: "handed to the next topic" means
//!   on the broker, so a crash after a commit loses nothing.
//! - Rebalance callbacks ([`ConsumerContext::post_rebalance`], run inside
//!   the member's own poll) are queued and returned by the next
//!   [`GroupMember::poll`] as [`Polled::Assigned`] / [`Polled::Revoked`],
//!   before any record; records of a revoked partition fetched but not yet
//!   returned are dropped (the next owner reads them again from the
//!   committed offset).
//! - Leaving: the member returns the records its consumer already fetched,
//!   then unsubscribes and closes (on a blocking thread: librdkafka's
//!   close waits for the group to let it go); its partitions move to the
//!   members that stay, from its last commit.
//! - Lag comes from the consumers' statistics (`statistics.interval.ms`):
//!   the high watermark that fetch responses carry minus the committed
//!   offset, per partition this node's members hold. Not from
//!   `fetch_watermarks` (ListOffsets): Tansu answers it wrongly after
//!   batched produce.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use pingme_protocol::ErrorCode;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, BusRecord, Consumed, GroupMember, Partition, Polled, Topic};

/// How a node talks to Kafka. The defaults are chosen for latency on a
/// small cluster (figures in docs/benchmarks.md, "Kafka bus latency").
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// `linger.ms`: how long the producer waits to fill a batch.
    pub linger_ms: u32,
    /// `batch.num.messages`: records per produce batch at most.
    pub batch_num_messages: u32,
    /// `queue.buffering.max.messages`: the producer queue's bound, past
    /// which `try_publish` answers `Full` and `publish` waits.
    pub queue_max_messages: u32,
    /// `fetch.wait.max.ms`: how long the broker may hold an empty fetch.
    pub fetch_wait_max_ms: u32,
    /// `session.timeout.ms`: a member silent this long is dropped from its
    /// group. Tansu's joins take about half of it.
    pub session_timeout_ms: u32,
    /// `heartbeat.interval.ms`.
    pub heartbeat_interval_ms: u32,
    /// `statistics.interval.ms` of consumers: how fresh [`Bus::lag`] is.
    pub stats_interval_ms: u32,
    /// Bound on admin requests, on waiting for deliveries before a commit,
    /// and on `publish` waiting for room.
    pub request_timeout: Duration,
    /// A member commits at most this often: [`GroupMember::commit`] calls
    /// in between return at once and their offsets go with the next one
    /// due, with the member's leaving, or, when no more records come, once
    /// the interval is over (its idle poll wakes for it). Each real commit
    /// waits for the node's deliveries and a broker round trip, which per
    /// batch would serialise a partition's work on them; a crash
    /// re-delivers up to this much more. Zero (the default): every call
    /// commits.
    pub commit_interval: Duration,
}

impl KafkaSettings {
    /// The defaults with `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            linger_ms: 1,
            batch_num_messages: 10_000,
            queue_max_messages: 100_000,
            fetch_wait_max_ms: 10,
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            stats_interval_ms: 1_000,
            request_timeout: Duration::from_secs(30),
            // Spaced commits measured worse on the 2-core test machine,
            // where the broker is the bottleneck (docs/benchmarks.md,
            // "Cluster"): the per-batch delivery wait is what throttled the
            // workers to the broker's pace.
            commit_interval: Duration::ZERO,
        }
    }

    /// Settings every client of the node shares.
    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            // Small records, each waited for: no Nagle delay on either side.
            .set("socket.nagle.disable", "true");
        config
    }

    fn producer(&self) -> ClientConfig {
        let mut config = self.client();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.num.messages", self.batch_num_messages.to_string())
            .set(
                "queue.buffering.max.messages",
                self.queue_max_messages.to_string(),
            );
        config
    }

    fn consumer(&self, group: &str, member: &str) -> ClientConfig {
        let mut config = self.client();
        config
            .set("group.id", group)
            .set("client.id", member)
            // Eager rebalances of the classic protocol (Tansu gives no
            // assignment under KIP-848's `consumer` protocol).
            .set("group.protocol", "classic")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string())
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                self.heartbeat_interval_ms.to_string(),
            )
            .set("statistics.interval.ms", self.stats_interval_ms.to_string());
        config
    }
}

/// Records handed to the producer and not yet reported delivered (or
/// failed), by ticket, so a commit can wait for exactly those published
/// before it, and learn whether any of them was lost.
#[derive(Default)]
struct Deliveries {
    tickets: Mutex<Tickets>,
    next: AtomicU64,
    /// Woken on every delivery report.
    reported: Notify,
}

#[derive(Default)]
struct Tickets {
    pending: BTreeSet<u64>,
    /// Records whose retries ran out, the most recent [`FAILED_KEPT`].
    failed: BTreeSet<u64>,
}

/// Failed tickets remembered. Failures are rare (retries ran out); a member
/// whose last commit is older than this many failures rewinds anyway.
const FAILED_KEPT: usize = 4_096;

impl Deliveries {
    fn lock(&self) -> MutexGuard<'_, Tickets> {
        self.tickets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The first ticket not yet issued.
    fn issued(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// A delivery report: the ticket is no longer pending.
    fn report(&self, ticket: u64, delivered: bool) {
        let mut tickets = self.lock();
        tickets.pending.remove(&ticket);
        if !delivered {
            tickets.failed.insert(ticket);
            if tickets.failed.len() > FAILED_KEPT {
                tickets.failed.pop_first();
            }
        }
        drop(tickets);
        self.reported.notify_waiters();
    }

    /// Waits until every record ticketed before `issued` is reported, then
    /// tells whether all those ticketed from `since` on were delivered.
    async fn settled(&self, since: u64, issued: u64, timeout: Duration) -> Result<bool, BusError> {
        let wait = async {
            loop {
                let reported = self.reported.notified();
                tokio::pin!(reported);
                reported.as_mut().enable();
                {
                    let tickets = self.lock();
                    if tickets
                        .pending
                        .first()
                        .is_none_or(|oldest| *oldest >= issued)
                    {
                        let forgotten = tickets.failed.len() == FAILED_KEPT
                            && tickets.failed.first().is_some_and(|first| *first > since);
                        return !forgotten && tickets.failed.range(since..issued).next().is_none();
                    }
                }
                reported.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| BusError::Broker("records not acknowledged in time".into()))
    }
}

/// The producer's callbacks (on librdkafka's polling thread).
struct ProducerEvents {
    deliveries: Arc<Deliveries>,
}

impl ClientContext for ProducerEvents {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka producer");
    }
}

impl ProducerContext for ProducerEvents {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        if let Err((error, message)) = result {
            // Retries (idempotent, in order) ran out: the record is lost to
            // the bus. The members whose commits it falls before rewind
            // instead of committing, so its cause is processed again.
            let code = ErrorCode::KafkaProducerError;
            crate::telemetry::failed(code, 1);
            tracing::error!(%error, topic = message.topic(), partition = message.partition(),
                code = code.code(), "record not delivered");
        }
        self.deliveries.report(ticket as u64, result.is_ok());
    }
}

/// Each member's lag (records fetched-visible and not committed), by
/// (topic, group) then member.
type LagBoard = Arc<Mutex<HashMap<(String, String), HashMap<u64, u64>>>>;

fn lock_board(board: &LagBoard) -> MutexGuard<'_, HashMap<(String, String), HashMap<u64, u64>>> {
    board
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One node's client of a Kafka cluster.
pub struct KafkaBus {
    settings: KafkaSettings,
    producer: ThreadedProducer<ProducerEvents>,
    deliveries: Arc<Deliveries>,
    admin: AdminClient<DefaultClientContext>,
    /// Topics this node created or found.
    declared: Mutex<HashSet<String>>,
    /// Topics this node stopped producing to.
    stopped: RwLock<HashSet<String>>,
    lags: LagBoard,
    next_member: AtomicU64,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.settings.brokers)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Creates the node's producer and admin client (no broker is
    /// contacted yet: librdkafka connects in the background).
    pub fn new(settings: KafkaSettings) -> Result<KafkaBus, BusError> {
        let deliveries = Arc::new(Deliveries::default());
        let producer = settings
            .producer()
            .create_with_context(ProducerEvents {
                deliveries: deliveries.clone(),
            })
            .map_err(broker_error)?;
        let admin = settings.client().create().map_err(broker_error)?;
        Ok(KafkaBus {
            settings,
            producer,
            deliveries,
            admin,
            declared: Mutex::new(HashSet::new()),
            stopped: RwLock::new(HashSet::new()),
            lags: Arc::default(),
            next_member: AtomicU64::new(0),
        })
    }

    /// The settings this bus runs with.
    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// Hands one record to the producer: `Full` when its queue is.
    fn send(
        &self,
        topic: &str,
        partition: Partition,
        key: u64,
        payload: &[u8],
    ) -> Result<(), BusError> {
        if self
            .stopped
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(topic)
        {
            return Err(BusError::Closed(topic.to_string()));
        }
        let key = key.to_be_bytes();
        let mut tickets = self.deliveries.lock();
        let ticket = self.deliveries.next.fetch_add(1, Ordering::SeqCst);
        tickets.pending.insert(ticket);
        let record = BaseRecord::with_opaque_to(topic, ticket as usize)
            .partition(partition as i32)
            .key(&key[..])
            .payload(payload);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((error, _)) => {
                tickets.pending.remove(&ticket);
                Err(match error {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        BusError::Full(topic.to_string())
                    }
                    error => BusError::Broker(format!("{topic}: {error}")),
                })
            }
        }
    }

    /// Whether a broker answers a metadata request within `timeout`: the
    /// health check. Blocking (call it on a blocking thread).
    pub fn check(&self, timeout: Duration) -> Result<(), BusError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(broker_error)?;
        if metadata.brokers().is_empty() {
            return Err(BusError::Broker("the cluster named no broker".into()));
        }
        Ok(())
    }

    /// The topics on the brokers whose names start with `prefix`.
    /// Blocking (call it on a blocking thread).
    pub fn topics_named(&self, prefix: &str, timeout: Duration) -> Result<Vec<String>, BusError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(broker_error)?;
        Ok(metadata
            .topics()
            .iter()
            .map(|topic| topic.name())
            .filter(|name| name.starts_with(prefix))
            .map(str::to_string)
            .collect())
    }

    /// Waits until what this node published is on the broker (up to the
    /// request timeout); stopping nodes call it so nothing stays queued.
    pub fn flush(&self) -> Result<(), BusError> {
        self.producer
            .flush(self.settings.request_timeout)
            .map_err(broker_error)
    }
}

impl Drop for KafkaBus {
    fn drop(&mut self) {
        // librdkafka's producer purges what is still queued when it is
        // destroyed: send it first.
        if let Err(error) = self.flush() {
            tracing::error!(%error, "records still queued when the Kafka bus closed");
        }
    }
}

fn broker_error(error: KafkaError) -> BusError {
    BusError::Broker(error.to_string())
}

#[async_trait]
impl<R: BusRecord> Bus<R> for KafkaBus {
    fn declare(&self, topic: &Topic<R>) -> Result<(), BusError> {
        let mut declared = self
            .declared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if declared.contains(topic.name()) {
            return Ok(());
        }
        let new = NewTopic::new(
            topic.name(),
            topic.partitions() as i32,
            TopicReplication::Fixed(-1),
        );
        let options = AdminOptions::new().request_timeout(Some(self.settings.request_timeout));
        // The admin client's own thread completes the future: blocking here
        // needs no runtime (declarations happen at start).
        let results = futures::executor::block_on(self.admin.create_topics([&new], &options))
            .map_err(broker_error)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(BusError::Broker(format!("creating {name}: {code}")));
                }
            }
        }
        // Producers on every node pick partitions by `key % partitions`:
        // a topic with another count would split conversations.
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic.name()), self.settings.request_timeout)
            .map_err(broker_error)?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic.name())
            .map_or(0, |t| t.partitions().len());
        if found != topic.partitions() as usize {
            return Err(BusError::Unknown(format!(
                "{} has {found} partitions, not {}",
                topic.name(),
                topic.partitions()
            )));
        }
        declared.insert(topic.name().to_string());
        Ok(())
    }

    fn try_publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError> {
        self.send(topic.name(), topic.partition_of(key), key, &record.encode())
    }

    async fn publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError> {
        let payload = record.encode();
        let partition = topic.partition_of(key);
        let deadline = tokio::time::Instant::now() + self.settings.request_timeout;
        loop {
            // Registered before trying, so a delivery in between (which
            // frees room) is not missed.
            let reported = self.deliveries.reported.notified();
            tokio::pin!(reported);
            reported.as_mut().enable();
            match self.send(topic.name(), partition, key, &payload) {
                Err(BusError::Full(name)) => {
                    if tokio::time::timeout_at(deadline, reported).await.is_err() {
                        return Err(BusError::Broker(format!(
                            "{name}: producer queue still full"
                        )));
                    }
                }
                sent => return sent,
            }
        }
    }

    fn stop_producing(&self, topic: &Topic<R>) {
        self.stopped
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(topic.name().to_string());
        if let Err(error) = self.flush() {
            tracing::error!(%error, topic = topic.name(), "records still queued at stop");
        }
    }

    fn join(
        &self,
        topic: &Topic<R>,
        group: &str,
        member: &str,
        leave: CancellationToken,
    ) -> Result<Box<dyn GroupMember<R>>, BusError> {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        let board_key = (topic.name().to_string(), group.to_string());
        let events = MemberEvents {
            topic: topic.name().to_string(),
            changes: Mutex::new(VecDeque::new()),
            changed: Notify::new(),
            lags: self.lags.clone(),
            board_key: board_key.clone(),
            id,
            gauged: Mutex::new(BTreeSet::new()),
        };
        let consumer: StreamConsumer<MemberEvents> = self
            .settings
            .consumer(group, member)
            .create_with_context(events)
            .map_err(broker_error)?;
        consumer.subscribe(&[topic.name()]).map_err(broker_error)?;
        let consumer = Arc::new(consumer);
        Ok(Box::new(KafkaMember {
            events: consumer.context().clone(),
            consumer: Some(consumer),
            topic: topic.name().to_string(),
            group: group.to_string(),
            leave,
            positions: BTreeMap::new(),
            committed: BTreeMap::new(),
            uncommitted: BTreeMap::new(),
            since: self.deliveries.issued(),
            ready: VecDeque::new(),
            deliveries: self.deliveries.clone(),
            timeout: self.settings.request_timeout,
            commit_interval: self.settings.commit_interval,
            // A new member's first commit goes out at once.
            commit_due: tokio::time::Instant::now(),
            record: PhantomData,
        }))
    }

    fn lag(&self, topic: &Topic<R>, group: &str) -> u64 {
        lock_board(&self.lags)
            .get(&(topic.name().to_string(), group.to_string()))
            .map_or(0, |members| members.values().sum())
    }
}

/// A partition change seen by a rebalance callback.
enum Change {
    Assigned(Vec<Partition>),
    Revoked(Vec<Partition>),
}

/// A member's consumer callbacks (run inside its own poll).
struct MemberEvents {
    topic: String,
    changes: Mutex<VecDeque<Change>>,
    /// Wakes the member's poll when a change is queued.
    changed: Notify,
    lags: LagBoard,
    board_key: (String, String),
    id: u64,
    /// Partitions whose lag gauge this member set last time: set to 0 when
    /// they move away (their next owner reports them).
    gauged: Mutex<BTreeSet<i32>>,
}

impl MemberEvents {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<Partition> {
        let mut partitions: Vec<Partition> = list
            .elements_for_topic(&self.topic)
            .iter()
            .filter_map(|element| Partition::try_from(element.partition()).ok())
            .collect();
        partitions.sort_unstable();
        partitions
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Change>> {
        self.changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for MemberEvents {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        // Partitions this member fetches: the high watermark its fetch
        // responses carried minus what the group committed.
        let lags: BTreeMap<i32, u64> = topic
            .partitions
            .values()
            .filter(|p| p.partition >= 0 && p.desired && p.hi_offset >= 0)
            .map(|p| {
                let committed = if p.committed_offset >= 0 {
                    p.committed_offset
                } else {
                    p.lo_offset.max(0)
                };
                (p.partition, (p.hi_offset - committed).max(0) as u64)
            })
            .collect();
        let lag = lags.values().sum();
        let (topic_name, group) = &self.board_key;
        let gauge = |partition: i32| {
            metrics::gauge!(crate::telemetry::CONSUMER_LAG,
                "topic" => topic_name.clone(), "group" => group.clone(),
                "partition" => partition.to_string())
        };
        {
            let mut gauged = self
                .gauged
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for gone in gauged.iter().filter(|p| !lags.contains_key(p)) {
                gauge(*gone).set(0.0);
            }
            for (partition, lag) in &lags {
                gauge(*partition).set(*lag as f64);
            }
            *gauged = lags.keys().copied().collect();
        }
        lock_board(&self.lags)
            .entry(self.board_key.clone())
            .or_default()
            .insert(self.id, lag);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, topic = self.topic, "kafka consumer");
    }
}

impl ConsumerContext for MemberEvents {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (change, what) = match rebalance {
            Rebalance::Assign(list) => (Change::Assigned(self.partitions(list)), "assigned"),
            Rebalance::Revoke(list) => (Change::Revoked(self.partitions(list)), "revoked"),
            Rebalance::Error(error) => {
                let code = ErrorCode::KafkaConsumerGroupError;
                crate::telemetry::failed(code, 1);
                tracing::error!(%error, topic = self.topic, code = code.code(), "rebalance failed");
                return;
            }
        };
        let (Change::Assigned(partitions) | Change::Revoked(partitions)) = &change;
        tracing::info!(
            topic = self.topic,
            group = self.board_key.1,
            ?partitions,
            "partitions {what}"
        );
        self.lock().push_back(change);
        self.changed.notify_one();
    }
}

/// A record fetched and not yet returned by a poll.
struct Fetched<R> {
    partition: Partition,
    offset: i64,
    /// `None`: undecodable (logged, skipped, its offset still committed).
    record: Option<R>,
}

/// One member of a consumer group on Kafka.
struct KafkaMember<R> {
    /// `None` once it left.
    consumer: Option<Arc<StreamConsumer<MemberEvents>>>,
    events: Arc<MemberEvents>,
    topic: String,
    group: String,
    leave: CancellationToken,
    /// Assigned partitions and the offset after the last record returned.
    positions: BTreeMap<Partition, Option<i64>>,
    /// What this member committed per partition.
    committed: BTreeMap<Partition, i64>,
    /// The first offset returned since the last commit, per partition:
    /// where a rewind goes back to.
    uncommitted: BTreeMap<Partition, i64>,
    /// The first delivery ticket issued after the last commit (or the
    /// join): records from it on may be effects of what is uncommitted.
    since: u64,
    ready: VecDeque<Fetched<R>>,
    deliveries: Arc<Deliveries>,
    timeout: Duration,
    commit_interval: Duration,
    /// When the next real commit may go out: an interval after the last
    /// one tried, failed or not, so a broker that refuses commits is not
    /// asked again at once.
    commit_due: tokio::time::Instant,
    record: PhantomData<fn() -> R>,
}

impl<R: BusRecord> KafkaMember<R> {
    /// Keeps a fetched record for the next poll (synchronously, so a poll
    /// dropped after `recv` loses nothing).
    fn accept(&mut self, message: Result<BorrowedMessage<'_>, KafkaError>) -> bool {
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, topic = self.topic, group = self.group, "consume failed");
                return false;
            }
        };
        let Ok(partition) = Partition::try_from(message.partition()) else {
            return true;
        };
        // A record of a partition revoked meanwhile is the next owner's.
        if message.topic() != self.topic || !self.positions.contains_key(&partition) {
            return true;
        }
        let bytes = Bytes::copy_from_slice(message.payload().unwrap_or_default());
        let record = match R::decode(bytes) {
            Ok(record) => Some(record),
            Err(error) => {
                crate::telemetry::failed(error.code(), 1);
                tracing::error!(%error, topic = self.topic, partition, offset = message.offset(),
                    code = error.code().code(), "record skipped");
                None
            }
        };
        self.ready.push_back(Fetched {
            partition,
            offset: message.offset(),
            record,
        });
        true
    }

    /// Takes what the consumer already fetched, without waiting.
    fn take_fetched(&mut self, consumer: &StreamConsumer<MemberEvents>, max: usize) -> usize {
        let mut taken = 0;
        while taken < max {
            match consumer.recv().now_or_never() {
                Some(message) => {
                    self.accept(message);
                    taken += 1;
                }
                None => break,
            }
        }
        taken
    }

    /// Returns up to `max` ready records; skipped ones only move positions.
    fn take_ready(&mut self, max: usize) -> Vec<Consumed<R>> {
        let mut records = Vec::new();
        while records.len() < max {
            let Some(fetched) = self.ready.pop_front() else {
                break;
            };
            self.positions
                .insert(fetched.partition, Some(fetched.offset + 1));
            self.uncommitted
                .entry(fetched.partition)
                .or_insert(fetched.offset);
            if let Some(record) = fetched.record {
                records.push(Consumed {
                    partition: fetched.partition,
                    record,
                });
            }
        }
        records
    }

    /// Unsubscribes and closes the consumer on a blocking thread
    /// (librdkafka's close waits for the group coordinator); the handle
    /// finishes once the group let the member go.
    fn close(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let mut closing = None;
        if let Some(consumer) = self.consumer.take() {
            lock_board(&self.events.lags)
                .entry(self.events.board_key.clone())
                .or_default()
                .remove(&self.events.id);
            let close = move || {
                consumer.unsubscribe();
                drop(consumer);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => closing = Some(runtime.spawn_blocking(close)),
                Err(_) => close(),
            }
        }
        self.positions.clear();
        self.uncommitted.clear();
        self.ready.clear();
        closing
    }

    /// Goes back to the last commit: the records returned since come
    /// again, from the broker (a seek also discards what librdkafka
    /// fetched past it).
    fn rewind(&mut self, consumer: &StreamConsumer<MemberEvents>) -> Result<(), BusError> {
        let rewound = std::mem::take(&mut self.uncommitted);
        for (partition, offset) in &rewound {
            consumer
                .seek(
                    &self.topic,
                    *partition as i32,
                    Offset::Offset(*offset),
                    Duration::ZERO,
                )
                .map_err(broker_error)?;
            self.positions
                .insert(*partition, self.committed.get(partition).copied());
        }
        self.ready
            .retain(|fetched| !rewound.contains_key(&fetched.partition));
        Ok(())
    }
}

impl<R> Drop for KafkaMember<R> {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            lock_board(&self.events.lags)
                .entry(self.events.board_key.clone())
                .or_default()
                .remove(&self.events.id);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(move || drop(consumer));
                }
                Err(_) => drop(consumer),
            }
        }
    }
}

#[async_trait]
impl<R: BusRecord> GroupMember<R> for KafkaMember<R> {
    async fn poll(&mut self, max: usize) -> Polled<R> {
        let max = max.max(1);
        loop {
            // Partition changes first: state of a revoked partition goes
            // before any record is processed.
            let change = self.events.lock().pop_front();
            match change {
                Some(Change::Assigned(partitions)) => {
                    for partition in &partitions {
                        self.positions.insert(*partition, None);
                    }
                    return Polled::Assigned(partitions);
                }
                Some(Change::Revoked(partitions)) => {
                    for partition in &partitions {
                        self.positions.remove(partition);
                        self.committed.remove(partition);
                        self.uncommitted.remove(partition);
                    }
                    self.ready
                        .retain(|fetched| !partitions.contains(&fetched.partition));
                    return Polled::Revoked(partitions);
                }
                None => {}
            }
            let records = self.take_ready(max);
            if !records.is_empty() {
                return Polled::Records(records);
            }
            if !self.ready.is_empty() {
                // Only skipped records were ready: look again.
                continue;
            }
            let Some(consumer) = self.consumer.clone() else {
                return Polled::Left;
            };
            if self.leave.is_cancelled() {
                // What the consumer already fetched is this member's to
                // finish; the rest goes to the next owner.
                if self.take_fetched(&consumer, max) > 0 {
                    continue;
                }
                // What was processed and not committed yet (commits are
                // spaced) goes now, while the member still holds it.
                if let Err(error) = self.commit_now().await {
                    tracing::warn!(%error, topic = self.topic, group = self.group,
                        "last commit before leaving failed: the next owner re-delivers");
                }
                // Left only once the group knows: a process that exits
                // right after must not leave a half-finished rebalance.
                if let Some(closing) = self.close() {
                    let _ = closing.await;
                }
                return Polled::Left;
            }
            // Spaced commits: records processed and not committed yet are
            // committed once due even if no more come, so an idle member's
            // lag goes to zero and a restart does not process them again.
            let commit_pending = !self.commit_interval.is_zero() && !self.uncommitted.is_empty();
            tokio::select! {
                biased;
                _ = self.events.changed.notified() => {}
                _ = self.leave.cancelled() => {}
                _ = tokio::time::sleep_until(self.commit_due), if commit_pending => {
                    // Nothing to process; the caller's commit is due.
                    return Polled::Records(Vec::new());
                }
                message = consumer.recv() => {
                    if self.accept(message) {
                        self.take_fetched(&consumer, max.saturating_sub(1));
                    } else {
                        // A broker or partition error: not a hot loop.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        if tokio::time::Instant::now() < self.commit_due && self.consumer.is_some() {
            // Goes with the next commit due, or with leaving.
            return Ok(());
        }
        self.commit_due = tokio::time::Instant::now() + self.commit_interval;
        self.commit_now().await
    }
}

impl<R: BusRecord> KafkaMember<R> {
    /// Commits what was polled so far (see [`GroupMember::commit`]).
    async fn commit_now(&mut self) -> Result<(), BusError> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(BusError::Fenced(format!(
                "{} left {}",
                self.topic, self.group
            )));
        };
        let mut offsets = TopicPartitionList::new();
        let mut advanced = Vec::new();
        for (partition, position) in &self.positions {
            if let Some(next) = position
                && self.committed.get(partition) != Some(next)
            {
                offsets
                    .add_partition_offset(&self.topic, *partition as i32, Offset::Offset(*next))
                    .map_err(broker_error)?;
                advanced.push((*partition, *next));
            }
        }
        if advanced.is_empty() {
            return Ok(());
        }
        // What the polled records caused on other topics is on the broker
        // before their offsets are; if some of it was lost, their offsets
        // are not committed and they are processed again.
        let issued = self.deliveries.issued();
        if !self
            .deliveries
            .settled(self.since, issued, self.timeout)
            .await?
        {
            self.since = issued;
            self.rewind(&consumer)?;
            return Err(BusError::Redelivering(format!(
                "{} in {}: a record published since the last commit was not delivered",
                self.topic, self.group
            )));
        }
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
                .await
                .map_err(|error| BusError::Broker(error.to_string()))?;
        match committed {
            Ok(()) => {
                self.committed.extend(advanced);
                self.uncommitted.clear();
                self.since = issued;
                Ok(())
            }
            Err(KafkaError::ConsumerCommit(code)) if fenced(code) => Err(BusError::Fenced(
                format!("{} in {}: {code}", self.topic, self.group),
            )),
            Err(error) => Err(broker_error(error)),
        }
    }
}

/// Commit errors that mean the member's generation is over (a rebalance
/// took its partitions): its commit is refused, as a fenced member's.
fn fenced(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::IllegalGeneration
            | RDKafkaErrorCode::UnknownMemberId
            | RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::FencedInstanceId
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DeadLetterRecord, letter};

    #[tokio::test]
    async fn a_failure_counts_against_the_commits_whose_window_holds_it() {
        let deliveries = Deliveries::default();
        for _ in 0..4 {
            let ticket = deliveries.next.fetch_add(1, Ordering::SeqCst);
            deliveries.lock().pending.insert(ticket);
        }
        deliveries.report(0, true);
        deliveries.report(1, true);
        deliveries.report(2, false);
        deliveries.report(3, true);
        let wait = Duration::from_secs(5);
        assert!(deliveries.settled(0, 2, wait).await.unwrap());
        assert!(!deliveries.settled(0, 3, wait).await.unwrap());
        assert!(!deliveries.settled(2, 4, wait).await.unwrap());
        assert!(deliveries.settled(3, 4, wait).await.unwrap());
    }

    #[tokio::test]
    async fn settling_waits_for_the_pending_reports_it_covers() {
        let deliveries = Arc::new(Deliveries::default());
        for _ in 0..2 {
            let ticket = deliveries.next.fetch_add(1, Ordering::SeqCst);
            deliveries.lock().pending.insert(ticket);
        }
        deliveries.report(0, true);
        let wait = Duration::from_secs(30);
        // Ticket 1 is not covered by a window ending at 1.
        assert!(deliveries.settled(0, 1, wait).await.unwrap());
        let waiting = tokio::spawn({
            let deliveries = deliveries.clone();
            async move { deliveries.settled(0, 2, wait).await }
        });
        tokio::task::yield_now().await;
        deliveries.report(1, false);
        assert!(!waiting.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn forgotten_failures_count_as_failures() {
        let deliveries = Deliveries::default();
        for ticket in 0..=FAILED_KEPT as u64 + 1 {
            deliveries.next.fetch_add(1, Ordering::SeqCst);
            deliveries.report(ticket, ticket == 0);
        }
        // Ticket 1's failure was dropped to keep the set bounded: a window
        // that holds it is refused all the same.
        assert_eq!(deliveries.lock().failed.first(), Some(&2));
        assert!(
            !deliveries
                .settled(0, 2, Duration::from_secs(5))
                .await
                .unwrap()
        );
    }

    /// The broker in `KAFKA_BROKERS`, or `None` outside CI (under
    /// `CI=true` a missing broker fails the test).
    fn broker() -> Option<KafkaSettings> {
        let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_default();
        if brokers.is_empty() {
            assert!(
                std::env::var("CI").map_or(true, |ci| ci != "true"),
                "the Kafka tests need KAFKA_BROKERS under CI=true (bash .ci/kafka.sh)"
            );
            eprintln!("skipped: KAFKA_BROKERS is unset (start a broker: `bash .ci/kafka.sh`)");
            return None;
        }
        let mut settings = KafkaSettings::new(brokers);
        settings.session_timeout_ms = 6_000;
        settings.heartbeat_interval_ms = 500;
        settings.request_timeout = Duration::from_secs(20);
        settings.commit_interval = Duration::ZERO;
        Some(settings)
    }

    /// `name` with a suffix of this run's own (see [`run_suffix`]).
    fn unique(name: &str) -> String {
        format!("{name}-{}", run_suffix())
    }

    /// A suffix no other run shares on the broker: process id and time.
    fn run_suffix() -> String {
        format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    }

    async fn assigned(member: &mut Box<dyn GroupMember<DeadLetterRecord>>) {
        let polled = tokio::time::timeout(Duration::from_secs(60), member.poll(10))
            .await
            .expect("an assignment within a minute");
        assert!(
            matches!(polled, Polled::Assigned(ref p) if p == &[0]),
            "{polled:?}"
        );
    }

    /// Spaced commits: calls within the interval commit nothing (a crash
    /// re-delivers those records), and leaving commits what was processed.
    #[tokio::test]
    async fn spaced_commits_go_out_when_the_member_leaves() {
        let Some(mut settings) = broker() else { return };
        settings.commit_interval = Duration::from_secs(3600);
        let bus = KafkaBus::new(settings).unwrap();
        let topic = Topic::<DeadLetterRecord>::new(unique("spaced"), 1);
        let group = unique("spaced-group");
        bus.declare(&topic).unwrap();
        for n in 1..=3 {
            bus.publish(&topic, 0, letter(n)).await.unwrap();
        }
        // A member that processes 1 and commits (its first commit goes out),
        // then 2 and 3 and "commits" (spaced: nothing yet), and crashes:
        // the next one gets 2 and 3 again.
        let mut crashed = bus
            .join(&topic, &group, "m0", CancellationToken::new())
            .unwrap();
        assigned(&mut crashed).await;
        assert_eq!(next_records(&mut crashed, 1).await, [1]);
        crashed.commit().await.unwrap();
        assert_eq!(next_records(&mut crashed, 2).await, [2, 3]);
        crashed.commit().await.unwrap();
        drop(crashed);
        // This one processes them and 4, and leaves: the leaving commits,
        // so the next member starts after 4.
        let leave = CancellationToken::new();
        let mut leaving = bus.join(&topic, &group, "m1", leave.clone()).unwrap();
        assigned(&mut leaving).await;
        assert_eq!(next_records(&mut leaving, 2).await, [2, 3], "re-delivered");
        // Its first commit goes out; then 4, "committed" (spaced).
        leaving.commit().await.unwrap();
        bus.publish(&topic, 0, letter(4)).await.unwrap();
        assert_eq!(next_records(&mut leaving, 1).await, [4]);
        leaving.commit().await.unwrap();
        leave.cancel();
        loop {
            match tokio::time::timeout(Duration::from_secs(60), leaving.poll(10))
                .await
                .expect("left within a minute")
            {
                Polled::Left => break,
                Polled::Records(records) => panic!("nothing more was published: {records:?}"),
                Polled::Assigned(_) | Polled::Revoked(_) => {}
            }
        }
        bus.publish(&topic, 0, letter(5)).await.unwrap();
        let mut next = bus
            .join(&topic, &group, "m2", CancellationToken::new())
            .unwrap();
        assigned(&mut next).await;
        assert_eq!(
            next_records(&mut next, 1).await,
            [5],
            "from after the leaving commit"
        );
    }

    /// Spaced commits of a member that goes idle: what it processed is
    /// committed once the interval is over, without more records or a
    /// leave, so a crash after that re-delivers nothing.
    #[tokio::test]
    async fn an_idle_member_commits_when_its_commit_falls_due() {
        let Some(mut settings) = broker() else { return };
        let interval = Duration::from_secs(15);
        settings.commit_interval = interval;
        let bus = KafkaBus::new(settings).unwrap();
        let topic = Topic::<DeadLetterRecord>::new(unique("idle-commit"), 1);
        let group = unique("idle-commit-group");
        bus.declare(&topic).unwrap();
        let mut member = bus
            .join(&topic, &group, "m0", CancellationToken::new())
            .unwrap();
        assigned(&mut member).await;
        bus.publish(&topic, 0, letter(1)).await.unwrap();
        assert_eq!(next_records(&mut member, 1).await, [1]);
        // The first commit went out; this one, right after it, is put off.
        member.commit().await.unwrap();
        bus.publish(&topic, 0, letter(2)).await.unwrap();
        assert_eq!(next_records(&mut member, 1).await, [2]);
        member.commit().await.unwrap();
        match tokio::time::timeout(interval + Duration::from_secs(60), member.poll(10))
            .await
            .expect("the idle member wakes for its commit")
        {
            Polled::Records(records) => assert!(records.is_empty(), "{records:?}"),
            other => panic!("expected the commit's wake, got {other:?}"),
        }
        member.commit().await.unwrap();
        // Crashes: no leave, no last commit.
        drop(member);
        bus.publish(&topic, 0, letter(3)).await.unwrap();
        let mut next = bus
            .join(&topic, &group, "m1", CancellationToken::new())
            .unwrap();
        assigned(&mut next).await;
        assert_eq!(next_records(&mut next, 1).await, [3], "1 and 2 committed");
    }

    async fn next_records(
        member: &mut Box<dyn GroupMember<DeadLetterRecord>>,
        count: usize,
    ) -> Vec<u32> {
        let mut numbers = Vec::new();
        while numbers.len() < count {
            let polled = tokio::time::timeout(Duration::from_secs(60), member.poll(count))
                .await
                .expect("records within a minute");
            match polled {
                Polled::Records(records) => {
                    numbers.extend(records.into_iter().map(|c| c.record.attempts));
                }
                other => panic!("expected records, got {other:?}"),
            }
        }
        numbers
    }

    /// A record the broker never took (its retries ran out) among what
    /// the polled records caused: the commit refuses, and the records
    /// since the last commit come again, exactly those.
    #[tokio::test]
    async fn a_lost_effect_rewinds_to_the_last_commit() {
        let Some(settings) = broker() else { return };
        let suffix = run_suffix();
        let bus = KafkaBus::new(settings).unwrap();
        let input = Topic::<DeadLetterRecord>::new(format!("rewind-in-{suffix}"), 1);
        let effects = Topic::<DeadLetterRecord>::new(format!("rewind-out-{suffix}"), 1);
        bus.declare(&input).unwrap();
        bus.declare(&effects).unwrap();
        let mut member = bus
            .join(
                &input,
                &format!("rewind-{suffix}"),
                "m0",
                CancellationToken::new(),
            )
            .unwrap();
        let polled = tokio::time::timeout(Duration::from_secs(60), member.poll(10))
            .await
            .expect("an assignment within a minute");
        assert!(
            matches!(polled, Polled::Assigned(ref p) if p == &[0]),
            "{polled:?}"
        );
        for n in 1..=3 {
            bus.publish(&input, 0, letter(n)).await.unwrap();
        }
        assert_eq!(next_records(&mut member, 3).await, [1, 2, 3]);
        bus.publish(&effects, 0, letter(100)).await.unwrap();
        member.commit().await.unwrap();

        for n in 4..=5 {
            bus.publish(&input, 0, letter(n)).await.unwrap();
        }
        assert_eq!(next_records(&mut member, 2).await, [4, 5]);
        // The effect of 4 and 5 is lost: as librdkafka reports a record
        // whose retries ran out.
        let lost = bus.deliveries.issued();
        bus.publish(&effects, 0, letter(200)).await.unwrap();
        bus.deliveries.report(lost, false);
        let refused = member.commit().await;
        assert!(
            matches!(refused, Err(BusError::Redelivering(_))),
            "{refused:?}"
        );

        assert_eq!(next_records(&mut member, 2).await, [4, 5], "4 and 5 again");
        bus.publish(&effects, 0, letter(200)).await.unwrap();
        member.commit().await.unwrap();
        bus.publish(&input, 0, letter(6)).await.unwrap();
        assert_eq!(
            next_records(&mut member, 1).await,
            [6],
            "nothing a third time"
        );
        member.commit().await.unwrap();
    }
}
