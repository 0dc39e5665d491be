//! Messages in MySQL: validation on the caller's task, then group commit.
//!
//! `append` callers check their messages (shape, membership: a query per
//! conversation of the call) and queue them. One writer task per store
//! takes everything queued (up to [`MAX_ROUND_REQUESTS`] calls) and
//! commits it as one transaction:
//!
//! 1. upsert and lock the round's `conversations` rows in ascending key
//!    order (the lock order every writer uses, so two servers' rounds wait
//!    for each other instead of deadlocking) and read their `latest_seq`;
//! 2. look up the round's idempotency keys: known keys are answered as
//!    duplicates (also repeats inside the round);
//! 3. multi-row insert of the new messages with the next seqs, in arrival
//!    order; advance `latest_seq`; index a direct conversation's first
//!    message for both users;
//! 4. commit (InnoDB with `innodb_flush_log_at_trx_commit=1`: durable).
//!
//! Nothing is answered before the commit returns. A round that loses a race
//! on an idempotency key (another server committed the same key in another
//! conversation), a deadlock or a lock wait timeout is rolled back and
//! redone, up to [`ROUND_ATTEMPTS`] times; any other failure answers every
//! caller of the round `Unavailable` (nothing of theirs is known stored,
//! and idempotency makes their retry exact).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use sqlx::{MySql, MySqlPool, QueryBuilder, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::records::{self, MESSAGE_COLUMNS};
use super::{ER_DUP_ENTRY, MysqlStore, error_number, page_limit, push_in_list, sql};
use crate::checks::{RecordLookups, check_message_shape, not_member, timeline_page};
use crate::codec::{ConversationKey, conversation_from_key, idempotency_key};
use crate::{
    Appended, CommitStats, ConversationId, MAX_PAGE, MessageStore, NewMessage, Seq, StoreError,
    StoreResult, StoredMessage, UserId,
};

