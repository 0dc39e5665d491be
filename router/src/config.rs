//! The router's settings: one plain struct with defaults that suit a single
//! node, and the bus layout (topic names, consumer groups, partition
//! counts) a cluster's nodes share. The binary fills them from its YAML/env
//! config; tests build them directly.

use std::time::Duration;

/// Room a `MessagePage` frame needs for everything but its messages.
pub const PAGE_OVERHEAD_BYTES: usize = 1024;
/// Room one message in a page needs beyond its body: ids, sender, client
/// message id (at most 128 bytes), times and protobuf tags (well under 1 KiB).
pub const MESSAGE_OVERHEAD_BYTES: usize = 1024;

/// The largest `MessagePage` frame holding one message of `max_body_bytes`:
/// a page budget must allow at least this, or a maximum-size message could
/// never be fetched.
pub const fn single_message_page_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes + MESSAGE_OVERHEAD_BYTES + PAGE_OVERHEAD_BYTES
}

/// What a node of a cluster runs (single node: everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Connections: the ingress checks, requests (sync, fetch, receipts,
    /// presence), and the consumer of this gateway's downstream topic.
    Gateway,
    /// The seed's task service: the persistence, task, push and
    /// dead-letter consumers. No connections.
    Worker,
    /// Both.
    #[default]
    All,
}

impl Role {
    /// Whether the node serves connections.
    pub fn gateway(self) -> bool {
        matches!(self, Role::Gateway | Role::All)
    }

    /// Whether the node runs the pipeline's workers.
    pub fn worker(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }
}

/// Everything the router can be tuned with. `RouterConfig::default()` is a
/// working single-node setup (push disabled).
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// This gateway's id: names its downstream topic (`downstream-topic-{id}`).
    pub gateway_id: String,
    /// What this node runs; a single node runs everything.
    pub role: Role,
    /// Conversation workers this node runs: members of the persistence
    /// group. Each owns the conversations of the partitions it is assigned.
    /// Also the consumers of this gateway's downstream topic.
    pub workers: usize,
    /// Fanout workers this node runs: members of the task topic's group.
    pub fanout_workers: usize,
    /// Push workers this node runs: members of the push group.
    pub push_workers: usize,
    /// The topics, groups and partition counts (shared by every node).
    /// Single node ([`crate::Router::start`]): one partition per worker.
    pub topics: BusTopics,
    /// Records each in-process topic partition holds before publishers wait
    /// (internal stages) or sends are refused with `OVERLOADED` (ingress).
    pub queue_capacity: usize,
    /// Most sends one worker appends in one store call.
    pub max_append_batch: usize,
    /// Groups with more members than this are delivered by fanout tasks,
    /// off the conversation worker. Read receipts and typing events are not
    /// relayed in such groups.
    pub large_group_threshold: u64,
    /// Members read and delivered per fanout step.
    pub fanout_batch_size: usize,
    /// Send offline-push events to the push provider.
    pub push_notification_enabled: bool,
    /// The push provider: an HTTP webhook receiving one JSON POST per event.
    /// Push stays off without it.
    pub push_webhook_url: Option<String>,
    /// Timeout of one webhook call.
    pub push_timeout: Duration,
    /// Tries of a push or fanout step before it becomes a dead letter
    /// (also the tries of a store append before the sender gets an error).
    pub message_retry_attempts: u32,
    /// Wait before the second try.
    pub retry_initial_backoff: Duration,
    /// Longest wait between two tries.
    pub retry_max_backoff: Duration,
    /// Growth of the wait from one try to the next.
    pub retry_multiplier: f64,
    /// Keep work that exhausted its retries as dead letters (otherwise it
    /// is logged and dropped).
    pub enable_dlq: bool,
    /// Largest message body accepted (the store's own limit still applies).
    pub max_body_bytes: usize,
    /// Longest `client_msg_id` accepted.
    pub max_client_msg_id_len: usize,
    /// Most conversations in one `SyncResponse` (also the default).
    pub sync_page_max: usize,
    /// Most messages in one `MessagePage` (also the default).
    pub fetch_page_max: usize,
    /// Most bytes of one `MessagePage` frame (a page always holds at least
    /// one message; at least [`single_message_page_bytes`] of
    /// `max_body_bytes`, at most `pingme_protocol::MAX_DOWNSTREAM_FRAME_SIZE`).
    /// The gateway sets it to a quarter of a connection's outbound budget
    /// (`session.max_queued_bytes`), so pages cannot cut a prompt reader
    /// off as a slow consumer.
    pub fetch_page_max_bytes: usize,
    /// Typing frames accepted per connection per second; more get
    /// `RATE_LIMITED`.
    pub typing_max_per_second: u32,
    /// Most user ids in one `PresenceQuery`.
    pub presence_query_max: usize,
    /// Requests (sync, fetch, acks, receipts, typing, presence) processed
    /// at once; more get `OVERLOADED`.
    pub max_inflight_requests: usize,
    /// How long a stopping gateway waits for the answers to the sends it
    /// published (in a cluster their worker may be in a rebalance); the
    /// senders of those still unanswered retry elsewhere.
    pub answers_wait: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            gateway_id: "local".to_string(),
            role: Role::All,
            workers: 4,
            fanout_workers: 2,
            push_workers: 1,
            topics: BusTopics::default(),
            queue_capacity: 8192,
            max_append_batch: 256,
            large_group_threshold: 500,
            fanout_batch_size: 1000,
            push_notification_enabled: false,
            push_webhook_url: None,
            push_timeout: Duration::from_secs(5),
            message_retry_attempts: 3,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(10),
            retry_multiplier: 2.0,
            enable_dlq: true,
            max_body_bytes: pingme_storage::MAX_BODY_BYTES,
            max_client_msg_id_len: 128,
            sync_page_max: 500,
            fetch_page_max: 200,
            fetch_page_max_bytes: 256 * 1024,
            typing_max_per_second: 5,
            presence_query_max: 500,
            max_inflight_requests: 4096,
            answers_wait: Duration::from_secs(10),
        }
    }
}

