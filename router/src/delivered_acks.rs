//! The delivered acks of the current window. Devices acknowledge delivery
//! cumulatively per conversation, from thousands of devices at once in a
//! busy group; the acks are coalesced here (the highest seq per device and
//! conversation wins) until the watermark writer takes them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pingme_storage::{ConversationId, Seq, UserId};

use crate::port::{ConnRef, SessionInfo};

/// One device's acks of the current window.
#[derive(Debug)]
pub(crate) struct DeviceAcks {
    pub(crate) user: UserId,
    pub(crate) device: Arc<str>,
    /// Where a refusal goes (the connection of the latest ack).
    pub(crate) conn: ConnRef,
    /// conversation -> (highest seq, request id of that ack).
    pub(crate) conversations: HashMap<ConversationId, (Seq, u64)>,
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
