//! Row shapes as the driver decodes them (tuples in the column order of
//! the `cql` statements) and their mapping to the domain records. CQL has
//! no unsigned integers: ids and seqs are stored as `bigint`, the same 64
//! bits reinterpreted ([`id_to_i64`]), so every id pingme assigns
//! round-trips exactly.

use bytes::Bytes;

use crate::codec::conversation_from_key;
use crate::{
    ConversationId, DeadLetter, DeviceRecord, GroupRecord, NewMessage, Seq, StoreResult,
    StoredMessage, UserRecord,
};

/// `users`: id, username, password_hash, created_ms.
pub type UserRow = (i64, String, String, i64);
/// `devices`: user_id, device_id, token_generation, last_login_ms.
pub type DeviceRow = (i64, String, i64, i64);
/// `groups`: id, name, owner_id, created_ms.
pub type GroupRow = (i64, String, i64, i64);
/// `messages` ([`super::cql::MESSAGE_COLUMNS`]): seq, msg_id, sender_id,
/// sender_device, client_msg_id, content_type, body, server_time_ms.
pub type MessageRow = (i64, String, i64, String, String, i32, Vec<u8>, i64);
/// `idempotency`: conversation_id, seq, trying_seq, claimed_ms.
pub type KeyRow = (Vec<u8>, i64, i64, i64);
/// `dead_letters`: id, kind, payload, code, error, attempts, created_ms.
pub type DeadLetterRow = (i64, String, Vec<u8>, i32, String, i32, i64);

/// An id (or seq) as CQL `bigint`.
pub fn id_to_i64(id: u64) -> i64 {
    id as i64
}

/// A CQL `bigint` back to the id.
fn id(value: i64) -> u64 {
    value as u64
}

pub fn user((user_id, username, password_hash, created_ms): UserRow) -> UserRecord {
    UserRecord {
        id: id(user_id),
        username,
        password_hash,
        created_ms,
    }
}

pub fn device((user, device_id, generation, last_login_ms): DeviceRow) -> DeviceRecord {
    DeviceRecord {
        user: id(user),
        device_id,
        token_generation: id(generation),
        last_login_ms,
    }
}

/// A group row with its member counter.
pub fn group((group_id, name, owner, created_ms): GroupRow, member_count: i64) -> GroupRecord {
    GroupRecord {
        id: id(group_id),
        name,
        owner: id(owner),
        member_count: member_count.max(0) as u64,
        created_ms,
    }
}

pub fn message(conversation: ConversationId, row: MessageRow) -> StoredMessage {
    let (seq, msg_id, sender, sender_device, client_msg_id, content_type, body, server_time_ms) =
        row;
    StoredMessage {
        conversation,
        seq: id(seq),
        msg_id,
        sender: id(sender),
        sender_device,
        client_msg_id,
        content_type,
        body: Bytes::from(body),
        server_time_ms,
    }
}

/// The row a new message is inserted as at `seq` (the bound values after
/// the partition key).
pub fn message_insert(
    message: &NewMessage,
    seq: Seq,
) -> (i64, &str, i64, &str, &str, i32, &[u8], i64) {
    (
        id_to_i64(seq),
        &message.msg_id,
        id_to_i64(message.sender),
        &message.sender_device,
        &message.client_msg_id,
        message.content_type,
        &message.body,
        message.server_time_ms,
    )
}

/// The stored form of a new message given `seq`.
pub fn stored(message: &NewMessage, seq: Seq) -> StoredMessage {
    StoredMessage {
        conversation: message.conversation,
        seq,
        msg_id: message.msg_id.clone(),
        sender: message.sender,
        sender_device: message.sender_device.clone(),
        client_msg_id: message.client_msg_id.clone(),
        content_type: message.content_type,
        body: message.body.clone(),
        server_time_ms: message.server_time_ms,
    }
}

/// An idempotency row: the first message's conversation, its seq (0 while
/// its writer works), the seq being tried, and when it was claimed.
pub fn key(
    (conversation, seq, trying, claimed_ms): KeyRow,
) -> StoreResult<(ConversationId, Seq, Seq, i64)> {
    Ok((
        conversation_from_key(&conversation)?,
        id(seq),
        id(trying),
        claimed_ms,
    ))
}

pub fn dead_letter(
    (letter_id, kind, payload, code, error, attempts, created_ms): DeadLetterRow,
) -> DeadLetter {
    DeadLetter {
        id: id(letter_id),
        kind,
        payload,
        code: code as u32,
        error,
        attempts: attempts as u32,
        created_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ConversationKey;

    #[test]
    fn ids_round_trip_through_bigint() {
        for value in [1u64, 42, i64::MAX as u64, u64::MAX - 7, u64::MAX] {
            assert_eq!(id(id_to_i64(value)), value);
        }
    }

    #[test]
    fn rows_map_to_records_and_back() {
        let new = NewMessage {
            conversation: ConversationId::Group(7),
            sender: 3,
            sender_device: "phone".into(),
            client_msg_id: "c-1".into(),
            msg_id: "m-1".into(),
            content_type: 2,
            body: Bytes::from_static(b"hello"),
            server_time_ms: 1_700_000_000_000,
        };
        let bound = message_insert(&new, 12_345);
        let row: MessageRow = (
            bound.0,
            bound.1.to_string(),
            bound.2,
            bound.3.to_string(),
            bound.4.to_string(),
            bound.5,
            bound.6.to_vec(),
            bound.7,
        );
        let read = message(new.conversation, row);
        assert_eq!(read, stored(&new, 12_345));

        assert_eq!(
            user((9, "ann".into(), "h".into(), 5)),
            UserRecord {
                id: 9,
                username: "ann".into(),
                password_hash: "h".into(),
                created_ms: 5
            }
        );
        assert_eq!(device((9, "d".into(), 3, 8)).token_generation, 3);
        let record = group((4, "g".into(), 9, 1), 12);
        assert_eq!((record.id, record.owner, record.member_count), (4, 9, 12));
        assert_eq!(
            group((4, "g".into(), 9, 1), -1).member_count,
            0,
            "never negative"
        );
        let dm = ConversationId::direct(2, 5).unwrap();
        let (conversation, seq, trying, claimed) =
            key((ConversationKey::new(dm).to_vec(), 0, 4, 99)).unwrap();
        assert_eq!((conversation, seq, trying, claimed), (dm, 0, 4, 99));
        assert!(key((b"bad".to_vec(), 0, 0, 0)).is_err());
        let letter = dead_letter((3, "push".into(), vec![1], 50006, "x".into(), 2, 7));
        assert_eq!((letter.id, letter.code, letter.attempts), (3, 50006, 2));
    }
}
