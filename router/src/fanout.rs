//! Delivery of stored messages to members: one delivery step (locate the
//! members, publish the shared frame per gateway, queue a push for the
//! offline ones) and the fanout workers that run large-group tasks page by
//! page off the conversation workers. Each step is retried with backoff;
//! a step that exhausts its tries becomes a dead letter that resumes at
//! that page. Deliveries are at-least-once: a retried step may give some
//! devices a frame twice, and clients drop seqs they already hold.

use std::sync::Arc;

use pingme_protocol::ErrorCode;
use pingme_storage::{ConversationId, GroupId, MAX_PAGE, StoreResult, UserId};
use tracing::Instrument;

use crate::pipeline::Pipeline;
use crate::records::{FanoutTask, PushEvent, Record};
use crate::retry::RetryPolicy;
use crate::telemetry;
use crate::transport::{Subscription, Topic, TransportError, conversation_key};

/// Every member of a group (small groups only: one or a few pages).
pub(crate) async fn all_members(ctx: &Pipeline, group: GroupId) -> StoreResult<Vec<UserId>> {
    let mut members = Vec::new();
    let mut after = 0;
    loop {
        let page = ctx.store.members_page(group, after, MAX_PAGE).await?;
        let done = page.len() < MAX_PAGE;
        members.extend(page.iter().map(|m| m.user));
        match page.last() {
            Some(last) if !done => after = last.user,
            _ => return Ok(members),
        }
    }
}

/// One delivery step: the task's frame to the connected devices of
/// `members`, a push event for the offline ones (never the sender).
pub(crate) async fn deliver_page(
    ctx: &Pipeline,
    task: &FanoutTask,
    members: &[UserId],
) -> Result<(), String> {
    let key = conversation_key(&task.conversation);
    let offline = ctx
        .to_users(
            members,
            &task.frame,
            task.skip.as_ref(),
            key,
            true,
            task.push.is_some(),
        )
        .await?;
    let Some(preview) = &task.push else {
        return Ok(());
    };
    let recipients: Vec<UserId> = offline.into_iter().filter(|u| *u != task.sender).collect();
    if recipients.is_empty() {
        return Ok(());
    }
    let event = PushEvent {
        conversation_id: task.conversation.to_string(),
        seq: task.seq,
        sender_id: task.sender,
        recipients,
        preview: preview.clone(),
    };
    // Push is a courtesy (offline members sync anyway): a push queue that is
    // full because the provider is slow or down drops the notification
    // rather than holding up deliveries and, behind them, new sends.
    match ctx
        .transport
        .try_publish(&Topic::Push, key, Record::Push(event))
    {
        Ok(()) => Ok(()),
        Err(TransportError::Full(topic)) => {
            telemetry::failed(ErrorCode::KafkaProducerError, 1);
            tracing::warn!(topic, "push queue full; notification dropped");
            Ok(())
        }
        Err(error) => Err(error.to_string()),
    }
}

/// Runs a task to the end, page by page from its cursor. On failure returns
/// the task positioned at the failing page, the error and the tries made.
pub(crate) async fn run_fanout(
    ctx: &Pipeline,
    mut task: FanoutTask,
    policy: RetryPolicy,
) -> Result<(), (FanoutTask, String, u32)> {
    let group = match task.conversation {
        ConversationId::Direct { low, high } => {
            let members = [low, high];
            let span = tracing::debug_span!(
                "fanout_page",
                msg_id = %task.msg_id,
                conversation = %task.conversation,
                seq = task.seq,
            );
            return match policy
                .run("fanout", || deliver_page(ctx, &task, &members))
                .instrument(span)
                .await
            {
                Ok(()) => Ok(()),
                Err((error, attempts)) => Err((task, error, attempts)),
            };
        }
        ConversationId::Group(group) => group,
    };
    let batch = ctx.config.fanout_batch_size;
    loop {
        let step = policy
            .run("fanout", || async {
                let page = ctx
                    .store
                    .members_page(group, task.after, batch)
                    .await
                    .map_err(|e| e.to_string())?;
                let users: Vec<UserId> = page.iter().map(|m| m.user).collect();
                deliver_page(ctx, &task, &users)
                    .instrument(tracing::debug_span!(
                        "fanout_page",
                        msg_id = %task.msg_id,
                        conversation = %task.conversation,
                        seq = task.seq,
                        after = task.after,
                        members = users.len(),
                    ))
                    .await?;
                Ok(users)
            })
            .await;
        match step {
            Err((error, attempts)) => return Err((task, error, attempts)),
            Ok(users) => match users.last() {
                Some(last) if users.len() >= batch => task.after = *last,
                _ => return Ok(()),
            },
        }
    }
}

/// One fanout worker: runs tasks of its partition in order until closed.
pub(crate) async fn run(ctx: Arc<Pipeline>, mut subscription: Box<dyn Subscription>) {
    loop {
        let records = subscription.next_batch(16).await;
        if records.is_empty() {
            break;
        }
        metrics::gauge!(telemetry::QUEUE_DEPTH, "topic" => "fanout")
            .set(ctx.transport.depth(&Topic::Fanout) as f64);
        for record in records {
            let Record::Fanout(task) = record else {
                tracing::warn!("unexpected record on the fanout topic");
                continue;
            };
            let key = conversation_key(&task.conversation);
            if let Err((task, error, attempts)) = run_fanout(&ctx, task, ctx.retry).await {
                ctx.dead_letter("fanout", key, &Record::Fanout(task), error, attempts)
                    .await;
            }
        }
        if let Err(error) = subscription.commit().await {
            tracing::warn!(%error, "commit of the fanout topic failed");
        }
    }
}
