//! The group-commit writer: the single owner of seq assignment in the
//! embedded store.
//!
//! `append` callers validate their messages and look their idempotency
//! keys up on their own task, then queue them here. One dedicated thread
//! takes everything queued, and for the whole round: assigns seqs in
//! arrival order, completes the idempotency check (against the rounds
//! committed since each caller's lookup began, and against the round
//! itself), writes one atomic fjall batch, syncs the journal once,
//! publishes the new latest seqs, and only then answers every caller.
//! Because this thread is the only code that writes messages, two appends
//! can never be given the same seq, and a latest seq read from the
//! timeline's last key is exact.

use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use fjall::{Database, PersistMode};
// The writer hashes every message's conversation and idempotency key a
// few times a round: SipHash was 4-5% of its CPU. foldhash is seeded per
// process, so clients still cannot choose colliding idempotency keys.
use foldhash::HashMap;
use foldhash::HashMapExt;
use tokio::sync::oneshot;

use super::keys::{self, ConversationKey};
use super::{Tables, db};
use crate::{Appended, ConversationId, NewMessage, Seq, StoreError, StoreResult, StoredMessage};

/// The queue between `append` callers and the writer: a vector the writer
/// takes whole, so a round costs one lock however many callers it answers.
#[derive(Default)]
pub(super) struct AppendQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    requests: Vec<AppendRequest>,
    closed: bool,
}

