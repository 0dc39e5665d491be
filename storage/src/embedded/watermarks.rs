//! [`WatermarkStore`] on fjall: delivered and read watermarks that only
//! move forward, written without their own fsync (a lost one only means a
//! message is delivered again).

use async_trait::async_trait;
use fjall::Keyspace;

use super::keys;
use super::{EmbeddedStore, Inner, check_id, db};
use crate::{ConversationId, Seq, StoreResult, UserId, WatermarkStore, Watermarks};

impl Inner {
    /// Raises a watermark kept under `key` to `seq`.
    fn raise(&self, keyspace: &Keyspace, key: Vec<u8>, seq: Seq) -> StoreResult<()> {
        let _guard = self.watermarks.lock().unwrap_or_else(|p| p.into_inner());
        let current = match db(keyspace.get(&key))? {
            Some(value) => keys::value_u64(&value)?,
            None => 0,
        };
        if seq > current {
            // Buffered, not fsynced: see the module doc.
            db(keyspace.insert(key, seq.to_be_bytes()))?;
        }
        Ok(())
    }

    fn watermark(&self, keyspace: &Keyspace, key: &[u8]) -> StoreResult<Seq> {
        match db(keyspace.get(key))? {
            Some(value) => keys::value_u64(&value),
            None => Ok(0),
        }
    }
}

#[async_trait]
impl WatermarkStore for EmbeddedStore {
    async fn set_delivered(
        &self,
        user: UserId,
        device_id: &str,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()> {
        check_id("device_id", device_id, false)?;
        let key = keys::delivered_key(user, device_id, conversation);
        self.inner.raise(&self.inner.tables.delivered, key, seq)
    }

    async fn set_read(
        &self,
        user: UserId,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()> {
        let key = keys::user_conversation_key(user, conversation);
        self.inner.raise(&self.inner.tables.read, key, seq)
    }

    async fn watermarks(
        &self,
        user: UserId,
        device_id: &str,
        conversations: &[ConversationId],
    ) -> StoreResult<Vec<Watermarks>> {
        let tables = &self.inner.tables;
        conversations
            .iter()
            .map(|&conversation| {
                Ok(Watermarks {
                    delivered: self.inner.watermark(
                        &tables.delivered,
                        &keys::delivered_key(user, device_id, conversation),
                    )?,
                    read: self.inner.watermark(
                        &tables.read,
                        &keys::user_conversation_key(user, conversation),
                    )?,
                })
            })
            .collect()
    }
}
