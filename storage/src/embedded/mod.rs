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

mod keys;
mod writer;

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::oneshot;

use self::keys::ConversationKey;
use self::writer::{AppendQueue, AppendRequest, Published, Writer, WriterStats};
use crate::{
    Appended, ConversationId, ConversationStore, DeadLetter, DeadLetterStore, DeviceRecord,
    GroupId, GroupRecord, MAX_BODY_BYTES, MAX_PAGE, Member, MessageStore, NewMessage, Role, Seq,
    StoreError, StoreResult, StoredMessage, UserId, UserRecord, UserStore, WatermarkStore,
    Watermarks,
};

/// Longest `client_msg_id`, `msg_id`, `sender_device` and device id the
/// store accepts, in bytes (they are length-prefixed with one byte).
pub const MAX_ID_BYTES: usize = 255;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the journal is fsynced: survives power loss. Production.
    Sync,
    /// After the journal is written to the OS (no fsync): survives a
    /// process crash but not a power loss. Benchmarks only.
    UnsafeNoSyncForBenchmarks,
}

/// Group-commit counters since open (see [`EmbeddedStore::commit_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Committed rounds (one batch write and, with `Sync`, one fsync each).
    pub rounds: u64,
    /// Append items answered by those rounds.
    pub messages: u64,
}

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
    /// Serialises watermark raises (read, compare, write).
    watermarks: Mutex<()>,
    published: Published,
    stats: Arc<WriterStats>,
    appends: Arc<AppendQueue>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after its last round; joining it
        // releases its database handle so the directory can be reopened.
        self.appends.close();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
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
    match role {
        Role::Owner => 1,
        Role::Admin => 2,
        Role::Member => 3,
    }
}

fn role_from(bytes: &[u8]) -> StoreResult<Role> {
    match bytes {
        [1] => Ok(Role::Owner),
        [2] => Ok(Role::Admin),
        [3] => Ok(Role::Member),
        _ => Err(keys::corrupt("role")),
    }
}

