//! Typed store errors. Each maps onto a stable code of the system table
//! (see `docs/error-codes.md`); the mapping lives with the callers that
//! speak codes (router, HTTP API), this crate stays free of the wire.

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The conversation, group, user or dead letter does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The user is not a member of the conversation (or lacks the role).
    #[error("user {user} is not a member of {conversation}")]
    NotMember {
        /// Who asked.
        user: u64,
        /// Which conversation.
        conversation: String,
    },
    /// A unique value already exists (username taken, member already there).
    #[error("conflict: {0}")]
    Conflict(String),
    /// An argument is invalid (body too large, empty client_msg_id, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The backend failed; the call may be retried.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;
