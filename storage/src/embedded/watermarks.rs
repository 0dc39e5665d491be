//! [`WatermarkStore`] on fjall: delivered and read watermarks that only
//! move forward, written without their own fsync (a lost one only means a
//! message is delivered again).

use std::collections::HashMap;

use async_trait::async_trait;
use fjall::Keyspace;

use super::keys;
use super::{EmbeddedStore, Inner, check_id, db};
use crate::{ConversationId, DeliveredMark, Seq, StoreResult, UserId, WatermarkStore, Watermarks};

/// Watermarks this process raised recently, by table and key. A raise
/// compares against the cached value instead of reading the memtable first
/// (a delivered-watermark window writes thousands of them, and the read
/// was half their cost). Exact because every write to these tables goes
/// through [`Inner::raise`] under the same lock; bounded by starting over
/// when full, after which each key is read once more.
#[derive(Debug, Default)]
pub(super) struct RaisedWatermarks {
    delivered: HashMap<Vec<u8>, Seq>,
    read: HashMap<Vec<u8>, Seq>,
}

/// Which watermark table a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Delivered,
    Read,
}

/// Cached watermarks per table at most (a few tens of MiB with their keys).
const RAISED_CAPACITY: usize = 131_072;

impl RaisedWatermarks {
    fn table(&mut self, table: Table) -> &mut HashMap<Vec<u8>, Seq> {
        match table {
            Table::Delivered => &mut self.delivered,
            Table::Read => &mut self.read,
        }
    }

    /// The value known for `key`, if cached.
    fn get(&mut self, table: Table, key: &[u8]) -> Option<Seq> {
        self.table(table).get(key).copied()
    }

    fn put(&mut self, table: Table, key: Vec<u8>, seq: Seq) {
        let seqs = self.table(table);
        if seqs.len() >= RAISED_CAPACITY && !seqs.contains_key(&key) {
            seqs.clear();
        }
        seqs.insert(key, seq);
    }
}

impl Inner {
    /// Raises a watermark kept under `key` to `seq`.
    fn raise(&self, table: Table, key: Vec<u8>, seq: Seq) -> StoreResult<()> {
        self.raise_many(table, vec![(key, seq)])
    }

    /// Raises the watermarks kept under each key to its seq, in one write
    /// batch (one journal write for all of them).
    fn raise_many(&self, table: Table, marks: Vec<(Vec<u8>, Seq)>) -> StoreResult<()> {
        let keyspace = match table {
            Table::Delivered => &self.tables.delivered,
            Table::Read => &self.tables.read,
        };
        // One batch holds one value per key: the highest asked wins.
        let mut wanted: HashMap<Vec<u8>, Seq> = HashMap::with_capacity(marks.len());
        for (key, seq) in marks {
            let entry = wanted.entry(key).or_insert(seq);
            *entry = (*entry).max(seq);
        }
        let mut raised = self.watermarks.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch =
            fjall::OwnedWriteBatch::with_capacity(self.db.clone(), wanted.len()).durability(None);
        let mut new_values = Vec::with_capacity(wanted.len());
        for (key, seq) in wanted {
            let current = match raised.get(table, &key) {
                Some(seq) => seq,
                None => match db(keyspace.get(&key))? {
                    Some(value) => keys::value_u64(&value)?,
                    None => 0,
                },
            };
            if seq > current {
                // Buffered, not fsynced: see the module doc.
                batch.insert(keyspace, key.as_slice(), seq.to_be_bytes());
            }
            new_values.push((key, seq.max(current)));
        }
        db(batch.commit())?;
        // Only what is written is remembered as raised.
        for (key, seq) in new_values {
            raised.put(table, key, seq);
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
        self.inner.raise(Table::Delivered, key, seq)
    }

    async fn set_delivered_many(&self, marks: &[DeliveredMark]) -> StoreResult<()> {
        let mut keyed = Vec::with_capacity(marks.len());
        for mark in marks {
            check_id("device_id", &mark.device_id, false)?;
            keyed.push((
                keys::delivered_key(mark.user, &mark.device_id, mark.conversation),
                mark.seq,
            ));
        }
        self.inner.raise_many(Table::Delivered, keyed)
    }

    async fn set_read(
        &self,
        user: UserId,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()> {
        let key = keys::user_conversation_key(user, conversation);
        self.inner.raise(Table::Read, key, seq)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_watermarks_are_kept_per_table_and_bounded() {
        let mut raised = RaisedWatermarks::default();
        raised.put(Table::Delivered, b"k".to_vec(), 5);
        assert_eq!(raised.get(Table::Delivered, b"k"), Some(5));
        assert_eq!(raised.get(Table::Read, b"k"), None, "tables apart");
        for i in 0..RAISED_CAPACITY as u64 + 10 {
            raised.put(Table::Read, i.to_be_bytes().to_vec(), i);
        }
        assert!(raised.read.len() <= RAISED_CAPACITY);
        assert_eq!(raised.get(Table::Delivered, b"k"), Some(5));
        // Raising a cached key again never counts as a new entry.
        let full = raised.read.len();
        raised.put(
            Table::Read,
            (RAISED_CAPACITY as u64 + 9).to_be_bytes().to_vec(),
            1,
        );
        assert_eq!(raised.read.len(), full);
    }

    #[tokio::test]
    async fn a_raise_never_lowers_whether_or_not_the_value_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), super::super::Durability::Sync).unwrap();
        let conversation = ConversationId::Group(7);
        store
            .set_delivered(1, "phone", conversation, 9)
            .await
            .unwrap();
        store
            .set_delivered(1, "phone", conversation, 4)
            .await
            .unwrap();
        let read = |store: &EmbeddedStore| {
            let store = store.clone();
            async move { store.watermarks(1, "phone", &[conversation]).await.unwrap()[0].delivered }
        };
        assert_eq!(read(&store).await, 9);
        // Forgotten (as when the cache starts over): the table still decides.
        store.inner.watermarks.lock().unwrap().delivered.clear();
        store
            .set_delivered(1, "phone", conversation, 6)
            .await
            .unwrap();
        assert_eq!(read(&store).await, 9);
        store
            .set_delivered(1, "phone", conversation, 12)
            .await
            .unwrap();
        assert_eq!(read(&store).await, 12);
        assert_eq!(
            store.inner.watermarks.lock().unwrap().get(
                Table::Delivered,
                &keys::delivered_key(1, "phone", conversation)
            ),
            Some(12)
        );
    }
}
