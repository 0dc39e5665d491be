//! The domain records pingme keeps, independent of any database.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A user's id, assigned at registration (never 0).
pub type UserId = u64;
/// A group's id, assigned at creation (never 0).
pub type GroupId = u64;
/// A conversation's position counter: dense per conversation, starting at 1.
pub type Seq = u64;

/// A conversation: the implicit one-to-one conversation of two users, or a
/// group. Its text form (`dm:{low}:{high}` or `g:{id}`) is what the wire
/// protocol and the HTTP API carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConversationId {
    /// One-to-one; always stored with `low < high`.
    Direct {
        /// The smaller user id.
        low: UserId,
        /// The larger user id.
        high: UserId,
    },
    /// A group conversation.
    Group(GroupId),
}

impl ConversationId {
    /// The one-to-one conversation of `a` and `b` (in either order), or
    /// `None` when `a == b` or either id is 0.
    pub fn direct(a: UserId, b: UserId) -> Option<ConversationId> {
        (a != b && a != 0 && b != 0).then(|| ConversationId::Direct {
            low: a.min(b),
            high: a.max(b),
        })
    }

    /// True if `user` is one of the two users of a direct conversation.
    /// (Group membership lives in the store.)
    pub fn is_direct_party(&self, user: UserId) -> bool {
        matches!(self, ConversationId::Direct { low, high } if *low == user || *high == user)
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConversationId::Direct { low, high } => write!(f, "dm:{low}:{high}"),
            ConversationId::Group(id) => write!(f, "g:{id}"),
        }
    }
}

/// A conversation id string that is not `dm:{a}:{b}` or `g:{id}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid conversation id {0:?}: expected dm:{{user}}:{{user}} or g:{{group}}")]
pub struct InvalidConversationId(pub String);

impl FromStr for ConversationId {
    type Err = InvalidConversationId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidConversationId(s.to_string());
        if let Some(rest) = s.strip_prefix("g:") {
            let id: GroupId = rest.parse().map_err(|_| invalid())?;
            return (id != 0 && rest == id.to_string())
                .then_some(ConversationId::Group(id))
                .ok_or_else(invalid);
        }
        let rest = s.strip_prefix("dm:").ok_or_else(invalid)?;
        let (a, b) = rest.split_once(':').ok_or_else(invalid)?;
        let (a, b): (UserId, UserId) = (
            a.parse().map_err(|_| invalid())?,
            b.parse().map_err(|_| invalid())?,
        );
        let id = ConversationId::direct(a, b).ok_or_else(invalid)?;
        // Only the canonical spelling is accepted, so one conversation has one id.
        (id.to_string() == s).then_some(id).ok_or_else(invalid)
    }
}

/// What a message body holds; the numbers are the wire `ContentType` values.
pub type ContentType = i32;

/// A message as the router hands it to the store, before it has a seq.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Target conversation.
    pub conversation: ConversationId,
    /// Sender; must be a member of `conversation`.
    pub sender: UserId,
    /// The sender's device.
    pub sender_device: String,
    /// The sender's idempotency key: (sender, client_msg_id) is stored once.
    pub client_msg_id: String,
    /// Server-assigned unique id (UUIDv7 text), chosen by the router.
    pub msg_id: String,
    /// Wire `ContentType` value.
    pub content_type: ContentType,
    /// Opaque payload.
    pub body: Bytes,
    /// When the server accepted it, Unix milliseconds.
    pub server_time_ms: i64,
}

/// A message as stored, with its seq.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Its conversation.
    pub conversation: ConversationId,
    /// Dense position in the conversation.
    pub seq: Seq,
    /// Unique id.
    pub msg_id: String,
    /// Sender.
    pub sender: UserId,
    /// The sender's device.
    pub sender_device: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Wire `ContentType` value.
    pub content_type: ContentType,
    /// Payload.
    pub body: Bytes,
    /// Acceptance time, Unix milliseconds.
    pub server_time_ms: i64,
}

/// The result of appending one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// The stored message: the new one, or for a duplicate the first one
    /// stored under the same (sender, client_msg_id).
    pub message: StoredMessage,
    /// True if nothing was stored because the key was already known.
    pub duplicate: bool,
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Id.
    pub id: UserId,
    /// Unique login name.
    pub username: String,
    /// PHC-format password hash (argon2).
    pub password_hash: String,
    /// Registration time, Unix milliseconds.
    pub created_ms: i64,
}

/// One account of a bulk import ([`crate::UserStore::import_accounts`]):
/// a login name and its password, already hashed (PHC string) by whoever
/// hands the accounts over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAccount {
    /// Unique login name.
    pub username: String,
    /// PHC-format password hash.
    pub password_hash: String,
}

/// What a bulk import made of one account: its user and, when the import
/// named a device, that device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedAccount {
    /// The new user.
    pub user: UserRecord,
    /// The device created with it, if any.
    pub device: Option<DeviceRecord>,
}

/// A device of a user, as far as tokens are concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The user.
    pub user: UserId,
    /// Client-chosen device id.
    pub device_id: String,
    /// Bumped by logout: tokens carrying an older generation are revoked.
    pub token_generation: u64,
    /// Last login, Unix milliseconds.
    pub last_login_ms: i64,
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Created the group; can do everything.
    Owner,
    /// Can add and remove members.
    Admin,
    /// Can send and read.
    Member,
}

/// A group's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Id.
    pub id: GroupId,
    /// Display name.
    pub name: String,
    /// Creator.
    pub owner: UserId,
    /// Current number of members.
    pub member_count: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
}

/// A group member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The user.
    pub user: UserId,
    /// The role.
    pub role: Role,
}

/// A device's positions in one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermarks {
    /// Highest seq the device acknowledged as delivered.
    pub delivered: Seq,
    /// Highest seq the user marked as read (shared by the user's devices).
    pub read: Seq,
}

/// One delivered watermark to raise: the device of `user` named
/// `device_id` holds `conversation` up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredMark {
    /// The user owning the device.
    pub user: UserId,
    /// The device.
    pub device_id: String,
    /// The conversation.
    pub conversation: ConversationId,
    /// The seq to raise the watermark to (never lowered).
    pub seq: Seq,
}

/// Something the router gave up on after its retries, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Store-assigned id, ascending in insertion order (0 when inserting).
    pub id: u64,
    /// What failed ("push", "fanout", ...).
    pub kind: String,
    /// The work item, as the router serialised it, so it can be replayed.
    pub payload: Vec<u8>,
    /// The error code (50006 for retries exhausted).
    pub code: u32,
    /// The last error, for humans.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it was dead-lettered, Unix milliseconds.
    pub created_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_have_one_canonical_spelling() {
        let dm = ConversationId::direct(9, 3).unwrap();
        assert_eq!(dm.to_string(), "dm:3:9");
        assert_eq!("dm:3:9".parse::<ConversationId>().unwrap(), dm);
        assert_eq!(
            "g:42".parse::<ConversationId>().unwrap(),
            ConversationId::Group(42)
        );
        for bad in [
            "dm:9:3", "dm:3:3", "dm:0:3", "g:0", "g:01", "g:", "x:1", "dm:1", "dm:a:b", "g:-1", "",
        ] {
            assert!(
                bad.parse::<ConversationId>().is_err(),
                "{bad} must be rejected"
            );
        }
        assert!(dm.is_direct_party(3) && dm.is_direct_party(9) && !dm.is_direct_party(4));
    }
}
