//! Everything pingme keeps, behind one async trait per role, shaped by what
//! the router and the HTTP API need (not by one database): [`UserStore`]
//! (users and devices), [`ConversationStore`] (groups and membership),
//! [`MessageStore`], [`WatermarkStore`] and [`DeadLetterStore`]. [`Stores`]
//! holds one handle per role, so each consumer takes only what it uses and
//! a deployment can serve roles from different backends.
//!
//! Backends, each a cargo feature on by default: `embedded` (fjall, one
//! process, crash-safe, group commit), `mysql` (MySQL/MariaDB, shared by
//! many processes, group commit in transactions) and `scylla` (ScyllaDB,
//! bucketed timelines; see `docs/storage.md` for what has run against a
//! cluster). A build without `embedded` compiles no fjall. The `conformance` suite
//! (cargo feature `conformance`) runs the same behaviour tests, per role,
//! against every backend that is reachable.
//!
//! Who assigns seq: the store, inside [`MessageStore::append`], atomically
//! with the idempotency check. The router additionally makes one worker the
//! single owner of each conversation, so appends of one conversation reach
//! the store from one place, in order; the store's own serialisation (one
//! writer for the embedded engine, a per-conversation row lock or
//! lightweight transaction for MySQL/ScyllaDB) is the guarantee that two
//! writers can never assign the same seq.

mod checks;
mod codec;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "embedded")]
pub mod embedded;
mod error;
mod model;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "scylla")]
pub mod scylla;

use std::sync::Arc;

use async_trait::async_trait;

pub use checks::MAX_ID_BYTES;
pub use error::{StoreError, StoreResult};
pub use model::*;

/// Largest message body a store accepts (the gateway's frame limit is
/// smaller; this is the store's own guard).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest page any paged read returns, whatever the caller asks.
pub const MAX_PAGE: usize = 1000;

/// Group-commit counters of a store since it opened: `messages / rounds`
/// is the average round size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Committed rounds (one write and one sync, or one transaction, each).
    pub rounds: u64,
    /// Append items answered by those rounds.
    pub messages: u64,
}

