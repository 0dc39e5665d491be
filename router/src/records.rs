//! The records that travel between pipeline stages, one type per topic,
//! and their encoding. Stages work with these plain Rust values (the
//! in-process bus moves them as they are: bodies and frames stay shared
//! `Bytes`); a bus that crosses processes, and the dead-letter store, keep
//! their prost encoding in the internal schema
//! (`router/proto/pingme/bus/v1/records.proto`) through [`BusRecord`].

use bytes::Bytes;
use pingme_storage::{ContentType, ConversationId, Seq, UserId};
use prost::Message as _;
use serde::Serialize;

use crate::bus::{BusRecord, RecordError};
use crate::port::ConnRef;

/// The generated types of the internal schema.
mod schema {
    include!(concat!(env!("OUT_DIR"), "/pingme.bus.v1.rs"));
}

/// A connection's address inside its gateway (a record's [`ConnRef`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnAddress {
    /// The gateway shard.
    pub shard: u16,
    /// The connection within the gateway.
    pub conn_id: u64,
}

impl From<ConnRef> for ConnAddress {
    fn from(conn: ConnRef) -> Self {
        Self {
            shard: conn.shard,
            conn_id: conn.conn_id,
        }
    }
}

impl From<ConnAddress> for ConnRef {
    fn from(conn: ConnAddress) -> Self {
        Self {
            shard: conn.shard,
            conn_id: conn.conn_id,
        }
    }
}

/// Where a request came from, so its answer can find the connection again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The gateway holding the connection (its downstream topic).
    pub gateway: String,
    /// The connection.
    pub conn: ConnAddress,
    /// The request id to echo.
    pub request_id: u64,
}

/// A send that passed the stateless checks, waiting for its conversation's
/// worker (the persistence topic, keyed by conversation).
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptedSend {
    /// Where the ack goes.
    pub origin: Origin,
    /// The sender.
    pub sender: UserId,
    /// The sender's device.
    pub sender_device: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// The target conversation.
    pub conversation: ConversationId,
    /// Wire `ContentType`.
    pub content_type: ContentType,
    /// The payload.
    pub body: Bytes,
    /// When the gateway accepted it, microseconds since the Unix epoch (0:
    /// not known); wall-clock, so it means the same on every node. Feeds
    /// the send-latency histograms only.
    pub accepted_at_us: u64,
}

/// What an offline push says about a message (no body: previews only).
/// Serialised as JSON for the push webhook, whose body is a public format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PushPreview {
    /// The message id.
    pub msg_id: String,
    /// Wire `ContentType`.
    pub content_type: ContentType,
    /// Text excerpt, or `[image]`, `[file]`, `[voice]`, `[message]`.
    pub preview: String,
}

/// Delivery of one stored message to the members of its conversation,
/// resumable from a member cursor (the task topic, keyed by conversation,
/// so one conversation's tasks run in seq order).
#[derive(Debug, Clone, PartialEq)]
pub struct FanoutTask {
    /// The conversation.
    pub conversation: ConversationId,
    /// The message's seq.
    pub seq: Seq,
    /// The message's id (tracing: every stage's span carries it).
    pub msg_id: String,
    /// The sender (never pushed to).
    pub sender: UserId,
    /// The sending connection, which has its ack and gets no deliver frame.
    pub skip: Option<(String, ConnAddress)>,
    /// The `Deliver` server frame, encoded once, length prefix included.
    pub frame: Bytes,
    /// Present when offline members get a push.
    pub push: Option<PushPreview>,
    /// Members with ids up to this one are done (0: none yet).
    pub after: UserId,
}

/// An offline-push notification of one message for some users (the push
/// topic). Its JSON is the push webhook's request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PushEvent {
    /// The conversation (wire spelling).
    pub conversation_id: String,
    /// The message's seq.
    pub seq: Seq,
    /// The sender.
    pub sender_id: UserId,
    /// Who should be notified (offline members).
    pub recipients: Vec<UserId>,
    /// What to show.
    #[serde(flatten)]
    pub preview: PushPreview,
}

/// Who a downstream frame is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownstreamTarget {
    /// One connection (an answer to its request).
    Connection(ConnAddress),
    /// Every connected device of these users, except `skip`.
    Users {
        /// The users.
        users: Vec<UserId>,
        /// A connection to leave out (the sender's).
        skip: Option<ConnAddress>,
    },
}

