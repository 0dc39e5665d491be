//! The transport between pipeline stages. Every stage publishes
//! [`Record`]s to a [`Topic`] under a partition key and consumes the
//! partitions it was given; nothing else connects the stages, so the same
//! pipeline runs over [`InProcessTransport`] (tokio channels, single node)
//! or a Kafka transport (cluster), which implements the same two traits:
//!
//! | trait call | in-process | Kafka |
//! |---|---|---|
//! | `partitions` | channels per topic | topic partition count |
//! | `try_publish` / `publish` | `try_send` / `send` | produce (key -> partition), queue-full vs. wait |
//! | `subscribe(topic, member)` | member i owns partition i | consumer i of the topic's group, assigned partitions |
//! | `next_batch` | `recv_many` | poll up to `max` records |
//! | `commit` | nothing | commit consumed offsets |
//! | `close` | drop the senders, consumers drain then end | stop producing, consumers drain then leave |
//! | `depth` | queued records | consumer lag |

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use pingme_protocol::ErrorCode;
use pingme_storage::ConversationId;
use tokio::sync::mpsc;

use crate::records::Record;

/// A stream of records between stages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Sends that passed the stateless checks, keyed by conversation; each
    /// partition is owned by one conversation worker (sequencer). The
    /// seed's persistence topic.
    Accepted,
    /// Delivery tasks of large groups, keyed by conversation (the seed's
    /// task topic).
    Fanout,
    /// Offline-push events (the seed's push topic).
    Push,
    /// Work that exhausted its retries (the seed's DLQ topic).
    DeadLetter,
    /// Frames for the connections of one gateway, keyed by conversation
    /// (the seed's `downstream-topic-{gateway_id}`).
    Downstream(String),
}

impl Topic {
    /// The topic's name on a broker.
    pub fn name(&self) -> String {
        match self {
            Topic::Accepted => "pingme-accepted".to_string(),
            Topic::Fanout => "pingme-fanout-tasks".to_string(),
            Topic::Push => "pingme-push".to_string(),
            Topic::DeadLetter => "pingme-dlq".to_string(),
            Topic::Downstream(gateway) => format!("downstream-topic-{gateway}"),
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Topic::Accepted => "accepted",
            Topic::Fanout => "fanout",
            Topic::Push => "push",
            Topic::DeadLetter => "dlq",
            Topic::Downstream(_) => "downstream",
        }
    }
}

/// The partition key of everything about one conversation: FNV-1a of its
/// wire spelling, stable across processes and builds (Kafka producers on
/// different nodes must agree).
pub fn conversation_key(conversation: &ConversationId) -> u64 {
    text_key(&conversation.to_string())
}

/// The partition key of a conversation given in its wire spelling.
pub fn text_key(conversation_id: &str) -> u64 {
    conversation_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Why a record could not be published or consumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The partition's queue is full (try again later).
    #[error("topic {0} is full")]
    Full(String),
    /// The topic was closed by shutdown.
    #[error("topic {0} is closed")]
    Closed(String),
    /// The topic was never declared, or the member has no partition.
    #[error("unknown topic or member: {0}")]
    Unknown(String),
    /// The broker failed.
    #[error("broker error: {0}")]
    Broker(String),
}

impl TransportError {
    /// The stable code a client or operator sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            TransportError::Full(_) => ErrorCode::Overloaded,
            TransportError::Closed(_) => ErrorCode::ShuttingDown,
            TransportError::Unknown(_) => ErrorCode::Internal,
            TransportError::Broker(_) => ErrorCode::KafkaProducerError,
        }
    }
}

/// How stages reach each other.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Creates `topic` with `partitions` partitions if it does not exist
    /// (in-process: channels; Kafka: checks or creates the topic).
    fn declare(&self, topic: &Topic, partitions: usize) -> Result<(), TransportError>;

    /// How many partitions (at most that many consumers run in parallel).
    fn partitions(&self, topic: &Topic) -> usize;

    /// Publishes without waiting: `Full` when the partition has no room.
    /// Used at ingress, where the gateway must not block.
    fn try_publish(&self, topic: &Topic, key: u64, record: Record) -> Result<(), TransportError>;

    /// Publishes, waiting for room: backpressure between stages. Records
    /// with the same key keep their order.
    async fn publish(&self, topic: &Topic, key: u64, record: Record) -> Result<(), TransportError>;

    /// Joins the consumers of `topic` as member `member` (0-based, below
    /// `partitions`). Each partition has exactly one consumer at a time,
    /// so records of one key are consumed in order by one member.
    fn subscribe(
        &self,
        topic: &Topic,
        member: usize,
    ) -> Result<Box<dyn Subscription>, TransportError>;

    /// Stops accepting records on `topic`; its consumers get what is
    /// already queued, then an empty batch.
    fn close(&self, topic: &Topic);

    /// Records published and not yet consumed (queue depth / consumer lag).
    fn depth(&self, topic: &Topic) -> u64;
}

/// One consumer's view of its partitions.
#[async_trait]
pub trait Subscription: Send {
    /// Waits for at least one record and returns up to `max`, in partition
    /// order. Empty means the topic was closed and everything was consumed.
    /// Cancel-safe: a call dropped before it completes takes no record (the
    /// fanout worker polls it once to pick up what arrived meanwhile).
    async fn next_batch(&mut self, max: usize) -> Vec<Record>;

    /// Everything returned so far is processed (Kafka: commit offsets, so
    /// a crash re-delivers at most the uncommitted batch).
    async fn commit(&mut self) -> Result<(), TransportError>;
}

/// One partition: a bounded channel.
struct Lane {
    sender: RwLock<Option<mpsc::Sender<Record>>>,
    receiver: Mutex<Option<mpsc::Receiver<Record>>>,
}

