//! Property tests of the wire contract: every `ClientFrame` and `ServerFrame`
//! body survives encode -> split -> decode unchanged, alone, in streams and
//! cut into arbitrary chunks; and arbitrary bytes fed to the decoder either
//! decode, ask for more, or fail with a typed error (never a panic).

use bytes::{BufMut, Bytes, BytesMut};
use pingme_protocol::v1::{
    self, AuthOk, Authenticate, ConversationState, Deliver, DeliveryAck, FetchMessages, GoAway,
    Hello, HelloAck, MessagePage, Ping, PresenceEvent, PresenceList, PresenceQuery, ReadMarker,
    ReadReceipt, SendAck, SendMessage, SyncRequest, SyncResponse, Typing, TypingEvent,
    client_frame, server_frame,
};
use pingme_protocol::{
    ClientCodec, ClientFrame, DEFAULT_MAX_FRAME_SIZE, FrameError, MAX_DOWNSTREAM_FRAME_SIZE,
    ServerCodec, ServerFrame, decode_message, encode_frame, split_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

// ---- strategies for the building blocks -------------------------------------

/// Conversation ids in both shapes, plus arbitrary text (the wire does not
/// validate them; the server does).
fn conversation_id() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| format!("dm:{}:{}", a.min(b), a.max(b))),
        any::<u64>().prop_map(|g| format!("g:{g}")),
        ".{0,40}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    ".{0,64}"
}

fn body() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..512).prop_map(Bytes::from)
}

/// Enum fields are open in proto3: any i32 must survive, known or not.
fn enum_value(known: i32) -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0..=known, 1 => any::<i32>()]
}

fn wire_message() -> impl Strategy<Value = v1::Message> {
    (
        conversation_id(),
        any::<u64>(),
        text(),
        any::<u64>(),
        text(),
        text(),
        enum_value(5),
        body(),
        any::<i64>(),
    )
        .prop_map(
            |(
                conversation_id,
                seq,
                msg_id,
                sender_id,
                sender_device,
                client_msg_id,
                content_type,
                body,
                server_time_ms,
            )| v1::Message {
                conversation_id,
                seq,
                msg_id,
                sender_id,
                sender_device,
                client_msg_id,
                content_type,
                body,
                server_time_ms,
            },
        )
}

fn presence_event() -> impl Strategy<Value = PresenceEvent> {
    (any::<u64>(), any::<bool>(), any::<i64>()).prop_map(|(user_id, online, last_seen_ms)| {
        PresenceEvent {
            user_id,
            online,
            last_seen_ms,
        }
    })
}

// ---- one strategy per body variant ------------------------------------------

