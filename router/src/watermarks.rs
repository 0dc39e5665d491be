//! Delivered watermarks. Devices acknowledge delivery cumulatively per
//! conversation, from thousands of devices at once in a busy group. Writing
//! every ack through to the store would cost store round trips per
//! delivery; instead the acks of a short window are coalesced (the highest
//! seq per device and conversation wins) and written in one pass.
//!
//! A delivered watermark is a lower bound: losing the last window in a
//! crash only means those messages are delivered again, and clients drop
//! seqs they already hold. A device's pending acks are written before its
//! own sync is answered and when it disconnects, so the device's next
//! session starts from them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pingme_storage::{ConversationId, Seq, UserId};
use tokio::sync::oneshot;

use crate::pipeline::Pipeline;
use crate::port::{ConnRef, SessionInfo};
use crate::requests::{RequestError, check_member};
use crate::wire::error_frame;

/// How long acks wait to be coalesced before they are written.
pub(crate) const FLUSH_PERIOD: Duration = Duration::from_millis(200);

/// Devices written between yields to the runtime.
const WRITES_PER_TURN: usize = 32;

/// One device's acks of the current window.
#[derive(Debug)]
pub(crate) struct DeviceAcks {
    user: UserId,
    device: Arc<str>,
    /// Where a refusal goes (the connection of the latest ack).
    conn: ConnRef,
    /// conversation -> (highest seq, request id of that ack).
    conversations: HashMap<ConversationId, (Seq, u64)>,
}

/// The acks waiting for the next write.
#[derive(Debug, Default)]
pub(crate) struct DeliveredAcks {
    pending: Mutex<HashMap<(UserId, Arc<str>), DeviceAcks>>,
}

impl DeliveredAcks {
    /// Records an ack; only the highest seq per conversation is kept.
    pub(crate) fn note(
        &self,
        session: &SessionInfo,
        request_id: u64,
        conversation: ConversationId,
        seq: Seq,
    ) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let device = pending
            .entry((session.user, session.device.clone()))
            .or_insert_with(|| DeviceAcks {
                user: session.user,
                device: session.device.clone(),
                conn: session.conn,
                conversations: HashMap::new(),
            });
        device.conn = session.conn;
        let entry = device
            .conversations
            .entry(conversation)
            .or_insert((seq, request_id));
        if seq > entry.0 {
            *entry = (seq, request_id);
        }
    }

    /// Takes one device's pending acks.
    pub(crate) fn take_device(&self, user: UserId, device: &Arc<str>) -> Vec<DeviceAcks> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending
            .remove(&(user, device.clone()))
            .into_iter()
            .collect()
    }

    /// Takes every pending ack.
    pub(crate) fn take_all(&self) -> Vec<DeviceAcks> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *pending).into_values().collect()
    }
}

/// Writes a window of acks: each seq is clamped to its conversation's
/// latest (a watermark ahead of the timeline would hide future messages
/// from sync), and group membership is checked here rather than per ack.
/// A refused ack gets an error frame on the connection that sent it.
pub(crate) async fn write(ctx: &Pipeline, batch: Vec<DeviceAcks>) {
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
                // The window is dropped: a lower watermark only redelivers.
                tracing::warn!(%error, "delivered watermarks not written");
                return;
            }
        };
    let mut written = 0u64;
    for (i, device) in batch.into_iter().enumerate() {
        if i % WRITES_PER_TURN == WRITES_PER_TURN - 1 {
            // The embedded store works on the calling thread: a window of
            // thousands of writes in one go would hold a runtime worker
            // (and the deliveries queued behind it) for milliseconds.
            tokio::task::yield_now().await;
        }
        for (&conversation, &(seq, request_id)) in &device.conversations {
            match write_one(ctx, &device, conversation, seq, &latest).await {
                Ok(()) => written += 1,
                Err(refused) => {
                    crate::telemetry::failed(refused.code, 1);
                    ctx.outbox.to_connection(
                        device.conn,
                        error_frame(request_id, refused.code, refused.message, ""),
                    );
                }
            }
        }
    }
    metrics::counter!(crate::telemetry::WATERMARKS_WRITTEN).increment(written);
}

async fn write_one(
    ctx: &Pipeline,
    device: &DeviceAcks,
    conversation: ConversationId,
    seq: Seq,
    latest: &HashMap<ConversationId, Seq>,
) -> Result<(), RequestError> {
    // 1:1 parties were checked when the ack arrived (no store needed).
    if let ConversationId::Group(_) = conversation {
        check_member(ctx, conversation, device.user).await?;
    }
    let seq = seq.min(latest.get(&conversation).copied().unwrap_or(0));
    ctx.stores
        .watermarks
        .set_delivered(device.user, &device.device, conversation, seq)
        .await?;
    Ok(())
}

/// Writes the pending acks every [`FLUSH_PERIOD`] until `stop` fires, then
/// once more, so nothing noted before shutdown is left behind.
pub(crate) async fn run(ctx: Arc<Pipeline>, mut stop: oneshot::Receiver<()>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: UserId, device: &str, conn_id: u64) -> SessionInfo {
        SessionInfo {
            user,
            device: Arc::from(device),
            conn: ConnRef { shard: 0, conn_id },
        }
    }

    #[test]
    fn the_highest_seq_per_device_and_conversation_wins() {
        let acks = DeliveredAcks::default();
        let phone = session(7, "phone", 1);
        let laptop = session(7, "laptop", 2);
        let group = ConversationId::Group(3);
        acks.note(&phone, 10, group, 5);
        acks.note(&phone, 11, group, 9);
        acks.note(&phone, 12, group, 8);
        acks.note(&laptop, 20, group, 2);
        let mut phone_acks = acks.take_device(7, &phone.device);
        assert_eq!(phone_acks.len(), 1);
        let phone_acks = phone_acks.remove(0);
        assert_eq!(phone_acks.conversations[&group], (9, 11));
        let rest = acks.take_all();
        assert_eq!(rest.len(), 1, "the laptop's acks stay until taken");
        assert_eq!(rest[0].conversations[&group], (2, 20));
        assert!(acks.take_all().is_empty());
    }
}
