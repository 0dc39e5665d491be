//! In-process presence: how many connections each user has here and when
//! they were last seen. Fed by `Dispatch::connected`/`disconnected`, read by
//! `PresenceQuery`. (Cluster presence lives in Redis behind the
//! [`crate::Directory`].)
//!
//! Visibility rule: any two users share their implicit direct conversation
//! (`dm:{a}:{b}` exists for every pair), so every authenticated user may
//! ask about any user id; unknown ids answer offline, never seen.

use dashmap::DashMap;
use pingme_storage::UserId;

/// One user's presence on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    /// Open connections.
    pub connections: u32,
    /// When the user was last connected, Unix ms (now-ish while online).
    pub last_seen_ms: i64,
}

/// Presence of every user seen since start.
#[derive(Debug, Default)]
pub struct PresenceMap {
    users: DashMap<UserId, Presence>,
}

impl PresenceMap {
    /// A connection of `user` opened at `now_ms`.
    pub fn connected(&self, user: UserId, now_ms: i64) {
        let mut entry = self.users.entry(user).or_default();
        entry.connections += 1;
        entry.last_seen_ms = now_ms;
    }

    /// A connection of `user` closed at `now_ms`.
    pub fn disconnected(&self, user: UserId, now_ms: i64) {
        let mut entry = self.users.entry(user).or_default();
        entry.connections = entry.connections.saturating_sub(1);
        entry.last_seen_ms = now_ms;
    }

    /// Whether `user` is online and when they were last seen (`now_ms`
    /// while online).
    pub fn get(&self, user: UserId, now_ms: i64) -> (bool, i64) {
        match self.users.get(&user) {
            Some(p) if p.connections > 0 => (true, now_ms),
            Some(p) => (false, p.last_seen_ms),
            None => (false, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_online_while_any_connection_is_open() {
        let map = PresenceMap::default();
        assert_eq!(map.get(1, 50), (false, 0));
        map.connected(1, 10);
        map.connected(1, 11);
        map.disconnected(1, 20);
        assert_eq!(map.get(1, 30), (true, 30));
        map.disconnected(1, 40);
        assert_eq!(map.get(1, 50), (false, 40));
        // A stray disconnect cannot make the count negative.
        map.disconnected(1, 60);
        map.connected(1, 70);
        assert!(map.get(1, 80).0);
    }
}
