//! A recording [`Outbox`]: what the router queued for each connection and
//! which users it asked to disconnect, for tests that stand in for the
//! gateway.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use pingme_protocol::{ServerFrame, decode_message, split_frame};
use pingme_router::port::{ConnRef, Outbox, UserId};

/// Records every frame queued on every connection, and every disconnect
/// asked for. Users are connected only when a test says so
/// ([`RecordingOutbox::connect`]).
#[derive(Debug, Default)]
pub struct RecordingOutbox {
    connections: Mutex<HashMap<UserId, Vec<ConnRef>>>,
    frames: Mutex<HashMap<ConnRef, Vec<Bytes>>>,
    /// Every [`Outbox::disconnect`] call, in order.
    pub disconnects: Mutex<Vec<Disconnect>>,
}

/// One [`Outbox::disconnect`] call.
#[derive(Debug, Clone)]
pub struct Disconnect {
    /// The user whose connections were to close.
    pub user: UserId,
    /// Only this device's, when set.
    pub device: Option<String>,
    /// The last frame they were to get.
    pub frame: Bytes,
}

impl RecordingOutbox {
    /// Makes `conn` a connected device of `user`.
    pub fn connect(&self, user: UserId, conn: ConnRef) {
        self.connections
            .lock()
            .unwrap()
            .entry(user)
            .or_default()
            .push(conn);
    }

    /// Forgets `conn`.
    pub fn drop_connection(&self, user: UserId, conn: ConnRef) {
        if let Some(conns) = self.connections.lock().unwrap().get_mut(&user) {
            conns.retain(|c| *c != conn);
        }
    }

    /// Everything queued on `conn` so far, decoded. One queued buffer may
    /// hold several frames back to back (a merged fanout delivery).
    pub fn frames(&self, conn: ConnRef) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        for queued in self.raw(conn) {
            let mut buf = BytesMut::from(&queued[..]);
            while let Some(payload) =
                split_frame(&mut buf, usize::MAX).expect("router frames are well framed")
            {
                frames.push(decode_message(payload).expect("router frames decode"));
            }
            assert!(buf.is_empty(), "a queued buffer ends on a frame boundary");
        }
        frames
    }

    /// Everything queued on `conn` so far, encoded.
    pub fn raw(&self, conn: ConnRef) -> Vec<Bytes> {
        self.frames
            .lock()
            .unwrap()
            .get(&conn)
            .cloned()
            .unwrap_or_default()
    }

    /// Frames on `conn` count.
    pub fn count(&self, conn: ConnRef) -> usize {
        self.frames.lock().unwrap().get(&conn).map_or(0, Vec::len)
    }

    fn record(&self, conn: ConnRef, frame: Bytes) {
        self.frames
            .lock()
            .unwrap()
            .entry(conn)
            .or_default()
            .push(frame);
    }
}

impl Outbox for RecordingOutbox {
    fn to_connection(&self, conn: ConnRef, frame: Bytes) -> bool {
        self.record(conn, frame);
        true
    }

    fn to_users(&self, users: &[UserId], frame: &Bytes, skip: Option<ConnRef>) -> usize {
        let targets: Vec<ConnRef> = {
            let connections = self.connections.lock().unwrap();
            users
                .iter()
                .filter_map(|user| connections.get(user))
                .flatten()
                .filter(|conn| Some(**conn) != skip)
                .copied()
                .collect()
        };
        let mut frames = self.frames.lock().unwrap();
        for conn in &targets {
            frames.entry(*conn).or_default().push(frame.clone());
        }
        targets.len()
    }

    fn online(&self, users: &[UserId]) -> Vec<bool> {
        let connections = self.connections.lock().unwrap();
        users
            .iter()
            .map(|user| connections.get(user).is_some_and(|c| !c.is_empty()))
            .collect()
    }

    fn disconnect(&self, user: UserId, device: Option<&str>, frame: Bytes) -> usize {
        self.disconnects.lock().unwrap().push(Disconnect {
            user,
            device: device.map(str::to_string),
            frame,
        });
        self.connections
            .lock()
            .unwrap()
            .remove(&user)
            .map_or(0, |c| c.len())
    }
}
