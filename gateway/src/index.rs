//! The gateway-wide connection index: which connections (shard, id,
//! device) each online user has, and the shard inboxes that carry frames
//! to them. It implements the router's [`Outbox`]: every call groups its
//! work per shard and only pushes into inboxes, so it never blocks on a
//! socket. It is built before the router (which needs an outbox) and the
//! shards attach to it when the gateway starts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::ws::WebSocket;
use bytes::Bytes;
use dashmap::DashMap;
use pingme_protocol::v1::GoAwayReason;
use pingme_router::port::{ConnRef, Outbound, Outbox, UserId};
use tokio::sync::mpsc::UnboundedSender;

use crate::connection::CloseReason;
use crate::frames::go_away;
use crate::limits::SessionLimits;

/// Work for one shard, sent through its inbox.
pub(crate) enum ShardCommand {
    /// Queue `frame` on these connections of the shard.
    Deliver { conn_ids: Vec<u64>, frame: Bytes },
    /// Several of the above, in order (one router batch's frames for this
    /// shard: one hand-off, one wake-up).
    DeliverMany(Vec<(Vec<u64>, Bytes)>),
    /// Queue `frame` as the last frame of these connections and close them.
    Disconnect {
        conn_ids: Vec<u64>,
        frame: Bytes,
        reason: CloseReason,
    },
    /// Shutdown: every frame queued before this command (the router's last
    /// acks) is on its connection; the go-away may follow.
    Drained,
    /// Serve a WebSocket accepted by the HTTP server; it must authenticate
    /// by `deadline` (set when its upgrade request was handled).
    AdoptWebSocket(Box<WebSocket>, tokio::time::Instant),
}

/// One connected device of a user.
#[derive(Debug, Clone)]
struct DeviceConn {
    device: Arc<str>,
    conn: ConnRef,
}

/// What the running shards share with the index.
pub(crate) struct ShardLinks {
    pub(crate) inboxes: Vec<UnboundedSender<ShardCommand>>,
    pub(crate) limits: SessionLimits,
    next_ws_shard: AtomicUsize,
}

impl ShardLinks {
    pub(crate) fn new(inboxes: Vec<UnboundedSender<ShardCommand>>, limits: SessionLimits) -> Self {
        Self {
            inboxes,
            limits,
            next_ws_shard: AtomicUsize::new(0),
        }
    }

    /// Hands a WebSocket to the next shard, round robin; it must
    /// authenticate by `deadline`.
    pub(crate) fn adopt_websocket(
        &self,
        socket: WebSocket,
        deadline: tokio::time::Instant,
    ) -> bool {
        let shard = self.next_ws_shard.fetch_add(1, Ordering::Relaxed) % self.inboxes.len();
        self.inboxes[shard]
            .send(ShardCommand::AdoptWebSocket(Box::new(socket), deadline))
            .is_ok()
    }
}

/// The connection index; the router's [`Outbox`]. Create it first, give
/// it to the router, then to [`Gateway::start`](crate::server::Gateway::start).
pub struct Connections {
    users: DashMap<UserId, Vec<DeviceConn>>,
    links: OnceLock<Arc<ShardLinks>>,
    next_conn_id: AtomicU64,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            users: DashMap::new(),
            links: OnceLock::new(),
            // Connection ids start at a random point, high 32 bits drawn
            // per process: a gateway restarted with the same id resumes its
            // downstream topic, whose records name connections of the
            // previous process; those must reach nobody, never a new
            // connection that happens to get the same number.
            next_conn_id: AtomicU64::new(u64::from(rand::random::<u32>()) << 32),
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("online_users", &self.users.len())
            .field("started", &self.links.get().is_some())
            .finish()
    }
}

impl Connections {
    /// An empty index, not yet attached to any shard: until the gateway
    /// starts, every outbox call reaches nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many users have at least one connection here.
    pub fn online_users(&self) -> usize {
        self.users.len()
    }

    /// How many connections a user has here.
    pub fn connections_of(&self, user: UserId) -> usize {
        self.users.get(&user).map_or(0, |devices| devices.len())
    }

    pub(crate) fn attach(&self, links: Arc<ShardLinks>) -> bool {
        self.links.set(links).is_ok()
    }

    pub(crate) fn links(&self) -> Option<&Arc<ShardLinks>> {
        self.links.get()
    }

