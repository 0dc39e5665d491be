//! The group-commit writer: the single owner of seq assignment in the
//! embedded store.
//!
//! `append` callers validate their messages on their own task, then queue
//! them here. One dedicated thread takes everything queued, and for the whole
//! round: assigns seqs in arrival order, checks idempotency (against the
//! store and against the round itself), writes one atomic fjall batch, syncs
//! the journal once, publishes the new latest seqs, and only then answers
//! every caller. Because this thread is the only code that writes messages,
//! two appends can never be given the same seq, and a latest seq read from
//! the timeline's last key is exact.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, RwLock};

use fjall::{Database, PersistMode};
use tokio::sync::oneshot;

use super::keys::{self, ConversationKey};
use super::{Tables, db};
use crate::{Appended, ConversationId, NewMessage, Seq, StoreError, StoreResult, StoredMessage};

/// The most messages one round takes, so a flood of callers cannot grow
/// a round (and its memory) without bound; the rest wait for the next round.
const MAX_ROUND_MESSAGES: usize = 32 * 1024;

/// One `append` call: messages that passed validation (`Ok`) or the typed
/// error they got (`Err`), and where to send the answer.
pub(super) struct AppendRequest {
    pub messages: Vec<StoreResult<NewMessage>>,
    pub reply: oneshot::Sender<StoreResult<Vec<StoreResult<Appended>>>>,
}

/// Latest seq per conversation as committed, shared with readers.
pub(super) type Published = Arc<RwLock<HashMap<ConversationId, Seq>>>;

/// One answer to send: the caller's reply channel and its result.
type Reply = (
    oneshot::Sender<StoreResult<Vec<StoreResult<Appended>>>>,
    StoreResult<Vec<StoreResult<Appended>>>,
);

/// Answers of one round, handed to the replier task.
pub(super) type Replies = tokio::sync::mpsc::UnboundedSender<Vec<Reply>>;

/// Starts the task that wakes callers for the writer. Waking a task from
/// a runtime worker costs a queue push; from the writer thread it costs a
/// futex wake per caller, which made answering the writer's biggest cost.
pub(super) fn spawn_replier() -> Option<Replies> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (replies, mut rounds) = tokio::sync::mpsc::unbounded_channel::<Vec<Reply>>();
    runtime.spawn(async move {
        while let Some(round) = rounds.recv().await {
            for (reply, answer) in round {
                // A caller that went away does not matter: its messages are stored.
                let _ = reply.send(answer);
            }
        }
    });
    Some(replies)
}

pub(super) struct Writer {
    pub db: Database,
    pub tables: Tables,
    pub persist: Option<PersistMode>,
    /// Authoritative latest seq of every conversation touched since open
    /// (loaded lazily from the timeline's last key).
    pub latest: HashMap<ConversationId, Seq>,
    pub published: Published,
    pub stats: Arc<WriterStats>,
    /// The replier task, if the store was opened inside a tokio runtime.
    pub replies: Option<Replies>,
}

/// Counters of committed rounds, for benchmarks and metrics.
#[derive(Default)]
pub(super) struct WriterStats {
    pub rounds: AtomicU64,
    pub messages: AtomicU64,
}

/// Where a message of the current round was answered: (request, item).
type Slot = (usize, usize);

impl Writer {
    /// Runs rounds until every sender is gone (the store was dropped).
    pub fn run(mut self, queue: Receiver<AppendRequest>) {
        while let Ok(first) = queue.recv() {
            let mut queued = first.messages.len();
            let mut round = vec![first];
            while queued < MAX_ROUND_MESSAGES {
                match queue.try_recv() {
                    Ok(request) => {
                        queued += request.messages.len();
                        round.push(request);
                    }
                    Err(_) => break,
                }
            }
            self.commit_round(round);
        }
    }

    fn commit_round(&mut self, round: Vec<AppendRequest>) {
        // Seqs this round moved, with their value before the round, so a
        // failed commit can hand them out again.
        let mut before: HashMap<ConversationId, Seq> = HashMap::new();
        let (replies, outcome) = {
            let mut replies = Vec::with_capacity(round.len());
            let mut items = Vec::with_capacity(round.len());
            for request in round {
                replies.push(request.reply);
                items.push(request.messages);
            }
            let outcome = self.write_round(items, &mut before);
            (replies, outcome)
        };
        let answers: Vec<Reply> = match outcome {
            Ok(answers) => {
                let stored: usize = answers.iter().map(Vec::len).sum();
                self.stats.rounds.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .messages
                    .fetch_add(stored as u64, Ordering::Relaxed);
                let mut published = self.published.write().unwrap_or_else(|p| p.into_inner());
                for conversation in before.keys() {
                    published.insert(*conversation, self.latest[conversation]);
                }
                drop(published);
                replies
                    .into_iter()
                    .zip(answers.into_iter().map(Ok))
                    .collect()
            }
            Err(error) => {
                tracing::error!(%error, "append round failed; nothing of it is acknowledged");
                for (conversation, seq) in before {
                    self.latest.insert(conversation, seq);
                }
                replies
                    .into_iter()
                    .map(|reply| (reply, Err(error.clone())))
                    .collect()
            }
        };
        // Answer through the replier task when there is one (and it still
        // runs), else from here.
        let answers = match &self.replies {
            Some(replies) => match replies.send(answers) {
                Ok(()) => return,
                Err(unsent) => unsent.0,
            },
            None => answers,
        };
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }

