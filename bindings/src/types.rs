//! The records and enums the bindings exchange with Kotlin, Swift and
//! Python, and their conversions from the Rust client's types (protobuf
//! messages and [`pingme_client::Event`]). Field meanings are those of
//! `protocol/proto/pingme/v1/pingme.proto`.

use pingme_client::v1;

/// Which certificates a TLS or QUIC connection trusts.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum Trust {
    /// Any certificate, e.g. the self-signed one `pingme serve` makes in
    /// development. Never in production: it gives up authenticating the
    /// server.
    DevCertificate,
    /// Certificates signed by the CA(s) in this PEM file.
    CaFile {
        /// Path of the PEM file.
        path: String,
    },
    /// Certificates signed by the CA(s) in this PEM text (a CA bundled
    /// with the app).
    CaPem {
        /// The PEM text.
        pem: String,
    },
}

/// Where and how `Pingme.connect` connects.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ConnectConfig {
    /// The gateway: `tcp://host:7000`, `tls://host:7443`, `quic://host:7443`
    /// or `ws://host:8080/v1/ws`.
    pub gateway: String,
    /// The access token from `Pingme.login`.
    pub token: String,
    /// Which certificates to trust; required for `tls://` and `quic://`,
    /// ignored otherwise.
    #[uniffi(default = None)]
    pub trust: Option<Trust>,
    /// The name checked against the certificate; default: the gateway's
    /// host as written in `gateway`.
    #[uniffi(default = None)]
    pub server_name: Option<String>,
    /// Watermarks persisted from `PingmeClient.watermarks` last
    /// time, so sync resumes where this device stopped.
    #[uniffi(default = [])]
    pub watermarks: Vec<Watermark>,
    /// How long a request (send, fetch, presence) may wait for its answer,
    /// reconnects included; default 30 s.
    #[uniffi(default = None)]
    pub request_timeout_ms: Option<u64>,
    /// Sent in `Hello` for the server's logs; default names this SDK.
    #[uniffi(default = None)]
    pub client_name: Option<String>,
    /// How long a delivery ack may wait so one ack covers what arrives
    /// meanwhile (default 100 ms; 0 acks every read at once, which costs
    /// a frame per read in a busy group).
    #[uniffi(default = None)]
    pub ack_delay_ms: Option<u64>,
}

/// This device holds every message of a conversation up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Watermark {
    /// The conversation.
    pub conversation_id: String,
    /// The highest seq held without gaps.
    pub seq: u64,
}

/// What a message body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ContentType {
    /// Not set (the server refuses to store it; seen only from newer
    /// servers' types this build does not know).
    Unspecified,
    /// UTF-8 text.
    Text,
    /// An image reference (app-defined encoding).
    Image,
    /// A file reference.
    File,
    /// A voice clip reference.
    Voice,
    /// App-defined payload.
    Custom,
}

impl From<ContentType> for v1::ContentType {
    fn from(value: ContentType) -> Self {
        match value {
            ContentType::Unspecified => v1::ContentType::Unspecified,
            ContentType::Text => v1::ContentType::Text,
            ContentType::Image => v1::ContentType::Image,
            ContentType::File => v1::ContentType::File,
            ContentType::Voice => v1::ContentType::Voice,
            ContentType::Custom => v1::ContentType::Custom,
        }
    }
}

