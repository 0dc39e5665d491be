//! Byte encodings of the embedded store's keys and values.
//!
//! Every integer in a key is big-endian so that the LSM's byte order is the
//! numeric order: a prefix scan of `(conversation, seq)` keys returns a
//! conversation's timeline in seq order, and `(group, user)` keys return
//! members in user id order. Values that are read on the hot path (messages)
//! use a hand-written binary layout; rarely-read records use JSON.

use bytes::Bytes;

use crate::{ConversationId, Seq, StoreResult, StoredMessage, UserId};

pub use crate::codec::{ConversationKey, be_u64, corrupt, decode_conversation, idempotency_key};

/// First byte of an encoded message value, so the layout can evolve.
const MESSAGE_VALUE_V1: u8 = 1;

/// Reads a big-endian u64 value, checking its length.
pub fn value_u64(bytes: &[u8]) -> StoreResult<u64> {
    if bytes.len() != 8 {
        return Err(corrupt("u64 value"));
    }
    Ok(be_u64(bytes))
}

/// `(conversation, seq)`: the timeline key of one message.
pub fn message_key(conversation: ConversationId, seq: Seq) -> Vec<u8> {
    let conv = ConversationKey::new(conversation);
    let mut key = Vec::with_capacity(conv.as_bytes().len() + 8);
    key.extend_from_slice(conv.as_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Two big-endian ids: `(group, user)` membership, `(user, group)` etc.
pub fn pair_key(a: u64, b: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&a.to_be_bytes());
    key[8..].copy_from_slice(&b.to_be_bytes());
    key
}

/// `(user, conversation)`: the user's conversation index and read watermark.
pub fn user_conversation_key(user: UserId, conversation: ConversationId) -> Vec<u8> {
    let conv = ConversationKey::new(conversation);
    let mut key = Vec::with_capacity(8 + conv.as_bytes().len());
    key.extend_from_slice(&user.to_be_bytes());
    key.extend_from_slice(conv.as_bytes());
    key
}

/// `(user, device)`: a device record. The device id is length-prefixed so
/// that no device's key is a prefix of another's.
pub fn device_key(user: UserId, device_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + 2 + device_id.len());
    key.extend_from_slice(&user.to_be_bytes());
    key.extend_from_slice(&(device_id.len() as u16).to_be_bytes());
    key.extend_from_slice(device_id.as_bytes());
    key
}

/// `(user, device, conversation)`: a delivered watermark.
pub fn delivered_key(user: UserId, device_id: &str, conversation: ConversationId) -> Vec<u8> {
    let mut key = device_key(user, device_id);
    key.extend_from_slice(ConversationKey::new(conversation).as_bytes());
    key
}

/// Encodes a message value (the key already holds conversation and seq):
/// version, sender, server time, content type, three u8-length-prefixed
/// strings (msg_id, sender_device, client_msg_id), then the body.
pub fn encode_message(message: &StoredMessage, out: &mut Vec<u8>) {
    out.clear();
    out.push(MESSAGE_VALUE_V1);
    out.extend_from_slice(&message.sender.to_le_bytes());
    out.extend_from_slice(&message.server_time_ms.to_le_bytes());
    out.extend_from_slice(&message.content_type.to_le_bytes());
    for text in [
        &message.msg_id,
        &message.sender_device,
        &message.client_msg_id,
    ] {
        // Lengths are checked at validation (MAX_ID_BYTES).
        out.push(text.len() as u8);
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&message.body);
}

/// Decodes a message value stored under `(conversation, seq)`.
pub fn decode_message(
    conversation: ConversationId,
    seq: Seq,
    value: &[u8],
) -> StoreResult<StoredMessage> {
    let bad = || corrupt("message value");
    let (&version, rest) = value.split_first().ok_or_else(bad)?;
    if version != MESSAGE_VALUE_V1 || rest.len() < 20 {
        return Err(bad());
    }
    let sender = u64::from_le_bytes(rest[0..8].try_into().map_err(|_| bad())?);
    let server_time_ms = i64::from_le_bytes(rest[8..16].try_into().map_err(|_| bad())?);
    let content_type = i32::from_le_bytes(rest[16..20].try_into().map_err(|_| bad())?);
    let mut rest = &rest[20..];
    let mut text = || -> StoreResult<String> {
        let (&len, tail) = rest.split_first().ok_or_else(bad)?;
        let len = len as usize;
        if tail.len() < len {
            return Err(bad());
        }
        let s = std::str::from_utf8(&tail[..len]).map_err(|_| bad())?;
        rest = &tail[len..];
        Ok(s.to_string())
    };
    let msg_id = text()?;
    let sender_device = text()?;
    let client_msg_id = text()?;
    Ok(StoredMessage {
        conversation,
        seq,
        msg_id,
        sender,
        sender_device,
        client_msg_id,
        content_type,
        body: Bytes::copy_from_slice(rest),
        server_time_ms,
    })
}

/// Decodes an idempotency value: the message key (conversation, seq) of
/// the first message stored under the key.
pub fn decode_location(value: &[u8]) -> StoreResult<(ConversationId, Seq)> {
    let (conversation, rest) = decode_conversation(value)?;
    if rest.len() != 8 {
        return Err(corrupt("idempotency value"));
    }
    Ok((conversation, be_u64(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_values_round_trip() {
        let message = StoredMessage {
            conversation: ConversationId::Group(7),
            seq: 3,
            msg_id: "0190-abc".into(),
            sender: 42,
            sender_device: "phone".into(),
            client_msg_id: "c-1".into(),
            content_type: 2,
            body: Bytes::from_static(b"hello"),
            server_time_ms: -5,
        };
        let mut value = Vec::new();
        encode_message(&message, &mut value);
        assert_eq!(
            decode_message(ConversationId::Group(7), 3, &value).unwrap(),
            message
        );
        assert!(decode_message(ConversationId::Group(7), 3, &value[..10]).is_err());
    }

    #[test]
    fn conversation_keys_sort_like_conversation_ids() {
        let mut ids = vec![
            ConversationId::Group(300),
            ConversationId::direct(2, 9).unwrap(),
            ConversationId::Group(2),
            ConversationId::direct(1, 700).unwrap(),
        ];
        let mut by_key = ids.clone();
        by_key.sort_by_key(|c| ConversationKey::new(*c).as_bytes().to_vec());
        ids.sort();
        assert_eq!(ids, by_key);
        for id in ids {
            let key = ConversationKey::new(id);
            assert_eq!(decode_conversation(key.as_bytes()).unwrap().0, id);
        }
    }
}