/// Accounts: users and their devices.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// Registers a user; `Conflict` if the username is taken.
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord>;
    /// Looks a user up by login name.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>>;
    /// Looks a user up by id.
    async fn user_by_id(&self, id: UserId) -> StoreResult<Option<UserRecord>>;
    /// Records a login of `device_id` (creating the device on first login)
    /// and returns it with its current token generation.
    async fn touch_device(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord>;
    /// The device, if it ever logged in.
    async fn device(&self, user: UserId, device_id: &str) -> StoreResult<Option<DeviceRecord>>;
    /// Revokes every token of the device issued so far (logout) and
    /// returns the new generation.
    async fn bump_token_generation(&self, user: UserId, device_id: &str) -> StoreResult<u64>;
    /// Creates many accounts at once, in order (an operator's bulk path:
    /// a migration from another system, or users for a load test), each
    /// with its already-hashed password and, when `device` is given, that
    /// device as if it had logged in at `now_ms`. A taken username fails
    /// with `Conflict`: a backend with transactions (MySQL) then stores
    /// none of the batch; the others (one account at a time, which is what
    /// this default does) keep the accounts before it.
    async fn import_accounts(
        &self,
        accounts: &[NewAccount],
        device: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Vec<ImportedAccount>> {
        let mut imported = Vec::with_capacity(accounts.len());
        for account in accounts {
            let user = self
                .create_user(&account.username, &account.password_hash, now_ms)
                .await?;
            let device = match device {
                Some(device) => Some(self.touch_device(user.id, device, now_ms).await?),
                None => None,
            };
            imported.push(ImportedAccount { user, device });
        }
        Ok(imported)
    }
}

/// Groups and membership; direct conversations need no record.
#[async_trait]
pub trait ConversationStore: Send + Sync {
    /// Creates a group owned by `owner` with `members` (the owner is added
    /// as `Owner` whether listed or not). Unknown users are `NotFound`.
    async fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        now_ms: i64,
    ) -> StoreResult<GroupRecord>;
    /// The group's record.
    async fn group(&self, id: GroupId) -> StoreResult<Option<GroupRecord>>;
    /// Adds members (a bulk add for huge groups is a sequence of these
    /// calls); users already in the group keep their role. Returns how many
    /// were new. Unknown users are `NotFound`.
    async fn add_members(&self, group: GroupId, members: &[Member]) -> StoreResult<u64>;
    /// Removes a member; returns whether they were one.
    async fn remove_member(&self, group: GroupId, user: UserId) -> StoreResult<bool>;
    /// The user's role in the group, `None` if not a member.
    async fn member_role(&self, group: GroupId, user: UserId) -> StoreResult<Option<Role>>;
    /// Whether `user` may read and write `conversation`. A direct
    /// conversation admits its two users if both exist.
    async fn is_member(&self, conversation: ConversationId, user: UserId) -> StoreResult<bool>;
    /// Members with id greater than `after`, ascending, at most `limit`
    /// (capped at [`MAX_PAGE`]): how huge groups are read.
    async fn members_page(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> StoreResult<Vec<Member>>;
    /// The user's conversations (groups they belong to, direct
    /// conversations with at least one message) after `after` in id order,
    /// at most `limit` (capped at [`MAX_PAGE`]).
    async fn user_conversations(
        &self,
        user: UserId,
        after: Option<ConversationId>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationId>>;
}

/// Messages: idempotent appends with dense per-conversation seqs.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Appends a batch, in order. Each message is checked (conversation
    /// exists, sender is a member, body within [`MAX_BODY_BYTES`],
    /// non-empty `client_msg_id`) and de-duplicated on (sender,
    /// client_msg_id): a repeat returns the first message with
    /// `duplicate: true` and stores nothing. New messages get the next
    /// seqs of their conversations in batch order. Every `Ok` item is
    /// durable when this returns. The outer error means nothing of the batch
    /// is known to be stored (safe to retry: idempotency makes it exact).
    async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<StoreResult<Appended>>>;
    /// Messages with `after < seq <= until` (`until == 0`: no upper
    /// bound), ascending, at most `limit` (capped at [`MAX_PAGE`]).
    async fn messages(
        &self,
        conversation: ConversationId,
        after: Seq,
        until: Seq,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>>;
    /// The latest seq of each conversation (0 if it has no message), in
    /// the order asked.
    async fn latest_seqs(&self, conversations: &[ConversationId]) -> StoreResult<Vec<Seq>>;
}

/// Per-device delivered and per-user read watermarks. Both only move forward.
#[async_trait]
pub trait WatermarkStore: Send + Sync {
    /// Raises the device's delivered watermark to `seq` (never lowers it).
    async fn set_delivered(
        &self,
        user: UserId,
        device_id: &str,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()>;
    /// Raises many delivered watermarks, as [`WatermarkStore::set_delivered`]
    /// would one by one. An error may leave some raised and others not (a
    /// watermark is a lower bound: the caller may write them again). A
    /// backend that can write them together overrides this: the embedded
    /// store writes them as one batch, one journal write instead of one
    /// per watermark.
    async fn set_delivered_many(&self, marks: &[DeliveredMark]) -> StoreResult<()> {
        for mark in marks {
            self.set_delivered(mark.user, &mark.device_id, mark.conversation, mark.seq)
                .await?;
        }
        Ok(())
    }
    /// Raises the user's read watermark to `seq` (never lowers it).
    async fn set_read(
        &self,
        user: UserId,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()>;
    /// The watermarks of one device in each conversation, in the order asked.
    async fn watermarks(
        &self,
        user: UserId,
        device_id: &str,
        conversations: &[ConversationId],
    ) -> StoreResult<Vec<Watermarks>>;
}

/// Work the router gave up on (single-node mode; the cluster uses a DLQ topic).
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Stores a dead letter and returns its id.
    async fn put_dead_letter(&self, letter: DeadLetter) -> StoreResult<u64>;
    /// Dead letters with id greater than `after`, oldest first.
    async fn dead_letters(&self, after: u64, limit: usize) -> StoreResult<Vec<DeadLetter>>;
    /// Removes a dead letter (after a successful replay); returns whether it existed.
    async fn remove_dead_letter(&self, id: u64) -> StoreResult<bool>;
    /// How many dead letters are stored.
    async fn dead_letter_count(&self) -> StoreResult<u64>;
}

/// The stores by role: each consumer keeps only the handles it uses (the
/// conversation workers `messages`, the auth layer `users`, ...), and a
/// deployment may mix backends (users and groups in MySQL, messages in
/// ScyllaDB). Cloning copies five `Arc`s.
///
/// Why trait objects and not generics: every call already boxes its future
/// (`async_trait`), and the hot path (`MessageStore::append`) takes a batch
/// per call, so one indirect call per batch is noise; generics would put a
/// type parameter on the router, the HTTP API and every test double.
#[derive(Clone)]
pub struct Stores {
    /// Accounts: users, devices, token generations.
    pub users: Arc<dyn UserStore>,
    /// Groups and membership.
    pub conversations: Arc<dyn ConversationStore>,
    /// Messages and their seqs.
    pub messages: Arc<dyn MessageStore>,
    /// Delivered and read watermarks.
    pub watermarks: Arc<dyn WatermarkStore>,
    /// Work the router gave up on (see `docs/storage.md` on who owns dead
    /// letters in a cluster).
    pub dead_letters: Arc<dyn DeadLetterStore>,
}

impl Stores {
    /// Every role served by one backend (the embedded store, or a MySQL
    /// store that keeps everything).
    pub fn all_from<S>(store: Arc<S>) -> Stores
    where
        S: UserStore
            + ConversationStore
            + MessageStore
            + WatermarkStore
            + DeadLetterStore
            + 'static,
    {
        Stores {
            users: store.clone(),
            conversations: store.clone(),
            messages: store.clone(),
            watermarks: store.clone(),
            dead_letters: store,
        }
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}
