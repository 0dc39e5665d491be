//! The boundary between the gateway (connections) and the router (message
//! pipeline). The gateway implements [`Outbox`]; the router implements
//! [`Dispatch`]. Everything that crosses it is cheap: ids, `Arc<str>` and
//! pre-encoded frames (`Bytes`, the 4-byte length prefix included), so a
//! frame for ten thousand devices is encoded once.

use std::sync::Arc;

use bytes::Bytes;
use pingme_protocol::v1::client_frame;

/// A user id (as in `pingme-storage`).
pub type UserId = u64;

/// Where one connection lives: its shard and its id within the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The gateway shard (one per core) owning the connection.
    pub shard: u16,
    /// The connection's id, unique within this gateway process.
    pub conn_id: u64,
}

/// An authenticated connection, as the router sees it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The authenticated user.
    pub user: UserId,
    /// The authenticated device.
    pub device: Arc<str>,
    /// The connection carrying the session.
    pub conn: ConnRef,
}

/// A frame for connections of this gateway, as [`Outbox::send_all`] takes
/// them.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// An answer on one connection (see [`Outbox::to_connection`]).
    Connection {
        /// The connection.
        conn: ConnRef,
        /// The encoded frame.
        frame: Bytes,
    },
    /// A frame for every connected device of these users but `skip` (see
    /// [`Outbox::to_users`]).
    Users {
        /// The users.
        users: Vec<UserId>,
        /// The encoded frame.
        frame: Bytes,
        /// The connection left out (the sender's own).
        skip: Option<ConnRef>,
    },
}

/// How the router reaches connected devices. Implemented by the gateway's
/// connection index; every method only queues and never blocks on a
/// socket (a slow reader is the gateway's business, not the router's).
pub trait Outbox: Send + Sync + 'static {
    /// Queues `frame` on one connection (answers to its requests). Returns
    /// false if the connection is gone.
    fn to_connection(&self, conn: ConnRef, frame: Bytes) -> bool;

    /// Queues `frame` on every connected device of every user in `users`,
    /// except the connection `skip` (the sending connection already has its
    /// ack). Groups the work per shard. Returns how many connections got it.
    fn to_users(&self, users: &[UserId], frame: &Bytes, skip: Option<ConnRef>) -> usize;

    /// Queues several frames, in order, as the calls above would one by
    /// one; returns for each how many connections got it. An outbox that
    /// hands frames to other threads hands these over together (a batch of
    /// acks and deliveries wakes each thread once, not once per frame).
    fn send_all(&self, frames: Vec<Outbound>) -> Vec<usize> {
        frames
            .into_iter()
            .map(|outbound| match outbound {
                Outbound::Connection { conn, frame } => {
                    usize::from(self.to_connection(conn, frame))
                }
                Outbound::Users { users, frame, skip } => self.to_users(&users, &frame, skip),
            })
            .collect()
    }

    /// Which of `users` have at least one connected device here, in the
    /// order asked.
    fn online(&self, users: &[UserId]) -> Vec<bool>;

    /// Sends `frame` (a go-away or a fatal error) to the connections of
    /// `user` (only `device` if given), then closes them. Returns how many
    /// were closed.
    fn disconnect(&self, user: UserId, device: Option<&str>, frame: Bytes) -> usize;
}

/// What the gateway calls for authenticated sessions. Implemented by the
/// router. Calls must return quickly: slow work (storage, fanout) happens on
/// the router's own workers, and answers go back through [`Outbox`].
pub trait Dispatch: Send + Sync + 'static {
    /// A session was authenticated on a connection.
    fn connected(&self, session: &SessionInfo);
    /// The session's connection closed (for any reason).
    fn disconnected(&self, session: &SessionInfo);
    /// A frame arrived on an authenticated session. Hello, Authenticate and
    /// Ping are the gateway's own business and never arrive here.
    fn frame(&self, session: &SessionInfo, request_id: u64, body: client_frame::Body);
}