/// An encoded server frame for connections of one gateway (its downstream
/// topic).
#[derive(Debug, Clone, PartialEq)]
pub struct DownstreamEnvelope {
    /// The recipients.
    pub target: DownstreamTarget,
    /// The frame, length prefix included, shared by every recipient.
    pub frame: Bytes,
    /// How many messages the frame delivers (it may hold several deliver
    /// frames back to back); 0 for receipts, typing and answers.
    pub messages: u32,
}

/// What kind of work a dead letter holds, and so how replay decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadWork {
    /// A [`FanoutTask`] (a delivery step).
    Fanout,
    /// A [`PushEvent`].
    Push,
}

impl DeadWork {
    /// The kind's name in dead letters.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadWork::Fanout => "fanout",
            DeadWork::Push => "push",
        }
    }

    /// The kind a stored dead letter names.
    pub fn parse(kind: &str) -> Option<DeadWork> {
        match kind {
            "fanout" => Some(DeadWork::Fanout),
            "push" => Some(DeadWork::Push),
            _ => None,
        }
    }
}

/// Work that exhausted its retries (the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRecord {
    /// `"fanout"` or `"push"` (see [`DeadWork`]).
    pub kind: String,
    /// The failed work: the encoded [`FanoutTask`] or [`PushEvent`] that
    /// replay runs again.
    pub payload: Bytes,
    /// The error code (50006).
    pub code: u32,
    /// The last error.
    pub error: String,
    /// Tries made.
    pub attempts: u32,
}

/// A push dead letter told apart by its `attempts` (bus tests).
#[cfg(test)]
pub(crate) fn letter(attempts: u32) -> DeadLetterRecord {
    DeadLetterRecord {
        kind: "push".into(),
        payload: Default::default(),
        code: 50006,
        error: String::new(),
        attempts,
    }
}

fn conversation(field: &'static str, text: &str) -> Result<ConversationId, RecordError> {
    text.parse().map_err(
        |e: pingme_storage::InvalidConversationId| RecordError::Invalid {
            field,
            reason: e.to_string(),
        },
    )
}

fn required<T>(field: &'static str, value: Option<T>) -> Result<T, RecordError> {
    value.ok_or(RecordError::Invalid {
        field,
        reason: "missing".into(),
    })
}

fn decode<M: prost::Message + Default>(bytes: Bytes) -> Result<M, RecordError> {
    M::decode(bytes).map_err(|e| RecordError::Decode(e.to_string()))
}

impl From<ConnAddress> for schema::ConnAddress {
    fn from(conn: ConnAddress) -> Self {
        Self {
            shard: u32::from(conn.shard),
            conn_id: conn.conn_id,
        }
    }
}

impl TryFrom<schema::ConnAddress> for ConnAddress {
    type Error = RecordError;

    fn try_from(conn: schema::ConnAddress) -> Result<Self, RecordError> {
        Ok(Self {
            shard: u16::try_from(conn.shard).map_err(|_| RecordError::Invalid {
                field: "shard",
                reason: format!("{} is not a shard", conn.shard),
            })?,
            conn_id: conn.conn_id,
        })
    }
}

impl From<&PushPreview> for schema::PushPreview {
    fn from(preview: &PushPreview) -> Self {
        Self {
            msg_id: preview.msg_id.clone(),
            content_type: preview.content_type,
            preview: preview.preview.clone(),
        }
    }
}

impl From<schema::PushPreview> for PushPreview {
    fn from(preview: schema::PushPreview) -> Self {
        Self {
            msg_id: preview.msg_id,
            content_type: preview.content_type,
            preview: preview.preview,
        }
    }
}

impl BusRecord for AcceptedSend {
    fn encode(&self) -> Bytes {
        schema::AcceptedSend {
            origin: Some(schema::Origin {
                gateway: self.origin.gateway.clone(),
                conn: Some(self.origin.conn.into()),
                request_id: self.origin.request_id,
            }),
            sender: self.sender,
            sender_device: self.sender_device.clone(),
            client_msg_id: self.client_msg_id.clone(),
            conversation: self.conversation.to_string(),
            content_type: self.content_type,
            body: self.body.clone(),
            accepted_at_us: self.accepted_at_us,
        }
        .encode_to_vec()
        .into()
    }

