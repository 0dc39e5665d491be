//! What the embedded store remembers of its tables to answer the checks
//! made on every send without a table lookup: which users exist, and who
//! is a member of which group with which role.
//!
//! A lookup in fjall walks the active memtable's skiplist, the sealed
//! ones and each table's filter: in the durable-append benchmark the
//! group membership check alone was a sixth of the whole process's CPU.
//! Both sets are bounded; past their bound further entries are looked up
//! each time, as before.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use crate::{GroupId, Role, UserId};

/// Users found to exist. Both parties of a direct conversation are checked
/// on every send and every delivery ack; a user is never deleted, so once
/// found an entry stays true. Bounded: past [`KnownUsers::MAX`] entries
/// (about 16 MiB) further users are looked up each time.
#[derive(Default)]
pub(super) struct KnownUsers(RwLock<HashSet<UserId>>);

impl KnownUsers {
    const MAX: usize = 1 << 20;

    pub fn contains(&self, user: UserId) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&user)
    }

    pub fn insert(&self, user: UserId) {
        let mut known = self.0.write().unwrap_or_else(|p| p.into_inner());
        if known.len() < Self::MAX {
            known.insert(user);
        }
    }
}

/// Group members found in the members table, with their role. Every group
/// send checks its sender's membership. Members are removed, so an entry
/// can go stale: a removal forgets the entry after its commit, and a
/// lookup that began before a removal may not remember what it read
/// (see [`KnownMembers::remember`]). Only members are remembered, never
/// an absence, so nothing a stranger sends can fill it. Bounded: past
/// [`KnownMembers::MAX`] entries (about 16 MiB) further members are looked
/// up each time.
#[derive(Default)]
pub(super) struct KnownMembers(RwLock<Members>);

#[derive(Default)]
struct Members {
    /// Removals so far: a lookup remembers its answer only if none
    /// happened since it began.
    removals: u64,
    roles: HashMap<(GroupId, UserId), Role>,
}

/// Taken before a members-table lookup, handed back with its answer.
#[derive(Clone, Copy, Debug)]
pub(super) struct LookupStart(u64);

impl KnownMembers {
    const MAX: usize = 1 << 19;

    pub fn role(&self, group: GroupId, user: UserId) -> Option<Role> {
        self.read().roles.get(&(group, user)).copied()
    }

    /// Call before reading the members table.
    pub fn lookup_start(&self) -> LookupStart {
        LookupStart(self.read().removals)
    }

    /// Remembers what a lookup begun at `start` found, unless a member was
    /// removed since: that lookup may have read the table before the
    /// removal's commit and the removal may have forgotten the entry
    /// already, so remembering it would bring a removed member back.
    pub fn remember(&self, start: LookupStart, group: GroupId, user: UserId, role: Role) {
        let mut members = self.0.write().unwrap_or_else(|p| p.into_inner());
        if members.removals == start.0 && members.roles.len() < Self::MAX {
            members.roles.insert((group, user), role);
        }
    }

    /// Call after a removal is committed, before it returns.
    pub fn forget(&self, group: GroupId, user: UserId) {
        let mut members = self.0.write().unwrap_or_else(|p| p.into_inner());
        members.removals += 1;
        members.roles.remove(&(group, user));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_that_began_before_a_removal_is_not_remembered() {
        let known = KnownMembers::default();
        // A lookup reads the table while the member is still there...
        let start = known.lookup_start();
        // ...the removal commits and forgets (nothing to forget yet)...
        known.forget(7, 42);
        // ...and the lookup's answer arrives late.
        known.remember(start, 7, 42, Role::Member);
        assert_eq!(known.role(7, 42), None);

        // A lookup begun after the removal is remembered.
        let start = known.lookup_start();
        known.remember(start, 7, 43, Role::Admin);
        assert_eq!(known.role(7, 43), Some(Role::Admin));
    }

    #[test]
    fn a_removal_forgets_a_remembered_member() {
        let known = KnownMembers::default();
        let start = known.lookup_start();
        known.remember(start, 7, 42, Role::Owner);
        known.remember(start, 8, 42, Role::Member);
        assert_eq!(known.role(7, 42), Some(Role::Owner));
        known.forget(7, 42);
        assert_eq!(known.role(7, 42), None);
        // Other groups of the same user are untouched.
        assert_eq!(known.role(8, 42), Some(Role::Member));
    }
}
