//! The MySQL/MariaDB backend (`storage.backend: mysql`): every role in one
//! InnoDB database that several `pingme` processes can share.
//!
//! - Schema: `storage/migrations/mysql/*.sql`, embedded in the binary and
//!   applied by [`MysqlStore::connect`] with sqlx's migrator (a version
//!   table and a named lock, so servers starting together apply it once).
//! - Seqs: the append path ([`append`]) batches concurrent `append` calls
//!   into rounds, one transaction each, like the embedded store's group
//!   commit; inside it the touched `conversations` rows are locked
//!   (ascending key order) and their `latest_seq` advanced, so two writers,
//!   in one process or in many, can never hand out the same seq. The
//!   `(conversation_id, seq)` primary key refuses a repeat regardless.
//! - Idempotency: a unique key on `(sender, client_msg_id)`; a race between
//!   two writers on one key (different conversations, so no shared row
//!   lock) makes the later commit fail on the key, and its round is redone,
//!   now answering the key as a duplicate.
//! - Connections run at `READ COMMITTED`: every statement sees what others
//!   committed before it, which the append round relies on after taking its
//!   row locks.
//!
//! Accounts, groups, watermarks and dead letters are plain statements
//! (short transactions where a read and a write must agree).

mod append;
mod conversations;
mod records;
#[cfg(feature = "conformance")]
mod test_database;

#[cfg(feature = "conformance")]
pub use test_database::{TestDatabase, server_from_env};

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlSslMode};
use sqlx::{ConnectOptions, Executor, Row};

use crate::checks::{RecordLookups, check_id, check_username};
use crate::codec::{ConversationKey, conversation_from_key};
use crate::{
    ConversationId, DeadLetter, DeadLetterStore, DeviceRecord, ImportedAccount, MAX_PAGE,
    NewAccount, StoreError, StoreResult, UserId, UserRecord, UserStore, WatermarkStore, Watermarks,
};

/// Where the database is and how many connections to keep. The gateway's
/// `database` section (env `DB_HOST`, `DB_PORT`, `DB_USERNAME`,
/// `DB_PASSWORD`, `DB_NAME`) fills it.
#[derive(Clone, PartialEq, Eq)]
pub struct MysqlConfig {
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Login.
    pub username: String,
    /// Password (may be empty).
    pub password: String,
    /// Database; created if missing. `[A-Za-z0-9_]` only.
    pub database: String,
    /// Most connections open at once (the append writer holds one per round).
    pub pool_size: u32,
    /// How long a call waits for a free connection, and a new connection
    /// for the server, before it fails with `Unavailable`.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for MysqlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("MysqlConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("database", &self.database)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig {
            host: "127.0.0.1".into(),
            port: 3306,
            username: "root".into(),
            password: String::new(),
            database: "pingme".into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl MysqlConfig {
    /// Parses `mysql://user[:password]@host[:port][/database]` (how tests
    /// name a server: `MYSQL_URL`). A missing database is `pingme`.
    pub fn from_url(url: &str) -> Result<MysqlConfig, String> {
        let rest = url
            .strip_prefix("mysql://")
            .ok_or_else(|| format!("{url:?}: expected mysql://user[:password]@host[:port][/db]"))?;
        let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
        let (login, address) = authority
            .rsplit_once('@')
            .ok_or_else(|| format!("{url:?}: missing user@"))?;
        let (username, password) = login.split_once(':').unwrap_or((login, ""));
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| format!("{url:?}: bad port {port:?}"))?,
            ),
            None => (address, 3306),
        };
        let database = database.split('?').next().unwrap_or("");
        Ok(MysqlConfig {
            host: host.to_string(),
            port,
            username: username.to_string(),
            password: password.to_string(),
            database: if database.is_empty() {
                "pingme".into()
            } else {
                database.to_string()
            },
            ..MysqlConfig::default()
        })
    }

    fn options(&self) -> MySqlConnectOptions {
        MySqlConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .username(&self.username)
            .password(&self.password)
            .charset("utf8mb4")
            // No TLS is compiled in (see DEPENDENCIES.md); say so instead
            // of trying and falling back.
            .ssl_mode(MySqlSslMode::Disabled)
            // Statements are logged by our own spans, not once each at info.
            .disable_statement_logging()
    }
}