    /// A process-wide unique connection id, apart from the previous
    /// processes' ids (but for a 1 in 2^32 chance per restart).
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records a new session. An older connection of the same device is
    /// replaced: it gets GoAway{REPLACED} and is closed.
    pub(crate) fn insert(&self, user: UserId, device: &Arc<str>, conn: ConnRef) {
        let replaced = {
            let mut devices = self
                .users
                .entry(user)
                .or_insert_with(|| Vec::with_capacity(1));
            let replaced = devices
                .iter()
                .position(|d| d.device == *device)
                .map(|i| devices.swap_remove(i).conn);
            devices.push(DeviceConn {
                device: device.clone(),
                conn,
            });
            replaced
        };
        if let Some(old) = replaced {
            let frame = go_away(
                GoAwayReason::Replaced,
                std::time::Duration::ZERO,
                "this device connected again elsewhere",
            );
            self.send(
                old.shard,
                ShardCommand::Disconnect {
                    conn_ids: vec![old.conn_id],
                    frame,
                    reason: CloseReason::Replaced,
                },
            );
        }
    }

    /// Forgets a closed connection (and only that one: a replacement of the
    /// same device stays).
    pub(crate) fn remove(&self, user: UserId, conn: ConnRef) {
        self.users.remove_if_mut(&user, |_, devices| {
            devices.retain(|d| d.conn != conn);
            devices.is_empty()
        });
    }

    fn send(&self, shard: u16, command: ShardCommand) -> bool {
        self.links
            .get()
            .and_then(|links| links.inboxes.get(usize::from(shard)))
            .is_some_and(|inbox| inbox.send(command).is_ok())
    }

    /// Puts [`ShardCommand::Drained`] behind everything already in every
    /// shard's inbox.
    pub(crate) fn mark_drained(&self) {
        for shard in 0..self.shard_count() {
            self.send(shard as u16, ShardCommand::Drained);
        }
    }

    /// The connections of `users` but `skip`, per shard (only shards with
    /// some).
    fn connections_per_shard(
        &self,
        users: &[UserId],
        skip: Option<ConnRef>,
    ) -> impl Iterator<Item = (usize, Vec<u64>)> + use<> {
        let mut per_shard: Vec<Vec<u64>> = vec![Vec::new(); self.shard_count()];
        for user in users {
            let Some(devices) = self.users.get(user) else {
                continue;
            };
            for device in devices.iter() {
                if Some(device.conn) == skip {
                    continue;
                }
                if let Some(ids) = per_shard.get_mut(usize::from(device.conn.shard)) {
                    ids.push(device.conn.conn_id);
                }
            }
        }
        per_shard
            .into_iter()
            .enumerate()
            .filter(|(_, ids)| !ids.is_empty())
    }

    fn shard_count(&self) -> usize {
        self.links.get().map_or(0, |links| links.inboxes.len())
    }
}

impl Outbox for Connections {
    /// True if the frame was handed to the connection's shard (a connection
    /// closing at that very moment drops it).
    fn to_connection(&self, conn: ConnRef, frame: Bytes) -> bool {
        self.send(
            conn.shard,
            ShardCommand::Deliver {
                conn_ids: vec![conn.conn_id],
                frame,
            },
        )
    }

    fn to_users(&self, users: &[UserId], frame: &Bytes, skip: Option<ConnRef>) -> usize {
        let mut delivered = 0;
        for (shard, conn_ids) in self.connections_per_shard(users, skip) {
            let n = conn_ids.len();
            let command = ShardCommand::Deliver {
                conn_ids,
                frame: frame.clone(),
            };
            if self.send(shard as u16, command) {
                delivered += n;
            }
        }
        delivered
    }

