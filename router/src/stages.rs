//! The ends of the pipeline that touch the outside: the consumer of this
//! gateway's downstream topic (frames onto connections through the
//! [`Outbox`](crate::port::Outbox)), the push workers (events to the
//! [`PushProvider`](crate::PushProvider), retried with backoff, dead-lettered
//! when the tries run out) and the dead-letter consumer (into the
//! [`DeadLetterStore`](pingme_storage::DeadLetterStore)), plus replay.

use std::sync::Arc;

use pingme_protocol::ErrorCode;
use pingme_storage::{DeadLetter, StoreError};

use crate::bus::{BusRecord, GroupMember, Polled, text_key};
use crate::fanout::{FanoutBatch, run_fanout};
use crate::pipeline::{Outgoing, PipelineContext, now_ms};
use crate::port::Outbound;
use crate::records::{
    DeadLetterRecord, DeadWork, DownstreamEnvelope, DownstreamTarget, FanoutTask, PushEvent,
};
use crate::retry::RetryPolicy;
use crate::telemetry;
use tracing::Instrument;

/// Applies downstream envelopes to this gateway's connections.
pub(crate) async fn run_downstream(
    ctx: Arc<PipelineContext>,
    mut member: Box<dyn GroupMember<DownstreamEnvelope>>,
) {
    loop {
        let envelopes = match member.poll(256).await {
            Polled::Records(envelopes) => envelopes,
            Polled::Assigned(partitions) => {
                ctx.downstream_owned().extend(partitions);
                continue;
            }
            Polled::Revoked(partitions) => {
                let mut owned = ctx.downstream_owned();
                for partition in partitions {
                    owned.remove(&partition);
                }
                continue;
            }
            Polled::Left => break,
        };
        // The whole poll in one hand-off per shard.
        let out = Outgoing::default();
        for envelope in envelopes.into_iter().map(|consumed| consumed.record) {
            let outbound = match envelope.target {
                DownstreamTarget::Connection(conn) => Outbound::Connection {
                    conn: conn.into(),
                    frame: envelope.frame,
                },
                DownstreamTarget::Users { users, skip } => Outbound::Users {
                    users,
                    frame: envelope.frame,
                    skip: skip.map(Into::into),
                },
            };
            out.push(outbound, envelope.messages);
        }
        ctx.hand_over(&out);
        if let Err(error) = member.commit().await {
            tracing::warn!(%error, "commit of the downstream topic failed");
        }
    }
}

/// Keeps dead letters in the store, where operators list and replay them.
pub(crate) async fn run_dead_letters(
    ctx: Arc<PipelineContext>,
    mut member: Box<dyn GroupMember<DeadLetterRecord>>,
) {
    loop {
        let letters = match member.poll(64).await {
            Polled::Records(letters) => letters,
            Polled::Assigned(_) | Polled::Revoked(_) => continue,
            Polled::Left => break,
        };
        for letter in letters.into_iter().map(|consumed| consumed.record) {
            let letter = DeadLetter {
                id: 0,
                kind: letter.kind,
                payload: letter.payload.to_vec(),
                code: letter.code,
                error: letter.error,
                attempts: letter.attempts,
                created_ms: now_ms(),
            };
            let stored = ctx
                .retry
                .run("dlq", || {
                    ctx.stores.dead_letters.put_dead_letter(letter.clone())
                })
                .await;
            if let Err((error, _)) = stored {
                telemetry::failed(ErrorCode::KafkaDlqSendFailed, 1);
                tracing::error!(%error, code = ErrorCode::KafkaDlqSendFailed.code(),
                    kind = letter.kind, "dead letter could not be stored");
            }
        }
        update_dlq_gauge(&ctx).await;
        if let Err(error) = member.commit().await {
            tracing::warn!(%error, "commit of the dead-letter topic failed");
        }
    }
}

async fn update_dlq_gauge(ctx: &PipelineContext) {
    if let Ok(count) = ctx.stores.dead_letters.dead_letter_count().await {
        metrics::gauge!(telemetry::DLQ_SIZE).set(count as f64);
    }
}