/// Whether `name` may name the database: 1-64 of `[A-Za-z0-9_]`, safe to
/// splice into `CREATE DATABASE` (identifiers cannot be bound as
/// parameters).
pub fn is_valid_database_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The schema, oldest first. Append new files; never edit an applied one
/// (the migrator checks each file's checksum).
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "schema",
    include_str!("../../migrations/mysql/0001_schema.sql"),
)];

fn migrator() -> sqlx::migrate::Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            sqlx::migrate::Migration::new(
                version,
                Cow::Borrowed(description),
                sqlx::migrate::MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    sqlx::migrate::Migrator {
        migrations: Cow::Owned(migrations),
        ..sqlx::migrate::Migrator::DEFAULT
    }
}

/// The MySQL store. Cheap to clone (a pool handle and the append queue).
#[derive(Clone)]
pub struct MysqlStore {
    pool: MySqlPool,
    appends: append::AppendQueue,
}

impl std::fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlStore")
            .field("pool_size", &self.pool.size())
            .finish_non_exhaustive()
    }
}

/// The MySQL error number of a database error, if it is one.
fn error_number(error: &sqlx::Error) -> Option<u16> {
    match error {
        sqlx::Error::Database(e) => e
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|e| e.number()),
        _ => None,
    }
}

/// ER_DUP_ENTRY: a unique or primary key already holds the value.
const ER_DUP_ENTRY: u16 = 1062;
/// ER_ACCESS_DENIED_ERROR: wrong user name or password.
const ER_ACCESS_DENIED: u16 = 1045;
/// ER_DBACCESS_DENIED_ERROR: the user may not use (or create) the database.
const ER_DB_ACCESS_DENIED: u16 = 1044;
/// ER_ACCESS_DENIED_NO_PASSWORD_ERROR: e.g. MariaDB's root, which logs in
/// over the local socket only.
const ER_ACCESS_DENIED_NO_PASSWORD: u16 = 1698;
/// ER_DATA_TOO_LONG: a value is longer than its column.
const ER_DATA_TOO_LONG: u16 = 1406;

/// Maps a driver error to a store error: the few that are the caller's
/// fault get their typed error, everything else is retryable.
pub(crate) fn sql(error: sqlx::Error) -> StoreError {
    match error_number(&error) {
        Some(ER_DUP_ENTRY) => StoreError::Conflict(error.to_string()),
        Some(ER_DATA_TOO_LONG) => StoreError::Invalid(error.to_string()),
        _ => StoreError::Unavailable(format!("mysql: {error}")),
    }
}

fn corrupt_column(what: &str, error: sqlx::Error) -> StoreError {
    StoreError::Corrupt(format!("{what}: {error}"))
}

/// A page limit as SQL takes it (`limit` is already capped at [`MAX_PAGE`]).
fn page_limit(limit: usize) -> i64 {
    limit.min(MAX_PAGE) as i64
}

