//! The conversation workers. Each owns the conversations hashed to the
//! partitions of the persistence topic it is assigned: it drains what is
//! queued, appends it in one store call (dense seqs, idempotency,
//! durability; the store group-commits across workers), answers every
//! sender, then plans delivery in seq order: direct conversations and small
//! groups right here, large groups as fanout tasks so their size never
//! holds this worker up. It commits a batch only after all of that, so a
//! worker that dies mid-batch leaves it to the partition's next owner.
//!
//! A send the store already holds (a client retry, or a batch read again
//! after a rebalance) is acked with the stored message and delivered
//! again: whoever appended it may have died before delivering, and
//! clients drop seqs they already hold.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Instant;

use pingme_protocol::ErrorCode;
use pingme_storage::{Appended, ConversationId, GroupId, NewMessage, StoreError, UserId};

use tracing::Instrument;

use crate::bus::{Consumed, GroupMember, Partition, Polled, conversation_key};
use crate::fanout::{all_members, deliver_page};
use crate::pipeline::{Outgoing, PipelineContext, now_ms};
use crate::records::{AcceptedSend, FanoutTask, PushPreview};
use crate::telemetry;
use crate::wire::{ack_frame, deliver_frame, error_frame, push_preview, store_error_code};

/// How one group is delivered, decided once per batch.
enum GroupPlan {
    /// Up to the threshold: every member, delivered by this worker.
    Small(Arc<Vec<UserId>>),
    /// Above it: a fanout task.
    Large,
}

/// Groups that once took the fanout path, with the partition of their
/// conversation. They keep that path, so a group shrinking below the
/// threshold cannot overtake deliveries still queued as tasks. Per
/// partition: a revoked partition's groups are forgotten (its next owner
/// decides afresh).
#[derive(Debug, Default)]
pub(crate) struct LargeGroups {
    groups: HashMap<GroupId, Partition>,
}

