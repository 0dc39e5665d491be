//! Framing: the 4-byte big-endian length prefix, the maximum frame size and
//! the split between "need more bytes" and "malformed". Every check happens
//! before any allocation sized by the peer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::ErrorCode;

/// Bytes in the length prefix.
pub const LENGTH_PREFIX: usize = 4;
/// Default limit for a client frame (protobuf bytes, prefix excluded).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 64 * 1024;
/// Limit for frames the server sends: a sync page can carry many bodies, so
/// clients accept more than the server does. The server keeps its pages
/// under this bound.
pub const MAX_DOWNSTREAM_FRAME_SIZE: usize = 4 * 1024 * 1024;

/// Why bytes could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the allowed maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// The payload is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The transport failed underneath the codec.
    #[error("transport error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The stable error code clients see for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) => ErrorCode::Malformed,
            FrameError::Io(_) => ErrorCode::Internal,
        }
    }
}

/// Splits one complete frame off the front of `buf` and returns its payload
/// (prefix removed) as `Bytes` sharing `buf`'s memory.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame; in that
/// case it reserves room for the rest, but only after the length was checked
/// against `max_frame_size`, so a peer cannot make us allocate more.
pub fn split_frame(buf: &mut BytesMut, max_frame_size: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < LENGTH_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame_size {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_size,
        });
    }
    let total = LENGTH_PREFIX + len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(LENGTH_PREFIX);
    Ok(Some(frame.freeze()))
}

/// Decodes one message from a frame payload. `bytes` fields of the result
/// point into `payload`: nothing is copied.
pub fn decode_message<M: Message + Default>(payload: Bytes) -> Result<M, FrameError> {
    Ok(M::decode(payload)?)
}

/// Appends `message` as one frame (prefix + protobuf) to `dst`.
pub fn encode_frame_into<M: Message>(message: &M, dst: &mut BytesMut) {
    let len = message.encoded_len();
    dst.reserve(LENGTH_PREFIX + len);
    // A message we build ourselves is far below 4 GiB; the cast cannot truncate
    // anything the receiver's limit would accept.
    dst.put_u32(len as u32);
    message
        .encode(dst)
        .expect("BytesMut grows on demand, so encoding cannot run out of room");
}

/// Encodes `message` as one frame into its own buffer. The result can be
/// cloned into any number of connection queues without copying.
pub fn encode_frame<M: Message>(message: &M) -> Bytes {
    let mut dst = BytesMut::with_capacity(LENGTH_PREFIX + message.encoded_len());
    encode_frame_into(message, &mut dst);
    dst.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ContentType, Deliver, Message as WireMessage, client_frame, server_frame};
    use crate::{ClientFrame, ServerFrame};

    #[test]
    fn partial_frames_ask_for_more_and_complete_frames_split() {
        let frame = encode_frame(&ClientFrame {
            request_id: 7,
            body: Some(client_frame::Body::Ping(crate::v1::Ping {
                client_time_ms: 42,
            })),
        });
        let mut buf = BytesMut::new();
        for (i, byte) in frame.iter().enumerate() {
            assert!(split_frame(&mut buf, 1024).unwrap().is_none(), "byte {i}");
            buf.put_u8(*byte);
        }
        let payload = split_frame(&mut buf, 1024).unwrap().expect("whole frame");
        let decoded: ClientFrame = decode_message(payload).unwrap();
        assert_eq!(decoded.request_id, 7);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_length_is_rejected_before_allocating() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let capacity_before = buf.capacity();
        let err = split_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == u32::MAX as usize));
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert_eq!(buf.capacity(), capacity_before);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        let payload = split_frame(&mut buf, 1024).unwrap().unwrap();
        let err = decode_message::<ClientFrame>(payload).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Malformed);
    }

    #[test]
    fn decoded_body_borrows_the_read_buffer() {
        let body = Bytes::from(vec![b'x'; 1000]);
        let frame = encode_frame(&ServerFrame {
            request_id: 0,
            body: Some(server_frame::Body::Deliver(Deliver {
                message: Some(WireMessage {
                    conversation_id: "g:1".into(),
                    seq: 1,
                    content_type: ContentType::Text as i32,
                    body: body.clone(),
                    ..Default::default()
                }),
            })),
        });
        let mut read_buffer = BytesMut::from(&frame[..]);
        let payload = split_frame(&mut read_buffer, MAX_DOWNSTREAM_FRAME_SIZE)
            .unwrap()
            .unwrap();
        let range = payload.as_ptr() as usize..payload.as_ptr() as usize + payload.len();
        let decoded: ServerFrame = decode_message(payload.clone()).unwrap();
        let Some(server_frame::Body::Deliver(deliver)) = decoded.body else {
            panic!("not a deliver frame");
        };
        let decoded_body = deliver.message.unwrap().body;
        assert_eq!(decoded_body, body);
        // The body's bytes lie inside the frame payload: a slice, not a copy.
        assert!(range.contains(&(decoded_body.as_ptr() as usize)));
    }

    #[test]
    fn a_shared_frame_is_encoded_once() {
        let frame = encode_frame(&ServerFrame::default());
        let queues: Vec<Bytes> = (0..10_000).map(|_| frame.clone()).collect();
        assert!(queues.iter().all(|q| q.as_ptr() == frame.as_ptr()));
    }
}
