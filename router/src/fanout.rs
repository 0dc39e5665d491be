//! Delivery of stored messages to members: one delivery step (locate the
//! members, publish the shared frame per gateway, queue a push for the
//! offline ones) and the fanout workers that run large-group tasks page by
//! page off the conversation workers, merging a backlog of one
//! conversation's tasks into one delivery. Each step is retried with backoff;
//! a step that exhausts its tries becomes a dead letter that resumes at
//! that page. Deliveries are at-least-once: a retried step may give some
//! devices a frame twice, and clients drop seqs they already hold.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use pingme_protocol::ErrorCode;
use pingme_storage::{ConversationId, GroupId, MAX_PAGE, StoreResult, UserId};

use crate::bus::{BusError, GroupMember, Polled, conversation_key};
use crate::pipeline::{Outgoing, PipelineContext};
use crate::records::{FanoutTask, PushEvent};
use crate::retry::RetryPolicy;
use crate::telemetry;

/// Every member of a group (small groups only: one or a few pages).
pub(crate) async fn all_members(ctx: &PipelineContext, group: GroupId) -> StoreResult<Vec<UserId>> {
    let mut members = Vec::new();
    let mut after = 0;
    loop {
        let page = ctx
            .stores
            .conversations
            .members_page(group, after, MAX_PAGE)
            .await?;
        let done = page.len() < MAX_PAGE;
        members.extend(page.iter().map(|m| m.user));
        match page.last() {
            Some(last) if !done => after = last.user,
            _ => return Ok(members),
        }
    }
}

/// The most frame bytes one merged delivery carries to a connection.
const MERGED_FRAME_BYTES: usize = 32 * 1024;

/// Fanout tasks of one conversation delivered as one: their deliver frames
/// back to back in one buffer (each keeps its length prefix, so a
/// connection reads exactly the bytes of separate deliveries, in seq
/// order). A backlog of k messages to a large group then costs one member
/// scan, one lookup per member and one queued buffer per connection instead
/// of k of each; with no backlog a batch is one task and nothing waits.
pub(crate) struct FanoutBatch {
    pub tasks: Vec<FanoutTask>,
}

impl FanoutBatch {
    /// Whether `task` may join: the same conversation and sending
    /// connection, the same member cursor, and room in the frame.
    fn admits(&self, task: &FanoutTask) -> bool {
        let first = &self.tasks[0];
        first.conversation == task.conversation
            && first.skip == task.skip
            && first.after == task.after
            && self.tasks.iter().map(|t| t.frame.len()).sum::<usize>() + task.frame.len()
                <= MERGED_FRAME_BYTES
    }

    /// Splits tasks, in order, into batches of consecutive mergeable ones.
    pub(crate) fn split(tasks: Vec<FanoutTask>) -> Vec<FanoutBatch> {
        let mut batches: Vec<FanoutBatch> = Vec::new();
        for task in tasks {
            match batches.last_mut() {
                Some(batch) if batch.admits(&task) => batch.tasks.push(task),
                _ => batches.push(FanoutBatch { tasks: vec![task] }),
            }
        }
        batches
    }

    /// The frames of every task, back to back (no copy for one task).
    fn frame(&self) -> Bytes {
        if let [task] = self.tasks.as_slice() {
            return task.frame.clone();
        }
        let mut frames = BytesMut::with_capacity(self.tasks.iter().map(|t| t.frame.len()).sum());
        for task in &self.tasks {
            frames.extend_from_slice(&task.frame);
        }
        frames.freeze()
    }

    /// One `fanout_page` span per message, all open for the shared work.
    fn spans(&self, members: usize) -> Vec<tracing::Span> {
        self.tasks
            .iter()
            .map(|task| {
                tracing::debug_span!(
                    "fanout_page",
                    msg_id = %task.msg_id,
                    conversation = %task.conversation,
                    seq = task.seq,
                    after = task.after,
                    members,
                    batch = self.tasks.len(),
                )
            })
            .collect()
    }
}