impl AppendQueue {
    /// Queues a request; `false` if the store is closing.
    pub fn push(&self, request: AppendRequest) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return false;
        }
        state.requests.push(request);
        // Only a writer that found the queue empty waits for a signal.
        if state.requests.len() == 1 {
            self.ready.notify_one();
        }
        true
    }

    /// Lets the writer finish what is queued and stop.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.ready.notify_one();
    }

    /// Everything queued, once there is at least one request and
    /// `not_before` has passed (what arrives until then joins the round);
    /// `None` once closed and drained.
    fn take(&self, spare: Vec<AppendRequest>, not_before: Instant) -> Option<Vec<AppendRequest>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            while state.requests.is_empty() {
                if state.closed {
                    return None;
                }
                state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            let now = Instant::now();
            if now >= not_before || state.closed {
                return Some(std::mem::replace(&mut state.requests, spare));
            }
            // Pushes onto a queue that is not empty do not signal, so this
            // sleeps until the deadline (or a close).
            state = self
                .ready
                .wait_timeout(state, not_before - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One `append` call: messages that passed validation (`Ok`) or the typed
/// error they got (`Err`), each with its idempotency key as the caller
/// looked it up, and where to send the answer.
pub(super) struct AppendRequest {
    pub messages: Vec<Checked>,
    /// Rounds committed before the caller's lookups began: keys committed
    /// by later rounds may be missing from them.
    pub after_round: u64,
    pub reply: oneshot::Sender<StoreResult<Vec<StoreResult<Appended>>>>,
}

/// A message as its caller checked it, with its idempotency lookup.
pub(super) type Checked = (StoreResult<NewMessage>, LookedUp);

/// A message's idempotency key and where the caller's lookup found it.
/// Callers look their keys up on their own tasks, in parallel: done here,
/// the lookups were a quarter of the writer thread's CPU, and the writer is
/// the store's one serial stage.
#[derive(Debug, Default)]
pub(super) struct LookedUp {
    /// Empty for a message that failed its checks.
    pub key: Vec<u8>,
    pub found: Option<(ConversationId, Seq)>,
}

/// How many of the latest rounds' keys the writer remembers, to catch a
/// key committed after a caller's lookup began (a lookup precedes its
/// round by a round or two; an older one is done again by the writer).
pub(super) const RECENT_ROUNDS: usize = 64;

/// Hashes of the idempotency keys of the latest committed rounds, newest
/// last. A hit is confirmed in the store (hashes may collide).
#[derive(Default)]
pub(super) struct RecentKeys {
    hasher: foldhash::fast::RandomState,
    rounds: std::collections::VecDeque<(u64, foldhash::HashSet<u64>)>,
}

impl RecentKeys {
    fn hash(&self, key: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    /// Whether a round after `after_round` (up to `committed`) may have
    /// stored `key`; `None` if those rounds are no longer all remembered.
    fn may_hold(&self, after_round: u64, committed: u64, key: &[u8]) -> Option<bool> {
        if after_round >= committed {
            return Some(false);
        }
        match self.rounds.front() {
            Some(&(oldest, _)) if oldest <= after_round + 1 => {}
            _ => return None,
        }
        let hash = self.hash(key);
        Some(
            self.rounds
                .iter()
                .rev()
                .take_while(|(round, _)| *round > after_round)
                .any(|(_, hashes)| hashes.contains(&hash)),
        )
    }

    fn remember(&mut self, round: u64, hashes: foldhash::HashSet<u64>) {
        if self.rounds.len() == RECENT_ROUNDS {
            self.rounds.pop_front();
        }
        self.rounds.push_back((round, hashes));
    }
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
    /// The shortest time from one round's start to the next
    /// ([`super::DEFAULT_GROUP_COMMIT_INTERVAL`]).
    pub round_interval: Duration,
    /// The latest rounds' idempotency keys, for callers' late lookups.
    pub recent: RecentKeys,
}

/// Counters of committed rounds, for benchmarks and metrics.
#[derive(Default)]
pub(super) struct WriterStats {
    pub rounds: AtomicU64,
    pub messages: AtomicU64,
}

impl Writer {
    /// Runs rounds until the queue is closed and drained. A round is
    /// everything queued while the previous round was being written and
    /// synced, and until `round_interval` after that round started, so
    /// rounds grow with the load (bounded by the number of callers
    /// waiting, each with one request).
    pub fn run(mut self, queue: Arc<AppendQueue>) {
        let mut spare = Vec::new();
        let mut not_before = Instant::now();
        while let Some(round) = queue.take(spare, not_before) {
            not_before = Instant::now() + self.round_interval;
            let capacity = round.len();
            self.commit_round(round);
            spare = Vec::with_capacity(capacity);
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
                items.push((request.messages, request.after_round));
            }
            let outcome = self.write_round(items, &mut before);
            (replies, outcome)
        };
        let answers: Vec<Reply> = match outcome {
            Ok(answers) => {
                let stored: usize = answers.iter().map(Vec::len).sum();
                // Release: a caller that reads this count before its
                // lookups sees this round's keys in the store.
                self.stats.rounds.fetch_add(1, Ordering::Release);
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
    ///
    /// Inserts go to the LSM's in-memory skiplists in key order, not
    /// arrival order: neighbouring keys share their search paths, which
    /// stay in the CPU cache (arrival order jumps across the whole
    /// memtable, one cache miss per level).
    fn write_round(
        &mut self,
        round: Vec<(Vec<Checked>, u64)>,
        before: &mut HashMap<ConversationId, Seq>,
    ) -> StoreResult<Vec<Vec<StoreResult<Appended>>>> {
        let total: usize = round.iter().map(|(messages, _)| messages.len()).sum();
        let committed = self.stats.rounds.load(Ordering::Relaxed);

        // Phase 1: where earlier rounds stored each valid message's key.
        // The caller's lookup answers for rounds up to its `after_round`;
        // later rounds are checked here, and the store asked again only
        // when one of them may hold the key (or they are too far back).
        let requests = round.len();
        let mut items: Vec<(usize, StoreResult<NewMessage>)> = Vec::with_capacity(total);
        let mut idempotency_keys: Vec<Vec<u8>> = Vec::with_capacity(total);
        let mut found: Vec<Option<(ConversationId, Seq)>> = Vec::with_capacity(total);
        for (r, (request, after_round)) in round.into_iter().enumerate() {
            for (item, looked_up) in request {
                let location = match (&item, looked_up.found) {
                    (Err(_), _) => None,
                    (Ok(_), Some(location)) => Some(location),
                    (Ok(_), None) => {
                        match self.recent.may_hold(after_round, committed, &looked_up.key) {
                            Some(false) => None,
                            Some(true) | None => self.tables.stored_location(&looked_up.key)?,
                        }
                    }
                };
                idempotency_keys.push(looked_up.key);
                found.push(location);
                items.push((r, item));
            }
        }
        let mut known: HashMap<&[u8], (ConversationId, Seq)> = HashMap::new();
        for (key, location) in idempotency_keys.iter().zip(&found) {
            if let Some(location) = location {
                known.insert(key.as_slice(), *location);
            }
        }

        // Phase 2: arrival order: duplicates, seqs, encoded writes.
        let mut answers: Vec<Vec<StoreResult<Appended>>> =
            (0..requests).map(|_| Vec::new()).collect();
        let mut in_round: HashMap<&[u8], (usize, usize)> = HashMap::with_capacity(total);
        let mut message_writes: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(total);
        let mut idempotency_writes: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(total);
        let mut index_writes: Vec<Vec<u8>> = Vec::new();
        for ((r, item), idempotency) in items.into_iter().zip(&idempotency_keys) {
            let message = match item {
                Ok(message) => message,
                Err(error) => {
                    answers[r].push(Err(error));
                    continue;
                }
            };
            let idempotency: &[u8] = idempotency.as_slice();
            if let Some(&(fr, fi)) = in_round.get(idempotency) {
                let duplicate = as_duplicate(&answers[fr][fi]);
                answers[r].push(duplicate);
                continue;
            }
            if let Some(&(conversation, seq)) = known.get(idempotency) {
                let stored = db(self
                    .tables
                    .messages
                    .get(keys::message_key(conversation, seq)))?
                .ok_or_else(|| keys::corrupt("idempotency entry without its message"))?;
                answers[r].push(Ok(Appended {
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
            let mut value = Vec::with_capacity(64 + stored.body.len());
            keys::encode_message(&stored, &mut value);
            idempotency_writes.push((idempotency.to_vec(), key.clone()));
            message_writes.push((key, value));
            if let (ConversationId::Direct { low, high }, 1) = (conversation, seq) {
                // A direct conversation exists for listing from its first message.
                for user in [low, high] {
                    index_writes.push(keys::user_conversation_key(user, conversation));
                }
            }
            in_round.insert(idempotency, (r, answers[r].len()));
            answers[r].push(Ok(Appended {
                message: stored,
                duplicate: false,
            }));
        }

        // One batch, in key order per keyspace, and (with Durability::Sync)
        // one fsync for the whole round.
        message_writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        idempotency_writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let writes = message_writes.len() + idempotency_writes.len() + index_writes.len();
        let mut batch =
            fjall::OwnedWriteBatch::with_capacity(self.db.clone(), writes).durability(self.persist);
        for (key, value) in message_writes {
            batch.insert(&self.tables.messages, key, value);
        }
        for (key, location) in idempotency_writes {
            batch.insert(&self.tables.idempotency, key, location);
        }
        for key in index_writes {
            batch.insert(&self.tables.user_conversations, key, []);
        }
        db(batch.commit())?;
        let stored = in_round.keys().map(|key| self.recent.hash(key)).collect();
        self.recent.remember(committed + 1, stored);
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