    fn decode(bytes: Bytes) -> Result<Self, RecordError> {
        let send: schema::AcceptedSend = decode(bytes)?;
        let origin = required("origin", send.origin)?;
        Ok(Self {
            origin: Origin {
                gateway: origin.gateway,
                conn: required("origin.conn", origin.conn)?.try_into()?,
                request_id: origin.request_id,
            },
            sender: send.sender,
            sender_device: send.sender_device,
            client_msg_id: send.client_msg_id,
            conversation: conversation("conversation", &send.conversation)?,
            content_type: send.content_type,
            body: send.body,
            accepted_at_us: send.accepted_at_us,
        })
    }
}

impl BusRecord for FanoutTask {
    fn encode(&self) -> Bytes {
        schema::FanoutTask {
            conversation: self.conversation.to_string(),
            seq: self.seq,
            msg_id: self.msg_id.clone(),
            sender: self.sender,
            skip: self
                .skip
                .as_ref()
                .map(|(gateway, conn)| schema::SkipConnection {
                    gateway: gateway.clone(),
                    conn: Some((*conn).into()),
                }),
            frame: self.frame.clone(),
            push: self.push.as_ref().map(Into::into),
            after: self.after,
        }
        .encode_to_vec()
        .into()
    }

    fn decode(bytes: Bytes) -> Result<Self, RecordError> {
        let task: schema::FanoutTask = decode(bytes)?;
        let skip = match task.skip {
            Some(skip) => Some((skip.gateway, required("skip.conn", skip.conn)?.try_into()?)),
            None => None,
        };
        Ok(Self {
            conversation: conversation("conversation", &task.conversation)?,
            seq: task.seq,
            msg_id: task.msg_id,
            sender: task.sender,
            skip,
            frame: task.frame,
            push: task.push.map(Into::into),
            after: task.after,
        })
    }
}

impl BusRecord for PushEvent {
    fn encode(&self) -> Bytes {
        schema::PushEvent {
            conversation: self.conversation_id.clone(),
            seq: self.seq,
            sender: self.sender_id,
            recipients: self.recipients.clone(),
            preview: Some((&self.preview).into()),
        }
        .encode_to_vec()
        .into()
    }

    fn decode(bytes: Bytes) -> Result<Self, RecordError> {
        let event: schema::PushEvent = decode(bytes)?;
        // Checked, so a corrupt event fails here and not at the provider.
        conversation("conversation", &event.conversation)?;
        Ok(Self {
            conversation_id: event.conversation,
            seq: event.seq,
            sender_id: event.sender,
            recipients: event.recipients,
            preview: required("preview", event.preview)?.into(),
        })
    }
}

impl BusRecord for DownstreamEnvelope {
    fn encode(&self) -> Bytes {
        use schema::downstream_envelope::Target;
        let target = match &self.target {
            DownstreamTarget::Connection(conn) => Target::Connection((*conn).into()),
            DownstreamTarget::Users { users, skip } => Target::Users(schema::UsersTarget {
                users: users.clone(),
                skip: skip.map(Into::into),
            }),
        };
        schema::DownstreamEnvelope {
            target: Some(target),
            frame: self.frame.clone(),
            messages: self.messages,
        }
        .encode_to_vec()
        .into()
    }

    fn decode(bytes: Bytes) -> Result<Self, RecordError> {
        use schema::downstream_envelope::Target;
        let envelope: schema::DownstreamEnvelope = decode(bytes)?;
        let target = match required("target", envelope.target)? {
            Target::Connection(conn) => DownstreamTarget::Connection(conn.try_into()?),
            Target::Users(users) => DownstreamTarget::Users {
                users: users.users,
                skip: users.skip.map(TryInto::try_into).transpose()?,
            },
        };
        Ok(Self {
            target,
            frame: envelope.frame,
            messages: envelope.messages,
        })
    }
}

impl BusRecord for DeadLetterRecord {
    fn encode(&self) -> Bytes {
        schema::DeadLetterRecord {
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            code: self.code,
            error: self.error.clone(),
            attempts: self.attempts,
        }
        .encode_to_vec()
        .into()
    }

