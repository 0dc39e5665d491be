//! The embedded backend: everything in one fjall database under one data
//! directory, crash-safe, with group commit for messages.
//!
//! Why fjall (an LSM tree) rather than redb (a copy-on-write B-tree): the
//! write load is append-heavy (every message is a new key) and the ack
//! path waits for durability, so what matters is the cost of one durable
//! batch. fjall writes a batch as one sequential journal append plus one
//! fsync, whatever the number of keys; redb rewrites the touched B-tree
//! pages and syncs twice per commit. fjall also gives cheap prefix scans
//! (timelines, member pages) and background compaction.
//!
//! Who assigns seq: one dedicated writer thread ([`writer`]) is the single
//! owner of seq assignment for this store. `append` callers validate their
//! messages on their own task (membership, sizes) and queue them; the writer
//! drains the queue, assigns seqs in arrival order, de-duplicates on
//! (sender, client_msg_id) (also inside one round), writes one batch, syncs
//! once, and then answers. Nothing is acknowledged before its sync.
//!
//! Everything else (users, groups, members, devices, dead letters) is a
//! read-modify-write under one mutex, committed and (with
//! [`Durability::Sync`]) synced before the call returns. Watermarks are
//! written without their own fsync: they reach disk with the next synced
//! batch, and a lost watermark only means a message is delivered again.
//!
//! Keyspaces and key encodings are listed in `docs/storage.md`.

mod background_priority;
mod conversations;
mod dead_letters;
mod keys;
mod known;
mod memtable_keeper;
mod messages;
mod users;
mod watermarks;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use self::known::{KnownMembers, KnownUsers};
use self::memtable_keeper::MemtableKeeper;
use self::writer::{AppendQueue, Published, Writer, WriterStats};
use crate::{
    ConversationId, GroupId, GroupRecord, Role, Seq, StoreError, StoreResult, UserId, UserRecord,
};

pub use crate::checks::MAX_ID_BYTES;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the journal is fsynced: survives power loss. Production.
    Sync,
    /// After the journal is written to the OS (no fsync): survives a
    /// process crash but not a power loss. Benchmarks only.
    UnsafeNoSyncForBenchmarks,
}

pub use crate::CommitStats;

/// The keyspaces of the database (see `docs/storage.md` for encodings).
#[derive(Clone)]
pub(crate) struct Tables {
    /// user id -> JSON `UserRecord`
    users: Keyspace,
    /// username -> user id
    usernames: Keyspace,
    /// (user, device) -> JSON `DeviceRecord`
    devices: Keyspace,
    /// group id -> JSON `GroupRecord`
    groups: Keyspace,
    /// (group, user) -> role
    members: Keyspace,
    /// (user, conversation) -> empty: the user's conversation index
    user_conversations: Keyspace,
    /// (conversation, seq) -> encoded message: every timeline
    messages: Keyspace,
    /// (sender, client_msg_id) -> (conversation, seq)
    idempotency: Keyspace,
    /// (user, device, conversation) -> delivered seq
    delivered: Keyspace,
    /// (user, conversation) -> read seq
    read: Keyspace,
    /// dead letter id -> JSON `DeadLetter`
    dead_letters: Keyspace,
    /// named counters that must survive deletes
    meta: Keyspace,
}

impl Tables {
    /// Where the message with this idempotency key is stored, if it is:
    /// the callers' lookups and the writer's second look share it.
    fn stored_location(
        &self,
        idempotency_key: &[u8],
    ) -> StoreResult<Option<(ConversationId, Seq)>> {
        db(self.idempotency.get(idempotency_key))?
            .map(|location| keys::decode_location(&location))
            .transpose()
    }

    /// Every keyspace, for the memtable keeper. Destructured, so a keyspace
    /// added to `Tables` cannot be left out of this list unnoticed.
    fn all(&self) -> Vec<Keyspace> {
        let Tables {
            users,
            usernames,
            devices,
            groups,
            members,
            user_conversations,
            messages,
            idempotency,
            delivered,
            read,
            dead_letters,
            meta,
        } = self;
        [
            users,
            usernames,
            devices,
            groups,
            members,
            user_conversations,
            messages,
            idempotency,
            delivered,
            read,
            dead_letters,
            meta,
        ]
        .map(Keyspace::clone)
        .into()
    }
}

const META_NEXT_DEAD_LETTER: &[u8] = b"next_dead_letter";

/// Counters behind the admin mutex (recovered on open).
struct Counters {
    next_user: UserId,
    next_group: GroupId,
    next_dead_letter: u64,
    dead_letter_count: u64,
}