impl MysqlStore {
    /// Connects, creates the database if it is missing, applies the
    /// migrations, and starts the append writer. Fails (with the server's
    /// reason) with `Unavailable` when the server cannot be reached within
    /// `config.connect_timeout`, and with `Invalid` when it refuses the
    /// login or the database (retrying would not help).
    pub async fn connect(config: &MysqlConfig) -> StoreResult<MysqlStore> {
        if !is_valid_database_name(&config.database) {
            return Err(StoreError::Invalid(format!(
                "database name {:?} must be 1-64 of [A-Za-z0-9_]",
                config.database
            )));
        }
        // A refused login is the configuration's fault, and waiting will not
        // mend it: `Invalid`, so a server starting up exits instead of
        // retrying. Everything else (no route, refused connection, timeout)
        // may pass.
        let unavailable = |e: sqlx::Error| match error_number(&e) {
            Some(ER_ACCESS_DENIED | ER_DB_ACCESS_DENIED | ER_ACCESS_DENIED_NO_PASSWORD) => {
                StoreError::Invalid(format!(
                    "mysql {}:{} refused user {:?}: {e}",
                    config.host, config.port, config.username
                ))
            }
            _ => StoreError::Unavailable(format!("mysql {}:{}: {e}", config.host, config.port)),
        };
        // The database may not exist yet: create it over a connection that
        // names none.
        let mut admin = tokio::time::timeout(config.connect_timeout, config.options().connect())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "mysql {}:{}: no connection within {:?}",
                    config.host, config.port, config.connect_timeout
                ))
            })?
            .map_err(unavailable)?;
        admin
            .execute(format!("CREATE DATABASE IF NOT EXISTS `{}`", config.database).as_str())
            .await
            .map_err(unavailable)?;
        drop(admin);

        let pool = MySqlPoolOptions::new()
            .max_connections(config.pool_size.max(2))
            .acquire_timeout(config.connect_timeout)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    Ok(())
                })
            })
            .connect_with(config.options().database(&config.database))
            .await
            .map_err(unavailable)?;
        migrator()
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("mysql migrations: {e}")))?;
        let appends = append::AppendQueue::start(pool.clone());
        Ok(MysqlStore { pool, appends })
    }

    /// Closes the pool (after the append writer's last round).
    pub async fn close(&self) {
        self.appends.close().await;
        self.pool.close().await;
    }

    /// Group-commit counters since connect: `messages / rounds` is the
    /// average round size.
    pub fn commit_stats(&self) -> crate::CommitStats {
        self.appends.stats()
    }

    /// The first of `users` that does not exist (for the error message).
    async fn first_unknown_user(&self, users: &[UserId]) -> StoreResult<UserId> {
        for &user in users {
            if self.user_by_id(user).await?.is_none() {
                return Ok(user);
            }
        }
        Ok(0)
    }
}

