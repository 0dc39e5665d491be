//! [`ConversationStore`] on fjall: groups, their members (one key per
//! `(group, user)`, so a page of a huge group is one range scan) and each
//! user's conversation index.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;

use async_trait::async_trait;

use super::keys;
use super::{EmbeddedStore, Inner, db, id_prefix_end, role_byte, role_from, to_json};
use crate::{
    ConversationId, ConversationStore, GroupId, GroupRecord, MAX_PAGE, Member, Role, StoreResult,
    UserId,
};

impl Inner {
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
        let committed = self.commit(batch);
        // Forgotten even when the commit failed: forgetting costs one lookup
        // at most, remembering a member who may be gone costs correctness.
        self.known_members.forget(group, user);
        committed?;
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
