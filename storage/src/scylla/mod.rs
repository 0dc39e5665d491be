//! The ScyllaDB backend (`storage.backend: scylla`): the design card's
//! store for huge-group fanout. A group's message is written once, into its
//! timeline partition `(conversation, seq / 10,000)`; members read the
//! timeline. Statements and schema are in [`cql`], row mappings in
//! [`rows`]; every statement is prepared once at connect, and the driver's
//! default policy routes each to a replica of its partition (token-aware).
//!
//! Append, per message (in batch order):
//!
//! 1. **Claim the idempotency key**: `INSERT INTO idempotency ... IF NOT
//!    EXISTS` with seq 0. A lost claim is a duplicate: the first writer's
//!    seq is answered once it is settled (a writer that died holding a
//!    claim for [`CLAIM_TIMEOUT`] is taken over, by LWT on its claim time).
//! 2. **Fence the seq**: read the conversation's `latest_seq`, note the seq
//!    being tried in the claim, then `INSERT INTO messages ... IF NOT
//!    EXISTS` at `latest + 1`; if another writer holds that seq, try the
//!    next one. Each seq is taken by exactly one applied insert, so seqs are
//!    dense and never reused, whoever writes and however stale the counter.
//! 3. Settle the claim with the seq, raise `latest_seq` (`IF latest_seq <
//!    ?`), and index a direct conversation's first message for both users.
//!
//! What has run against a live cluster: nothing (no CQL server can be
//! installed where this was written); `docs/storage.md` says so. The
//! conformance suite runs against it when `SCYLLA_URI` is set
//! (`storage/tests/conformance_scylla.rs`).

pub mod cql;
pub mod rows;

use std::time::Duration;

use ::scylla::client::execution_profile::ExecutionProfile;
use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use ::scylla::response::query_result::QueryResult;
use ::scylla::serialize::row::SerializeRow;
use ::scylla::statement::prepared::PreparedStatement;
use ::scylla::statement::{Consistency, SerialConsistency};
use ::scylla::value::{CqlValue, Row};
use async_trait::async_trait;

use self::rows::{MessageRow, id_to_i64};
use crate::checks::{
    RecordLookups, admit_sender, check_id, check_message_shape, check_username, timeline_page,
};
use crate::codec::{ConversationKey, member, role_code, role_from_code};
use crate::{
    Appended, ConversationId, ConversationStore, DeadLetter, DeadLetterStore, DeviceRecord,
    GroupId, GroupRecord, MAX_PAGE, Member, MessageStore, NewMessage, Role, Seq, StoreError,
    StoreResult, StoredMessage, UserId, UserRecord, UserStore, WatermarkStore, Watermarks,
};

