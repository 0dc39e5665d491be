//! [`DeadLetterStore`] on fjall: dead letters under ids from a persisted
//! counter (never reused, even after removal and restart).

use std::ops::Bound;

use async_trait::async_trait;

use super::{EmbeddedStore, Inner, META_NEXT_DEAD_LETTER, db, from_json, to_json};
use crate::{DeadLetter, DeadLetterStore, MAX_PAGE, StoreResult};

impl Inner {
    fn put_dead_letter(&self, mut letter: DeadLetter) -> StoreResult<u64> {
        let mut counters = self.admin();
        letter.id = counters.next_dead_letter;
        let mut batch = self.db.batch();
        batch.insert(
            &self.tables.dead_letters,
            letter.id.to_be_bytes(),
            to_json(&letter),
        );
        batch.insert(
            &self.tables.meta,
            META_NEXT_DEAD_LETTER,
            (letter.id + 1).to_be_bytes(),
        );
        self.commit(batch)?;
        counters.next_dead_letter += 1;
        counters.dead_letter_count += 1;
        Ok(letter.id)
    }

    fn dead_letters(&self, after: u64, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        let limit = limit.min(MAX_PAGE);
        let range = (
            Bound::Excluded(after.to_be_bytes().to_vec()),
            Bound::Unbounded,
        );
        let mut page = Vec::with_capacity(limit.min(64));
        for guard in self.tables.dead_letters.range(range).take(limit) {
            page.push(from_json(&db(guard.value())?, "dead letter")?);
        }
        Ok(page)
    }

    fn remove_dead_letter(&self, id: u64) -> StoreResult<bool> {
        let mut counters = self.admin();
        if !db(self.tables.dead_letters.contains_key(id.to_be_bytes()))? {
            return Ok(false);
        }
        let mut batch = self.db.batch();
        batch.remove(&self.tables.dead_letters, id.to_be_bytes());
        self.commit(batch)?;
        counters.dead_letter_count -= 1;
        Ok(true)
    }
}

#[async_trait]
impl DeadLetterStore for EmbeddedStore {
    async fn put_dead_letter(&self, letter: DeadLetter) -> StoreResult<u64> {
        self.blocking(move |inner| inner.put_dead_letter(letter))
            .await
    }

    async fn dead_letters(&self, after: u64, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        self.inner.dead_letters(after, limit)
    }

    async fn remove_dead_letter(&self, id: u64) -> StoreResult<bool> {
        self.blocking(move |inner| inner.remove_dead_letter(id))
            .await
    }

    async fn dead_letter_count(&self) -> StoreResult<u64> {
        Ok(self.inner.admin().dead_letter_count)
    }
}