    fn decode(bytes: Bytes) -> Result<Self, RecordError> {
        let letter: schema::DeadLetterRecord = decode(bytes)?;
        Ok(Self {
            kind: letter.kind,
            payload: letter.payload,
            code: letter.code,
            error: letter.error,
            attempts: letter.attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<R: BusRecord + PartialEq>(record: R) {
        assert_eq!(R::decode(record.encode()).unwrap(), record);
    }

    fn conn(shard: u16, conn_id: u64) -> ConnAddress {
        ConnAddress { shard, conn_id }
    }

    #[test]
    fn every_record_round_trips_through_its_encoding() {
        let preview = PushPreview {
            msg_id: "m".into(),
            content_type: 1,
            preview: "hi".into(),
        };
        round_trip(AcceptedSend {
            origin: Origin {
                gateway: "gw-a".into(),
                conn: conn(1, 2),
                request_id: 3,
            },
            sender: 4,
            sender_device: "phone".into(),
            client_msg_id: "c-1".into(),
            conversation: ConversationId::Direct { low: 4, high: 9 },
            content_type: 1,
            body: Bytes::from_static(b"hello"),
            accepted_at_us: 1_764_590_000_123_456,
        });
        let task = FanoutTask {
            conversation: ConversationId::Group(7),
            seq: 3,
            msg_id: "m-1".into(),
            sender: 1,
            skip: Some(("gw-1".into(), conn(2, 9))),
            frame: Bytes::from_static(b"\0\0\0\x02ab"),
            push: Some(preview.clone()),
            after: 40,
        };
        round_trip(task.clone());
        round_trip(FanoutTask {
            skip: None,
            push: None,
            ..task.clone()
        });
        round_trip(PushEvent {
            conversation_id: "g:7".into(),
            seq: 3,
            sender_id: 1,
            recipients: vec![5, 6],
            preview,
        });
        for target in [
            DownstreamTarget::Connection(conn(0, 1)),
            DownstreamTarget::Users {
                users: vec![1, 2],
                skip: Some(conn(3, 4)),
            },
            DownstreamTarget::Users {
                users: vec![],
                skip: None,
            },
        ] {
            round_trip(DownstreamEnvelope {
                target,
                frame: Bytes::from_static(b"\0\0\0\x01x"),
                messages: 2,
            });
        }
        round_trip(DeadLetterRecord {
            kind: DeadWork::Fanout.as_str().into(),
            payload: task.encode(),
            code: 50006,
            error: "down".into(),
            attempts: 3,
        });
    }

    #[test]
    fn bytes_that_are_not_a_record_are_refused_with_unmarshal_failed() {
        let garbage = FanoutTask::decode(Bytes::from_static(b"\xff\xff\xff"));
        assert!(matches!(garbage, Err(RecordError::Decode(_))));
        assert_eq!(
            garbage.unwrap_err().code(),
            pingme_protocol::ErrorCode::KafkaUnmarshalFailed
        );
        // A well-formed message with a field out of range.
        let bad_conversation = PushEvent {
            conversation_id: "nope".into(),
            seq: 1,
            sender_id: 1,
            recipients: vec![],
            preview: PushPreview {
                msg_id: String::new(),
                content_type: 0,
                preview: String::new(),
            },
        }
        .encode();
        assert!(matches!(
            PushEvent::decode(bad_conversation),
            Err(RecordError::Invalid {
                field: "conversation",
                ..
            })
        ));
        // An envelope without a target.
        assert!(matches!(
            DownstreamEnvelope::decode(Bytes::new()),
            Err(RecordError::Invalid {
                field: "target",
                ..
            })
        ));
    }

    #[test]
    fn frames_are_sliced_out_of_the_record_not_copied() {
        let task = FanoutTask {
            conversation: ConversationId::Group(1),
            seq: 1,
            msg_id: String::new(),
            sender: 1,
            skip: None,
            frame: Bytes::from(vec![7u8; 256]),
            push: None,
            after: 0,
        };
        let encoded = task.encode();
        let decoded = FanoutTask::decode(encoded.clone()).unwrap();
        let range = encoded.as_ptr_range();
        assert!(range.contains(&decoded.frame.as_ptr()));
    }
}