#[async_trait]
impl UserStore for MysqlStore {
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord> {
        check_username(username)?;
        let inserted =
            sqlx::query("INSERT INTO users (username, password_hash, created_ms) VALUES (?, ?, ?)")
                .bind(username)
                .bind(password_hash)
                .bind(now_ms)
                .execute(&self.pool)
                .await;
        match inserted {
            Ok(done) => Ok(UserRecord {
                id: done.last_insert_id(),
                username: username.to_string(),
                password_hash: password_hash.to_string(),
                created_ms: now_ms,
            }),
            Err(e) if error_number(&e) == Some(ER_DUP_ENTRY) => Err(StoreError::Conflict(format!(
                "username {username:?} is taken"
            ))),
            Err(e) => Err(sql(e)),
        }
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        sqlx::query("SELECT id, username, password_hash, created_ms FROM users WHERE username = ?")
            .bind(username)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql)?
            .map(|row| records::user(&row))
            .transpose()
    }

    async fn user_by_id(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        sqlx::query("SELECT id, username, password_hash, created_ms FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql)?
            .map(|row| records::user(&row))
            .transpose()
    }

    async fn touch_device(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord> {
        self.check_device_owner(user, device_id).await?;
        sqlx::query(
            "INSERT INTO devices (user_id, device_id, token_generation, last_login_ms) \
             VALUES (?, ?, 0, ?) ON DUPLICATE KEY UPDATE last_login_ms = VALUES(last_login_ms)",
        )
        .bind(user)
        .bind(device_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(sql)?;
        self.device(user, device_id)
            .await?
            .ok_or_else(|| StoreError::Unavailable("device vanished after its upsert".into()))
    }

    async fn device(&self, user: UserId, device_id: &str) -> StoreResult<Option<DeviceRecord>> {
        sqlx::query(
            "SELECT user_id, device_id, token_generation, last_login_ms FROM devices \
             WHERE user_id = ? AND device_id = ?",
        )
        .bind(user)
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(sql)?
        .map(|row| records::device(&row))
        .transpose()
    }

    async fn bump_token_generation(&self, user: UserId, device_id: &str) -> StoreResult<u64> {
        // LAST_INSERT_ID(expr) hands the new value back in the OK packet:
        // one atomic statement, no read-then-write race between two logouts.
        let done = sqlx::query(
            "UPDATE devices SET token_generation = LAST_INSERT_ID(token_generation + 1) \
             WHERE user_id = ? AND device_id = ?",
        )
        .bind(user)
        .bind(device_id)
        .execute(&self.pool)
        .await
        .map_err(sql)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "device {device_id:?} of user {user}"
            )));
        }
        Ok(done.last_insert_id())
    }

    /// One transaction per call: the users in multi-row inserts, their ids
    /// read back by name, then their devices; a taken name rolls all of it
    /// back. This is what lets a million accounts in in about a minute
    /// where one insert per user would take many.
    async fn import_accounts(
        &self,
        accounts: &[NewAccount],
        device: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Vec<ImportedAccount>> {
        for account in accounts {
            check_username(&account.username)?;
        }
        if let Some(device) = device {
            check_id("device_id", device, false)?;
        }
        let mut tx = self.pool.begin().await.map_err(sql)?;
        let mut ids = std::collections::HashMap::with_capacity(accounts.len());
        for chunk in accounts.chunks(MAX_PAGE) {
            let mut insert =
                sqlx::QueryBuilder::new("INSERT INTO users (username, password_hash, created_ms) ");
            insert.push_values(chunk, |mut row, account| {
                row.push_bind(&account.username)
                    .push_bind(&account.password_hash)
                    .push_bind(now_ms);
            });
            match insert.build().execute(&mut *tx).await {
                Ok(_) => {}
                Err(e) if error_number(&e) == Some(ER_DUP_ENTRY) => {
                    return Err(StoreError::Conflict(format!(
                        "a username of the batch is taken: {e}"
                    )));
                }
                Err(e) => return Err(sql(e)),
            }
            let mut select =
                sqlx::QueryBuilder::new("SELECT id, username FROM users WHERE username IN ");
            push_in_list(&mut select, chunk.iter().map(|a| a.username.as_str()));
            for row in select.build().fetch_all(&mut *tx).await.map_err(sql)? {
                let id: u64 = row.try_get("id").map_err(sql)?;
                ids.insert(records::text(&row, "username")?, id);
            }
        }
        let imported = accounts
            .iter()
            .map(|account| {
                let id = *ids.get(&account.username).ok_or_else(|| {
                    StoreError::Unavailable(format!(
                        "user {:?} vanished after its insert",
                        account.username
                    ))
                })?;
                Ok(ImportedAccount {
                    user: UserRecord {
                        id,
                        username: account.username.clone(),
                        password_hash: account.password_hash.clone(),
                        created_ms: now_ms,
                    },
                    device: device.map(|device| DeviceRecord {
                        user: id,
                        device_id: device.to_string(),
                        token_generation: 0,
                        last_login_ms: now_ms,
                    }),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        if device.is_some() {
            for chunk in imported.chunks(MAX_PAGE) {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO devices (user_id, device_id, token_generation, last_login_ms) ",
                );
                insert.push_values(chunk, |mut row, account| {
                    if let Some(device) = &account.device {
                        row.push_bind(device.user)
                            .push_bind(&device.device_id)
                            .push_bind(0u64)
                            .push_bind(now_ms);
                    }
                });
                insert.build().execute(&mut *tx).await.map_err(sql)?;
            }
        }
        tx.commit().await.map_err(sql)?;
        Ok(imported)
    }
}

/// A watermark table: `delivered` is kept per device, `read_marks` per
/// user; both only move forward.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MarkTable {
    Delivered,
    Read,
}

impl MarkTable {
    fn name(self) -> &'static str {
        match self {
            MarkTable::Delivered => "delivered",
            MarkTable::Read => "read_marks",
        }
    }

    /// `user_id = ? [AND device_id = ?]`: the key columns before the
    /// conversation.
    fn push_owner<'a>(
        self,
        query: &mut sqlx::QueryBuilder<'a, sqlx::MySql>,
        user: UserId,
        device_id: &'a str,
    ) {
        query.push("user_id = ").push_bind(user);
        if self == MarkTable::Delivered {
            query.push(" AND device_id = ").push_bind(device_id);
        }
    }

    /// Raises the mark of (owner, conversation) to `seq`, inserting it if
    /// missing, never lowering it: one statement, no read-then-write race.
    async fn raise(
        self,
        pool: &MySqlPool,
        user: UserId,
        device_id: &str,
        conversation: ConversationId,
        seq: u64,
    ) -> StoreResult<()> {
        let device = self == MarkTable::Delivered;
        let mut upsert = sqlx::QueryBuilder::new(format!(
            "INSERT INTO {} (user_id, {}conversation_id, seq) VALUES (",
            self.name(),
            if device { "device_id, " } else { "" }
        ));
        let mut values = upsert.separated(", ");
        values.push_bind(user);
        if device {
            values.push_bind(device_id);
        }
        values.push_bind(ConversationKey::new(conversation).to_vec());
        values.push_bind(seq);
        upsert.push(") ON DUPLICATE KEY UPDATE seq = GREATEST(seq, VALUES(seq))");
        upsert.build().execute(pool).await.map_err(sql)?;
        Ok(())
    }

    /// The marks of `conversations` (encoded keys, at most [`MAX_PAGE`])
    /// that exist, as (key, seq).
    async fn of(
        self,
        pool: &MySqlPool,
        user: UserId,
        device_id: &str,
        conversations: &[Vec<u8>],
    ) -> StoreResult<Vec<(Vec<u8>, u64)>> {
        let mut select = sqlx::QueryBuilder::new(format!(
            "SELECT conversation_id, seq FROM {} WHERE ",
            self.name()
        ));
        self.push_owner(&mut select, user, device_id);
        select.push(" AND conversation_id IN ");
        push_in_list(&mut select, conversations.iter().map(Vec::as_slice));
        select
            .build()
            .fetch_all(pool)
            .await
            .map_err(sql)?
            .iter()
            .map(|row| Ok((row.try_get(0).map_err(sql)?, row.try_get(1).map_err(sql)?)))
            .collect()
    }
}

