//! The records that travel between pipeline stages, one kind per topic.
//! They are plain serde values: the in-process transport moves them as they
//! are (bodies and frames stay shared `Bytes`), the Kafka transport and the
//! dead-letter store serialise them with [`Record::encode`].

use bytes::Bytes;
use pingme_storage::{ContentType, ConversationId, Seq, UserId};
use serde::{Deserialize, Serialize};

use crate::port::ConnRef;

/// A connection's address inside its gateway (a serialisable [`ConnRef`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The gateway holding the connection (its downstream topic).
    pub gateway: String,
    /// The connection.
    pub conn: ConnAddress,
    /// The request id to echo.
    pub request_id: u64,
}

/// A send that passed the stateless checks, waiting for its conversation's
/// worker (topic [`crate::Topic::Accepted`], keyed by conversation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

/// What an offline push says about a message (no body: previews only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushPreview {
    /// The message id.
    pub msg_id: String,
    /// Wire `ContentType`.
    pub content_type: ContentType,
    /// Text excerpt, or `[image]`, `[file]`, `[voice]`, `[message]`.
    pub preview: String,
}

/// Delivery of one stored message to the members of its conversation,
/// resumable from a member cursor (topic [`crate::Topic::Fanout`], keyed by
/// conversation, so one conversation's tasks run in seq order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutTask {
    /// The conversation.
    pub conversation: ConversationId,
    /// The message's seq.
    pub seq: Seq,
    /// The message's id (tracing: every stage's span carries it). Tasks
    /// serialised before it existed read as empty.
    #[serde(default)]
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

/// An offline-push notification of one message for some users (topic
/// [`crate::Topic::Push`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// An encoded server frame for connections of one gateway (topic
/// [`crate::Topic::Downstream`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownstreamEnvelope {
    /// The recipients.
    pub target: DownstreamTarget,
    /// The frame, length prefix included, shared by every recipient.
    pub frame: Bytes,
    /// How many messages the frame delivers (it may hold several deliver
    /// frames back to back); 0 for receipts, typing and answers.
    pub messages: u32,
}

/// Work that exhausted its retries (topic [`crate::Topic::DeadLetter`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// `"fanout"` or `"push"`.
    pub kind: String,
    /// The failed work: an encoded [`Record`] that replay runs again.
    pub payload: Vec<u8>,
    /// The error code (50006).
    pub code: u32,
    /// The last error.
    pub error: String,
    /// Tries made.
    pub attempts: u32,
}

/// Everything a topic can carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// On [`crate::Topic::Accepted`].
    Accepted(AcceptedSend),
    /// On [`crate::Topic::Fanout`].
    Fanout(FanoutTask),
    /// On [`crate::Topic::Push`].
    Push(PushEvent),
    /// On [`crate::Topic::DeadLetter`].
    DeadLetter(DeadLetterRecord),
    /// On [`crate::Topic::Downstream`].
    Downstream(DownstreamEnvelope),
}

impl Record {
    /// The record's bytes for a broker or the dead-letter store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records are plain data and always serialise")
    }

    /// A record from [`Record::encode`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Record, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The id of the message this work is about, when it is about one
    /// (for the `msg_id` of tracing spans).
    pub fn msg_id(&self) -> Option<&str> {
        match self {
            Record::Fanout(task) => Some(&task.msg_id),
            Record::Push(event) => Some(&event.preview.msg_id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_encoding() {
        let task = Record::Fanout(FanoutTask {
            conversation: ConversationId::Group(7),
            seq: 3,
            msg_id: "m-1".into(),
            sender: 1,
            skip: Some((
                "gw-1".into(),
                ConnAddress {
                    shard: 2,
                    conn_id: 9,
                },
            )),
            frame: Bytes::from_static(b"\0\0\0\x02ab"),
            push: Some(PushPreview {
                msg_id: "m".into(),
                content_type: 1,
                preview: "hi".into(),
            }),
            after: 40,
        });
        assert_eq!(Record::decode(&task.encode()).unwrap(), task);
        assert!(Record::decode(b"{not json").is_err());
    }
}