    /// Builds and commits one batch for the round; returns every answer.
    fn write_round(
        &mut self,
        round: Vec<Vec<StoreResult<NewMessage>>>,
        before: &mut HashMap<ConversationId, Seq>,
    ) -> StoreResult<Vec<Vec<StoreResult<Appended>>>> {
        let total: usize = round.iter().map(Vec::len).sum();
        let mut batch = self.db.batch().durability(self.persist);
        let mut answers: Vec<Vec<StoreResult<Appended>>> = Vec::with_capacity(round.len());
        // Idempotency keys first stored in this round -> where they were answered.
        let mut in_round: HashMap<Vec<u8>, Slot> = HashMap::with_capacity(total);
        let mut value = Vec::with_capacity(256);

        for (r, request) in round.into_iter().enumerate() {
            let mut request_answers = Vec::with_capacity(request.len());
            for item in request {
                let message = match item {
                    Ok(message) => message,
                    Err(error) => {
                        request_answers.push(Err(error));
                        continue;
                    }
                };
                let idempotency = keys::idempotency_key(message.sender, &message.client_msg_id);
                if let Some(&(fr, fi)) = in_round.get(&idempotency) {
                    let first = if fr == r {
                        &request_answers[fi]
                    } else {
                        &answers[fr][fi]
                    };
                    request_answers.push(as_duplicate(first));
                    continue;
                }
                if let Some(location) = db(self.tables.idempotency.get(&idempotency))? {
                    let (conversation, seq) = keys::decode_location(&location)?;
                    let stored = db(self
                        .tables
                        .messages
                        .get(keys::message_key(conversation, seq)))?
                    .ok_or_else(|| keys::corrupt("idempotency entry without its message"))?;
                    request_answers.push(Ok(Appended {
                        message: keys::decode_message(conversation, seq, &stored)?,
                        duplicate: true,
                    }));
                    continue;
                }

                let conversation = message.conversation;
                let previous = self.latest_seq(conversation)?;
                before.entry(conversation).or_insert(previous);
                let seq = previous + 1;
                self.latest.insert(conversation, seq);
                let stored = StoredMessage {
                    conversation,
                    seq,
                    msg_id: message.msg_id,
                    sender: message.sender,
                    sender_device: message.sender_device,
                    client_msg_id: message.client_msg_id,
                    content_type: message.content_type,
                    body: message.body,
                    server_time_ms: message.server_time_ms,
                };
                let key = keys::message_key(conversation, seq);
                keys::encode_message(&stored, &mut value);
                batch.insert(&self.tables.messages, key.clone(), value.as_slice());
                batch.insert(&self.tables.idempotency, idempotency.clone(), key);
                if let (ConversationId::Direct { low, high }, 1) = (conversation, seq) {
                    // A direct conversation exists for listing from its first message.
                    for user in [low, high] {
                        batch.insert(
                            &self.tables.user_conversations,
                            keys::user_conversation_key(user, conversation),
                            [],
                        );
                    }
                }
                in_round.insert(idempotency, (r, request_answers.len()));
                request_answers.push(Ok(Appended {
                    message: stored,
                    duplicate: false,
                }));
            }
            answers.push(request_answers);
        }
        // One write and (with Durability::Sync) one fsync for the whole round.
        db(batch.commit())?;
        Ok(answers)
    }

    /// The conversation's latest seq: from memory, or once per conversation
    /// after open from the last key of its timeline (exact, since only this
    /// thread writes timelines).
    fn latest_seq(&mut self, conversation: ConversationId) -> StoreResult<Seq> {
        match self.latest.entry(conversation) {
            Entry::Occupied(entry) => Ok(*entry.get()),
            Entry::Vacant(entry) => {
                let seq = last_seq_on_disk(&self.tables, conversation)?;
                entry.insert(seq);
                Ok(seq)
            }
        }
    }
}

/// The seq of the last message of a timeline on disk (0 if empty).
pub(super) fn last_seq_on_disk(tables: &Tables, conversation: ConversationId) -> StoreResult<Seq> {
    let prefix = ConversationKey::new(conversation);
    match tables.messages.prefix(prefix.as_bytes()).next_back() {
        None => Ok(0),
        Some(guard) => {
            let key = db(guard.key())?;
            let seq_bytes = key
                .get(prefix.as_bytes().len()..)
                .filter(|rest| rest.len() == 8)
                .ok_or_else(|| keys::corrupt("message key"))?;
            Ok(keys::be_u64(seq_bytes))
        }
    }
}

fn as_duplicate(first: &StoreResult<Appended>) -> StoreResult<Appended> {
    match first {
        Ok(appended) => Ok(Appended {
            message: appended.message.clone(),
            duplicate: true,
        }),
        // Only stored messages are recorded in a round's idempotency map.
        Err(_) => Err(StoreError::Corrupt("duplicate of a failed message".into())),
    }
}