impl From<v1::ContentType> for ContentType {
    fn from(value: v1::ContentType) -> Self {
        match value {
            v1::ContentType::Unspecified => ContentType::Unspecified,
            v1::ContentType::Text => ContentType::Text,
            v1::ContentType::Image => ContentType::Image,
            v1::ContentType::File => ContentType::File,
            v1::ContentType::Voice => ContentType::Voice,
            v1::ContentType::Custom => ContentType::Custom,
        }
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Message {
    /// The conversation it belongs to.
    pub conversation_id: String,
    /// Its dense position in the conversation (1, 2, 3, ...).
    pub seq: u64,
    /// Server-assigned unique id.
    pub msg_id: String,
    /// Who sent it.
    pub sender_id: u64,
    /// From which of the sender's devices.
    pub sender_device: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// What the body holds.
    pub content_type: ContentType,
    /// The payload (UTF-8 for text).
    pub body: Vec<u8>,
    /// When the server accepted it, Unix milliseconds.
    pub server_time_ms: i64,
}

impl From<v1::Message> for Message {
    fn from(m: v1::Message) -> Self {
        Message {
            content_type: m.content_type().into(),
            conversation_id: m.conversation_id,
            seq: m.seq,
            msg_id: m.msg_id,
            sender_id: m.sender_id,
            sender_device: m.sender_device,
            client_msg_id: m.client_msg_id,
            body: m.body.to_vec(),
            server_time_ms: m.server_time_ms,
        }
    }
}

/// The server stored a sent message.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SendAck {
    /// The send's idempotency key.
    pub client_msg_id: String,
    /// Server-assigned unique id.
    pub msg_id: String,
    /// The conversation it went to.
    pub conversation_id: String,
    /// Its position in the conversation.
    pub seq: u64,
    /// When the server accepted it, Unix milliseconds.
    pub server_time_ms: i64,
}

impl From<v1::SendAck> for SendAck {
    fn from(a: v1::SendAck) -> Self {
        SendAck {
            client_msg_id: a.client_msg_id,
            msg_id: a.msg_id,
            conversation_id: a.conversation_id,
            seq: a.seq,
            server_time_ms: a.server_time_ms,
        }
    }
}

/// One page of a conversation's history.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct MessagePage {
    /// The conversation.
    pub conversation_id: String,
    /// Ascending by seq, without gaps.
    pub messages: Vec<Message>,
    /// More messages remain up to the asked bound.
    pub has_more: bool,
}

impl From<v1::MessagePage> for MessagePage {
    fn from(p: v1::MessagePage) -> Self {
        MessagePage {
            conversation_id: p.conversation_id,
            messages: p.messages.into_iter().map(Into::into).collect(),
            has_more: p.has_more,
        }
    }
}

/// A user's presence.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Presence {
    /// The user.
    pub user_id: u64,
    /// At least one of the user's devices is connected.
    pub online: bool,
    /// When the user was last connected, Unix milliseconds (0 if never).
    pub last_seen_ms: i64,
}

impl From<v1::PresenceEvent> for Presence {
    fn from(p: v1::PresenceEvent) -> Self {
        Presence {
            user_id: p.user_id,
            online: p.online,
            last_seen_ms: p.last_seen_ms,
        }
    }
}

/// What a successful login returns.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Login {
    /// The access token for `ConnectConfig.token`.
    pub token: String,
    /// Token to get a new access token without the password.
    pub refresh_token: String,
    /// The logged-in user.
    pub user_id: u64,
}

impl From<pingme_client::Login> for Login {
    fn from(l: pingme_client::Login) -> Self {
        Login {
            token: l.token,
            refresh_token: l.refresh_token,
            user_id: l.user_id,
        }
    }
}

/// A group.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Group {
    /// The group's id.
    pub group_id: u64,
    /// Its conversation id (`g:{group_id}`), what sends name.
    pub conversation_id: String,
    /// Members, the owner included.
    pub member_count: u64,
}

impl From<pingme_client::Group> for Group {
    fn from(g: pingme_client::Group) -> Self {
        Group {
            group_id: g.group_id,
            conversation_id: g.conversation_id,
            member_count: g.member_count,
        }
    }
}

/// Why the server sent `GoAway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum GoAwayReason {
    /// Not set.
    Unspecified,
    /// The server is shutting down; the client reconnects by itself.
    Shutdown,
    /// The same device logged in on another connection; the client stops.
    Replaced,
    /// The server sheds load; the client reconnects by itself.
    Rebalance,
    /// The device logged out or its tokens were revoked; log in again.
    LoggedOut,
}

impl From<v1::GoAwayReason> for GoAwayReason {
    fn from(r: v1::GoAwayReason) -> Self {
        match r {
            v1::GoAwayReason::Unspecified => GoAwayReason::Unspecified,
            v1::GoAwayReason::Shutdown => GoAwayReason::Shutdown,
            v1::GoAwayReason::Replaced => GoAwayReason::Replaced,
            v1::GoAwayReason::Rebalance => GoAwayReason::Rebalance,
            v1::GoAwayReason::LoggedOut => GoAwayReason::LoggedOut,
        }
    }
}