impl RouterConfig {
    /// The same settings with every count at least 1, so a zero in a config
    /// file cannot stall the pipeline.
    pub(crate) fn normalised(mut self) -> Self {
        self.workers = self.workers.max(1);
        self.fanout_workers = self.fanout_workers.max(1);
        self.push_workers = self.push_workers.max(1);
        self.topics = self.topics.normalised();
        self.queue_capacity = self.queue_capacity.max(1);
        self.max_append_batch = self.max_append_batch.max(1);
        self.fanout_batch_size = self.fanout_batch_size.clamp(1, pingme_storage::MAX_PAGE);
        self.message_retry_attempts = self.message_retry_attempts.max(1);
        self.sync_page_max = self.sync_page_max.clamp(1, pingme_storage::MAX_PAGE);
        // One below the store cap: fetch reads one extra message to know `has_more`.
        self.fetch_page_max = self.fetch_page_max.clamp(1, pingme_storage::MAX_PAGE - 1);
        self.max_body_bytes = self.max_body_bytes.min(pingme_storage::MAX_BODY_BYTES);
        self.fetch_page_max_bytes = self.fetch_page_max_bytes.clamp(
            single_message_page_bytes(self.max_body_bytes),
            pingme_protocol::MAX_DOWNSTREAM_FRAME_SIZE,
        );
        self.max_inflight_requests = self.max_inflight_requests.max(1);
        if !self.retry_multiplier.is_finite() || self.retry_multiplier < 1.0 {
            self.retry_multiplier = 1.0;
        }
        self
    }

    /// The same settings laid out for the single-node bus: every stage's
    /// topic has one partition per worker of this node, so each worker owns
    /// exactly one.
    pub(crate) fn single_node(mut self) -> Self {
        self.role = Role::All;
        let partitions = |workers: usize| u32::try_from(workers).unwrap_or(u32::MAX);
        self.topics.persistence_partitions = partitions(self.workers);
        self.topics.task_partitions = partitions(self.fanout_workers);
        self.topics.push_partitions = partitions(self.push_workers);
        self.topics.dlq_partitions = 1;
        self.topics.downstream_partitions = partitions(self.workers);
        self
    }
}

/// The bus layout: topic names, consumer groups and partition counts.
/// Every node of a cluster must agree on it (a topic's partition count is
/// a property of the topic, not of one node). The defaults are the seed's
/// names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusTopics {
    /// Accepted sends, keyed by conversation (the seed's persistence topic).
    pub persistence_topic: String,
    /// Consumer group of the conversation workers (persist, ack, deliver).
    pub persistence_group: String,
    /// Partitions of the persistence topic: at most this many conversation
    /// workers run in parallel across the cluster.
    pub persistence_partitions: u32,
    /// Large-group fanout tasks, keyed by conversation (the seed's task
    /// topic).
    pub task_topic: String,
    /// Consumer group of the fanout workers (the seed's `consumer_group`).
    pub consumer_group: String,
    /// Partitions of the task topic.
    pub task_partitions: u32,
    /// Offline-push events.
    pub push_topic: String,
    /// Consumer group of the push workers.
    pub push_group: String,
    /// Partitions of the push topic.
    pub push_partitions: u32,
    /// Work that exhausted its retries.
    pub dlq_topic: String,
    /// Consumer group of the dead-letter consumers.
    pub dlq_group: String,
    /// Partitions of the dead-letter topic.
    pub dlq_partitions: u32,
    /// Each gateway's downstream topic is `{prefix}{gateway_id}`, consumed
    /// by that gateway alone (its group is the topic's name).
    pub downstream_topic_prefix: String,
    /// Partitions of each downstream topic.
    pub downstream_partitions: u32,
}

impl Default for BusTopics {
    fn default() -> Self {
        Self {
            persistence_topic: "im-persistence".into(),
            persistence_group: "im-persistence-group".into(),
            persistence_partitions: 12,
            task_topic: "im-task".into(),
            consumer_group: "im-task-group".into(),
            task_partitions: 12,
            push_topic: "im-push".into(),
            push_group: "im-push-group".into(),
            push_partitions: 4,
            dlq_topic: "im-dlq".into(),
            dlq_group: "im-dlq-group".into(),
            dlq_partitions: 1,
            downstream_topic_prefix: "downstream-topic-".into(),
            downstream_partitions: 4,
        }
    }
}

impl BusTopics {
    fn normalised(mut self) -> Self {
        for partitions in [
            &mut self.persistence_partitions,
            &mut self.task_partitions,
            &mut self.push_partitions,
            &mut self.dlq_partitions,
            &mut self.downstream_partitions,
        ] {
            *partitions = (*partitions).max(1);
        }
        self
    }
}
