//! Reads what the load generator checks of a delivery (conversation, seq,
//! sender, body) straight from the encoded `ServerFrame`, borrowing from the
//! frame's bytes. A full decode allocates a string per text field of every
//! delivered message, and at a million deliveries a second on two shared
//! cores the load generator's receive path, not the server, was the limit
//! of a fanout run (issue 17). Every other frame kind is decoded in full by
//! the caller.

use bytes::Buf;
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};

/// `ServerFrame.deliver` (pingme.proto).
const FRAME_DELIVER: u32 = 14;
/// `Deliver.message`.
const DELIVER_MESSAGE: u32 = 1;
/// `Message` fields read here.
const MESSAGE_CONVERSATION_ID: u32 = 1;
const MESSAGE_SEQ: u32 = 2;
const MESSAGE_SENDER_ID: u32 = 4;
const MESSAGE_BODY: u32 = 8;

/// The fields of a delivered message that the accounting needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveredView<'a> {
    pub conversation_id: &'a str,
    pub seq: u64,
    pub sender_id: u64,
    pub body: &'a [u8],
}

/// The same fields of a message decoded in full (a fetched page's).
impl<'a> From<&'a pingme_protocol::v1::Message> for DeliveredView<'a> {
    fn from(message: &'a pingme_protocol::v1::Message) -> Self {
        DeliveredView {
            conversation_id: &message.conversation_id,
            seq: message.seq,
            sender_id: message.sender_id,
            body: &message.body,
        }
    }
}

/// What a frame is, as far as the receive path cares.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameView<'a> {
    /// A `Deliver` with its message.
    Delivered(DeliveredView<'a>),
    /// Anything else (decode it in full).
    Other,
}

/// A frame that is not a well-formed `ServerFrame`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame(String);

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed server frame: {}", self.0)
    }
}

impl std::error::Error for BadFrame {}

impl From<DecodeError> for BadFrame {
    fn from(error: DecodeError) -> Self {
        BadFrame(error.to_string())
    }
}

/// Looks at one encoded `ServerFrame` (no length prefix).
pub fn view(frame: &[u8]) -> Result<FrameView<'_>, BadFrame> {
    let mut buf = frame;
    let mut deliver = None;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match (tag, wire_type) {
            (FRAME_DELIVER, WireType::LengthDelimited) => deliver = Some(take_bytes(&mut buf)?),
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())?,
        }
    }
    let Some(mut deliver) = deliver else {
        return Ok(FrameView::Other);
    };
    let mut message = None;
    while deliver.has_remaining() {
        let (tag, wire_type) = decode_key(&mut deliver)?;
        match (tag, wire_type) {
            (DELIVER_MESSAGE, WireType::LengthDelimited) => {
                message = Some(take_bytes(&mut deliver)?)
            }
            _ => skip_field(wire_type, tag, &mut deliver, DecodeContext::default())?,
        }
    }
    // A Deliver without a message carries nothing to check.
    let Some(mut message) = message else {
        return Ok(FrameView::Other);
    };
    let mut view = DeliveredView {
        conversation_id: "",
        seq: 0,
        sender_id: 0,
        body: &[],
    };
    while message.has_remaining() {
        let (tag, wire_type) = decode_key(&mut message)?;
        match (tag, wire_type) {
            (MESSAGE_CONVERSATION_ID, WireType::LengthDelimited) => {
                view.conversation_id = std::str::from_utf8(take_bytes(&mut message)?)
                    .map_err(|_| BadFrame("conversation_id is not UTF-8".into()))?;
            }
            (MESSAGE_SEQ, WireType::Varint) => view.seq = decode_varint(&mut message)?,
            (MESSAGE_SENDER_ID, WireType::Varint) => view.sender_id = decode_varint(&mut message)?,
            (MESSAGE_BODY, WireType::LengthDelimited) => view.body = take_bytes(&mut message)?,
            _ => skip_field(wire_type, tag, &mut message, DecodeContext::default())?,
        }
    }
    Ok(FrameView::Delivered(view))
}

/// A length-delimited field's bytes, borrowed.
fn take_bytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], BadFrame> {
    let len = decode_varint(buf)?;
    let len = usize::try_from(len).map_err(|_| BadFrame("length overflows".into()))?;
    if len > buf.len() {
        return Err(BadFrame("length past the end of the frame".into()));
    }
    let (bytes, rest) = buf.split_at(len);
    *buf = rest;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingme_protocol::v1::{Deliver, Message, Pong, ServerFrame, server_frame};
    use prost::Message as _;

    fn delivered(message: Message) -> Vec<u8> {
        ServerFrame {
            request_id: 7,
            body: Some(server_frame::Body::Deliver(Deliver {
                message: Some(message),
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn a_delivery_is_read_as_the_full_decoder_reads_it() {
        let message = Message {
            conversation_id: "g:42".into(),
            seq: 300_000,
            msg_id: "m-1".into(),
            sender_id: 1 << 40,
            sender_device: "phone".into(),
            client_msg_id: "c-9".into(),
            content_type: 1,
            body: bytes::Bytes::from_static(b"hello body"),
            server_time_ms: 1_700_000_000_000,
        };
        let frame = delivered(message.clone());
        assert_eq!(
            view(&frame).unwrap(),
            FrameView::Delivered(DeliveredView {
                conversation_id: "g:42",
                seq: 300_000,
                sender_id: 1 << 40,
                body: b"hello body",
            })
        );
    }

    #[test]
    fn other_frames_and_empty_deliveries_are_left_to_the_full_decoder() {
        let pong = ServerFrame {
            request_id: 1,
            body: Some(server_frame::Body::Pong(Pong::default())),
        }
        .encode_to_vec();
        assert_eq!(view(&pong).unwrap(), FrameView::Other);
        let empty = ServerFrame {
            request_id: 0,
            body: Some(server_frame::Body::Deliver(Deliver { message: None })),
        }
        .encode_to_vec();
        assert_eq!(view(&empty).unwrap(), FrameView::Other);
    }

    #[test]
    fn truncated_or_malformed_frames_are_errors() {
        let frame = delivered(Message {
            conversation_id: "d:1:2".into(),
            seq: 5,
            body: bytes::Bytes::from_static(b"0123456789"),
            ..Message::default()
        });
        // The first two bytes are the request id (a whole frame by
        // itself); every cut after them falls inside the delivery.
        assert_eq!(view(&frame[..2]).unwrap(), FrameView::Other);
        for end in 3..frame.len() {
            assert!(view(&frame[..end]).is_err(), "cut at {end} accepted");
        }
        let bad_utf8 = delivered(Message {
            conversation_id: String::from_utf8_lossy(&[0x61]).into(),
            ..Message::default()
        });
        let mut bad = bad_utf8.clone();
        let at = bad.iter().position(|&b| b == 0x61).unwrap();
        bad[at] = 0xff;
        assert!(view(&bad).is_err());
        assert!(view(&bad_utf8).is_ok());
    }
}
