//! The input checks every backend makes before it stores anything, so a
//! bad message gets the same typed error whatever the backend (see
//! `MessageStore::append`).

use crate::{MAX_BODY_BYTES, NewMessage, StoreError, StoreResult};

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
