//! The pipeline's shape: the bus every stage talks through
//! ([`PipelineBus`]: one bus carrying all five record types), its typed
//! topics, and the context every stage shares (the stores, the directory,
//! the push provider and the settings), plus the few helpers all stages use
//! to publish (answers, frames for users, dead letters).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pingme_protocol::ErrorCode;
use pingme_storage::{Stores, UserId};
use tracing::Instrument;

use crate::bus::{Bus, BusError, BusRecord, Topic};
use crate::config::{BusTopics, RouterConfig};
use crate::delivered_acks::DeliveredAcks;
use crate::directory::Directory;
use crate::port::{Outbound, Outbox};
use crate::push::PushProvider;
use crate::records::{
    AcceptedSend, ConnAddress, DeadLetterRecord, DeadWork, DownstreamEnvelope, DownstreamTarget,
    FanoutTask, Origin, PushEvent,
};
use crate::retry::RetryPolicy;

/// A bus carrying every topic of the pipeline: what a router is started
/// with. Every [`Bus`] implementation generic over its record type is one.
pub trait PipelineBus:
    Bus<AcceptedSend>
    + Bus<FanoutTask>
    + Bus<PushEvent>
    + Bus<DeadLetterRecord>
    + Bus<DownstreamEnvelope>
{
}

impl<T> PipelineBus for T where
    T: Bus<AcceptedSend>
        + Bus<FanoutTask>
        + Bus<PushEvent>
        + Bus<DeadLetterRecord>
        + Bus<DownstreamEnvelope>
{
}

/// The pipeline's topics, typed by the record each carries.
pub(crate) struct Topics {
    pub accepted: Topic<AcceptedSend>,
    pub tasks: Topic<FanoutTask>,
    pub push: Topic<PushEvent>,
    pub dead_letters: Topic<DeadLetterRecord>,
    downstream_prefix: String,
    downstream_partitions: u32,
}

impl Topics {
    pub fn new(layout: &BusTopics) -> Self {
        Self {
            accepted: Topic::new(
                layout.persistence_topic.as_str(),
                layout.persistence_partitions,
            ),
            tasks: Topic::new(layout.task_topic.as_str(), layout.task_partitions),
            push: Topic::new(layout.push_topic.as_str(), layout.push_partitions),
            dead_letters: Topic::new(layout.dlq_topic.as_str(), layout.dlq_partitions),
            downstream_prefix: layout.downstream_topic_prefix.clone(),
            downstream_partitions: layout.downstream_partitions,
        }
    }

    /// The downstream topic of `gateway`.
    pub fn downstream(&self, gateway: &str) -> Topic<DownstreamEnvelope> {
        Topic::new(
            format!("{}{gateway}", self.downstream_prefix),
            self.downstream_partitions,
        )
    }
}

/// Work that can become a dead letter.
pub(crate) trait DeadLetterWork: BusRecord {
    const KIND: DeadWork;
    /// The message the work is about (tracing spans carry it).
    fn msg_id(&self) -> &str;
}

impl DeadLetterWork for FanoutTask {
    const KIND: DeadWork = DeadWork::Fanout;
    fn msg_id(&self) -> &str {
        &self.msg_id
    }
}

impl DeadLetterWork for PushEvent {
    const KIND: DeadWork = DeadWork::Push;
    fn msg_id(&self) -> &str {
        &self.preview.msg_id
    }
}

/// Frames for this node's own connections, collected over one piece of
/// work (a conversation worker's batch, a downstream poll) and handed to
/// the outbox together by [`PipelineContext::hand_over`]: one hand-off per
/// gateway shard instead of one per frame. Behind a mutex only so that a
/// retried step can add to it; one task uses it at a time.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    /// Each frame, with the messages it delivers (0: not a delivery).
    frames: std::sync::Mutex<Vec<(Outbound, u32)>>,
}

impl Outgoing {
    pub fn push(&self, outbound: Outbound, messages: u32) {
        self.frames
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((outbound, messages));
    }