struct Inner {
    db: Database,
    tables: Tables,
    persist: Option<PersistMode>,
    /// Serialises read-modify-writes of everything but messages and watermarks.
    admin: Mutex<Counters>,
    /// Serialises watermark raises (compare, write) and knows the values
    /// raised recently.
    watermarks: Mutex<watermarks::RaisedWatermarks>,
    published: Published,
    stats: Arc<WriterStats>,
    appends: Arc<AppendQueue>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Frees flushed memtables off fjall's locks (dropped after the writer).
    keeper: Option<MemtableKeeper>,
    known_users: KnownUsers,
    known_members: KnownMembers,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after its last round; joining it
        // releases its database handle so the directory can be reopened.
        self.appends.close();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        self.keeper.take();
    }
}

/// The embedded store. Cheap to clone (all clones share one database).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("persist", &self.inner.persist)
            .finish_non_exhaustive()
    }
}

/// Maps a fjall failure to the retryable store error.
pub(crate) fn db<T>(result: fjall::Result<T>) -> StoreResult<T> {
    result.map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain records cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|_| keys::corrupt(what))
}

fn role_byte(role: Role) -> u8 {
    crate::codec::role_code(role)
}

fn role_from(bytes: &[u8]) -> StoreResult<Role> {
    match bytes {
        [code] => crate::codec::role_from_code(*code),
        _ => Err(keys::corrupt("role")),
    }
}

use crate::checks::check_id;

/// The key after every key starting with the 8-byte id `prefix_id`.
fn id_prefix_end(prefix_id: u64) -> Vec<u8> {
    let mut end = prefix_id.to_be_bytes().to_vec();
    end.push(0xff);
    end
}

/// Largest memtable per keyspace before it is flushed to disk. fjall's
/// default (64 MiB) holds about a minute of a 10,000 msg/s chat, and its
/// flush then takes most of a core at once: every append and delivery
/// waited 200-400 ms behind it on a 2-core machine. Smaller memtables flush
/// more often in short slices, and hold less memory.
const MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;

/// Size of the tables a compaction writes (fjall's default: 64 MiB). A
/// compaction finishes its last table, syncs it and opens its new tables
/// while holding the keyspace's version lock, which every read and write of
/// the keyspace waits for; smaller tables make that wait shorter (the
/// store writer's appends over 10 ms fell by a third in a 10,000 msg/s
/// chat). Existing keyspaces keep the size they were created with.
const TABLE_BYTES: u64 = 4 * 1024 * 1024;

/// fjall's background workers (flushes and compactions). One: with more,
/// fjall's first worker hands every compaction request back to the queue
/// for the others and takes the next message at once, so while another
/// worker compacts it spins on the queue (measured: 2% of a core in a
/// 10,000 msg/s chat, a third of fjall's whole share). One worker does
/// flushes and compactions in turn, which measured no worse.
const STORE_WORKERS: usize = 1;