#[async_trait]
impl WatermarkStore for MysqlStore {
    async fn set_delivered(
        &self,
        user: UserId,
        device_id: &str,
        conversation: ConversationId,
        seq: u64,
    ) -> StoreResult<()> {
        check_id("device_id", device_id, false)?;
        MarkTable::Delivered
            .raise(&self.pool, user, device_id, conversation, seq)
            .await
    }

    async fn set_read(
        &self,
        user: UserId,
        conversation: ConversationId,
        seq: u64,
    ) -> StoreResult<()> {
        MarkTable::Read
            .raise(&self.pool, user, "", conversation, seq)
            .await
    }

    async fn watermarks(
        &self,
        user: UserId,
        device_id: &str,
        conversations: &[ConversationId],
    ) -> StoreResult<Vec<Watermarks>> {
        let mut marks = vec![Watermarks::default(); conversations.len()];
        let keys: Vec<Vec<u8>> = conversations
            .iter()
            .map(|&c| ConversationKey::new(c).to_vec())
            .collect();
        for (start, chunk) in (0..).step_by(MAX_PAGE).zip(keys.chunks(MAX_PAGE)) {
            for table in [MarkTable::Delivered, MarkTable::Read] {
                for (key, seq) in table.of(&self.pool, user, device_id, chunk).await? {
                    // The same conversation may be asked twice: fill every slot.
                    for (i, asked) in chunk.iter().enumerate() {
                        if *asked == key {
                            let mark = &mut marks[start + i];
                            match table {
                                MarkTable::Delivered => mark.delivered = seq,
                                MarkTable::Read => mark.read = seq,
                            }
                        }
                    }
                }
            }
        }
        Ok(marks)
    }
}