/// Why a replay did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// No dead letter has this id.
    #[error("dead letter {0} not found")]
    NotFound(u64),
    /// The payload is not a record this router can run.
    #[error("dead letter {id} cannot be replayed: {reason}")]
    Unreadable {
        /// The letter.
        id: u64,
        /// Why.
        reason: String,
    },
    /// The work failed again; the letter stays.
    #[error("replay of dead letter {id} failed: {reason}")]
    Failed {
        /// The letter.
        id: u64,
        /// The error of the try.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReplayError {
    /// The stable code of this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReplayError::NotFound(_) => ErrorCode::NotFound,
            ReplayError::Unreadable { .. } => ErrorCode::KafkaUnmarshalFailed,
            ReplayError::Failed { .. } => ErrorCode::KafkaDeliveryFailed,
            ReplayError::Store(error) => crate::wire::store_error_code(error),
        }
    }
}

/// Runs a dead letter's work once more; removes the letter on success.
pub(crate) async fn replay(ctx: &PipelineContext, id: u64) -> Result<(), ReplayError> {
    let letter = ctx
        .stores
        .dead_letters
        .dead_letters(id.saturating_sub(1), 1)
        .await?
        .into_iter()
        .find(|letter| letter.id == id)
        .ok_or(ReplayError::NotFound(id))?;
    let unreadable = |reason: String| ReplayError::Unreadable { id, reason };
    let payload = bytes::Bytes::from(letter.payload);
    let outcome = match DeadWork::parse(&letter.kind) {
        Some(DeadWork::Fanout) => {
            let task = FanoutTask::decode(payload).map_err(|e| unreadable(e.to_string()))?;
            run_fanout(ctx, FanoutBatch { tasks: vec![task] }, RetryPolicy::once())
                .await
                .map_err(|(_, error, _)| error)
        }
        Some(DeadWork::Push) => {
            let event = PushEvent::decode(payload).map_err(|e| unreadable(e.to_string()))?;
            match &ctx.push {
                Some(provider) => provider.notify(&event).await,
                None => Err("push is disabled".to_string()),
            }
        }
        None => return Err(unreadable(format!("no replay for kind {:?}", letter.kind))),
    };
    outcome.map_err(|reason| ReplayError::Failed { id, reason })?;
    ctx.stores.dead_letters.remove_dead_letter(id).await?;
    update_dlq_gauge(ctx).await;
    Ok(())
}

/// One push worker: sends the events of its partition until closed. The
/// events of one batch are sent concurrently (order does not matter for
/// notifications), so one slow call does not serialise the rest.
pub(crate) async fn run_push(
    ctx: Arc<PipelineContext>,
    mut member: Box<dyn GroupMember<PushEvent>>,
) {
    loop {
        let events = match member.poll(64).await {
            Polled::Records(events) => events,
            Polled::Assigned(_) | Polled::Revoked(_) => continue,
            Polled::Left => break,
        };
        let mut calls = tokio::task::JoinSet::new();
        for event in events.into_iter().map(|consumed| consumed.record) {
            let span = tracing::debug_span!(
                "push",
                msg_id = %event.preview.msg_id,
                conversation = %event.conversation_id,
                seq = event.seq,
                recipients = event.recipients.len(),
            );
            calls.spawn(push(ctx.clone(), event).instrument(span));
        }
        calls.join_all().await;
        if let Err(error) = member.commit().await {
            tracing::warn!(%error, "commit of the push topic failed");
        }
    }
}

/// Sends one event with retries; dead-letters it when they run out.
async fn push(ctx: Arc<PipelineContext>, event: PushEvent) {
    let Some(provider) = ctx.push.clone() else {
        return;
    };
    match ctx.retry.run("push", || provider.notify(&event)).await {
        Ok(()) => metrics::counter!(telemetry::PUSHED).increment(event.recipients.len() as u64),
        Err((error, attempts)) => {
            let key = text_key(&event.conversation_id);
            ctx.dead_letter(key, &event, error, attempts).await;
        }
    }
}