/// The default shortest time from the start of one group-commit round to
/// the start of the next. A round's fsync, journal write and wake-ups
/// cost the same for one message as for a hundred: with no floor, a
/// 10,000 msg/s chat ran 1,770 rounds a second of 5 messages each, and
/// its fsyncs alone took a tenth of a core. With 1 ms, 830 rounds of 11
/// messages, and the server's CPU per message 10% lower (median latency
/// 1 ms higher, the tail the same; docs/benchmarks.md). An append that
/// finds the writer idle for longer than this waits for nothing.
pub const DEFAULT_GROUP_COMMIT_INTERVAL: Duration = Duration::from_millis(1);

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` and starts its writer thread,
    /// with [`DEFAULT_GROUP_COMMIT_INTERVAL`].
    pub fn open(dir: &Path, durability: Durability) -> StoreResult<EmbeddedStore> {
        Self::open_with(dir, durability, DEFAULT_GROUP_COMMIT_INTERVAL)
    }

    /// [`EmbeddedStore::open`] with the shortest time between the starts
    /// of two group-commit rounds: appends arriving within it of the
    /// previous round's start wait for the rest of it and share the next
    /// round (zero: a round starts as soon as the previous one is synced).
    pub fn open_with(
        dir: &Path,
        durability: Durability,
        group_commit_interval: Duration,
    ) -> StoreResult<EmbeddedStore> {
        let priority = background_priority::WorkerPriority::before_open();
        let database = db(Database::builder(dir).worker_threads(STORE_WORKERS).open())?;
        let keyspace = |name: &str| {
            db(database.keyspace(name, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(MEMTABLE_BYTES)
                    .compaction_strategy(Arc::new(
                        fjall::compaction::Leveled::default().with_table_target_size(TABLE_BYTES),
                    ))
            }))
        };
        let tables = Tables {
            users: keyspace("users")?,
            usernames: keyspace("usernames")?,
            devices: keyspace("devices")?,
            groups: keyspace("groups")?,
            members: keyspace("members")?,
            user_conversations: keyspace("user_conversations")?,
            messages: keyspace("messages")?,
            idempotency: keyspace("idempotency")?,
            delivered: keyspace("delivered")?,
            read: keyspace("read")?,
            dead_letters: keyspace("dead_letters")?,
            meta: keyspace("meta")?,
        };
        let persist = match durability {
            Durability::Sync => Some(PersistMode::SyncAll),
            Durability::UnsafeNoSyncForBenchmarks => Some(PersistMode::Buffer),
        };

        let last_id = |keyspace: &Keyspace| -> StoreResult<u64> {
            match keyspace.last_key_value() {
                None => Ok(0),
                Some(guard) => keys::value_u64(&db(guard.key())?),
            }
        };
        let next_dead_letter = match db(tables.meta.get(META_NEXT_DEAD_LETTER))? {
            Some(value) => keys::value_u64(&value)?,
            None => 1,
        };
        let counters = Counters {
            next_user: last_id(&tables.users)? + 1,
            next_group: last_id(&tables.groups)? + 1,
            next_dead_letter,
            dead_letter_count: db(tables.dead_letters.len())? as u64,
        };

        let published: Published = Arc::default();
        let stats = Arc::new(WriterStats::default());
        let appends = Arc::new(AppendQueue::default());
        let queue = appends.clone();
        let writer = Writer {
            db: database.clone(),
            tables: tables.clone(),
            persist,
            latest: foldhash::HashMap::default(),
            recent: writer::RecentKeys::default(),
            published: published.clone(),
            stats: stats.clone(),
            replies: writer::spawn_replier(),
            round_interval: group_commit_interval,
        };
        let writer = std::thread::Builder::new()
            .name("pingme-store-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer: {e}")))?;

        let keeper = MemtableKeeper::start(tables.all(), priority)
            .map_err(|e| StoreError::Unavailable(format!("cannot start memtable keeper: {e}")))?;

        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db: database,
                tables,
                persist,
                admin: Mutex::new(counters),
                watermarks: Mutex::new(watermarks::RaisedWatermarks::default()),
                published,
                stats,
                appends,
                writer: Some(writer),
                keeper: Some(keeper),
                known_users: KnownUsers::default(),
                known_members: KnownMembers::default(),
            }),
        })
    }

    /// How many group-commit rounds the writer has committed since open,
    /// and how many append items (stored, duplicate or rejected) they
    /// answered: `messages / rounds` is the average round size.
    pub fn commit_stats(&self) -> CommitStats {
        use std::sync::atomic::Ordering::Relaxed;
        CommitStats {
            rounds: self.inner.stats.rounds.load(Relaxed),
            messages: self.inner.stats.messages.load(Relaxed),
        }
    }

    /// Runs a blocking (fsyncing) operation off the async runtime's threads.
    async fn blocking<T, F>(&self, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || op(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

impl Inner {
    fn admin(&self) -> MutexGuard<'_, Counters> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(&self, batch: fjall::OwnedWriteBatch) -> StoreResult<()> {
        db(batch.durability(self.persist).commit())
    }

    fn user(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        db(self.tables.users.get(id.to_be_bytes()))?
            .map(|value| from_json(&value, "user"))
            .transpose()
    }

    fn user_exists(&self, id: UserId) -> StoreResult<bool> {
        if self.known_users.contains(id) {
            return Ok(true);
        }
        let exists = db(self.tables.users.contains_key(id.to_be_bytes()))?;
        if exists {
            self.known_users.insert(id);
        }
        Ok(exists)
    }

    fn require_users(&self, users: impl IntoIterator<Item = UserId>) -> StoreResult<()> {
        for user in users {
            if !self.user_exists(user)? {
                return Err(StoreError::NotFound(format!("user {user}")));
            }
        }
        Ok(())
    }

    fn group(&self, id: GroupId) -> StoreResult<Option<GroupRecord>> {
        db(self.tables.groups.get(id.to_be_bytes()))?
            .map(|value| from_json(&value, "group"))
            .transpose()
    }

    fn require_group(&self, id: GroupId) -> StoreResult<GroupRecord> {
        self.group(id)?
            .ok_or_else(|| StoreError::NotFound(format!("group {id}")))
    }

    /// `NotFound` unless the conversation exists (group created, or both
    /// users of a direct conversation registered).
    fn require_conversation(&self, conversation: ConversationId) -> StoreResult<()> {
        match conversation {
            ConversationId::Group(id) => self.require_group(id).map(|_| ()),
            ConversationId::Direct { low, high } => self.require_users([low, high]),
        }
    }

    fn role(&self, group: GroupId, user: UserId) -> StoreResult<Option<Role>> {
        if let Some(role) = self.known_members.role(group, user) {
            return Ok(Some(role));
        }
        let start = self.known_members.lookup_start();
        let role = db(self.tables.members.get(keys::pair_key(group, user)))?
            .map(|value| role_from(&value))
            .transpose()?;
        if let Some(role) = role {
            self.known_members.remember(start, group, user, role);
        }
        Ok(role)
    }

    fn is_member(&self, conversation: ConversationId, user: UserId) -> StoreResult<bool> {
        match conversation {
            ConversationId::Group(id) => {
                if self.role(id, user)?.is_some() {
                    return Ok(true);
                }
                self.require_group(id)?;
                Ok(false)
            }
            ConversationId::Direct { low, high } => {
                self.require_users([low, high])?;
                Ok(conversation.is_direct_party(user))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConversationStore, MessageStore, NewMessage, UserStore};
    use bytes::Bytes;

    /// Registers users 1 ("a") and 2 ("b"); their direct conversation.
    async fn users_a_and_b(store: &EmbeddedStore) -> ConversationId {
        store.create_user("a", "h", 0).await.unwrap();
        store.create_user("b", "h", 0).await.unwrap();
        ConversationId::direct(1, 2).unwrap()
    }

    fn message(conversation: ConversationId, sender: UserId, client_msg_id: &str) -> NewMessage {
        NewMessage {
            conversation,
            sender,
            sender_device: "d1".into(),
            client_msg_id: client_msg_id.into(),
            msg_id: format!("m-{client_msg_id}"),
            content_type: 1,
            body: Bytes::from_static(b"hi"),
            server_time_ms: 5,
        }
    }

    #[tokio::test]
    async fn appends_soon_after_a_round_wait_for_the_interval_and_share_a_round() {
        let dir = tempfile::tempdir().unwrap();
        let interval = Duration::from_millis(300);
        let store = EmbeddedStore::open_with(dir.path(), Durability::Sync, interval).unwrap();
        let dm = users_a_and_b(&store).await;
        // Round one starts after this instant; round two no sooner than
        // the interval after round one's start.
        let before_first = std::time::Instant::now();
        store.append(vec![message(dm, 1, "first")]).await.unwrap();
        // Queued right after the first round: they wait out the rest of the
        // interval (a lower bound, whatever the machine's speed).
        let appends: Vec<_> = (0..4)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.append(vec![message(dm, 2, &format!("m{i}"))]).await },
                )
            })
            .collect();
        for append in appends {
            append.await.unwrap().unwrap();
        }
        assert!(before_first.elapsed() >= interval);
        assert_eq!(store.latest_seqs(&[dm]).await.unwrap(), [5]);
        assert_eq!(store.commit_stats().messages, 5);
    }

    #[tokio::test]
    async fn membership_is_answered_per_sender_and_conversation_within_a_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Durability::Sync).unwrap();
        for name in ["a", "b", "c"] {
            store.create_user(name, "h", 0).await.unwrap();
        }
        let group = store.create_group(1, "g", &[1, 2], 0).await.unwrap().id;
        let other = store.create_group(3, "h", &[3], 0).await.unwrap().id;
        let (g, h) = (ConversationId::Group(group), ConversationId::Group(other));
        // One call: a member's burst, a stranger between two of its
        // messages, the member into a group it is not in, then back.
        let out = store
            .append(vec![
                message(g, 1, "1"),
                message(g, 1, "2"),
                message(g, 3, "3"),
                message(g, 1, "4"),
                message(h, 1, "5"),
                message(g, 2, "6"),
                message(g, 2, "7"),
            ])
            .await
            .unwrap();
        let admitted: Vec<bool> = out.iter().map(Result::is_ok).collect();
        assert_eq!(admitted, [true, true, false, true, false, true, true]);
        for refused in [&out[2], &out[4]] {
            assert!(
                matches!(refused, Err(StoreError::NotMember { .. })),
                "{refused:?}"
            );
        }
        assert_eq!(store.latest_seqs(&[g, h]).await.unwrap(), [5, 0]);
    }

    /// Queues `message` as a caller would whose idempotency lookup began
    /// after `after_round` rounds and found nothing.
    async fn append_looked_up_at(
        store: &EmbeddedStore,
        message: NewMessage,
        after_round: u64,
    ) -> crate::Appended {
        let looked_up = writer::LookedUp {
            key: keys::idempotency_key(message.sender, &message.client_msg_id),
            found: None,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        assert!(store.inner.appends.push(writer::AppendRequest {
            messages: vec![(Ok(message), looked_up)],
            after_round,
            reply,
        }));
        let mut results = answer.await.unwrap().unwrap();
        results.remove(0).unwrap()
    }

    #[tokio::test]
    async fn a_key_stored_after_the_callers_lookup_began_is_still_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Durability::Sync).unwrap();
        let dm = users_a_and_b(&store).await;
        let before = store.commit_stats().rounds;
        store.append(vec![message(dm, 1, "x")]).await.unwrap();

        // A lookup that began before that round missed it: the writer's
        // memory of recent rounds catches it.
        let again = append_looked_up_at(&store, message(dm, 1, "x"), before).await;
        assert!(again.duplicate);
        assert_eq!(again.message.seq, 1);

        // So does the store itself, once the round is further back than
        // the writer remembers.
        for i in 0..writer::RECENT_ROUNDS + 2 {
            store
                .append(vec![message(dm, 2, &format!("later-{i}"))])
                .await
                .unwrap();
        }
        assert!(store.commit_stats().rounds > before + writer::RECENT_ROUNDS as u64);
        let again = append_looked_up_at(&store, message(dm, 1, "x"), before).await;
        assert!(again.duplicate);
        assert_eq!(again.message.seq, 1);

        // A fresh key the lookup did not find is stored.
        let fresh = append_looked_up_at(&store, message(dm, 1, "y"), before).await;
        assert!(!fresh.duplicate);
        let last = 1 + writer::RECENT_ROUNDS as u64 + 2 + 1;
        assert_eq!(fresh.message.seq, last);
        assert_eq!(store.latest_seqs(&[dm]).await.unwrap(), [last]);
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_seqs_continue() {
        let dir = tempfile::tempdir().unwrap();
        let dm = ConversationId::direct(1, 2).unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), Durability::Sync).unwrap();
            users_a_and_b(&store).await;
            let out = store
                .append(vec![
                    message(dm, 1, "x"),
                    message(dm, 2, "y"),
                    message(dm, 1, "x"),
                ])
                .await
                .unwrap();
            let seqs: Vec<_> = out
                .iter()
                .map(|r| r.as_ref().unwrap().message.seq)
                .collect();
            assert_eq!(seqs, [1, 2, 1]);
            assert!(out[2].as_ref().unwrap().duplicate);
        }
        let store = EmbeddedStore::open(dir.path(), Durability::Sync).unwrap();
        assert_eq!(store.latest_seqs(&[dm]).await.unwrap(), [2]);
        let out = store
            .append(vec![message(dm, 2, "z"), message(dm, 2, "y")])
            .await
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap().message.seq, 3);
        assert!(out[1].as_ref().unwrap().duplicate);
        assert_eq!(out[1].as_ref().unwrap().message.seq, 2);
        assert_eq!(store.create_user("c", "h", 0).await.unwrap().id, 3);
        assert_eq!(store.user_conversations(1, None, 10).await.unwrap(), [dm]);
    }

    /// A direct conversation's parties, once found, are answered from the
    /// known-users set; a user who does not exist is never added and is
    /// refused every time.
    #[tokio::test]
    async fn direct_parties_found_once_are_known() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Durability::Sync).unwrap();
        let dm = users_a_and_b(&store).await;
        let known = |user| store.inner.known_users.contains(user);
        assert!(!known(1) && !known(2));
        let out = store.append(vec![message(dm, 1, "x")]).await.unwrap();
        assert!(out[0].is_ok());
        assert!(known(1) && known(2));

        let stranger = ConversationId::direct(1, 9).unwrap();
        for _ in 0..2 {
            let out = store.append(vec![message(stranger, 1, "y")]).await.unwrap();
            assert!(matches!(out[0], Err(StoreError::NotFound(_))), "{out:?}");
            assert!(!known(9));
        }
    }
}