fn check_id(what: &str, value: &str, allow_empty: bool) -> StoreResult<()> {
    if value.is_empty() && !allow_empty {
        return Err(StoreError::Invalid(format!("{what} must not be empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(StoreError::Invalid(format!(
            "{what} is longer than {MAX_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

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

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    pub fn open(dir: &Path, durability: Durability) -> StoreResult<EmbeddedStore> {
        let database = db(Database::builder(dir).open())?;
        let keyspace = |name: &str| {
            db(database.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
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
            latest: HashMap::new(),
            published: published.clone(),
            stats: stats.clone(),
            replies: writer::spawn_replier(),
        };
        let writer = std::thread::Builder::new()
            .name("pingme-store-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer: {e}")))?;

        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db: database,
                tables,
                persist,
                admin: Mutex::new(counters),
                watermarks: Mutex::new(()),
                published,
                stats,
                appends,
                writer: Some(writer),
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
        db(self.tables.users.contains_key(id.to_be_bytes()))
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
        db(self.tables.members.get(keys::pair_key(group, user)))?
            .map(|value| role_from(&value))
            .transpose()
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

    /// The checks `append` makes before a message reaches the writer.
    fn check_new_message(&self, message: &NewMessage) -> StoreResult<()> {
        check_id("client_msg_id", &message.client_msg_id, false)?;
        check_id("msg_id", &message.msg_id, false)?;
        check_id("sender_device", &message.sender_device, true)?;
        if message.body.len() > MAX_BODY_BYTES {
            return Err(StoreError::Invalid(format!(
                "body of {} bytes exceeds {MAX_BODY_BYTES}",
                message.body.len()
            )));
        }
        if self.is_member(message.conversation, message.sender)? {
            Ok(())
        } else {
            Err(StoreError::NotMember {
                user: message.sender,
                conversation: message.conversation.to_string(),
            })
        }
    }

    fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord> {
        if username.is_empty() {
            return Err(StoreError::Invalid("username must not be empty".into()));
        }
        let mut counters = self.admin();
        if db(self.tables.usernames.contains_key(username))? {
            return Err(StoreError::Conflict(format!(
                "username {username:?} is taken"
            )));
        }
        let user = UserRecord {
            id: counters.next_user,
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            created_ms: now_ms,
        };
        let mut batch = self.db.batch();
        batch.insert(&self.tables.users, user.id.to_be_bytes(), to_json(&user));
        batch.insert(&self.tables.usernames, username, user.id.to_be_bytes());
        self.commit(batch)?;
        counters.next_user += 1;
        Ok(user)
    }

    fn device(&self, user: UserId, device_id: &str) -> StoreResult<Option<DeviceRecord>> {
        db(self.tables.devices.get(keys::device_key(user, device_id)))?
            .map(|value| from_json(&value, "device"))
            .transpose()
    }

    fn touch_device(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord> {
        check_id("device_id", device_id, false)?;
        let _admin = self.admin();
        self.require_users([user])?;
        let mut device = self.device(user, device_id)?.unwrap_or(DeviceRecord {
            user,
            device_id: device_id.to_string(),
            token_generation: 0,
            last_login_ms: now_ms,
        });
        device.last_login_ms = now_ms;
        self.put_device(&device)?;
        Ok(device)
    }

    fn bump_token_generation(&self, user: UserId, device_id: &str) -> StoreResult<u64> {
        let _admin = self.admin();
        let mut device = self
            .device(user, device_id)?
            .ok_or_else(|| StoreError::NotFound(format!("device {device_id:?} of user {user}")))?;
        device.token_generation += 1;
        self.put_device(&device)?;
        Ok(device.token_generation)
    }

    /// Writes a device record (durably, like every account change).
    fn put_device(&self, device: &DeviceRecord) -> StoreResult<()> {
        let mut batch = self.db.batch();
        batch.insert(
            &self.tables.devices,
            keys::device_key(device.user, &device.device_id),
            to_json(device),
        );
        self.commit(batch)
    }

    fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        now_ms: i64,
    ) -> StoreResult<GroupRecord> {
        let mut counters = self.admin();
        self.require_users(std::iter::once(owner).chain(members.iter().copied()))?;
        let id = counters.next_group;
        let mut roles: HashMap<UserId, Role> =
            members.iter().map(|&user| (user, Role::Member)).collect();
        roles.insert(owner, Role::Owner);
        let group = GroupRecord {
            id,
            name: name.to_string(),
            owner,
            member_count: roles.len() as u64,
            created_ms: now_ms,
        };
        let mut batch = self.db.batch();
        batch.insert(&self.tables.groups, id.to_be_bytes(), to_json(&group));
        for (user, role) in roles {
            self.stage_member(&mut batch, id, user, role);
        }
        self.commit(batch)?;
        counters.next_group += 1;
        Ok(group)
    }

    fn stage_member(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        group: GroupId,
        user: UserId,
        role: Role,
    ) {
        batch.insert(
            &self.tables.members,
            keys::pair_key(group, user),
            [role_byte(role)],
        );
        batch.insert(
            &self.tables.user_conversations,
            keys::user_conversation_key(user, ConversationId::Group(group)),
            [],
        );
    }

    fn add_members(&self, group: GroupId, members: &[Member]) -> StoreResult<u64> {
        let _admin = self.admin();
        let mut record = self.require_group(group)?;
        self.require_users(members.iter().map(|m| m.user))?;
        let mut seen = HashSet::with_capacity(members.len());
        let mut batch = self.db.batch();
        let mut added = 0;
        for member in members {
            if seen.insert(member.user) && self.role(group, member.user)?.is_none() {
                self.stage_member(&mut batch, group, member.user, member.role);
                added += 1;
            }
        }
        if added > 0 {
            record.member_count += added;
            batch.insert(&self.tables.groups, group.to_be_bytes(), to_json(&record));
            self.commit(batch)?;
        }
        Ok(added)
    }

    fn remove_member(&self, group: GroupId, user: UserId) -> StoreResult<bool> {
        let _admin = self.admin();
        let mut record = self.require_group(group)?;
        if self.role(group, user)?.is_none() {
            return Ok(false);
        }
        record.member_count = record.member_count.saturating_sub(1);
        let mut batch = self.db.batch();
        batch.remove(&self.tables.members, keys::pair_key(group, user));
        batch.remove(
            &self.tables.user_conversations,
            keys::user_conversation_key(user, ConversationId::Group(group)),
        );
        batch.insert(&self.tables.groups, group.to_be_bytes(), to_json(&record));
        self.commit(batch)?;
        Ok(true)
    }

    fn members_page(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> StoreResult<Vec<Member>> {
        self.require_group(group)?;
        let limit = limit.min(MAX_PAGE);
        let range = (
            Bound::Excluded(keys::pair_key(group, after).to_vec()),
            Bound::Included(keys::pair_key(group, u64::MAX).to_vec()),
        );
        let mut page = Vec::with_capacity(limit);
        for guard in self.tables.members.range(range).take(limit) {
            let (key, value) = db(guard.into_inner())?;
            if key.len() != 16 {
                return Err(keys::corrupt("member key"));
            }
            page.push(Member {
                user: keys::be_u64(&key[8..]),
                role: role_from(&value)?,
            });
        }
        Ok(page)
    }

    fn user_conversations(
        &self,
        user: UserId,
        after: Option<ConversationId>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationId>> {
        self.require_users([user])?;
        let limit = limit.min(MAX_PAGE);
        let start = match after {
            Some(after) => Bound::Excluded(keys::user_conversation_key(user, after)),
            None => Bound::Included(user.to_be_bytes().to_vec()),
        };
        let range = (start, Bound::Excluded(id_prefix_end(user)));
        let mut page = Vec::with_capacity(limit);
        for guard in self.tables.user_conversations.range(range).take(limit) {
            let key = db(guard.key())?;
            let (conversation, rest) = keys::decode_conversation(key.get(8..).unwrap_or(&[]))?;
            if !rest.is_empty() {
                return Err(keys::corrupt("user conversation key"));
            }
            page.push(conversation);
        }
        Ok(page)
    }

    fn messages(
        &self,
        conversation: ConversationId,
        after: Seq,
        until: Seq,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.require_conversation(conversation)?;
        let limit = limit.min(MAX_PAGE);
        if limit == 0 || after == u64::MAX || (until != 0 && until <= after) {
            return Ok(Vec::new());
        }
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
impl UserStore for EmbeddedStore {
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord> {
        let (username, password_hash) = (username.to_string(), password_hash.to_string());
        self.blocking(move |inner| inner.create_user(&username, &password_hash, now_ms))
            .await
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        match db(self.inner.tables.usernames.get(username))? {
            Some(id) => self.inner.user(keys::value_u64(&id)?),
            None => Ok(None),
        }
    }

    async fn user_by_id(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        self.inner.user(id)
    }

    async fn touch_device(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord> {
        let device_id = device_id.to_string();
        self.blocking(move |inner| inner.touch_device(user, &device_id, now_ms))
            .await
    }

    async fn device(&self, user: UserId, device_id: &str) -> StoreResult<Option<DeviceRecord>> {
        self.inner.device(user, device_id)
    }

    async fn bump_token_generation(&self, user: UserId, device_id: &str) -> StoreResult<u64> {
        let device_id = device_id.to_string();
        self.blocking(move |inner| inner.bump_token_generation(user, &device_id))
            .await
    }
}

#[async_trait]
impl ConversationStore for EmbeddedStore {
    async fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        now_ms: i64,
    ) -> StoreResult<GroupRecord> {
        let (name, members) = (name.to_string(), members.to_vec());
        self.blocking(move |inner| inner.create_group(owner, &name, &members, now_ms))
            .await
    }

    async fn group(&self, id: GroupId) -> StoreResult<Option<GroupRecord>> {
        self.inner.group(id)
    }

    async fn add_members(&self, group: GroupId, members: &[Member]) -> StoreResult<u64> {
        let members = members.to_vec();
        self.blocking(move |inner| inner.add_members(group, &members))
            .await
    }

    async fn remove_member(&self, group: GroupId, user: UserId) -> StoreResult<bool> {
        self.blocking(move |inner| inner.remove_member(group, user))
            .await
    }

    async fn member_role(&self, group: GroupId, user: UserId) -> StoreResult<Option<Role>> {
        self.inner.role(group, user)
    }

    async fn is_member(&self, conversation: ConversationId, user: UserId) -> StoreResult<bool> {
        self.inner.is_member(conversation, user)
    }

    async fn members_page(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> StoreResult<Vec<Member>> {
        self.inner.members_page(group, after, limit)
    }

    async fn user_conversations(
        &self,
        user: UserId,
        after: Option<ConversationId>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationId>> {
        self.inner.user_conversations(user, after, limit)
    }
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<StoreResult<Appended>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let messages = batch
            .into_iter()
            .map(|message| self.inner.check_new_message(&message).map(|()| message))
            .collect();
        let (reply, answer) = oneshot::channel();
        if !self.inner.appends.push(AppendRequest { messages, reply }) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

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
    async fn appends_survive_reopen_and_seqs_continue() {
        let dir = tempfile::tempdir().unwrap();
        let dm = ConversationId::direct(1, 2).unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), Durability::Sync).unwrap();
            store.create_user("a", "h", 0).await.unwrap();
            store.create_user("b", "h", 0).await.unwrap();
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
}