/// What the client tells the app, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ClientEvent {
    /// A connection is up and authenticated.
    Connected {
        /// The authenticated user.
        user_id: u64,
        /// The authenticated device.
        device_id: String,
        /// True after the first connection.
        reconnected: bool,
    },
    /// A message this device had not seen, pushed live or found by sync;
    /// each (conversation, seq) once.
    Message {
        /// The message.
        message: Message,
    },
    /// Another member read a conversation up to a seq.
    ReadReceipt {
        /// The conversation.
        conversation_id: String,
        /// Who read.
        user_id: u64,
        /// Up to which seq.
        seq: u64,
    },
    /// Another member is typing (or stopped).
    Typing {
        /// The conversation.
        conversation_id: String,
        /// Who.
        user_id: u64,
        /// True while typing.
        active: bool,
    },
    /// A user went online or offline.
    Presence {
        /// The user's presence now.
        presence: Presence,
    },
    /// The server asked this client to go away.
    GoAway {
        /// Why.
        reason: GoAwayReason,
        /// Wait at least this long before reconnecting (the client does).
        retry_after_ms: u32,
        /// Where to reconnect (`host:port`); empty for the same address.
        reconnect_to: String,
        /// The server's detail.
        detail: String,
    },
    /// The sync after a (re)connect finished: every message this device
    /// missed while offline was delivered as a `Message` event before it.
    Synced,
    /// The connection was lost; the client reconnects after `delay_ms`.
    Reconnecting {
        /// Failed attempts in a row so far.
        attempt: u32,
        /// Wait before the next attempt, milliseconds.
        delay_ms: u64,
        /// Why the last connection or attempt failed.
        reason: String,
    },
    /// The client stopped for good (closed, replaced, logged out, token
    /// rejected). No more events follow.
    Closed {
        /// Why.
        reason: String,
    },
}

impl From<pingme_client::Event> for ClientEvent {
    fn from(event: pingme_client::Event) -> Self {
        use pingme_client::Event;
        match event {
            Event::Connected {
                user_id,
                device_id,
                reconnected,
            } => ClientEvent::Connected {
                user_id,
                device_id,
                reconnected,
            },
            Event::Message(message) => ClientEvent::Message {
                message: message.into(),
            },
            Event::ReadReceipt(r) => ClientEvent::ReadReceipt {
                conversation_id: r.conversation_id,
                user_id: r.user_id,
                seq: r.seq,
            },
            Event::Typing(t) => ClientEvent::Typing {
                conversation_id: t.conversation_id,
                user_id: t.user_id,
                active: t.active,
            },
            Event::Presence(p) => ClientEvent::Presence { presence: p.into() },
            Event::GoAway(g) => ClientEvent::GoAway {
                reason: g.reason().into(),
                retry_after_ms: g.retry_after_ms,
                reconnect_to: g.reconnect_to,
                detail: g.message,
            },
            Event::Synced => ClientEvent::Synced,
            Event::Reconnecting {
                attempt,
                delay,
                reason,
            } => ClientEvent::Reconnecting {
                attempt,
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                reason,
            },
            Event::Closed { reason } => ClientEvent::Closed { reason },
        }
    }
}

/// The conversation id of the direct (1:1) conversation between two users,
/// `dm:{lower id}:{higher id}` (the same from both sides).
#[uniffi::export]
pub fn direct_conversation_id(user_a: u64, user_b: u64) -> String {
    format!("dm:{}:{}", user_a.min(user_b), user_a.max(user_b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversations_are_named_the_same_from_both_sides() {
        assert_eq!(direct_conversation_id(7, 3), "dm:3:7");
        assert_eq!(direct_conversation_id(3, 7), "dm:3:7");
    }

    #[test]
    fn content_types_round_trip() {
        for t in [
            ContentType::Unspecified,
            ContentType::Text,
            ContentType::Image,
            ContentType::File,
            ContentType::Voice,
            ContentType::Custom,
        ] {
            assert_eq!(ContentType::from(v1::ContentType::from(t)), t);
        }
    }

    #[test]
    fn events_convert_with_their_fields() {
        let message = v1::Message {
            conversation_id: "dm:1:2".into(),
            seq: 4,
            msg_id: "m".into(),
            sender_id: 1,
            sender_device: "phone".into(),
            client_msg_id: "c".into(),
            content_type: v1::ContentType::Text as i32,
            body: "hi".into(),
            server_time_ms: 99,
        };
        let event = ClientEvent::from(pingme_client::Event::Message(message));
        let ClientEvent::Message { message } = event else {
            panic!("expected a message, got {event:?}");
        };
        assert_eq!(
            (message.seq, message.content_type, message.body.as_slice()),
            (4, ContentType::Text, &b"hi"[..])
        );

        let event = ClientEvent::from(pingme_client::Event::Reconnecting {
            attempt: 2,
            delay: std::time::Duration::from_millis(1500),
            reason: "lost".into(),
        });
        assert_eq!(
            event,
            ClientEvent::Reconnecting {
                attempt: 2,
                delay_ms: 1500,
                reason: "lost".into()
            }
        );
    }
}