#[async_trait]
impl DeadLetterStore for MysqlStore {
    async fn put_dead_letter(&self, letter: DeadLetter) -> StoreResult<u64> {
        let done = sqlx::query(
            "INSERT INTO dead_letters (kind, payload, code, error, attempts, created_ms) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&letter.kind)
        .bind(&letter.payload)
        .bind(letter.code)
        .bind(&letter.error)
        .bind(letter.attempts)
        .bind(letter.created_ms)
        .execute(&self.pool)
        .await
        .map_err(sql)?;
        Ok(done.last_insert_id())
    }

    async fn dead_letters(&self, after: u64, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        sqlx::query(
            "SELECT id, kind, payload, code, error, attempts, created_ms FROM dead_letters \
             WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(page_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(sql)?
        .iter()
        .map(records::dead_letter)
        .collect()
    }

    async fn remove_dead_letter(&self, id: u64) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM dead_letters WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(sql)?;
        Ok(done.rows_affected() > 0)
    }

    async fn dead_letter_count(&self) -> StoreResult<u64> {
        let count: i64 = sqlx::query("SELECT COUNT(*) FROM dead_letters")
            .fetch_one(&self.pool)
            .await
            .map_err(sql)?
            .try_get(0)
            .map_err(sql)?;
        Ok(count as u64)
    }
}

/// Appends `(?, ?, ...)` binding `items`: the list of an `IN`.
fn push_in_list<'args, T>(
    query: &mut sqlx::QueryBuilder<'args, sqlx::MySql>,
    items: impl IntoIterator<Item = T>,
) where
    T: 'args + sqlx::Encode<'args, sqlx::MySql> + sqlx::Type<sqlx::MySql> + Send,
{
    query.push("(");
    let mut list = query.separated(", ");
    for item in items {
        list.push_bind(item);
    }
    query.push(")");
}

/// Decodes a conversation key column.
fn conversation_column(row: &sqlx::mysql::MySqlRow, index: usize) -> StoreResult<ConversationId> {
    let key: Vec<u8> = row
        .try_get(index)
        .map_err(|e| corrupt_column("conversation_id", e))?;
    conversation_from_key(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_server_and_database() {
        let config = MysqlConfig::from_url("mysql://app:secret@db.local:3307/chat").unwrap();
        assert_eq!(
            (
                config.host.as_str(),
                config.port,
                config.username.as_str(),
                config.password.as_str(),
                config.database.as_str()
            ),
            ("db.local", 3307, "app", "secret", "chat")
        );
        let config = MysqlConfig::from_url("mysql://root@127.0.0.1").unwrap();
        assert_eq!((config.port, config.password.as_str()), (3306, ""));
        assert_eq!(config.database, "pingme");
        assert!(MysqlConfig::from_url("postgres://x@y/z").is_err());
        assert!(MysqlConfig::from_url("mysql://host-only").is_err());
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn only_plain_database_names_are_spliced_into_sql() {
        assert!(is_valid_database_name("pingme_t_01ab"));
        for bad in ["", "a`b", "x; DROP DATABASE y", "a-b", &"x".repeat(65)] {
            assert!(!is_valid_database_name(bad), "{bad:?}");
        }
    }
}
