//! The bus between pipeline stages: typed topics, consumer groups with
//! dynamic partition assignment, and the contract every implementation
//! keeps. Stages only talk through it, so the same pipeline runs over
//! [`InProcessBus`] (single node: bounded tokio channels, records moved as
//! they are), [`SerialisedBus`] (several nodes in one process: every record
//! encoded and decoded, partitions moved by a coordinator) or Kafka
//! (`KafkaBus`, feature `kafka`: several processes sharing a broker).
//!
//! | bus call | in-process | serialised (tests) | Kafka (rdkafka) |
//! |---|---|---|---|
//! | [`Bus::declare`] | channels per partition | a log per partition | admin client: create the topic with its partitions (another count found: refused) |
//! | [`Bus::try_publish`] / [`Bus::publish`] | `try_send` / `send` | encode, append to the partition's log | idempotent produce (`acks=all`) to partition `key % partitions`; producer queue full vs. wait for room |
//! | [`Bus::stop_producing`] | drop this node's senders | refuse this node's publishes | refuse this node's publishes, flush |
//! | [`Bus::join`] | member k owns partition k | coordinator assigns, rebalances on join, leave, drop | `subscribe` in the group; `ConsumerContext` rebalance callbacks |
//! | [`Polled::Assigned`] / [`Polled::Revoked`] | once, at start | on every rebalance | post-rebalance callbacks, queued into the next poll (fetched records of revoked partitions dropped) |
//! | [`GroupMember::poll`] | `recv_many` | read from the committed offset on | `recv`, then what is already fetched, up to `max` |
//! | [`GroupMember::commit`] | nothing | offsets to the coordinator | wait until this node's earlier publishes are acknowledged, then commit the polled offsets (sync) |
//! | leave token | nobody to hand over to: consume until this node stopped producing and the queue is empty | finish what is queued for the member, leave, rebalance | return what the consumer already fetched, then `unsubscribe`, close |
//! | [`Bus::lag`] | queued records | log end - committed | high watermark of fetch responses (statistics) - committed, this node's members |
//!
//! Delivery is at least once: a member commits only after the effects of
//! what it polled are durable (stored, or handed to the next topic), so a
//! member that dies re-delivers, through the partition's next owner,
//! everything after its last commit. Consumers tolerate repeats (the store
//! de-duplicates sends; clients drop seqs they already hold).

mod in_process;
#[cfg(feature = "kafka")]
mod kafka;
mod serialised;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingme_protocol::ErrorCode;
use pingme_storage::ConversationId;
use tokio_util::sync::CancellationToken;

pub use in_process::InProcessBus;
#[cfg(feature = "kafka")]
pub use kafka::{KafkaBus, KafkaSettings};
pub use serialised::{BusCluster, SerialisedBus};

/// A partition's index within its topic.
pub type Partition = u32;

/// A value that travels on a topic. Its bytes on a broker are the prost
/// encoding of its message in the internal schema
/// (`router/proto/pingme/bus/v1/records.proto`), never JSON, never the
/// public client protocol.
pub trait BusRecord: Clone + fmt::Debug + Send + Sync + 'static {
    /// The record's bytes on a broker.
    fn encode(&self) -> Bytes;

    /// A record from [`BusRecord::encode`] bytes (bodies and frames are
    /// sliced out of `bytes`, not copied).
    fn decode(bytes: Bytes) -> Result<Self, RecordError>;
}

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not a protobuf message of the expected type.
    #[error("undecodable record: {0}")]
    Decode(String),
    /// A field that must be set is missing or out of range.
    #[error("invalid record field {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl RecordError {
    /// The stable code (unmarshal failed, 50002).
    pub fn code(&self) -> ErrorCode {
        ErrorCode::KafkaUnmarshalFailed
    }
}

/// A named stream of records of one type, with a fixed partition count
/// (a property of the topic, from configuration). Records with the same
/// key go to the same partition, and a partition is consumed by one
/// member of a group at a time, so one key's records are processed in
/// order.
pub struct Topic<R> {
    name: Arc<str>,
    partitions: Partition,
    record: PhantomData<fn() -> R>,
}

impl<R> Topic<R> {
    /// The topic `name` with `partitions` partitions (at least 1).
    pub fn new(name: impl Into<Arc<str>>, partitions: Partition) -> Self {
        Self {
            name: name.into(),
            partitions: partitions.max(1),
            record: PhantomData,
        }
    }

    /// The topic's name on a broker.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many partitions it has.
    pub fn partitions(&self) -> Partition {
        self.partitions
    }

    /// The partition of `key`. Every producer, on every node and every bus
    /// implementation, picks the partition itself with this function, so
    /// they all agree (a Kafka producer sets the partition explicitly).
    pub fn partition_of(&self, key: u64) -> Partition {
        (key % u64::from(self.partitions)) as Partition
    }
}

impl<R> Clone for Topic<R> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            partitions: self.partitions,
            record: PhantomData,
        }
    }
}

impl<R> fmt::Debug for Topic<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.name, self.partitions)
    }
}

