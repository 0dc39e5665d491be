//! The input checks every backend makes before it stores anything, so a
//! bad message gets the same typed error whatever the backend (see
//! `MessageStore::append`), and the membership rules the remote backends
//! build from their own lookups ([`RecordLookups`]).

use async_trait::async_trait;

use crate::{
    ConversationId, ConversationStore, GroupId, GroupRecord, MAX_BODY_BYTES, MAX_PAGE, NewMessage,
    Seq, StoreError, StoreResult, UserId,
};

/// Longest `client_msg_id`, `msg_id`, `sender_device` and device id a store
/// accepts, in bytes (the embedded store length-prefixes them with one
/// byte; the SQL and CQL schemas use the same bound).
pub const MAX_ID_BYTES: usize = 255;

/// `Invalid` for an id that is empty (unless allowed) or longer than
/// [`MAX_ID_BYTES`].
pub fn check_id(what: &str, value: &str, allow_empty: bool) -> StoreResult<()> {
    if value.is_empty() && !allow_empty {
        return Err(StoreError::Invalid(format!("{what} must not be empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(StoreError::Invalid(format!(
            "{what} is longer than {MAX_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

/// `Invalid` for an empty login name (its length is the HTTP API's rule).
pub fn check_username(username: &str) -> StoreResult<()> {
    if username.is_empty() {
        return Err(StoreError::Invalid("username must not be empty".into()));
    }
    Ok(())
}

/// The checks of a new message that need no stored state: ids and body size.
/// (Membership is the backend's own lookup.)
pub fn check_message_shape(message: &NewMessage) -> StoreResult<()> {
    check_id("client_msg_id", &message.client_msg_id, false)?;
    check_id("msg_id", &message.msg_id, false)?;
    check_id("sender_device", &message.sender_device, true)?;
    if message.body.len() > MAX_BODY_BYTES {
        return Err(StoreError::Invalid(format!(
            "body of {} bytes exceeds {MAX_BODY_BYTES}",
            message.body.len()
        )));
    }
    Ok(())
}

/// The error for a sender outside the conversation.
pub fn not_member(conversation: ConversationId, user: UserId) -> StoreError {
    StoreError::NotMember {
        user,
        conversation: conversation.to_string(),
    }
}

/// `message` passes when its sender is a member (as the backend found).
pub fn admit_sender(message: &NewMessage, is_member: bool) -> StoreResult<()> {
    if is_member {
        Ok(())
    } else {
        Err(not_member(message.conversation, message.sender))
    }
}

/// How many messages a timeline read (`after < seq <= until`, `until == 0`
/// unbounded) may return: `limit` capped at [`MAX_PAGE`], or `None` when
/// the bounds alone make the page empty.
pub fn timeline_page(after: Seq, until: Seq, limit: usize) -> Option<usize> {
    let limit = limit.min(MAX_PAGE);
    if limit == 0 || after == u64::MAX || (until != 0 && until <= after) {
        None
    } else {
        Some(limit)
    }
}

/// The two lookups a remote backend (MySQL, ScyllaDB) answers in its own
/// query language; the existence and membership rules built on them are
/// written once, as the provided methods.
#[async_trait]
pub trait RecordLookups: ConversationStore {
    /// The group's record, if it exists.
    async fn group_record(&self, id: GroupId) -> StoreResult<Option<GroupRecord>>;

    /// `NotFound` naming a user of `users` (sorted, distinct) that does
    /// not exist.
    async fn require_distinct_users(&self, users: &[UserId]) -> StoreResult<()>;

    /// `NotFound` unless every one of `users` exists (repeats allowed).
    async fn require_users(&self, users: &[UserId]) -> StoreResult<()> {
        let mut distinct = users.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        self.require_distinct_users(&distinct).await
    }

    /// `NotFound` unless the conversation exists (group created, or both
    /// users of a direct conversation registered).
    async fn require_conversation(&self, conversation: ConversationId) -> StoreResult<()> {
        match conversation {
            ConversationId::Group(id) => match self.group_record(id).await? {
                Some(_) => Ok(()),
                None => Err(StoreError::NotFound(format!("group {id}"))),
            },
            ConversationId::Direct { low, high } => self.require_users(&[low, high]).await,
        }
    }

    /// `ConversationStore::is_member`: a group admits its members (a
    /// missing group is `NotFound`, looked up only when the user is not a
    /// member), a direct conversation its two users if both exist.
    async fn member_of(&self, conversation: ConversationId, user: UserId) -> StoreResult<bool> {
        match conversation {
            ConversationId::Group(id) => {
                if self.member_role(id, user).await?.is_some() {
                    return Ok(true);
                }
                self.require_conversation(conversation).await?;
                Ok(false)
            }
            ConversationId::Direct { low, high } => {
                self.require_users(&[low, high]).await?;
                Ok(conversation.is_direct_party(user))
            }
        }
    }

    /// What `UserStore::touch_device` checks before it writes: the device
    /// id's shape, and that the user exists.
    async fn check_device_owner(&self, user: UserId, device_id: &str) -> StoreResult<()> {
        check_id("device_id", device_id, false)?;
        self.require_users(&[user]).await
    }
}