/// Most `append` calls one round commits.
const MAX_ROUND_REQUESTS: usize = 512;
/// Calls that may wait for the writer; more wait in `append` itself
/// (backpressure instead of an unbounded queue).
const QUEUE_CAPACITY: usize = 4096;
/// How often a round is redone after a lost race, deadlock or lock timeout.
const ROUND_ATTEMPTS: u32 = 5;
/// Body bytes per multi-row insert, well under MariaDB's default 16 MiB
/// `max_allowed_packet`.
const INSERT_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Rows per multi-row statement (10 placeholders a row, under the 65,535
/// placeholder limit).
const ROWS_PER_STATEMENT: usize = 1000;

/// ER_LOCK_DEADLOCK and ER_LOCK_WAIT_TIMEOUT: the round may simply be redone.
const ER_LOCK_DEADLOCK: u16 = 1213;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

type Answer = StoreResult<Vec<StoreResult<Appended>>>;

/// One `append` call: each message checked (`Ok`) or its typed error.
struct AppendRequest {
    messages: Vec<StoreResult<NewMessage>>,
    reply: oneshot::Sender<Answer>,
}

enum Command {
    Append(AppendRequest),
    /// Finish what is queued, then stop.
    Close(oneshot::Sender<()>),
}

#[derive(Default)]
struct Stats {
    rounds: AtomicU64,
    messages: AtomicU64,
}

/// The handle `append` callers queue through.
#[derive(Clone)]
pub(super) struct AppendQueue {
    commands: mpsc::Sender<Command>,
    stats: Arc<Stats>,
}

impl AppendQueue {
    /// Starts the writer task on the current runtime.
    pub fn start(pool: MySqlPool) -> AppendQueue {
        let (commands, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run_writer(pool, receiver, stats.clone()));
        AppendQueue { commands, stats }
    }

    async fn push(&self, messages: Vec<StoreResult<NewMessage>>) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append(AppendRequest { messages, reply }))
            .await
            .map_err(|_| StoreError::Unavailable("mysql store is closed".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("mysql append writer stopped".into()))?
    }

    /// Waits for the writer to answer everything queued and stop.
    pub async fn close(&self) {
        let (done, stopped) = oneshot::channel();
        if self.commands.send(Command::Close(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }

    pub fn stats(&self) -> CommitStats {
        CommitStats {
            rounds: self.stats.rounds.load(Ordering::Relaxed),
            messages: self.stats.messages.load(Ordering::Relaxed),
        }
    }
}

async fn run_writer(pool: MySqlPool, mut receiver: mpsc::Receiver<Command>, stats: Arc<Stats>) {
    let mut commands = Vec::with_capacity(MAX_ROUND_REQUESTS);
    let mut closed = None;
    while closed.is_none() && receiver.recv_many(&mut commands, MAX_ROUND_REQUESTS).await > 0 {
        let mut requests = Vec::with_capacity(commands.len());
        for command in commands.drain(..) {
            match command {
                Command::Append(request) => requests.push(request),
                // Calls queued after the close are refused: the sender side
                // is dropped below.
                Command::Close(done) => closed = Some(done),
            }
        }
        if requests.is_empty() {
            continue;
        }
        let answers = commit_round(&pool, &requests).await;
        stats.rounds.fetch_add(1, Ordering::Relaxed);
        let count: usize = requests.iter().map(|r| r.messages.len()).sum();
        stats.messages.fetch_add(count as u64, Ordering::Relaxed);
        match answers {
            Ok(answers) => {
                for (request, answer) in requests.into_iter().zip(answers) {
                    let _ = request.reply.send(Ok(answer));
                }
            }
            Err(error) => {
                tracing::warn!(%error, calls = requests.len(), "mysql append round failed");
                for request in requests {
                    let _ = request.reply.send(Err(error.clone()));
                }
            }
        }
    }
    drop(receiver);
    if let Some(done) = closed {
        let _ = done.send(());
    }
}

/// A checked message of the round, with its keys encoded once.
struct Pending<'a> {
    message: &'a NewMessage,
    conversation: Vec<u8>,
    idempotency: Vec<u8>,
}

/// Commits a round, redoing it after a lost race; answers per call.
async fn commit_round(
    pool: &MySqlPool,
    requests: &[AppendRequest],
) -> StoreResult<Vec<Vec<StoreResult<Appended>>>> {
    let pending: Vec<Pending> = requests
        .iter()
        .flat_map(|r| r.messages.iter())
        .filter_map(|m| m.as_ref().ok())
        .map(|message| Pending {
            message,
            conversation: ConversationKey::new(message.conversation).to_vec(),
            idempotency: idempotency_key(message.sender, &message.client_msg_id),
        })
        .collect();
    let mut attempt = 1;
    let mut stored = loop {
        match try_round(pool, &pending).await {
            Ok(stored) => break stored.into_iter(),
            Err(error) => {
                let retry = matches!(
                    error_number(&error),
                    Some(ER_DUP_ENTRY | ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)
                );
                if !retry || attempt >= ROUND_ATTEMPTS {
                    return Err(StoreError::Unavailable(format!(
                        "mysql append (attempt {attempt}): {error}"
                    )));
                }
                tracing::debug!(%error, attempt, "mysql append round redone");
                attempt += 1;
            }
        }
    };
    // Put the round's answers back in each call's shape.
    Ok(requests
        .iter()
        .map(|request| {
            request
                .messages
                .iter()
                .map(|checked| match checked {
                    Ok(_) => stored.next().ok_or_else(|| {
                        StoreError::Unavailable("mysql append: answer missing".into())
                    }),
                    Err(error) => Err(error.clone()),
                })
                .collect()
        })
        .collect())
}

/// One attempt at a round: the answers of `pending`, in order.
async fn try_round(
    pool: &MySqlPool,
    pending: &[Pending<'_>],
) -> Result<Vec<Appended>, sqlx::Error> {
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    let mut latest = lock_conversations(&mut tx, pending).await?;
    let was_silent: Vec<Vec<u8>> = latest
        .iter()
        .filter(|(_, seq)| **seq == 0)
        .map(|(key, _)| key.clone())
        .collect();
    let mut known = known_messages(&mut tx, pending).await?;

    let mut answers = Vec::with_capacity(pending.len());
    let mut fresh: Vec<(&Pending, StoredMessage)> = Vec::new();
    for p in pending {
        if let Some(first) = known.get(&p.idempotency) {
            answers.push(Appended {
                message: first.clone(),
                duplicate: true,
            });
            continue;
        }
        let seq = latest.entry(p.conversation.clone()).or_insert(0);
        *seq += 1;
        let m = p.message;
        let message = StoredMessage {
            conversation: m.conversation,
            seq: *seq,
            msg_id: m.msg_id.clone(),
            sender: m.sender,
            sender_device: m.sender_device.clone(),
            client_msg_id: m.client_msg_id.clone(),
            content_type: m.content_type,
            body: m.body.clone(),
            server_time_ms: m.server_time_ms,
        };
        known.insert(p.idempotency.clone(), message.clone());
        answers.push(Appended {
            message: message.clone(),
            duplicate: false,
        });
        fresh.push((p, message));
    }
    if !fresh.is_empty() {
        insert_messages(&mut tx, &fresh).await?;
        advance_latest(&mut tx, &latest).await?;
        index_first_direct_messages(&mut tx, &was_silent, &latest).await?;
    }
    tx.commit().await?;
    Ok(answers)
}

/// Creates missing counter rows, locks every counter of the round in
/// ascending key order, and returns their `latest_seq`.
async fn lock_conversations(
    tx: &mut Transaction<'static, MySql>,
    pending: &[Pending<'_>],
) -> Result<BTreeMap<Vec<u8>, Seq>, sqlx::Error> {
    let keys: Vec<&[u8]> = {
        let mut keys: Vec<&[u8]> = pending.iter().map(|p| p.conversation.as_slice()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    };
    let mut latest = BTreeMap::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut upsert =
            QueryBuilder::<MySql>::new("INSERT INTO conversations (conversation_id, latest_seq) ");
        upsert.push_values(chunk, |mut row, key| {
            row.push_bind(*key).push_bind(0u64);
        });
        upsert.push(" ON DUPLICATE KEY UPDATE latest_seq = latest_seq");
        upsert.build().execute(&mut **tx).await?;
        let mut select = QueryBuilder::<MySql>::new(
            "SELECT conversation_id, latest_seq FROM conversations WHERE conversation_id IN ",
        );
        push_in_list(&mut select, chunk.iter().copied());
        select.push(" ORDER BY conversation_id FOR UPDATE");
        for row in select.build().fetch_all(&mut **tx).await? {
            latest.insert(row.try_get::<Vec<u8>, _>(0)?, row.try_get::<u64, _>(1)?);
        }
    }
    Ok(latest)
}

/// The stored messages of the round's idempotency keys that exist already.
async fn known_messages(
    tx: &mut Transaction<'static, MySql>,
    pending: &[Pending<'_>],
) -> Result<HashMap<Vec<u8>, StoredMessage>, sqlx::Error> {
    let mut keys: Vec<&[u8]> = pending.iter().map(|p| p.idempotency.as_slice()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut known = HashMap::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut select = QueryBuilder::<MySql>::new(format!(
            "SELECT {MESSAGE_COLUMNS}, idempotency_key FROM messages WHERE idempotency_key IN "
        ));
        push_in_list(&mut select, chunk.iter().copied());
        for row in select.build().fetch_all(&mut **tx).await? {
            let message = records::message(&row).map_err(|e| sqlx::Error::Decode(e.into()))?;
            known.insert(row.try_get::<Vec<u8>, _>("idempotency_key")?, message);
        }
    }
    Ok(known)
}

async fn insert_messages(
    tx: &mut Transaction<'static, MySql>,
    fresh: &[(&Pending<'_>, StoredMessage)],
) -> Result<(), sqlx::Error> {
    let mut start = 0;
    while start < fresh.len() {
        // Cut statements by rows and by body bytes.
        let mut end = start;
        let mut bytes = 0;
        while end < fresh.len()
            && end - start < ROWS_PER_STATEMENT
            && (end == start || bytes + fresh[end].1.body.len() <= INSERT_BODY_BYTES)
        {
            bytes += fresh[end].1.body.len();
            end += 1;
        }
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT INTO messages (conversation_id, seq, idempotency_key, msg_id, sender_id, \
             sender_device, client_msg_id, content_type, body, server_time_ms) ",
        );
        insert.push_values(&fresh[start..end], |mut row, (p, m)| {
            row.push_bind(p.conversation.as_slice())
                .push_bind(m.seq)
                .push_bind(p.idempotency.as_slice())
                .push_bind(m.msg_id.as_str())
                .push_bind(m.sender)
                .push_bind(m.sender_device.as_str())
                .push_bind(m.client_msg_id.as_str())
                .push_bind(m.content_type)
                .push_bind(m.body.as_ref())
                .push_bind(m.server_time_ms);
        });
        insert.build().execute(&mut **tx).await?;
        start = end;
    }
    Ok(())
}

async fn advance_latest(
    tx: &mut Transaction<'static, MySql>,
    latest: &BTreeMap<Vec<u8>, Seq>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<(&Vec<u8>, &Seq)> = latest.iter().collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut upsert =
            QueryBuilder::<MySql>::new("INSERT INTO conversations (conversation_id, latest_seq) ");
        upsert.push_values(chunk, |mut row, (key, seq)| {
            row.push_bind(key.as_slice()).push_bind(**seq);
        });
        upsert.push(" ON DUPLICATE KEY UPDATE latest_seq = VALUES(latest_seq)");
        upsert.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A direct conversation appears in both users' lists with its first message.
async fn index_first_direct_messages(
    tx: &mut Transaction<'static, MySql>,
    was_silent: &[Vec<u8>],
    latest: &BTreeMap<Vec<u8>, Seq>,
) -> Result<(), sqlx::Error> {
    let mut rows: Vec<(UserId, &[u8])> = Vec::new();
    for key in was_silent {
        if latest.get(key).copied().unwrap_or(0) == 0 {
            continue;
        }
        if let Ok(ConversationId::Direct { low, high }) = conversation_from_key(key) {
            rows.push((low, key));
            rows.push((high, key));
        }
    }
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO user_conversations (user_id, conversation_id) ",
        );
        insert.push_values(chunk, |mut row, (user, key)| {
            row.push_bind(*user).push_bind(*key);
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}

impl MysqlStore {
    /// Checks every message of a call: shape first, then membership with
    /// one query per conversation of the call. The outer error means the
    /// checks could not run.
    async fn check_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> StoreResult<Vec<StoreResult<NewMessage>>> {
        let mut members: HashMap<(ConversationId, UserId), StoreResult<()>> = HashMap::new();
        let mut senders: BTreeMap<ConversationId, Vec<UserId>> = BTreeMap::new();
        for message in &batch {
            if check_message_shape(message).is_ok() {
                senders
                    .entry(message.conversation)
                    .or_default()
                    .push(message.sender);
            }
        }
        for (conversation, mut users) in senders {
            users.sort_unstable();
            users.dedup();
            let admitted = self.members_among(conversation, &users).await?;
            for (user, verdict) in users.into_iter().zip(admitted) {
                members.insert((conversation, user), verdict);
            }
        }
        Ok(batch
            .into_iter()
            .map(|message| {
                check_message_shape(&message)?;
                match members.get(&(message.conversation, message.sender)) {
                    Some(Ok(())) => Ok(message),
                    Some(Err(error)) => Err(error.clone()),
                    None => Err(StoreError::Unavailable("membership not checked".into())),
                }
            })
            .collect())
    }

    /// For each of `users` (sorted, distinct): `Ok` if a member of
    /// `conversation`, else `NotMember` or `NotFound` (no such
    /// conversation).
    async fn members_among(
        &self,
        conversation: ConversationId,
        users: &[UserId],
    ) -> StoreResult<Vec<StoreResult<()>>> {
        let not_member = |user| not_member(conversation, user);
        match conversation {
            ConversationId::Direct { .. } => match self.require_conversation(conversation).await {
                Ok(()) => Ok(users
                    .iter()
                    .map(|&user| {
                        if conversation.is_direct_party(user) {
                            Ok(())
                        } else {
                            Err(not_member(user))
                        }
                    })
                    .collect()),
                Err(StoreError::NotFound(what)) => Ok(users
                    .iter()
                    .map(|_| Err(StoreError::NotFound(what.clone())))
                    .collect()),
                Err(other) => Err(other),
            },
            ConversationId::Group(group) => {
                let mut found = Vec::with_capacity(users.len());
                for chunk in users.chunks(MAX_PAGE) {
                    let mut select =
                        QueryBuilder::<MySql>::new("SELECT user_id FROM members WHERE group_id = ");
                    select.push_bind(group).push(" AND user_id IN ");
                    push_in_list(&mut select, chunk.iter().copied());
                    for row in select.build().fetch_all(&self.pool).await.map_err(sql)? {
                        found.push(row.try_get::<UserId, _>(0).map_err(sql)?);
                    }
                }
                if found.len() < users.len() && self.group_record(group).await?.is_none() {
                    let missing = StoreError::NotFound(format!("group {group}"));
                    return Ok(users.iter().map(|_| Err(missing.clone())).collect());
                }
                Ok(users
                    .iter()
                    .map(|user| {
                        if found.contains(user) {
                            Ok(())
                        } else {
                            Err(not_member(*user))
                        }
                    })
                    .collect())
            }
        }
    }
}

#[async_trait]
impl MessageStore for MysqlStore {
    async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<StoreResult<Appended>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let checked = self.check_batch(batch).await?;
        self.appends.push(checked).await
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
        let until = if until == 0 { u64::MAX } else { until };
        sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? \
             AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
        ))
        .bind(ConversationKey::new(conversation).as_bytes())
        .bind(after)
        .bind(until)
        .bind(page_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(sql)?
        .iter()
        .map(records::message)
        .collect()
    }

    async fn latest_seqs(&self, conversations: &[ConversationId]) -> StoreResult<Vec<Seq>> {
        let keys: Vec<Vec<u8>> = conversations
            .iter()
            .map(|&c| ConversationKey::new(c).to_vec())
            .collect();
        let mut latest: HashMap<Vec<u8>, Seq> = HashMap::new();
        let mut distinct: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        distinct.sort_unstable();
        distinct.dedup();
        for chunk in distinct.chunks(ROWS_PER_STATEMENT) {
            let mut select = QueryBuilder::<MySql>::new(
                "SELECT conversation_id, latest_seq FROM conversations WHERE conversation_id IN ",
            );
            push_in_list(&mut select, chunk.iter().copied());
            for row in select.build().fetch_all(&self.pool).await.map_err(sql)? {
                latest.insert(row.try_get(0).map_err(sql)?, row.try_get(1).map_err(sql)?);
            }
        }
        Ok(keys
            .iter()
            .map(|key| latest.get(key).copied().unwrap_or(0))
            .collect())
    }
}