/// A claim older than this whose writer never settled it is taken over.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the cluster is (the gateway's `storage.scylla_nodes`; tests:
/// `SCYLLA_URI`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace, created if missing (`[a-z0-9_]`, at most 48).
    pub keyspace: String,
    /// Replicas per partition when the keyspace is created.
    pub replication_factor: u32,
    /// Longest wait for one request (and for connecting).
    pub timeout: Duration,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "pingme".into(),
            replication_factor: 3,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Whether `name` may name the keyspace: 1-48 of `[a-z0-9_]` (it is
/// spliced into `CREATE KEYSPACE`; identifiers cannot be bound).
pub fn is_valid_keyspace(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("scylla: {error}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The statements, prepared once.
struct Prepared {
    by_text: std::collections::HashMap<&'static str, PreparedStatement>,
}

impl Prepared {
    fn get(&self, text: &'static str) -> &PreparedStatement {
        // Every text used is in `cql::PREPARED` (a unit test checks the list).
        &self.by_text[text]
    }
}

/// The ScyllaDB store.
pub struct ScyllaStore {
    session: Session,
    prepared: Prepared,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore").finish_non_exhaustive()
    }
}

/// The `[applied]` column of a conditional statement's answer.
fn applied(result: QueryResult) -> StoreResult<bool> {
    let rows = result.into_rows_result().map_err(unavailable)?;
    let row: Row = rows.first_row().map_err(unavailable)?;
    match row.columns.first() {
        Some(Some(CqlValue::Boolean(applied))) => Ok(*applied),
        _ => Err(StoreError::Corrupt("LWT answer without [applied]".into())),
    }
}

impl ScyllaStore {
    /// Connects, creates the keyspace and tables if missing, and prepares
    /// every statement. Consistency: `LOCAL_QUORUM`, LWT at `LOCAL_SERIAL`.
    pub async fn connect(config: &ScyllaConfig) -> StoreResult<ScyllaStore> {
        let keyspace = &config.keyspace;
        if !is_valid_keyspace(keyspace) {
            return Err(StoreError::Invalid(format!(
                "keyspace {keyspace:?} must be 1-48 of [a-z0-9_]"
            )));
        }
        let profile = ExecutionProfile::builder()
            .consistency(Consistency::LocalQuorum)
            .serial_consistency(Some(SerialConsistency::LocalSerial))
            .request_timeout(Some(config.timeout))
            .build()
            .into_handle();
        let session = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(config.timeout)
            .default_execution_profile_handle(profile)
            .build()
            .await
            .map_err(unavailable)?;
        session
            .query_unpaged(
                cql::create_keyspace(keyspace, config.replication_factor),
                &[],
            )
            .await
            .map_err(unavailable)?;
        session
            .use_keyspace(keyspace, false)
            .await
            .map_err(unavailable)?;
        for table in cql::TABLES {
            session
                .query_unpaged(*table, &[])
                .await
                .map_err(unavailable)?;
        }
        session
            .await_schema_agreement()
            .await
            .map_err(unavailable)?;
        let mut by_text = std::collections::HashMap::new();
        for &text in cql::PREPARED {
            by_text.insert(text, session.prepare(text).await.map_err(unavailable)?);
        }
        Ok(ScyllaStore {
            session,
            prepared: Prepared { by_text },
        })
    }

    async fn run(&self, text: &'static str, values: impl SerializeRow) -> StoreResult<QueryResult> {
        self.session
            .execute_unpaged(self.prepared.get(text), values)
            .await
            .map_err(unavailable)
    }

    /// Runs a conditional statement and answers whether it applied.
    async fn lwt(&self, text: &'static str, values: impl SerializeRow) -> StoreResult<bool> {
        applied(self.run(text, values).await?)
    }

    /// The rows of a read, typed.
    async fn rows<R>(&self, text: &'static str, values: impl SerializeRow) -> StoreResult<Vec<R>>
    where
        R: for<'f, 'm> ::scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let rows = self
            .run(text, values)
            .await?
            .into_rows_result()
            .map_err(unavailable)?;
        rows.rows::<R>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .map(|row| row.map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    async fn first<R>(
        &self,
        text: &'static str,
        values: impl SerializeRow,
    ) -> StoreResult<Option<R>>
    where
        R: for<'f, 'm> ::scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        Ok(self.rows(text, values).await?.into_iter().next())
    }

    /// The next id of a counter (ascending, never reused): LWT on its row.
    async fn next_id(&self, counter: &str) -> StoreResult<u64> {
        loop {
            match self.first::<(i64,)>(cql::READ_COUNTER, (counter,)).await? {
                None => {
                    if self.lwt(cql::START_COUNTER, (counter, 2i64)).await? {
                        return Ok(1);
                    }
                }
                Some((next,)) => {
                    if self
                        .lwt(cql::ADVANCE_COUNTER, (next + 1, counter, next))
                        .await?
                    {
                        return Ok(next as u64);
                    }
                }
            }
        }
    }

    async fn latest_seq(&self, key: &[u8]) -> StoreResult<Seq> {
        Ok(self
            .first::<(i64,)>(cql::LATEST_SEQ, (key,))
            .await?
            .map_or(0, |(s,)| s as u64))
    }

    async fn message_at(
        &self,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<Option<StoredMessage>> {
        let key = ConversationKey::new(conversation).to_vec();
        Ok(self
            .first::<MessageRow>(cql::MESSAGE, (key, cql::bucket_of(seq), seq as i64))
            .await?
            .map(|row| rows::message(conversation, row)))
    }

    /// Raises a value kept by `start` (insert if missing) and `raise`
    /// (`IF value < ?`) to at least `seq`.
    async fn raise(
        &self,
        start: &'static str,
        raise: &'static str,
        key: &(dyn RaiseKey + Sync),
        seq: Seq,
    ) -> StoreResult<()> {
        let seq = seq as i64;
        if self.lwt(start, key.with_last(seq)).await? {
            return Ok(());
        }
        // Not applied: either the stored value is already >= seq, or we
        // raised it; both leave it >= seq.
        self.lwt(raise, key.raise_values(seq)).await.map(|_| ())
    }

    /// Appends one checked message (see the module doc).
    async fn append_one(&self, message: &NewMessage) -> StoreResult<Appended> {
        let sender = id_to_i64(message.sender);
        let client_msg_id = message.client_msg_id.as_str();
        let conversation = ConversationKey::new(message.conversation).to_vec();
        let claimed = self
            .lwt(
                cql::CLAIM_KEY,
                (sender, client_msg_id, &conversation, now_ms()),
            )
            .await?;
        if !claimed {
            // Someone holds the key: answer their message once settled, or
            // take over a claim whose writer died.
            let deadline = tokio::time::Instant::now() + CLAIM_TIMEOUT;
            let mut pause = Duration::from_millis(5);
            loop {
                let Some(row) = self
                    .first::<rows::KeyRow>(cql::READ_KEY, (sender, client_msg_id))
                    .await?
                else {
                    return Err(StoreError::Unavailable("idempotency claim vanished".into()));
                };
                let (first_conversation, seq, trying, claim) = rows::key(row)?;
                if seq > 0 {
                    let first =
                        self.message_at(first_conversation, seq)
                            .await?
                            .ok_or_else(|| {
                                StoreError::Corrupt(format!(
                                    "settled key without its message at {seq}"
                                ))
                            })?;
                    return Ok(Appended {
                        message: first,
                        duplicate: true,
                    });
                }
                if now_ms() - claim >= CLAIM_TIMEOUT.as_millis() as i64
                    || tokio::time::Instant::now() >= deadline
                {
                    let now = now_ms();
                    if self
                        .lwt(cql::TAKE_OVER_KEY, (now, sender, client_msg_id, claim))
                        .await?
                    {
                        // The dead writer may have stored it already.
                        if trying > 0
                            && let Some(stored) =
                                self.message_at(first_conversation, trying).await?
                            && stored.sender == message.sender
                            && stored.client_msg_id == message.client_msg_id
                        {
                            self.settle(&stored).await?;
                            return Ok(Appended {
                                message: stored,
                                duplicate: true,
                            });
                        }
                        break;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
        let mut seq = self.latest_seq(&conversation).await?;
        let stored = loop {
            seq += 1;
            self.run(cql::TRYING_SEQ, (seq as i64, sender, client_msg_id))
                .await?;
            let row = rows::message_insert(message, seq);
            let applied = self
                .lwt(
                    cql::INSERT_MESSAGE,
                    (
                        &conversation,
                        cql::bucket_of(seq),
                        row.0,
                        row.1,
                        row.2,
                        row.3,
                        row.4,
                        row.5,
                        row.6,
                        row.7,
                    ),
                )
                .await?;
            if applied {
                break rows::stored(message, seq);
            }
        };
        self.settle(&stored).await?;
        Ok(Appended {
            message: stored,
            duplicate: false,
        })
    }

    /// Settles a stored message's claim, raises the conversation's latest
    /// seq, and indexes a direct conversation's first message.
    async fn settle(&self, stored: &StoredMessage) -> StoreResult<()> {
        let conversation = ConversationKey::new(stored.conversation).to_vec();
        self.run(
            cql::SETTLE_KEY,
            (
                stored.seq as i64,
                id_to_i64(stored.sender),
                stored.client_msg_id.as_str(),
            ),
        )
        .await?;
        self.raise(
            cql::START_LATEST,
            cql::RAISE_LATEST,
            &LatestKey(conversation.clone()),
            stored.seq,
        )
        .await?;
        if let ConversationId::Direct { low, high } = stored.conversation {
            for user in [low, high] {
                self.run(cql::INDEX_CONVERSATION, (id_to_i64(user), &conversation))
                    .await?;
            }
        }
        Ok(())
    }

    async fn check_member(&self, message: &NewMessage) -> StoreResult<()> {
        check_message_shape(message)?;
        let is_member = self.member_of(message.conversation, message.sender).await?;
        admit_sender(message, is_member)
    }
}

/// The key columns of a raised value, and how its two statements bind them.
trait RaiseKey {
    /// Values of the `START_*` insert: the key, then the value.
    fn with_last(&self, seq: i64) -> Vec<CqlValue>;
    /// Values of the `RAISE_*` update: the value, the key, the bound.
    fn raise_values(&self, seq: i64) -> Vec<CqlValue>;
}

struct LatestKey(Vec<u8>);

impl RaiseKey for LatestKey {
    fn with_last(&self, seq: i64) -> Vec<CqlValue> {
        vec![CqlValue::Blob(self.0.clone()), CqlValue::BigInt(seq)]
    }
    fn raise_values(&self, seq: i64) -> Vec<CqlValue> {
        vec![
            CqlValue::BigInt(seq),
            CqlValue::Blob(self.0.clone()),
            CqlValue::BigInt(seq),
        ]
    }
}

/// The key of a watermark row: (user, device?, conversation).
struct MarkKey {
    user: i64,
    device: Option<String>,
    conversation: Vec<u8>,
}

impl MarkKey {
    fn key(&self) -> Vec<CqlValue> {
        let mut key = vec![CqlValue::BigInt(self.user)];
        if let Some(device) = &self.device {
            key.push(CqlValue::Text(device.clone()));
        }
        key.push(CqlValue::Blob(self.conversation.clone()));
        key
    }
}

impl RaiseKey for MarkKey {
    fn with_last(&self, seq: i64) -> Vec<CqlValue> {
        let mut values = self.key();
        values.push(CqlValue::BigInt(seq));
        values
    }
    fn raise_values(&self, seq: i64) -> Vec<CqlValue> {
        let mut values = vec![CqlValue::BigInt(seq)];
        values.extend(self.key());
        values.push(CqlValue::BigInt(seq));
        values
    }
}

#[async_trait]
impl RecordLookups for ScyllaStore {
    async fn group_record(&self, id: GroupId) -> StoreResult<Option<GroupRecord>> {
        let Some(row) = self
            .first::<rows::GroupRow>(cql::GROUP, (id_to_i64(id),))
            .await?
        else {
            return Ok(None);
        };
        let count = self
            .first::<(i64,)>(cql::MEMBER_COUNT, (id_to_i64(id),))
            .await?
            .map_or(0, |(c,)| c);
        Ok(Some(rows::group(row, count)))
    }

    async fn require_distinct_users(&self, users: &[UserId]) -> StoreResult<()> {
        for &user in users {
            if self.user_by_id(user).await?.is_none() {
                return Err(StoreError::NotFound(format!("user {user}")));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl UserStore for ScyllaStore {
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord> {
        check_username(username)?;
        // The id is drawn first; a name lost to a racing registration
        // leaves a gap, which ids may have (they only ascend).
        let id = self.next_id("user").await?;
        if !self
            .lwt(cql::CLAIM_USERNAME, (username, id_to_i64(id)))
            .await?
        {
            return Err(StoreError::Conflict(format!(
                "username {username:?} is taken"
            )));
        }
        self.run(
            cql::INSERT_USER,
            (id_to_i64(id), username, password_hash, now_ms),
        )
        .await?;
        Ok(UserRecord {
            id,
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            created_ms: now_ms,
        })
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        match self
            .first::<(i64,)>(cql::USER_ID_BY_NAME, (username,))
            .await?
        {
            Some((id,)) => self.user_by_id(id as u64).await,
            None => Ok(None),
        }
    }

    async fn user_by_id(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        Ok(self
            .first::<rows::UserRow>(cql::USER_BY_ID, (id_to_i64(id),))
            .await?
            .map(rows::user))
    }

    async fn touch_device(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord> {
        self.check_device_owner(user, device_id).await?;
        let user_key = id_to_i64(user);
        if !self
            .lwt(cql::CREATE_DEVICE, (user_key, device_id, now_ms))
            .await?
        {
            self.run(cql::TOUCH_DEVICE, (now_ms, user_key, device_id))
                .await?;
        }
        self.device(user, device_id)
            .await?
            .ok_or_else(|| StoreError::Unavailable("device vanished after its write".into()))
    }

    async fn device(&self, user: UserId, device_id: &str) -> StoreResult<Option<DeviceRecord>> {
        Ok(self
            .first::<rows::DeviceRow>(cql::DEVICE, (id_to_i64(user), device_id))
            .await?
            .map(rows::device))
    }

    async fn bump_token_generation(&self, user: UserId, device_id: &str) -> StoreResult<u64> {
        loop {
            let device = self.device(user, device_id).await?.ok_or_else(|| {
                StoreError::NotFound(format!("device {device_id:?} of user {user}"))
            })?;
            let current = device.token_generation as i64;
            if self
                .lwt(
                    cql::BUMP_GENERATION,
                    (current + 1, id_to_i64(user), device_id, current),
                )
                .await?
            {
                return Ok(device.token_generation + 1);
            }
        }
    }
}

#[async_trait]
impl ConversationStore for ScyllaStore {
    async fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        now_ms: i64,
    ) -> StoreResult<GroupRecord> {
        let everyone: Vec<UserId> = std::iter::once(owner)
            .chain(members.iter().copied())
            .collect();
        self.require_users(&everyone).await?;
        let id = self.next_id("group").await?;
        self.run(
            cql::INSERT_GROUP,
            (id_to_i64(id), name, id_to_i64(owner), now_ms),
        )
        .await?;
        let mut roster = vec![Member {
            user: owner,
            role: Role::Owner,
        }];
        roster.extend(members.iter().map(|&user| Member {
            user,
            role: Role::Member,
        }));
        let added = self.add_members(id, &roster).await?;
        Ok(GroupRecord {
            id,
            name: name.to_string(),
            owner,
            member_count: added,
            created_ms: now_ms,
        })
    }

    async fn group(&self, id: GroupId) -> StoreResult<Option<GroupRecord>> {
        self.group_record(id).await
    }

    async fn add_members(&self, group: GroupId, members: &[Member]) -> StoreResult<u64> {
        if self
            .first::<rows::GroupRow>(cql::GROUP, (id_to_i64(group),))
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!("group {group}")));
        }
        let users: Vec<UserId> = members.iter().map(|m| m.user).collect();
        self.require_users(&users).await?;
        let conversation = ConversationKey::new(ConversationId::Group(group)).to_vec();
        let mut added = 0i64;
        for member in members {
            // LWT: two admins adding one user concurrently count them once.
            let user = id_to_i64(member.user);
            if self
                .lwt(
                    cql::INSERT_MEMBER,
                    (id_to_i64(group), user, role_code(member.role) as i8),
                )
                .await?
            {
                added += 1;
                self.run(cql::INDEX_CONVERSATION, (user, &conversation))
                    .await?;
            }
        }
        if added > 0 {
            self.run(
                cql::ADD_MEMBER_COUNT,
                (::scylla::value::Counter(added), id_to_i64(group)),
            )
            .await?;
        }
        Ok(added as u64)
    }

    async fn remove_member(&self, group: GroupId, user: UserId) -> StoreResult<bool> {
        self.require_conversation(ConversationId::Group(group))
            .await?;
        let removed = self
            .lwt(cql::REMOVE_MEMBER, (id_to_i64(group), id_to_i64(user)))
            .await?;
        if removed {
            let conversation = ConversationKey::new(ConversationId::Group(group)).to_vec();
            self.run(cql::UNINDEX_CONVERSATION, (id_to_i64(user), conversation))
                .await?;
            self.run(
                cql::ADD_MEMBER_COUNT,
                (::scylla::value::Counter(-1), id_to_i64(group)),
            )
            .await?;
        }
        Ok(removed)
    }

    async fn member_role(&self, group: GroupId, user: UserId) -> StoreResult<Option<Role>> {
        self.first::<(i8,)>(cql::MEMBER_ROLE, (id_to_i64(group), id_to_i64(user)))
            .await?
            .map(|(code,)| role_from_code(code as u8))
            .transpose()
    }

    async fn is_member(&self, conversation: ConversationId, user: UserId) -> StoreResult<bool> {
        self.member_of(conversation, user).await
    }

    async fn members_page(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> StoreResult<Vec<Member>> {
        self.require_conversation(ConversationId::Group(group))
            .await?;
        let limit = limit.min(MAX_PAGE);
        if limit == 0 || after >= i64::MAX as u64 {
            return Ok(Vec::new());
        }
        self.rows::<(i64, i8)>(
            cql::MEMBERS_PAGE,
            (id_to_i64(group), id_to_i64(after), limit as i32),
        )
        .await?
        .into_iter()
        .map(|(user, code)| member(user as u64, code as u8))
        .collect()
    }

    async fn user_conversations(
        &self,
        user: UserId,
        after: Option<ConversationId>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationId>> {
        self.require_users(&[user]).await?;
        let limit = limit.min(MAX_PAGE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after
            .map(|c| ConversationKey::new(c).to_vec())
            .unwrap_or_default();
        self.rows::<(Vec<u8>,)>(
            cql::USER_CONVERSATIONS,
            (id_to_i64(user), after, limit as i32),
        )
        .await?
        .into_iter()
        .map(|(key,)| crate::codec::conversation_from_key(&key))
        .collect()
    }
}

#[async_trait]
impl MessageStore for ScyllaStore {
    async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<StoreResult<Appended>>> {
        let mut answers = Vec::with_capacity(batch.len());
        for message in &batch {
            match self.check_member(message).await {
                // A failure to store is the outer error only before anything
                // of the batch was stored; after, it is this message's.
                Ok(()) => match self.append_one(message).await {
                    Err(error @ StoreError::Unavailable(_)) if answers.is_empty() => {
                        return Err(error);
                    }
                    answer => answers.push(answer),
                },
                Err(error @ StoreError::Unavailable(_)) if answers.is_empty() => return Err(error),
                Err(error) => answers.push(Err(error)),
            }
        }
        Ok(answers)
    }

    async fn messages(
        &self,
        conversation: ConversationId,
        after: Seq,
        until: Seq,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.require_conversation(conversation).await?;
        let Some(limit) = timeline_page(after, until, limit) else {
            return Ok(Vec::new());
        };
        let key = ConversationKey::new(conversation).to_vec();
        let until = if until == 0 {
            self.latest_seq(&key).await?
        } else {
            until
        };
        let mut page = Vec::new();
        if until <= after {
            return Ok(page);
        }
        for bucket in cql::buckets(after, until) {
            let left = limit - page.len();
            if left == 0 {
                break;
            }
            let rows = self
                .rows::<MessageRow>(
                    cql::MESSAGES_PAGE,
                    (&key, bucket, after as i64, until as i64, left as i32),
                )
                .await?;
            page.extend(rows.into_iter().map(|row| rows::message(conversation, row)));
        }
        Ok(page)
    }

    async fn latest_seqs(&self, conversations: &[ConversationId]) -> StoreResult<Vec<Seq>> {
        let mut seqs = Vec::with_capacity(conversations.len());
        for &conversation in conversations {
            seqs.push(
                self.latest_seq(ConversationKey::new(conversation).as_bytes())
                    .await?,
            );
        }
        Ok(seqs)
    }
}

#[async_trait]
impl WatermarkStore for ScyllaStore {
    async fn set_delivered(
        &self,
        user: UserId,
        device_id: &str,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()> {
        check_id("device_id", device_id, false)?;
        let key = MarkKey {
            user: id_to_i64(user),
            device: Some(device_id.to_string()),
            conversation: ConversationKey::new(conversation).to_vec(),
        };
        self.raise(cql::START_DELIVERED, cql::RAISE_DELIVERED, &key, seq)
            .await
    }

    async fn set_read(
        &self,
        user: UserId,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()> {
        let key = MarkKey {
            user: id_to_i64(user),
            device: None,
            conversation: ConversationKey::new(conversation).to_vec(),
        };
        self.raise(cql::START_READ_MARK, cql::RAISE_READ_MARK, &key, seq)
            .await
    }

    async fn watermarks(
        &self,
        user: UserId,
        device_id: &str,
        conversations: &[ConversationId],
    ) -> StoreResult<Vec<Watermarks>> {
        let mut marks = Vec::with_capacity(conversations.len());
        for &conversation in conversations {
            let key = ConversationKey::new(conversation).to_vec();
            let delivered = self
                .first::<(i64,)>(cql::DELIVERED, (id_to_i64(user), device_id, &key))
                .await?
                .map_or(0, |(s,)| s as u64);
            let read = self
                .first::<(i64,)>(cql::READ_MARK, (id_to_i64(user), &key))
                .await?
                .map_or(0, |(s,)| s as u64);
            marks.push(Watermarks { delivered, read });
        }
        Ok(marks)
    }
}

#[async_trait]
impl DeadLetterStore for ScyllaStore {
    async fn put_dead_letter(&self, letter: DeadLetter) -> StoreResult<u64> {
        let id = self.next_id("dead_letter").await?;
        self.run(
            cql::INSERT_DEAD_LETTER,
            (
                id_to_i64(id),
                letter.kind.as_str(),
                letter.payload.as_slice(),
                letter.code as i32,
                letter.error.as_str(),
                letter.attempts as i32,
                letter.created_ms,
            ),
        )
        .await?;
        Ok(id)
    }

    async fn dead_letters(&self, after: u64, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        let limit = limit.min(MAX_PAGE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .rows::<rows::DeadLetterRow>(cql::DEAD_LETTERS, (id_to_i64(after), limit as i32))
            .await?
            .into_iter()
            .map(rows::dead_letter)
            .collect())
    }

    async fn remove_dead_letter(&self, id: u64) -> StoreResult<bool> {
        self.lwt(cql::REMOVE_DEAD_LETTER, (id_to_i64(id),)).await
    }

    async fn dead_letter_count(&self) -> StoreResult<u64> {
        Ok(self
            .first::<(i64,)>(cql::COUNT_DEAD_LETTERS, ())
            .await?
            .map_or(0, |(c,)| c as u64))
    }
}