impl<R> PartialEq for Topic<R> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.partitions == other.partitions
    }
}

/// The partition key of everything about one conversation: FNV-1a of its
/// wire spelling, stable across processes and builds (producers on
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

/// Why a record could not be published, or a member could not join or
/// commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The partition's queue is full (try again later).
    #[error("topic {0} is full")]
    Full(String),
    /// This node stopped producing to the topic (shutdown).
    #[error("topic {0} is closed")]
    Closed(String),
    /// The topic was never declared (or with another record type), or the
    /// group has no partition left for another member.
    #[error("unknown topic or member: {0}")]
    Unknown(String),
    /// The member is no longer in its group (it was dropped, or its
    /// partitions moved on): its commit is refused.
    #[error("member {0} is no longer in its group")]
    Fenced(String),
    /// The broker failed.
    #[error("broker error: {0}")]
    Broker(String),
    /// A record published since the member's last commit was lost by the
    /// broker: nothing was committed, and the records polled since come
    /// again (the stages are idempotent).
    #[error("re-delivering: {0}")]
    Redelivering(String),
}

impl BusError {
    /// The stable code a client or operator sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            BusError::Full(_) => ErrorCode::Overloaded,
            BusError::Closed(_) => ErrorCode::ShuttingDown,
            BusError::Unknown(_) => ErrorCode::Internal,
            BusError::Fenced(_) => ErrorCode::KafkaConsumerGroupError,
            BusError::Broker(_) | BusError::Redelivering(_) => ErrorCode::KafkaProducerError,
        }
    }
}

/// One record as a member consumed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumed<R> {
    /// The partition it came from.
    pub partition: Partition,
    /// The record.
    pub record: R,
}

/// What a member's poll returns: records, or a change of its partitions.
/// Rebalance events arrive between batches, so a member never holds state
/// of a partition it no longer owns while it processes records.
#[derive(Debug, Clone, PartialEq)]
pub enum Polled<R> {
    /// Records of the member's partitions, each partition's in order.
    Records(Vec<Consumed<R>>),
    /// These partitions are now the member's, read from their committed
    /// offset on: state about them is built from here.
    Assigned(Vec<Partition>),
    /// These partitions are no longer the member's: their state must be
    /// dropped. What was polled from them and not committed is delivered
    /// again to the next owner.
    Revoked(Vec<Partition>),
    /// The member left its group (its leave token fired and nothing was
    /// left queued for it, the topic ended, or the member was dropped);
    /// nothing more comes.
    Left,
}

/// How the stages of one node reach a topic of record type `R`.
#[async_trait]
pub trait Bus<R: BusRecord>: Send + Sync + 'static {
    /// Creates `topic` if it does not exist.
    fn declare(&self, topic: &Topic<R>) -> Result<(), BusError>;

    /// Publishes without waiting: `Full` when the partition has no room.
    /// Used at ingress, where the gateway must not block.
    fn try_publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError>;

    /// Publishes, waiting for room: backpressure between stages. Records
    /// with the same key keep their order.
    async fn publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError>;

    /// This node publishes nothing more to `topic` (what it published is
    /// kept); other nodes may go on. Part of a graceful stop, separate
    /// from leaving the groups that consume the topic.
    fn stop_producing(&self, topic: &Topic<R>);

    /// Joins the consumer group `group` of `topic` as `member` (a name
    /// unique in the group). The member's partitions arrive as
    /// [`Polled::Assigned`] events. Once `leave` is cancelled, the member
    /// gets what is already queued for it, then leaves the group (its
    /// partitions move to the other members) and polls [`Polled::Left`].
    fn join(
        &self,
        topic: &Topic<R>,
        group: &str,
        member: &str,
        leave: CancellationToken,
    ) -> Result<Box<dyn GroupMember<R>>, BusError>;

    /// Records published and not yet committed by `group` (consumer lag).
    fn lag(&self, topic: &Topic<R>, group: &str) -> u64;
}

/// One member of a consumer group.
#[async_trait]
pub trait GroupMember<R>: Send {
    /// Waits for the next event and returns up to `max` records.
    /// Cancel-safe: a call dropped before it completes takes nothing.
    /// May return no records when a commit the member put off falls due
    /// (spaced commits): the caller commits, as after any batch.
    async fn poll(&mut self, max: usize) -> Polled<R>;

    /// Everything polled so far has durable effects: commit its offsets,
    /// so a crash re-delivers at most what was polled since. When an effect
    /// was lost on the way (a record the broker never took), nothing is
    /// committed and the records polled since the last commit come again:
    /// [`BusError::Redelivering`].
    async fn commit(&mut self) -> Result<(), BusError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::PushEvent;

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

    #[test]
    fn a_key_has_one_partition() {
        let topic: Topic<PushEvent> = Topic::new("im-push", 3);
        assert_eq!(topic.partition_of(7), 1);
        assert_eq!(topic.partition_of(9), 0);
        assert_eq!(Topic::<PushEvent>::new("t", 0).partitions(), 1);
    }
}