    fn take(&self) -> Vec<(Outbound, u32)> {
        std::mem::take(
            &mut *self
                .frames
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

/// The shared context of the stages.
pub(crate) struct PipelineContext {
    pub stores: Stores,
    pub bus: Arc<dyn PipelineBus>,
    pub topics: Topics,
    pub directory: Arc<dyn Directory>,
    pub outbox: Arc<dyn Outbox>,
    pub push: Option<Arc<dyn PushProvider>>,
    pub config: RouterConfig,
    pub retry: RetryPolicy,
    /// Delivery acks waiting to be written (see [`crate::watermarks`]).
    pub delivered_acks: DeliveredAcks,
    /// Partitions of this gateway's downstream topic its members hold:
    /// until they hold all, frames for its connections wait on the bus.
    pub downstream_owned: std::sync::Mutex<std::collections::BTreeSet<crate::bus::Partition>>,
    /// Sends this gateway published whose answer (ack or error, one per
    /// send, through its downstream topic) has not come back yet: a
    /// stopping gateway waits for them before it stops consuming.
    pub unanswered: std::sync::atomic::AtomicU64,
    /// Whether frames for this gateway's connections skip its downstream
    /// topic and go to the outbox at once: on a single node, where the
    /// in-process bus reaches no other gateway and one worker owns each
    /// conversation for the process's life. In a cluster they cross the
    /// topic: a conversation changing owner could otherwise see its new
    /// owner's deliveries overtake its old owner's still on the topic.
    pub local_downstream: bool,
}

/// Wall clock in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    (now_us() / 1000) as i64
}

/// Wall clock in Unix microseconds.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl PipelineContext {
    /// See [`PipelineContext::downstream_owned`] (the field).
    pub fn downstream_owned(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<crate::bus::Partition>> {
        self.downstream_owned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Answers the connection of `origin` (on its gateway) with `frame`:
    /// into `out` if it is this node's own and skips the topic, else
    /// published on its gateway's downstream topic.
    pub async fn reply(&self, origin: &Origin, key: u64, frame: Bytes, out: &Outgoing) {
        if self.local_downstream && origin.gateway == self.config.gateway_id {
            let conn = origin.conn.into();
            out.push(Outbound::Connection { conn, frame }, 0);
            return;
        }
        let envelope = DownstreamEnvelope {
            target: DownstreamTarget::Connection(origin.conn),
            frame,
            messages: 0,
        };
        let topic = self.topics.downstream(&origin.gateway);
        if let Err(error) = self.bus.publish(&topic, key, envelope).await {
            tracing::warn!(%error, "answer to a connection dropped");
        }
    }

    /// Sends `frame` to the connected devices of `users`, one envelope per
    /// gateway (this node's own into `out` when they skip the topic),
    /// leaving out `skip` (a gateway and connection). `frame` delivers
    /// `messages` messages (0: not a delivery). Returns the users
    /// connected nowhere when `need_offline`.
    #[allow(clippy::too_many_arguments)]
    pub async fn to_users(
        &self,
        users: &[UserId],
        frame: &Bytes,
        skip: Option<&(String, ConnAddress)>,
        key: u64,
        messages: u32,
        need_offline: bool,
        out: &Outgoing,
    ) -> Result<Vec<UserId>, String> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let located = self
            .directory
            .locate(users, need_offline)
            .await
            .map_err(|e| e.to_string())?;
        for (gateway, users) in located.online {
            let skip = skip
                .filter(|(skip_gateway, _)| *skip_gateway == gateway)
                .map(|(_, conn)| *conn);
            if self.local_downstream && gateway == self.config.gateway_id {
                let outbound = Outbound::Users {
                    users,
                    frame: frame.clone(),
                    skip: skip.map(Into::into),
                };
                out.push(outbound, messages);
                continue;
            }
            let envelope = DownstreamEnvelope {
                target: DownstreamTarget::Users { users, skip },
                frame: frame.clone(),
                messages,
            };
            self.bus
                .publish(&self.topics.downstream(&gateway), key, envelope)
                .await
                .map_err(|e: BusError| e.to_string())?;
        }
        Ok(located.offline)
    }

    /// Hands what `out` collected to this gateway's connections, in order.
    pub fn hand_over(&self, out: &Outgoing) {
        let frames = out.take();
        if frames.is_empty() {
            return;
        }
        let (frames, messages): (Vec<Outbound>, Vec<u32>) = frames.into_iter().unzip();
        let answers = frames
            .iter()
            .filter(|outbound| matches!(outbound, Outbound::Connection { .. }))
            .count() as u64;
        if answers > 0 {
            // One answer per send (a re-delivered one, or one for a
            // previous process of this gateway, stops at zero).
            let _ = self.unanswered.fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| Some(n.saturating_sub(answers)),
            );
        }
        let reached = self.outbox.send_all(frames);
        let delivered: u64 = reached
            .iter()
            .zip(messages)
            .map(|(&reached, messages)| reached as u64 * u64::from(messages))
            .sum();
        if delivered > 0 {
            metrics::counter!(crate::telemetry::DELIVERED).increment(delivered);
        }
    }

    /// Hands work that exhausted its retries to the dead-letter stage.
    pub async fn dead_letter<W: DeadLetterWork>(
        &self,
        key: u64,
        work: &W,
        error: String,
        attempts: u32,
    ) {
        let kind = W::KIND.as_str();
        let span = tracing::debug_span!("dead_letter", kind, msg_id = work.msg_id());
        self.dead_letter_in_span(kind, key, work.encode(), error, attempts)
            .instrument(span)
            .await
    }

    async fn dead_letter_in_span(
        &self,
        kind: &str,
        key: u64,
        payload: Bytes,
        error: String,
        attempts: u32,
    ) {
        crate::telemetry::failed(ErrorCode::KafkaRetryExhaustedSentToDlq, 1);
        if !self.config.enable_dlq {
            tracing::error!(kind, %error, attempts, code = ErrorCode::KafkaRetryExhaustedSentToDlq.code(),
                "retries exhausted; dead-letter queue disabled, work dropped");
            return;
        }
        tracing::warn!(kind, %error, attempts, code = ErrorCode::KafkaRetryExhaustedSentToDlq.code(),
            "retries exhausted; sent to the dead-letter queue");
        let letter = DeadLetterRecord {
            kind: kind.to_string(),
            payload,
            code: ErrorCode::KafkaRetryExhaustedSentToDlq.code(),
            error,
            attempts,
        };
        if let Err(error) = self
            .bus
            .publish(&self.topics.dead_letters, key, letter)
            .await
        {
            crate::telemetry::failed(ErrorCode::KafkaDlqSendFailed, 1);
            tracing::error!(%error, code = ErrorCode::KafkaDlqSendFailed.code(), "dead letter lost");
        }
    }
}
