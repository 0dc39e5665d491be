//! The router decides where a message goes and in what order: it checks a
//! send, makes it durable with its per-conversation seq, acknowledges it,
//! and plans its delivery to every device that should have it.
//!
//! Its boundary with the gateway is [`port`]: the gateway hands the router
//! every post-authentication frame through [`port::Dispatch`], and the
//! router reaches connections through [`port::Outbox`]. Neither side knows
//! how the other is built, so the gateway's tests can use a double of the
//! router and the router's tests a double of the gateway.
//!
//! Inside, the router is one pipeline of stages that only talk through a
//! [`Bus`] of typed topics (`docs/router.md` draws it): ingress checks ->
//! persistence topic -> conversation workers (durable append with its
//! seq, ack, small-conversation delivery) -> task topic -> fanout workers
//! (large groups) -> push topic -> push workers; downstream topics carry
//! frames to each gateway's connections and the dead-letter topic carries
//! what exhausted its retries. [`Router::start`] runs it over tokio
//! channels; [`Router::start_with`] over any bus: [`SerialisedBus`] for
//! several nodes in one process, Kafka in a cluster.

mod bus;
mod config;
mod conversation_worker;
mod delivered_acks;
mod directory;
mod fanout;
mod membership;
mod pipeline;
pub mod port;
mod push;
mod records;
mod redis_directory;
mod requests;
mod retry;
mod router;
mod stages;
#[cfg(feature = "kafka")]
pub mod stale_downstream;
pub mod telemetry;
mod visibility;
mod watermarks;
mod wire;

pub use bus::{
    Bus, BusCluster, BusError, BusRecord, Consumed, GroupMember, InProcessBus, Partition, Polled,
    RecordError, SerialisedBus, Topic, conversation_key, text_key,
};
#[cfg(feature = "kafka")]
pub use bus::{KafkaBus, KafkaSettings};
pub use config::{BusTopics, Role, RouterConfig, single_message_page_bytes};
pub use directory::{
    Clock, Directory, DirectoryError, LocalDirectory, Located, ManualClock, Presence, Registration,
    SharedDirectory, SystemClock,
};
pub use pipeline::PipelineBus;
pub use push::{PushProvider, WebhookPush};
pub use records::{
    AcceptedSend, ConnAddress, DeadLetterRecord, DeadWork, DownstreamEnvelope, DownstreamTarget,
    FanoutTask, Origin, PushEvent, PushPreview,
};
pub use redis_directory::{RedisDirectory, RedisDirectorySettings};
pub use retry::RetryPolicy;
pub use router::Router;
pub use stages::ReplayError;
pub use wire::{push_preview, store_error_code};