fn client_body() -> impl Strategy<Value = client_frame::Body> {
    use client_frame::Body;
    prop_oneof![
        (any::<u32>(), any::<u32>(), text()).prop_map(|(max_version, min_version, client_name)| {
            Body::Hello(Hello {
                max_version,
                min_version,
                client_name,
            })
        }),
        ".{0,300}".prop_map(|token| Body::Authenticate(Authenticate { token })),
        any::<i64>().prop_map(|client_time_ms| Body::Ping(Ping { client_time_ms })),
        (text(), conversation_id(), enum_value(5), body()).prop_map(
            |(client_msg_id, conversation_id, content_type, body)| Body::Send(SendMessage {
                client_msg_id,
                conversation_id,
                content_type,
                body,
            })
        ),
        (conversation_id(), any::<u64>()).prop_map(|(conversation_id, seq)| Body::DeliveryAck(
            DeliveryAck {
                conversation_id,
                seq
            }
        )),
        (conversation_id(), any::<u64>()).prop_map(|(conversation_id, seq)| Body::ReadMarker(
            ReadMarker {
                conversation_id,
                seq
            }
        )),
        (conversation_id(), any::<bool>()).prop_map(|(conversation_id, active)| Body::Typing(
            Typing {
                conversation_id,
                active
            }
        )),
        (conversation_id(), any::<u32>()).prop_map(|(after_conversation_id, limit)| Body::Sync(
            SyncRequest {
                after_conversation_id,
                limit
            }
        )),
        (conversation_id(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(conversation_id, after_seq, until_seq, limit)| Body::Fetch(FetchMessages {
                conversation_id,
                after_seq,
                until_seq,
                limit,
            })
        ),
        vec(any::<u64>(), 0..50)
            .prop_map(|user_ids| Body::PresenceQuery(PresenceQuery { user_ids })),
    ]
}

fn server_body() -> impl Strategy<Value = server_frame::Body> {
    use server_frame::Body;
    prop_oneof![
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(version, max_frame_size, heartbeat_interval_ms, idle_timeout_ms)| {
                Body::HelloAck(HelloAck {
                    version,
                    max_frame_size,
                    heartbeat_interval_ms,
                    idle_timeout_ms,
                    ..Default::default()
                })
            }
        ),
        (any::<u64>(), text(), any::<i64>()).prop_map(|(user_id, device_id, server_time_ms)| {
            Body::AuthOk(AuthOk {
                user_id,
                device_id,
                server_time_ms,
            })
        }),
        (any::<i64>(), any::<i64>()).prop_map(|(client_time_ms, server_time_ms)| Body::Pong(
            v1::Pong {
                client_time_ms,
                server_time_ms
            }
        )),
        (
            text(),
            text(),
            conversation_id(),
            any::<u64>(),
            any::<i64>()
        )
            .prop_map(
                |(client_msg_id, msg_id, conversation_id, seq, server_time_ms)| {
                    Body::SendAck(SendAck {
                        client_msg_id,
                        msg_id,
                        conversation_id,
                        seq,
                        server_time_ms,
                    })
                }
            ),
        proptest::option::of(wire_message()).prop_map(|message| Body::Deliver(Deliver { message })),
        (conversation_id(), any::<u64>(), any::<u64>()).prop_map(
            |(conversation_id, user_id, seq)| Body::ReadReceipt(ReadReceipt {
                conversation_id,
                user_id,
                seq
            })
        ),
        (conversation_id(), any::<u64>(), any::<bool>()).prop_map(
            |(conversation_id, user_id, active)| Body::Typing(TypingEvent {
                conversation_id,
                user_id,
                active
            })
        ),
        presence_event().prop_map(Body::Presence),
        (
            vec(
                (conversation_id(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                    |(conversation_id, latest_seq, delivered_seq, read_seq)| ConversationState {
                        conversation_id,
                        latest_seq,
                        delivered_seq,
                        read_seq,
                    }
                ),
                0..20
            ),
            any::<bool>(),
            conversation_id()
        )
            .prop_map(|(conversations, has_more, next_after_conversation_id)| {
                Body::Sync(SyncResponse {
                    conversations,
                    has_more,
                    next_after_conversation_id,
                })
            }),
        (conversation_id(), vec(wire_message(), 0..8), any::<bool>()).prop_map(
            |(conversation_id, messages, has_more)| Body::Page(MessagePage {
                conversation_id,
                messages,
                has_more
            })
        ),
        (enum_value(4), any::<u32>(), text(), text()).prop_map(
            |(reason, retry_after_ms, reconnect_to, message)| Body::GoAway(GoAway {
                reason,
                retry_after_ms,
                reconnect_to,
                message,
            })
        ),
        (any::<u32>(), text(), text(), any::<bool>()).prop_map(
            |(code, message, client_msg_id, fatal)| Body::Error(v1::Error {
                code,
                message,
                client_msg_id,
                fatal,
            })
        ),
        vec(presence_event(), 0..20).prop_map(|users| Body::PresenceList(PresenceList { users })),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    (any::<u64>(), proptest::option::of(client_body()))
        .prop_map(|(request_id, body)| ClientFrame { request_id, body })
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    (any::<u64>(), proptest::option::of(server_body()))
        .prop_map(|(request_id, body)| ServerFrame { request_id, body })
}

/// Cuts `wire` into consecutive chunks whose lengths come from `cuts`
/// (cycled), so a decoder sees frames split at arbitrary places.
fn chunks(wire: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < wire.len() {
        let len = cuts[i % cuts.len()].max(1).min(wire.len() - at);
        out.push(wire[at..at + len].to_vec());
        at += len;
        i += 1;
    }
    out
}

/// Drives a tokio-util decoder over chunked input the way `FramedRead` does.
/// Returns the decoded frames, and the error if one stopped decoding.
fn feed<D: Decoder>(decoder: &mut D, pieces: &[Vec<u8>]) -> (Vec<D::Item>, Option<D::Error>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.put_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(item)) => out.push(item),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_frames_round_trip(frame in client_frame()) {
        let mut wire = BytesMut::from(&encode_frame(&frame)[..]);
        let payload = split_frame(&mut wire, MAX_DOWNSTREAM_FRAME_SIZE)
            .expect("own frame within limit")
            .expect("complete frame");
        prop_assert!(wire.is_empty());
        let decoded: ClientFrame = decode_message(payload).expect("own frame decodes");
        prop_assert_eq!(decoded, frame);
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        let mut wire = BytesMut::from(&encode_frame(&frame)[..]);
        let payload = split_frame(&mut wire, MAX_DOWNSTREAM_FRAME_SIZE)
            .expect("own frame within limit")
            .expect("complete frame");
        prop_assert!(wire.is_empty());
        let decoded: ServerFrame = decode_message(payload).expect("own frame decodes");
        prop_assert_eq!(decoded, frame);
    }

    /// A stream of client frames cut anywhere comes out of the server's codec
    /// whole and in order.
    #[test]
    fn chunked_client_stream_decodes_in_order(
        frames in vec(client_frame(), 1..8),
        cuts in vec(1usize..64, 1..16),
    ) {
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend_from_slice(&encode_frame(frame));
        }
        let mut codec = ServerCodec::new(MAX_DOWNSTREAM_FRAME_SIZE);
        let (decoded, error) = feed(&mut codec, &chunks(&wire, &cuts));
        prop_assert!(error.is_none(), "{error:?}");
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn chunked_server_stream_decodes_in_order(
        frames in vec(server_frame(), 1..8),
        cuts in vec(1usize..64, 1..16),
    ) {
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend_from_slice(&encode_frame(frame));
        }
        let mut codec = ClientCodec::default();
        let (decoded, error) = feed(&mut codec, &chunks(&wire, &cuts));
        prop_assert!(error.is_none(), "{error:?}");
        prop_assert_eq!(decoded, frames);
    }

    /// Arbitrary bytes: each step decodes a frame, asks for more (leaving the
    /// buffer intact), or fails with a typed error carrying a stable code.
    #[test]
    fn arbitrary_bytes_never_panic_split_and_decode(bytes in vec(any::<u8>(), 0..2048)) {
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match split_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE) {
                Ok(Some(payload)) => {
                    prop_assert_eq!(before - buf.len(), payload.len() + 4);
                    if let Err(e) = decode_message::<ClientFrame>(payload.clone()) {
                        prop_assert_eq!(e.code(), pingme_protocol::ErrorCode::Malformed);
                    }
                    // The same bytes are also fed to the other direction's type.
                    let _ = decode_message::<ServerFrame>(payload);
                }
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before, "asking for more consumes nothing");
                    break;
                }
                Err(e) => {
                    prop_assert!(matches!(e, FrameError::TooLarge { .. }), "unexpected {:?}", e);
                    prop_assert_eq!(e.code(), pingme_protocol::ErrorCode::FrameTooLarge);
                    break;
                }
            }
        }
    }

    /// Arbitrary bytes cut arbitrarily through the server codec: no panic,
    /// and the outcome does not depend on where the bytes were cut.
    #[test]
    fn arbitrary_chunked_bytes_never_panic_the_codec(
        bytes in vec(any::<u8>(), 0..2048),
        cuts in vec(1usize..128, 1..16),
        max in prop_oneof![Just(16usize), Just(1024), Just(DEFAULT_MAX_FRAME_SIZE)],
    ) {
        let mut chunked = ServerCodec::new(max);
        let (chunked_frames, chunked_error) = feed(&mut chunked, &chunks(&bytes, &cuts));
        let mut whole = ServerCodec::new(max);
        let (whole_frames, whole_error) = feed(&mut whole, std::slice::from_ref(&bytes));
        prop_assert_eq!(chunked_frames, whole_frames);
        prop_assert_eq!(
            chunked_error.map(|e| e.code()),
            whole_error.map(|e| e.code())
        );
    }

    /// A valid frame's prefix claiming more than the limit is refused, never
    /// buffered.
    #[test]
    fn frames_over_the_limit_are_refused(frame in client_frame(), max in 0usize..64) {
        let wire = encode_frame(&frame);
        let len = wire.len() - 4;
        let mut buf = BytesMut::from(&wire[..]);
        match split_frame(&mut buf, max) {
            Ok(Some(_)) => prop_assert!(len <= max),
            Ok(None) => prop_assert!(false, "a whole frame was buffered"),
            Err(FrameError::TooLarge { len: announced, max: limit }) => {
                prop_assert_eq!(announced, len);
                prop_assert_eq!(limit, max);
                prop_assert!(len > max);
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}