impl LargeGroups {
    fn contains(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    fn insert(&mut self, group: GroupId, partition: Partition) {
        self.groups.insert(group, partition);
    }

    /// Forgets the groups of partitions this worker no longer owns.
    pub(crate) fn revoke(&mut self, partitions: &[Partition]) {
        self.groups
            .retain(|_, partition| !partitions.contains(partition));
    }
}

/// One conversation worker: runs until it leaves its group.
pub(crate) async fn run(ctx: Arc<PipelineContext>, mut member: Box<dyn GroupMember<AcceptedSend>>) {
    let mut large_groups = LargeGroups::default();
    loop {
        let sends = match member.poll(ctx.config.max_append_batch).await {
            Polled::Records(sends) => sends,
            Polled::Assigned(_) => continue,
            Polled::Revoked(partitions) => {
                large_groups.revoke(&partitions);
                continue;
            }
            Polled::Left => break,
        };
        process_batch(&ctx, sends, &mut large_groups).await;
        if let Err(error) = member.commit().await {
            tracing::warn!(%error, "commit of the persistence topic failed");
        }
    }
}

async fn process_batch(
    ctx: &PipelineContext,
    sends: Vec<Consumed<AcceptedSend>>,
    large_groups: &mut LargeGroups,
) {
    if sends.is_empty() {
        return;
    }
    let (partitions, sends): (Vec<Partition>, Vec<AcceptedSend>) = sends
        .into_iter()
        .map(|consumed| (consumed.partition, consumed.record))
        .unzip();
    telemetry::since_accepted(
        telemetry::SEND_WAIT_SECONDS,
        sends.iter().map(|send| send.accepted_at_us),
    );
    let now = now_ms();
    let batch: Vec<NewMessage> = sends
        .iter()
        .map(|send| NewMessage {
            conversation: send.conversation,
            sender: send.sender,
            sender_device: send.sender_device.clone(),
            client_msg_id: send.client_msg_id.clone(),
            msg_id: uuid::Uuid::now_v7().to_string(),
            content_type: send.content_type,
            body: send.body.clone(),
            server_time_ms: now,
        })
        .collect();
    // One span per message for its append and ack (the append itself is
    // batched, so each span covers the shared store call). Spans are
    // `debug`: with OTLP export off and logs at `info` they are disabled at
    // the callsite and cost one interest check.
    let append_spans: Vec<tracing::Span> = batch
        .iter()
        .map(|message| {
            tracing::debug_span!(
                "append",
                msg_id = %message.msg_id,
                conversation = %message.conversation,
                seq = tracing::field::Empty,
                duplicate_of = tracing::field::Empty,
                batch = sends.len(),
            )
        })
        .collect();
    let started = Instant::now();
    // Retrying the same batch (same msg_ids) is exact: the store de-duplicates.
    let outcome = ctx
        .retry
        .run("append", || async {
            match ctx.stores.messages.append(batch.clone()).await {
                Ok(results) => Ok(Ok(results)),
                Err(error @ StoreError::Unavailable(_)) => Err(error),
                Err(error) => Ok(Err(error)),
            }
        })
        .await
        .unwrap_or_else(|(error, _)| Err(error));
    metrics::histogram!(telemetry::APPEND_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::histogram!(telemetry::APPEND_BATCH).record(sends.len() as f64);
    // This batch's answers, then its deliveries, each handed over at once.
    let out = Outgoing::default();

    let results = match outcome {
        Ok(results) => results,
        Err(error) => {
            let code = store_error_code(&error);
            tracing::warn!(%error, batch = sends.len(), "append failed; senders told to retry");
            telemetry::failed(code, sends.len() as u64);
            for send in &sends {
                let frame = error_frame(
                    send.origin.request_id,
                    code,
                    error.to_string(),
                    &send.client_msg_id,
                );
                let key = conversation_key(&send.conversation);
                ctx.reply(&send.origin, key, frame, &out).await;
            }
            // Recorded before the hand-over: an answered sender finds it.
            telemetry::since_accepted(
                telemetry::SEND_ACK_SECONDS,
                sends.iter().map(|send| send.accepted_at_us),
            );
            ctx.hand_over(&out);
            return;
        }
    };

    // Answers first (they are what the senders wait for), then deliveries.
    let accepted_at: Vec<u64> = sends.iter().map(|send| send.accepted_at_us).collect();
    let mut stored = Vec::new();
    let mut results = results.into_iter();
    for ((send, span), partition) in sends.into_iter().zip(append_spans).zip(partitions) {
        let key = conversation_key(&send.conversation);
        let result = results
            .next()
            .unwrap_or_else(|| Err(StoreError::Corrupt("append returned fewer results".into())));
        match result {
            Ok(Appended { message, duplicate }) => {
                span.record("seq", message.seq);
                if duplicate {
                    // The idempotency record answered: the stored message
                    // keeps its own id, not the one chosen for this try.
                    span.record("duplicate_of", message.msg_id.as_str());
                }
                let frame = ack_frame(send.origin.request_id, &message);
                ctx.reply(&send.origin, key, frame, &out).await;
                if duplicate {
                    metrics::counter!(telemetry::DUPLICATES).increment(1);
                } else {
                    metrics::counter!(telemetry::ACCEPTED).increment(1);
                }
                stored.push((send, message, partition));
            }
            Err(error) => {
                let code = store_error_code(&error);
                telemetry::failed(code, 1);
                let frame = error_frame(
                    send.origin.request_id,
                    code,
                    error.to_string(),
                    &send.client_msg_id,
                );
                ctx.reply(&send.origin, key, frame, &out).await;
            }
        }
    }
    telemetry::since_accepted(telemetry::SEND_ACK_SECONDS, accepted_at.into_iter());
    ctx.hand_over(&out);

    let mut plans: HashMap<GroupId, GroupPlan> = HashMap::new();
    for (send, message, partition) in stored {
        let task = FanoutTask {
            conversation: message.conversation,
            seq: message.seq,
            msg_id: message.msg_id.clone(),
            sender: message.sender,
            skip: Some((send.origin.gateway.clone(), send.origin.conn)),
            frame: deliver_frame(&message),
            push: ctx.push.as_ref().map(|_| PushPreview {
                msg_id: message.msg_id.clone(),
                content_type: message.content_type,
                preview: push_preview(message.content_type, &message.body),
            }),
            after: 0,
        };
        let span = tracing::debug_span!(
            "deliver",
            msg_id = %task.msg_id,
            conversation = %task.conversation,
            seq = task.seq,
        );
        deliver(ctx, task, partition, &mut plans, large_groups, &out)
            .instrument(span)
            .await;
    }
    ctx.hand_over(&out);
}

/// Delivers one stored message (this node's own connections' frames into
/// `out`), or queues its fanout task.
async fn deliver(
    ctx: &PipelineContext,
    task: FanoutTask,
    partition: Partition,
    plans: &mut HashMap<GroupId, GroupPlan>,
    large_groups: &mut LargeGroups,
    out: &Outgoing,
) {
    let key = conversation_key(&task.conversation);
    let members = match task.conversation {
        ConversationId::Direct { low, high } => Arc::new(vec![low, high]),
        ConversationId::Group(group) => {
            let plan = match plans.entry(group) {
                Entry::Occupied(known) => known.into_mut(),
                Entry::Vacant(unknown) => match plan_group(ctx, group, large_groups).await {
                    Ok(plan) => unknown.insert(plan),
                    Err((error, attempts)) => {
                        ctx.dead_letter(key, &task, error, attempts).await;
                        return;
                    }
                },
            };
            match plan {
                GroupPlan::Small(members) => members.clone(),
                GroupPlan::Large => {
                    large_groups.insert(group, partition);
                    if let Err(error) = ctx.bus.publish(&ctx.topics.tasks, key, task).await {
                        telemetry::failed(ErrorCode::KafkaProducerError, 1);
                        tracing::error!(%error, "fanout task not queued; members will sync");
                    }
                    return;
                }
            }
        }
    };
    if let Err((error, attempts)) = ctx
        .retry
        .run("deliver", || {
            deliver_page(ctx, std::slice::from_ref(&task), &task.frame, &members, out)
        })
        .await
    {
        ctx.dead_letter(key, &task, error, attempts).await;
    }
}

async fn plan_group(
    ctx: &PipelineContext,
    group: GroupId,
    large_groups: &LargeGroups,
) -> Result<GroupPlan, (String, u32)> {
    if large_groups.contains(group) {
        return Ok(GroupPlan::Large);
    }
    ctx.retry
        .run("plan", || async {
            let record = ctx
                .stores
                .conversations
                .group(group)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("group {group} vanished"))?;
            if record.member_count > ctx.config.large_group_threshold {
                return Ok(GroupPlan::Large);
            }
            let members = all_members(ctx, group).await.map_err(|e| e.to_string())?;
            Ok(GroupPlan::Small(Arc::new(members)))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_partition_forgets_its_large_groups() {
        let mut large = LargeGroups::default();
        large.insert(1, 0);
        large.insert(2, 1);
        large.insert(3, 2);
        large.revoke(&[0, 2]);
        assert!(!large.contains(1));
        assert!(large.contains(2));
        assert!(!large.contains(3));
    }
}
