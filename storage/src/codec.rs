//! Byte encodings every backend shares, so a conversation or an
//! idempotency key has one binary form whatever keeps it: the embedded
//! store's key prefixes, MySQL's `VARBINARY` keys and ScyllaDB's `blob`
//! keys are the same bytes.
//!
//! Integers are big-endian, so byte order is numeric order: sorting
//! encoded conversation keys sorts by [`ConversationId`]'s `Ord` (all
//! direct conversations before all groups, then by id), which is the order
//! `user_conversations` pages in.

use crate::{ConversationId, Member, Role, StoreError, StoreResult, UserId};

/// Longest encoded conversation key: tag + two user ids.
pub const CONVERSATION_KEY_MAX: usize = 17;

const TAG_DIRECT: u8 = b'd';
const TAG_GROUP: u8 = b'g';

/// A conversation as bytes: `d` + low + high, or `g` + group id.
/// `d` sorts before `g`, matching `ConversationId`'s derived `Ord`.
#[derive(Clone, Copy)]
pub struct ConversationKey {
    bytes: [u8; CONVERSATION_KEY_MAX],
    len: u8,
}

impl ConversationKey {
    /// The key of `conversation`.
    pub fn new(conversation: ConversationId) -> Self {
        let mut bytes = [0u8; CONVERSATION_KEY_MAX];
        let len = match conversation {
            ConversationId::Direct { low, high } => {
                bytes[0] = TAG_DIRECT;
                bytes[1..9].copy_from_slice(&low.to_be_bytes());
                bytes[9..17].copy_from_slice(&high.to_be_bytes());
                17
            }
            ConversationId::Group(id) => {
                bytes[0] = TAG_GROUP;
                bytes[1..9].copy_from_slice(&id.to_be_bytes());
                9
            }
        };
        ConversationKey { bytes, len }
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The encoded bytes, owned (what a query binds).
    pub fn to_vec(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

/// Decodes a conversation key from the front of `bytes`, returning it and
/// the rest.
pub fn decode_conversation(bytes: &[u8]) -> StoreResult<(ConversationId, &[u8])> {
    match bytes.first() {
        Some(&TAG_DIRECT) if bytes.len() >= 17 => {
            let low = be_u64(&bytes[1..9]);
            let high = be_u64(&bytes[9..17]);
            Ok((ConversationId::Direct { low, high }, &bytes[17..]))
        }
        Some(&TAG_GROUP) if bytes.len() >= 9 => {
            Ok((ConversationId::Group(be_u64(&bytes[1..9])), &bytes[9..]))
        }
        _ => Err(corrupt("conversation key")),
    }
}

/// Decodes a column holding exactly one conversation key.
pub fn conversation_from_key(bytes: &[u8]) -> StoreResult<ConversationId> {
    match decode_conversation(bytes)? {
        (conversation, []) => Ok(conversation),
        _ => Err(corrupt("conversation key")),
    }
}

/// `(sender, client_msg_id)`: the idempotency key.
pub fn idempotency_key(sender: UserId, client_msg_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + client_msg_id.len());
    key.extend_from_slice(&sender.to_be_bytes());
    key.extend_from_slice(client_msg_id.as_bytes());
    key
}

/// The stored form of a role: 1 owner, 2 admin, 3 member.
pub fn role_code(role: Role) -> u8 {
    match role {
        Role::Owner => 1,
        Role::Admin => 2,
        Role::Member => 3,
    }
}

/// A stored role code.
pub fn role_from_code(code: u8) -> StoreResult<Role> {
    match code {
        1 => Ok(Role::Owner),
        2 => Ok(Role::Admin),
        3 => Ok(Role::Member),
        _ => Err(corrupt("role")),
    }
}

/// A member from its stored columns (user id, role code).
pub fn member(user: UserId, role: u8) -> StoreResult<Member> {
    Ok(Member {
        user,
        role: role_from_code(role)?,
    })
}

/// The big-endian u64 at the front of `bytes` (at least 8 long).
pub fn be_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(buf)
}

/// The error for stored bytes that do not decode.
pub fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("undecodable {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_keys_round_trip_and_sort_like_conversation_ids() {
        let mut ids = vec![
            ConversationId::Group(2),
            ConversationId::direct(300, 1).unwrap(),
            ConversationId::Group(1 << 40),
            ConversationId::direct(2, 3).unwrap(),
            ConversationId::direct(2, 1 << 33).unwrap(),
        ];
        let mut keys: Vec<Vec<u8>> = ids
            .iter()
            .map(|&c| ConversationKey::new(c).to_vec())
            .collect();
        ids.sort();
        keys.sort();
        let decoded: Vec<ConversationId> = keys
            .iter()
            .map(|k| conversation_from_key(k).unwrap())
            .collect();
        assert_eq!(decoded, ids);
        assert!(conversation_from_key(b"g\0\0").is_err());
        assert!(conversation_from_key(&[b'x'; 9]).is_err());
        let mut long = ConversationKey::new(ConversationId::Group(1)).to_vec();
        long.push(0);
        assert!(conversation_from_key(&long).is_err(), "trailing bytes");
    }
}