    fn send_all(&self, frames: Vec<Outbound>) -> Vec<usize> {
        let shards = self.shard_count();
        let mut queues: Vec<Vec<(Vec<u64>, Bytes)>> = vec![Vec::new(); shards];
        // Per shard, for each queued item: which frame it is and how many
        // connections it reaches (counted once the shard took its queue).
        let mut counts: Vec<Vec<(usize, usize)>> = vec![Vec::new(); shards];
        let mut reached = vec![0; frames.len()];
        for (index, outbound) in frames.into_iter().enumerate() {
            match outbound {
                Outbound::Connection { conn, frame } => {
                    let shard = usize::from(conn.shard);
                    if let Some(queue) = queues.get_mut(shard) {
                        queue.push((vec![conn.conn_id], frame));
                        counts[shard].push((index, 1));
                    }
                }
                Outbound::Users { users, frame, skip } => {
                    for (shard, conn_ids) in self.connections_per_shard(&users, skip) {
                        counts[shard].push((index, conn_ids.len()));
                        queues[shard].push((conn_ids, frame.clone()));
                    }
                }
            }
        }
        for (shard, (queue, counts)) in queues.into_iter().zip(counts).enumerate() {
            if !queue.is_empty() && self.send(shard as u16, ShardCommand::DeliverMany(queue)) {
                for (index, n) in counts {
                    reached[index] += n;
                }
            }
        }
        reached
    }

    fn online(&self, users: &[UserId]) -> Vec<bool> {
        users.iter().map(|u| self.users.contains_key(u)).collect()
    }

    fn disconnect(&self, user: UserId, device: Option<&str>, frame: Bytes) -> usize {
        let targets: Vec<ConnRef> = self.users.get(&user).map_or_else(Vec::new, |devices| {
            devices
                .iter()
                .filter(|d| device.is_none_or(|wanted| &*d.device == wanted))
                .map(|d| d.conn)
                .collect()
        });
        let mut closed = 0;
        for conn in targets {
            let command = ShardCommand::Disconnect {
                conn_ids: vec![conn.conn_id],
                frame: frame.clone(),
                reason: CloseReason::Evicted,
            };
            if self.send(conn.shard, command) {
                closed += 1;
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes (indexes) of one gateway id hand out different
    /// connection ids, so a downstream record left by the first reaches
    /// nobody in the second.
    #[test]
    fn a_restarted_gateway_does_not_reuse_connection_ids() {
        let first = Connections::new();
        let ids: Vec<u64> = (0..1_000).map(|_| first.next_conn_id()).collect();
        let mut restarts_apart = 0;
        for _ in 0..20 {
            let second = Connections::new();
            let next = second.next_conn_id();
            if !ids.contains(&next) {
                restarts_apart += 1;
            }
        }
        // Ids come from a random 32-bit base: all 20 restarts start apart
        // (but for a 1 in 2^32 chance each), where a counter from 1 never
        // would.
        assert_eq!(restarts_apart, 20);
        assert!(ids.windows(2).all(|pair| pair[1] == pair[0] + 1));
    }

    /// A router batch's frames reach each shard as one command, in the
    /// order sent, and every frame's count says how many it reached.
    #[test]
    fn a_batch_is_one_command_per_shard_in_order() {
        let (first, mut first_inbox) = tokio::sync::mpsc::unbounded_channel();
        let (second, mut second_inbox) = tokio::sync::mpsc::unbounded_channel();
        let connections = Connections::new();
        assert!(connections.attach(Arc::new(ShardLinks::new(
            vec![first, second],
            SessionLimits::default()
        ))));
        let conn = |shard, conn_id| ConnRef { shard, conn_id };
        let (phone, laptop, peer) = (conn(0, 1), conn(1, 2), conn(1, 3));
        connections.insert(7, &Arc::from("phone"), phone);
        connections.insert(7, &Arc::from("laptop"), laptop);
        connections.insert(8, &Arc::from("phone"), peer);
        let frame = |byte: u8| Bytes::from(vec![byte]);

        let reached = connections.send_all(vec![
            Outbound::Connection {
                conn: peer,
                frame: frame(1),
            },
            Outbound::Users {
                users: vec![7, 8, 9],
                frame: frame(2),
                skip: Some(peer),
            },
            Outbound::Connection {
                conn: phone,
                frame: frame(3),
            },
        ]);
        assert_eq!(reached, [1, 2, 1]);

        let only = |inbox: &mut tokio::sync::mpsc::UnboundedReceiver<ShardCommand>| {
            let command = inbox.try_recv().expect("one command");
            assert!(inbox.try_recv().is_err(), "exactly one command");
            match command {
                ShardCommand::DeliverMany(frames) => frames,
                _ => panic!("expected DeliverMany"),
            }
        };
        assert_eq!(
            only(&mut first_inbox),
            [(vec![1], frame(2)), (vec![1], frame(3))]
        );
        assert_eq!(
            only(&mut second_inbox),
            [(vec![3], frame(1)), (vec![2], frame(2))]
        );
    }
}
