//! [`MessageStore`] on fjall: `append` checks each message and looks its
//! idempotency key up on the caller's task, then hands it to the
//! group-commit writer ([`super::writer`]), the single owner of seq
//! assignment; timeline reads are range scans of
//! `messages/(conversation, seq)`.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::keys::{self, ConversationKey};
use super::writer::{self, AppendRequest, LookedUp};
use super::{EmbeddedStore, Inner, db};
use crate::checks::{admit_sender, check_message_shape, timeline_page};
use crate::{
    Appended, ConversationId, MessageStore, NewMessage, Seq, StoreError, StoreResult,
    StoredMessage, UserId,
};

impl Inner {
    /// The checks `append` makes before a message reaches the writer.
    /// `last_member` is the previous message's membership answer: a burst
    /// of one sender into one conversation (a group's messages, a batch
    /// from one connection) is looked up once, not once per message (the
    /// lookup was a tenth of the CPU of 16-message appends).
    fn check_new_message(
        &self,
        message: &NewMessage,
        last_member: &mut Option<(ConversationId, UserId, bool)>,
    ) -> StoreResult<()> {
        check_message_shape(message)?;
        let is_member = match *last_member {
            Some((conversation, sender, answer))
                if conversation == message.conversation && sender == message.sender =>
            {
                answer
            }
            _ => {
                let answer = self.is_member(message.conversation, message.sender)?;
                *last_member = Some((message.conversation, message.sender, answer));
                answer
            }
        };
        admit_sender(message, is_member)
    }

    /// The message's idempotency key and where it is stored, if it is.
    fn look_up(&self, message: &NewMessage) -> StoreResult<LookedUp> {
        let key = keys::idempotency_key(message.sender, &message.client_msg_id);
        let found = self.tables.stored_location(&key)?;
        Ok(LookedUp { key, found })
    }

    fn messages(
        &self,
        conversation: ConversationId,
        after: Seq,
        until: Seq,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.require_conversation(conversation)?;
        let Some(limit) = timeline_page(after, until, limit) else {
            return Ok(Vec::new());
        };
        let last = if until == 0 { u64::MAX } else { until };
        let range =
            keys::message_key(conversation, after + 1)..=keys::message_key(conversation, last);
        let prefix_len = ConversationKey::new(conversation).as_bytes().len();
        let mut page = Vec::with_capacity(limit.min(64));
        for guard in self.tables.messages.range(range).take(limit) {
            let (key, value) = db(guard.into_inner())?;
            let seq = key
                .get(prefix_len..)
                .filter(|s| s.len() == 8)
                .map(keys::be_u64)
                .ok_or_else(|| keys::corrupt("message key"))?;
            page.push(keys::decode_message(conversation, seq, &value)?);
        }
        Ok(page)
    }

    fn latest_seqs(&self, conversations: &[ConversationId]) -> StoreResult<Vec<Seq>> {
        let mut seqs = Vec::with_capacity(conversations.len());
        let mut missing = Vec::new();
        {
            let published = self.published.read().unwrap_or_else(|p| p.into_inner());
            for (i, conversation) in conversations.iter().enumerate() {
                match published.get(conversation) {
                    Some(&seq) => seqs.push(seq),
                    None => {
                        seqs.push(0);
                        missing.push(i);
                    }
                }
            }
        }
        // Not touched since open: the timeline's last key is the committed
        // latest (the writer publishes only after its commit).
        for i in missing {
            seqs[i] = writer::last_seq_on_disk(&self.tables, conversations[i])?;
        }
        Ok(seqs)
    }
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<StoreResult<Appended>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Acquire: every round counted here has its keys in the store for
        // the lookups below; the writer checks the rounds after it.
        let after_round = self.inner.stats.rounds.load(Ordering::Acquire);
        let mut last_member = None;
        let messages = batch
            .into_iter()
            .map(|message| {
                let checked = self
                    .inner
                    .check_new_message(&message, &mut last_member)
                    .and_then(|()| self.inner.look_up(&message));
                match checked {
                    Ok(looked_up) => (Ok(message), looked_up),
                    Err(error) => (Err(error), LookedUp::default()),
                }
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            messages,
            after_round,
            reply,
        };
        if !self.inner.appends.push(request) {
            return Err(StoreError::Unavailable("store is closing".into()));
        }
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    async fn messages(
        &self,
        conversation: ConversationId,
        after: Seq,
        until: Seq,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.inner.messages(conversation, after, until, limit)
    }

    async fn latest_seqs(&self, conversations: &[ConversationId]) -> StoreResult<Vec<Seq>> {
        self.inner.latest_seqs(conversations)
    }
}
