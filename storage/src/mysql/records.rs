//! Row mappings: MySQL rows to the domain records, column by column, with
//! a `Corrupt` error naming the column when a stored value does not fit.

use bytes::Bytes;
use sqlx::Row;
use sqlx::mysql::MySqlRow;

use super::corrupt_column;
use crate::{
    ConversationId, DeadLetter, DeviceRecord, GroupRecord, StoreError, StoreResult, StoredMessage,
    UserRecord,
};

fn get<'r, T>(row: &'r MySqlRow, column: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, sqlx::MySql> + sqlx::Type<sqlx::MySql>,
{
    row.try_get(column).map_err(|e| corrupt_column(column, e))
}

/// A text column. Columns with a binary collation (`utf8mb4_bin`: ids
/// compare byte for byte) reach the driver flagged binary, which it will
/// not decode as `String`; their bytes are UTF-8 by construction.
pub fn text(row: &MySqlRow, column: &str) -> StoreResult<String> {
    let bytes: Vec<u8> = get(row, column)?;
    String::from_utf8(bytes).map_err(|_| StoreError::Corrupt(format!("{column}: not UTF-8")))
}

/// `users` row.
pub fn user(row: &MySqlRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        id: get(row, "id")?,
        username: text(row, "username")?,
        password_hash: text(row, "password_hash")?,
        created_ms: get(row, "created_ms")?,
    })
}

/// `devices` row.
pub fn device(row: &MySqlRow) -> StoreResult<DeviceRecord> {
    Ok(DeviceRecord {
        user: get(row, "user_id")?,
        device_id: text(row, "device_id")?,
        token_generation: get(row, "token_generation")?,
        last_login_ms: get(row, "last_login_ms")?,
    })
}

/// `chat_groups` row.
pub fn group(row: &MySqlRow) -> StoreResult<GroupRecord> {
    Ok(GroupRecord {
        id: get(row, "id")?,
        name: text(row, "name")?,
        owner: get(row, "owner_id")?,
        member_count: get(row, "member_count")?,
        created_ms: get(row, "created_ms")?,
    })
}

/// `messages` row (the columns of [`MESSAGE_COLUMNS`]) of `conversation`.
pub fn message(row: &MySqlRow) -> StoreResult<StoredMessage> {
    let conversation: ConversationId = super::conversation_column(row, 0)?;
    let body: Vec<u8> = get(row, "body")?;
    Ok(StoredMessage {
        conversation,
        seq: get(row, "seq")?,
        msg_id: text(row, "msg_id")?,
        sender: get(row, "sender_id")?,
        sender_device: text(row, "sender_device")?,
        client_msg_id: text(row, "client_msg_id")?,
        content_type: get(row, "content_type")?,
        body: Bytes::from(body),
        server_time_ms: get(row, "server_time_ms")?,
    })
}

/// The columns [`message`] reads, conversation first.
pub const MESSAGE_COLUMNS: &str = "conversation_id, seq, msg_id, sender_id, sender_device, \
     client_msg_id, content_type, body, server_time_ms";

/// `dead_letters` row.
pub fn dead_letter(row: &MySqlRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: get(row, "id")?,
        kind: text(row, "kind")?,
        payload: get(row, "payload")?,
        code: get(row, "code")?,
        error: text(row, "error")?,
        attempts: get(row, "attempts")?,
        created_ms: get(row, "created_ms")?,
    })
}
