//! Conversions between stored records and wire frames, and the mapping of
//! failures onto stable error codes. Frames leave here encoded (length
//! prefix included), ready to be shared.

use bytes::Bytes;
use pingme_protocol::v1::{self, server_frame};
use pingme_protocol::{ErrorCode, ServerFrame, encode_frame};
use pingme_storage::{ContentType, StoreError, StoredMessage};

/// How long a text preview in a push may be, in characters.
const PREVIEW_CHARS: usize = 100;

/// The wire form of a stored message.
pub fn wire_message(message: &StoredMessage) -> v1::Message {
    v1::Message {
        conversation_id: message.conversation.to_string(),
        seq: message.seq,
        msg_id: message.msg_id.clone(),
        sender_id: message.sender,
        sender_device: message.sender_device.clone(),
        client_msg_id: message.client_msg_id.clone(),
        content_type: message.content_type,
        body: message.body.clone(),
        server_time_ms: message.server_time_ms,
    }
}

/// Encodes a server frame with `body` answering `request_id`.
pub fn frame(request_id: u64, body: server_frame::Body) -> Bytes {
    encode_frame(&ServerFrame {
        request_id,
        body: Some(body),
    })
}

/// The `Deliver` frame of a message, pushed (request id 0).
pub fn deliver_frame(message: &StoredMessage) -> Bytes {
    frame(
        0,
        server_frame::Body::Deliver(v1::Deliver {
            message: Some(wire_message(message)),
        }),
    )
}

/// The `SendAck` of a stored message (the same for every retry).
pub fn ack_frame(request_id: u64, message: &StoredMessage) -> Bytes {
    frame(
        request_id,
        server_frame::Body::SendAck(v1::SendAck {
            client_msg_id: message.client_msg_id.clone(),
            msg_id: message.msg_id.clone(),
            conversation_id: message.conversation.to_string(),
            seq: message.seq,
            server_time_ms: message.server_time_ms,
        }),
    )
}

/// An `Error` answer; `client_msg_id` is set for failed sends.
pub fn error_frame(
    request_id: u64,
    code: ErrorCode,
    message: impl Into<String>,
    client_msg_id: &str,
) -> Bytes {
    let mut error = ServerFrame::error(request_id, code, message);
    if let Some(server_frame::Body::Error(e)) = error.body.as_mut() {
        e.client_msg_id = client_msg_id.to_string();
    }
    encode_frame(&error)
}

/// The code a client sees for a store failure: the one mapping, used by
/// the router's answers and the gateway's HTTP API alike.
pub fn store_error_code(error: &StoreError) -> ErrorCode {
    match error {
        StoreError::NotFound(_) => ErrorCode::NotFound,
        StoreError::NotMember { .. } => ErrorCode::Forbidden,
        StoreError::Conflict(_) => ErrorCode::Conflict,
        StoreError::Invalid(_) => ErrorCode::InvalidArgument,
        StoreError::Unavailable(_) => ErrorCode::StorageUnavailable,
        StoreError::Corrupt(_) => ErrorCode::StorageCorrupt,
    }
}

/// Whether a content type is one the server accepts in a send.
pub fn content_type_is_valid(content_type: ContentType) -> bool {
    matches!(
        v1::ContentType::try_from(content_type),
        Ok(t) if t != v1::ContentType::Unspecified
    )
}

/// What an offline push shows: a text excerpt or the kind of attachment.
pub fn push_preview(content_type: ContentType, body: &[u8]) -> String {
    match v1::ContentType::try_from(content_type) {
        Ok(v1::ContentType::Text) => {
            let text = String::from_utf8_lossy(body);
            let mut chars = text.chars();
            let mut excerpt: String = chars.by_ref().take(PREVIEW_CHARS).collect();
            if chars.next().is_some() {
                excerpt.push('…');
            }
            excerpt
        }
        Ok(v1::ContentType::Image) => "[image]".to_string(),
        Ok(v1::ContentType::File) => "[file]".to_string(),
        Ok(v1::ContentType::Voice) => "[voice]".to_string(),
        _ => "[message]".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_name_attachments_and_cut_long_text() {
        assert_eq!(push_preview(1, "héllo".as_bytes()), "héllo");
        let long = "x".repeat(300);
        assert_eq!(push_preview(1, long.as_bytes()).chars().count(), 101);
        assert_eq!(push_preview(2, b"url"), "[image]");
        assert_eq!(push_preview(3, b"url"), "[file]");
        assert_eq!(push_preview(4, b"url"), "[voice]");
        assert_eq!(push_preview(5, b"{}"), "[message]");
        assert_eq!(push_preview(1, &[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn only_known_content_types_are_valid() {
        assert!(!content_type_is_valid(0));
        assert!((1..=5).all(content_type_is_valid));
        assert!(!content_type_is_valid(6));
        assert!(!content_type_is_valid(-1));
    }
}