impl Lane {
    fn new(capacity: usize) -> Self {
        let (sender, receiver) = mpsc::channel(capacity);
        Self {
            sender: RwLock::new(Some(sender)),
            receiver: Mutex::new(Some(receiver)),
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<Record>> {
        self.sender
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// The single-node transport: one bounded tokio channel per partition.
pub struct InProcessTransport {
    topics: RwLock<HashMap<Topic, Arc<Vec<Lane>>>>,
    capacity: usize,
}

impl std::fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessTransport")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl InProcessTransport {
    /// A transport whose partitions each queue up to `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            topics: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lanes(&self, topic: &Topic) -> Result<Arc<Vec<Lane>>, TransportError> {
        self.topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(topic)
            .cloned()
            .ok_or_else(|| TransportError::Unknown(topic.name()))
    }

    fn lane_sender(&self, topic: &Topic, key: u64) -> Result<mpsc::Sender<Record>, TransportError> {
        let lanes = self.lanes(topic)?;
        let lane = &lanes[(key % lanes.len() as u64) as usize];
        lane.sender()
            .ok_or_else(|| TransportError::Closed(topic.name()))
    }
}

#[async_trait]
impl Transport for InProcessTransport {
    fn declare(&self, topic: &Topic, partitions: usize) -> Result<(), TransportError> {
        let mut topics = self
            .topics
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        topics.entry(topic.clone()).or_insert_with(|| {
            Arc::new(
                (0..partitions.max(1))
                    .map(|_| Lane::new(self.capacity))
                    .collect(),
            )
        });
        Ok(())
    }

    fn partitions(&self, topic: &Topic) -> usize {
        self.lanes(topic).map(|lanes| lanes.len()).unwrap_or(0)
    }

    fn try_publish(&self, topic: &Topic, key: u64, record: Record) -> Result<(), TransportError> {
        self.lane_sender(topic, key)?
            .try_send(record)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => TransportError::Full(topic.name()),
                mpsc::error::TrySendError::Closed(_) => TransportError::Closed(topic.name()),
            })
    }

    async fn publish(&self, topic: &Topic, key: u64, record: Record) -> Result<(), TransportError> {
        let sender = self.lane_sender(topic, key)?;
        sender
            .send(record)
            .await
            .map_err(|_| TransportError::Closed(topic.name()))
    }

    fn subscribe(
        &self,
        topic: &Topic,
        member: usize,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let lanes = self.lanes(topic)?;
        let receiver = lanes
            .get(member)
            .and_then(|lane| {
                lane.receiver
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take()
            })
            .ok_or_else(|| TransportError::Unknown(format!("{} member {member}", topic.name())))?;
        Ok(Box::new(ChannelSubscription { receiver }))
    }

    fn close(&self, topic: &Topic) {
        if let Ok(lanes) = self.lanes(topic) {
            for lane in lanes.iter() {
                lane.sender
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
            }
        }
    }

    fn depth(&self, topic: &Topic) -> u64 {
        self.lanes(topic)
            .map(|lanes| {
                lanes
                    .iter()
                    .filter_map(|lane| lane.sender())
                    .map(|sender| queued(&sender, self.capacity) as u64)
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Records queued in a channel: its room used.
fn queued(sender: &mpsc::Sender<Record>, capacity: usize) -> usize {
    capacity.saturating_sub(sender.capacity())
}

struct ChannelSubscription {
    receiver: mpsc::Receiver<Record>,
}

#[async_trait]
impl Subscription for ChannelSubscription {
    async fn next_batch(&mut self, max: usize) -> Vec<Record> {
        let mut batch = Vec::with_capacity(max.clamp(1, 1024));
        self.receiver.recv_many(&mut batch, max.max(1)).await;
        batch
    }

    async fn commit(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DeadLetterRecord, Record};

    fn letter(attempts: u32) -> Record {
        Record::DeadLetter(DeadLetterRecord {
            kind: "push".into(),
            payload: vec![],
            code: 50006,
            error: String::new(),
            attempts,
        })
    }

    #[tokio::test]
    async fn a_key_keeps_its_order_and_close_drains_then_ends() {
        let transport = InProcessTransport::new(4);
        transport.declare(&Topic::DeadLetter, 3).unwrap();
        let key = conversation_key(&ConversationId::Group(5));
        let member = (key % 3) as usize;
        let mut subscription = transport.subscribe(&Topic::DeadLetter, member).unwrap();
        for attempts in 0..4 {
            transport
                .try_publish(&Topic::DeadLetter, key, letter(attempts))
                .unwrap();
        }
        assert_eq!(
            transport.try_publish(&Topic::DeadLetter, key, letter(9)),
            Err(TransportError::Full(Topic::DeadLetter.name()))
        );
        assert_eq!(transport.depth(&Topic::DeadLetter), 4);
        transport.close(&Topic::DeadLetter);
        assert!(matches!(
            transport.publish(&Topic::DeadLetter, key, letter(9)).await,
            Err(TransportError::Closed(_))
        ));
        let batch = subscription.next_batch(10).await;
        assert_eq!(batch, (0..4).map(letter).collect::<Vec<_>>());
        assert!(subscription.next_batch(10).await.is_empty());
        // A partition has one consumer.
        assert!(transport.subscribe(&Topic::DeadLetter, member).is_err());
    }

    #[test]
    fn conversation_keys_are_stable() {
        // FNV-1a of "g:1": fixed forever, whichever process computes it.
        assert_eq!(
            conversation_key(&ConversationId::Group(1)),
            "g:1"
                .bytes()
                .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64)
                    .wrapping_mul(0x100000001b3))
        );
        assert_ne!(
            conversation_key(&ConversationId::Group(1)),
            conversation_key(&ConversationId::Group(2))
        );
    }
}
