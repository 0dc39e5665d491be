//! The delivered-watermark writer. Writing every delivery ack through to
//! the store would cost store round trips per delivery; instead the acks of
//! a short window, coalesced in `DeliveredAcks`, are written in one pass.
//!
//! A delivered watermark is a lower bound: losing the last window in a
//! crash only means those messages are delivered again, and clients drop
//! seqs they already hold. A device's pending acks are written before its
//! own sync is answered and when it disconnects, so the device's next
//! session starts from them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pingme_storage::{ConversationId, DeliveredMark, Seq};
use tokio::sync::oneshot;

use crate::delivered_acks::DeviceAcks;
use crate::membership::check_member;
use crate::pipeline::PipelineContext;
use crate::wire::error_frame;

/// How long acks wait to be coalesced before they are written.
pub(crate) const FLUSH_PERIOD: Duration = Duration::from_millis(200);

/// Watermarks per store call: one batch each (one journal write in the
/// embedded store), with a yield to the runtime between them, since the
/// embedded store works on the calling thread and a window of a busy group
/// holds thousands.
const MARKS_PER_WRITE: usize = 512;

/// Group memberships checked between yields to the runtime.
const CHECKS_PER_TURN: usize = 32;

/// Writes a window of acks: each seq is clamped to its conversation's
/// latest (a watermark ahead of the timeline would hide future messages
/// from sync), and group membership is checked here rather than per ack.
/// A refused ack gets an error frame on the connection that sent it; a
/// window the store fails to take is dropped (a lower watermark only
/// means a redelivery).
pub(crate) async fn write(ctx: &PipelineContext, batch: Vec<DeviceAcks>) {
    if batch.is_empty() {
        return;
    }
    let mut conversations: Vec<ConversationId> = batch
        .iter()
        .flat_map(|device| device.conversations.keys().copied())
        .collect();
    conversations.sort_unstable();
    conversations.dedup();
    let latest: HashMap<ConversationId, Seq> =
        match ctx.stores.messages.latest_seqs(&conversations).await {
            Ok(seqs) => conversations.iter().copied().zip(seqs).collect(),
            Err(error) => {
                tracing::warn!(%error, "delivered watermarks not written");
                return;
            }
        };
    let mut marks = Vec::new();
    let mut checks = 0usize;
    for device in &batch {
        for (&conversation, &(seq, request_id)) in &device.conversations {
            // 1:1 parties were checked when the ack arrived (no store needed).
            if let ConversationId::Group(_) = conversation {
                checks += 1;
                if checks.is_multiple_of(CHECKS_PER_TURN) {
                    tokio::task::yield_now().await;
                }
                if let Err(refused) = check_member(ctx, conversation, device.user).await {
                    crate::telemetry::failed(refused.code, 1);
                    ctx.outbox.to_connection(
                        device.conn,
                        error_frame(request_id, refused.code, refused.message, ""),
                    );
                    continue;
                }
            }
            marks.push(DeliveredMark {
                user: device.user,
                device_id: device.device.to_string(),
                conversation,
                seq: seq.min(latest.get(&conversation).copied().unwrap_or(0)),
            });
        }
    }
    let mut written = 0u64;
    for (i, chunk) in marks.chunks(MARKS_PER_WRITE).enumerate() {
        if i > 0 {
            tokio::task::yield_now().await;
        }
        match ctx.stores.watermarks.set_delivered_many(chunk).await {
            Ok(()) => written += chunk.len() as u64,
            Err(error) => {
                tracing::warn!(%error, marks = chunk.len(), "delivered watermarks not written")
            }
        }
    }
    metrics::counter!(crate::telemetry::WATERMARKS_WRITTEN).increment(written);
}

/// Writes the pending acks every [`FLUSH_PERIOD`] until `stop` fires, then
/// once more, so nothing noted before shutdown is left behind.
pub(crate) async fn run(ctx: Arc<PipelineContext>, mut stop: oneshot::Receiver<()>) {
    let mut ticks = tokio::time::interval(FLUSH_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => write(&ctx, ctx.delivered_acks.take_all()).await,
            _ = &mut stop => break,
        }
    }
    write(&ctx, ctx.delivered_acks.take_all()).await;
}
