//! Groups and membership in MySQL: `chat_groups`, `members` and the
//! per-user index `user_conversations`. A group's `member_count` moves in
//! the same transaction as its member rows, under the group row's lock.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::{MySql, Row, Transaction};

use super::{MysqlStore, conversation_column, page_limit, push_in_list, records, sql};
use crate::checks::RecordLookups;
use crate::codec::{ConversationKey, member, role_code, role_from_code};
use crate::{
    ConversationId, ConversationStore, GroupId, GroupRecord, MAX_PAGE, Member, Role, StoreError,
    StoreResult, UserId,
};

const GROUP_COLUMNS: &str = "SELECT id, name, owner_id, member_count, created_ms FROM chat_groups";

#[async_trait]
impl RecordLookups for MysqlStore {
    async fn group_record(&self, id: GroupId) -> StoreResult<Option<GroupRecord>> {
        sqlx::query(&format!("{GROUP_COLUMNS} WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql)?
            .map(|row| records::group(&row))
            .transpose()
    }

    async fn require_distinct_users(&self, users: &[UserId]) -> StoreResult<()> {
        for chunk in users.chunks(MAX_PAGE) {
            let mut query = sqlx::QueryBuilder::new("SELECT COUNT(*) FROM users WHERE id IN ");
            push_in_list(&mut query, chunk.iter().copied());
            let found: i64 = query
                .build()
                .fetch_one(&self.pool)
                .await
                .map_err(sql)?
                .try_get(0)
                .map_err(sql)?;
            if found as usize != chunk.len() {
                let missing = self.first_unknown_user(chunk).await?;
                return Err(StoreError::NotFound(format!("user {missing}")));
            }
        }
        Ok(())
    }
}

impl MysqlStore {
    /// The group's row, locked for the rest of `tx`; `NotFound` if missing.
    async fn lock_group(
        tx: &mut Transaction<'static, MySql>,
        group: GroupId,
    ) -> StoreResult<GroupRecord> {
        let row = sqlx::query(&format!("{GROUP_COLUMNS} WHERE id = ? FOR UPDATE"))
            .bind(group)
            .fetch_optional(&mut **tx)
            .await
            .map_err(sql)?
            .ok_or_else(|| StoreError::NotFound(format!("group {group}")))?;
        records::group(&row)
    }

    /// Inserts member rows (and their conversation index rows) that are
    /// not there yet; returns how many were new.
    async fn insert_members(
        tx: &mut Transaction<'static, MySql>,
        group: GroupId,
        members: &[Member],
    ) -> StoreResult<u64> {
        let key = ConversationKey::new(ConversationId::Group(group)).to_vec();
        let mut added = 0;
        for chunk in members.chunks(MAX_PAGE) {
            let mut insert =
                sqlx::QueryBuilder::new("INSERT IGNORE INTO members (group_id, user_id, role) ");
            insert.push_values(chunk, |mut row, member| {
                row.push_bind(group)
                    .push_bind(member.user)
                    .push_bind(role_code(member.role));
            });
            added += insert
                .build()
                .execute(&mut **tx)
                .await
                .map_err(sql)?
                .rows_affected();
            let mut index = sqlx::QueryBuilder::new(
                "INSERT IGNORE INTO user_conversations (user_id, conversation_id) ",
            );
            index.push_values(chunk, |mut row, member| {
                row.push_bind(member.user).push_bind(key.as_slice());
            });
            index.build().execute(&mut **tx).await.map_err(sql)?;
        }
        Ok(added)
    }
}

/// `members` without repeats of a user (the first mention wins, as in the
/// embedded store).
fn distinct_members(members: impl IntoIterator<Item = Member>) -> Vec<Member> {
    let mut seen = HashSet::new();
    members
        .into_iter()
        .filter(|m| seen.insert(m.user))
        .collect()
}

#[async_trait]
impl ConversationStore for MysqlStore {
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
        let members = distinct_members(
            std::iter::once(Member {
                user: owner,
                role: Role::Owner,
            })
            .chain(members.iter().map(|&user| Member {
                user,
                role: Role::Member,
            })),
        );
        let mut tx = self.pool.begin().await.map_err(sql)?;
        let id = sqlx::query(
            "INSERT INTO chat_groups (name, owner_id, member_count, created_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(name)
        .bind(owner)
        .bind(members.len() as u64)
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(sql)?
        .last_insert_id();
        Self::insert_members(&mut tx, id, &members).await?;
        tx.commit().await.map_err(sql)?;
        Ok(GroupRecord {
            id,
            name: name.to_string(),
            owner,
            member_count: members.len() as u64,
            created_ms: now_ms,
        })
    }

    async fn group(&self, id: GroupId) -> StoreResult<Option<GroupRecord>> {
        self.group_record(id).await
    }

    async fn add_members(&self, group: GroupId, members: &[Member]) -> StoreResult<u64> {
        let members = distinct_members(members.iter().copied());
        let users: Vec<UserId> = members.iter().map(|m| m.user).collect();
        let mut tx = self.pool.begin().await.map_err(sql)?;
        Self::lock_group(&mut tx, group).await?;
        self.require_users(&users).await?;
        let added = Self::insert_members(&mut tx, group, &members).await?;
        if added > 0 {
            sqlx::query("UPDATE chat_groups SET member_count = member_count + ? WHERE id = ?")
                .bind(added)
                .bind(group)
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
        }
        tx.commit().await.map_err(sql)?;
        Ok(added)
    }

    async fn remove_member(&self, group: GroupId, user: UserId) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(sql)?;
        Self::lock_group(&mut tx, group).await?;
        let removed = sqlx::query("DELETE FROM members WHERE group_id = ? AND user_id = ?")
            .bind(group)
            .bind(user)
            .execute(&mut *tx)
            .await
            .map_err(sql)?
            .rows_affected()
            > 0;
        if removed {
            sqlx::query("DELETE FROM user_conversations WHERE user_id = ? AND conversation_id = ?")
                .bind(user)
                .bind(ConversationKey::new(ConversationId::Group(group)).as_bytes())
                .execute(&mut *tx)
                .await
                .map_err(sql)?;
            sqlx::query(
                "UPDATE chat_groups SET member_count = GREATEST(member_count, 1) - 1 WHERE id = ?",
            )
            .bind(group)
            .execute(&mut *tx)
            .await
            .map_err(sql)?;
        }
        tx.commit().await.map_err(sql)?;
        Ok(removed)
    }

    async fn member_role(&self, group: GroupId, user: UserId) -> StoreResult<Option<Role>> {
        sqlx::query("SELECT role FROM members WHERE group_id = ? AND user_id = ?")
            .bind(group)
            .bind(user)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql)?
            .map(|row| role_from_code(row.try_get(0).map_err(sql)?))
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
        if limit == 0 {
            return Ok(Vec::new());
        }
        sqlx::query(
            "SELECT user_id, role FROM members WHERE group_id = ? AND user_id > ? \
             ORDER BY user_id LIMIT ?",
        )
        .bind(group)
        .bind(after)
        .bind(page_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(sql)?
        .iter()
        .map(|row| member(row.try_get(0).map_err(sql)?, row.try_get(1).map_err(sql)?))
        .collect()
    }

    async fn user_conversations(
        &self,
        user: UserId,
        after: Option<ConversationId>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationId>> {
        self.require_users(&[user]).await?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Keys sort like ConversationIds (codec.rs), and the empty key
        // sorts before every key.
        let after = after
            .map(|c| ConversationKey::new(c).to_vec())
            .unwrap_or_default();
        sqlx::query(
            "SELECT conversation_id FROM user_conversations WHERE user_id = ? \
             AND conversation_id > ? ORDER BY conversation_id LIMIT ?",
        )
        .bind(user)
        .bind(after)
        .bind(page_limit(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(sql)?
        .iter()
        .map(|row| conversation_column(row, 0))
        .collect()
    }
}