/// One delivery step: the tasks' frames (`frame`, back to back) to the
/// connected devices of `members` (this node's own into `out`), a push
/// event per task for the offline ones (never the sender). All tasks are
/// of one conversation.
pub(crate) async fn deliver_page(
    ctx: &PipelineContext,
    tasks: &[FanoutTask],
    frame: &Bytes,
    members: &[UserId],
    out: &Outgoing,
) -> Result<(), String> {
    let Some(first) = tasks.first() else {
        return Ok(());
    };
    let key = conversation_key(&first.conversation);
    let want_push = tasks.iter().any(|task| task.push.is_some());
    let offline = ctx
        .to_users(
            members,
            frame,
            first.skip.as_ref(),
            key,
            tasks.len() as u32,
            want_push,
            out,
        )
        .await?;
    if offline.is_empty() {
        return Ok(());
    }
    for task in tasks {
        let Some(preview) = &task.push else {
            continue;
        };
        let recipients: Vec<UserId> = offline
            .iter()
            .copied()
            .filter(|u| *u != task.sender)
            .collect();
        if recipients.is_empty() {
            continue;
        }
        let event = PushEvent {
            conversation_id: task.conversation.to_string(),
            seq: task.seq,
            sender_id: task.sender,
            recipients,
            preview: preview.clone(),
        };
        // Push is a courtesy (offline members sync anyway): a push queue
        // that is full because the provider is slow or down drops the
        // notification rather than holding up deliveries and, behind them,
        // new sends.
        match ctx.bus.try_publish(&ctx.topics.push, key, event) {
            Ok(()) => {}
            Err(BusError::Full(topic)) => {
                telemetry::failed(ErrorCode::KafkaProducerError, 1);
                tracing::warn!(topic, "push queue full; notification dropped");
            }
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(())
}

/// [`deliver_page`], its frames handed over at once (also those of a
/// step that failed part way: they are as good as published).
async fn deliver_page_now(
    ctx: &PipelineContext,
    tasks: &[FanoutTask],
    frame: &Bytes,
    members: &[UserId],
) -> Result<(), String> {
    let out = Outgoing::default();
    let delivered = deliver_page(ctx, tasks, frame, members, &out).await;
    ctx.hand_over(&out);
    delivered
}

/// Runs a batch to the end, page by page from its cursor. On failure
/// returns its tasks positioned at the failing page, the error and the
/// tries made.
pub(crate) async fn run_fanout(
    ctx: &PipelineContext,
    mut batch: FanoutBatch,
    policy: RetryPolicy,
) -> Result<(), (Vec<FanoutTask>, String, u32)> {
    let frame = batch.frame();
    let first = &batch.tasks[0];
    let group = match first.conversation {
        ConversationId::Direct { low, high } => {
            let members = [low, high];
            let _spans = batch.spans(members.len());
            return match policy
                .run("fanout", || {
                    deliver_page_now(ctx, &batch.tasks, &frame, &members)
                })
                .await
            {
                Ok(()) => Ok(()),
                Err((error, attempts)) => Err((batch.tasks, error, attempts)),
            };
        }
        ConversationId::Group(group) => group,
    };
    let page_size = ctx.config.fanout_batch_size;
    let mut after = first.after;
    loop {
        let step = policy
            .run("fanout", || async {
                let page = ctx
                    .stores
                    .conversations
                    .members_page(group, after, page_size)
                    .await
                    .map_err(|e| e.to_string())?;
                let users: Vec<UserId> = page.iter().map(|m| m.user).collect();
                let _spans = batch.spans(users.len());
                deliver_page_now(ctx, &batch.tasks, &frame, &users).await?;
                Ok(users)
            })
            .await;
        match step {
            Err((error, attempts)) => {
                for task in &mut batch.tasks {
                    task.after = after;
                }
                return Err((batch.tasks, error, attempts));
            }
            Ok(users) => match users.last() {
                Some(last) if users.len() >= page_size => after = *last,
                _ => return Ok(()),
            },
        }
    }
}

/// Records taken from the fanout topic per round (and so the most tasks
/// one merged delivery can hold).
const TASKS_PER_ROUND: usize = 64;

/// One fanout worker: runs the tasks of its partitions in order until it
/// leaves its group. Fanout keeps no state per partition.
pub(crate) async fn run(ctx: Arc<PipelineContext>, mut member: Box<dyn GroupMember<FanoutTask>>) {
    let mut next = None;
    loop {
        let polled = match next.take() {
            Some(polled) => polled,
            None => member.poll(TASKS_PER_ROUND).await,
        };
        let mut tasks: Vec<FanoutTask> = match polled {
            Polled::Records(records) => records.into_iter().map(|c| c.record).collect(),
            Polled::Assigned(_) | Polled::Revoked(_) => continue,
            Polled::Left => break,
        };
        if tasks.len() < TASKS_PER_ROUND {
            // A conversation worker publishes a burst's tasks one after
            // another, and this worker wakes at the first: one turn for
            // the rest to arrive lets the burst merge into one delivery
            // instead of its first task alone, then the others.
            tokio::task::yield_now().await;
            match member.poll(TASKS_PER_ROUND - tasks.len()).now_or_never() {
                Some(Polled::Records(more)) => tasks.extend(more.into_iter().map(|c| c.record)),
                // A rebalance event waits until this round is done.
                Some(other) => next = Some(other),
                None => {}
            }
        }
        for batch in FanoutBatch::split(tasks) {
            if let Err((tasks, error, attempts)) = run_fanout(&ctx, batch, ctx.retry).await {
                for task in tasks {
                    let key = conversation_key(&task.conversation);
                    ctx.dead_letter(key, &task, error.clone(), attempts).await;
                }
            }
        }
        if let Err(error) = member.commit().await {
            tracing::warn!(%error, "commit of the task topic failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use pingme_protocol::split_frame;

    use super::*;
    use crate::records::ConnAddress;

    fn task(conversation: &str, seq: u64, sender_conn: u64, after: UserId) -> FanoutTask {
        FanoutTask {
            conversation: conversation.parse().unwrap(),
            seq,
            msg_id: format!("m{seq}"),
            sender: 1,
            skip: Some((
                "gw".into(),
                ConnAddress {
                    shard: 0,
                    conn_id: sender_conn,
                },
            )),
            frame: pingme_protocol::encode_frame(&pingme_protocol::ServerFrame {
                request_id: seq,
                body: None,
            }),
            push: None,
            after,
        }
    }

    fn seqs(batch: &FanoutBatch) -> Vec<u64> {
        batch.tasks.iter().map(|t| t.seq).collect()
    }

    #[test]
    fn consecutive_tasks_of_one_conversation_and_sender_merge_in_order() {
        let tasks = vec![
            task("g:1", 1, 7, 0),
            task("g:1", 2, 7, 0),
            task("g:1", 3, 7, 0),
            task("g:2", 1, 7, 0),
            task("g:1", 4, 7, 0),
            task("g:1", 5, 8, 0),
            task("g:1", 6, 8, 40),
        ];
        let batches = FanoutBatch::split(tasks);
        let runs: Vec<Vec<u64>> = batches.iter().map(seqs).collect();
        // Another conversation in between, another sending connection, or
        // a resumed cursor starts a new batch; order is never changed.
        assert_eq!(
            runs,
            vec![vec![1, 2, 3], vec![1], vec![4], vec![5], vec![6]]
        );
    }

    #[test]
    fn a_merged_frame_is_the_frames_back_to_back() {
        let batch = FanoutBatch::split(vec![task("g:1", 1, 7, 0), task("g:1", 2, 7, 0)])
            .pop()
            .unwrap();
        let mut merged = BytesMut::from(&batch.frame()[..]);
        let mut request_ids = Vec::new();
        while let Some(payload) = split_frame(&mut merged, 1024).unwrap() {
            let frame: pingme_protocol::ServerFrame =
                pingme_protocol::decode_message(payload).unwrap();
            request_ids.push(frame.request_id);
        }
        assert!(merged.is_empty());
        assert_eq!(request_ids, vec![1, 2]);
        // One task: its own buffer, not a copy.
        let single = FanoutBatch::split(vec![task("g:1", 3, 7, 0)])
            .pop()
            .unwrap();
        assert_eq!(single.frame().as_ptr(), single.tasks[0].frame.as_ptr());
    }

    #[test]
    fn a_batch_stops_growing_at_the_frame_budget() {
        let per_frame = task("g:1", 0, 7, 0).frame.len();
        let count = MERGED_FRAME_BYTES / per_frame + 5;
        let tasks = (1..=count as u64)
            .map(|seq| task("g:1", seq, 7, 0))
            .collect();
        let batches = FanoutBatch::split(tasks);
        assert_eq!(batches.len(), 2);
        assert!(batches[0].frame().len() <= MERGED_FRAME_BYTES);
    }
}
