//! Who is connected where, and presence: the [`Directory`] every gateway
//! registers its connections in (on authenticate, and out again on close)
//! and the delivery stages ask to split a member list per gateway (one
//! downstream envelope per gateway) and to name the offline members
//! (push). It also answers presence and last-seen for users on any
//! gateway.
//!
//! Implementations: [`LocalDirectory`] for a single node (every connection
//! is on this gateway; locating costs nothing unless offline users are
//! needed), [`SharedDirectory`] for several routers in one process (the
//! multi-node tests; gateways hold leases they must renew, on an injectable
//! [`Clock`]), and [`crate::RedisDirectory`] in cluster mode
//! (`docs/architecture.md`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use pingme_storage::UserId;

use crate::port::Outbox;
use crate::records::ConnAddress;

/// One registered connection: whose, which device, on which gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Registration {
    /// The authenticated user.
    pub user: UserId,
    /// The authenticated device.
    pub device: Arc<str>,
    /// The gateway holding the connection (its downstream topic).
    pub gateway: Arc<str>,
    /// The connection within that gateway.
    pub conn: ConnAddress,
}

/// Users split by where they are connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    /// Per gateway id, the users with a connection there.
    pub online: Vec<(String, Vec<UserId>)>,
    /// Users connected nowhere (filled only when asked for).
    pub offline: Vec<UserId>,
}

/// One user's presence across every gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    /// Whether any device of the user is connected anywhere.
    pub online: bool,
    /// When the user was last connected, Unix ms: now while online, 0 if
    /// never seen (or unknown).
    pub last_seen_ms: i64,
}

/// Why the directory could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// The backing service (Redis) failed; the call may be retried.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// The directory was set up or called wrongly (a bad server address,
    /// another gateway's connection); retrying does not help.
    #[error("directory misconfigured: {0}")]
    Settings(String),
}

/// The presence directory.
///
/// Ordering: the router calls `register` and `unregister` of one
/// connection in that order and never concurrently (it waits for a pending
/// `register` before unregistering).
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Records an authenticated connection. Also counts as a renewal of the
    /// gateway's lease (a gateway that registers is alive).
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError>;

    /// Removes a closed connection and sets the user's last-seen time.
    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError>;

    /// How often the router must call [`Directory::renew_lease`]: `None`
    /// when registrations never expire (single node: they die with the
    /// process). Implementations answer a third of their lease, so two
    /// renewals may be lost before the lease runs out.
    fn renew_every(&self) -> Option<Duration>;

    /// Keeps `gateway`'s registrations alive for one more lease. When a
    /// gateway stops renewing (it died without unregistering), its users
    /// are offline once the lease ends and nothing routes to it after.
    /// Returns false if the lease had already lapsed: other gateways saw
    /// this gateway's users offline meanwhile, and its earlier
    /// registrations are gone, unless the directory keeps them and writes
    /// them again (the Redis directory does; [`SharedDirectory`] does not,
    /// so there the connections must register again).
    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError>;

    /// Splits `users` per gateway, in one call for the whole slice (a fanout
    /// page: one round trip, not one per user). When `need_offline` is
    /// false the directory may skip the precise lookup and list users under
    /// a gateway that will find them not connected (cheaper for the common
    /// case of a single gateway without push).
    async fn locate(&self, users: &[UserId], need_offline: bool)
    -> Result<Located, DirectoryError>;

    /// The presence of each of `users`, in the order asked.
    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError>;
}

/// A warning logged at most once per period, with how many were held back.
pub(crate) struct ThrottledWarning {
    period: Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    held_back: AtomicU64,
}

impl ThrottledWarning {
    pub(crate) const fn new(period: Duration) -> Self {
        Self {
            period,
            last: std::sync::Mutex::new(None),
            held_back: AtomicU64::new(0),
        }
    }

    /// The number of warnings held back since the last one, if this one
    /// is to be logged.
    pub(crate) fn due(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(at) if now.duration_since(at) < self.period => {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.held_back.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// Wall-clock time in Unix ms, injectable so lease expiry is testable
/// without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Now, Unix ms.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        Self(AtomicI64::new(now_ms))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One user's connections on this node and when they were last seen.
#[derive(Debug, Clone, Copy, Default)]
struct LocalPresence {
    connections: u32,
    last_seen_ms: i64,
}

/// The single-node directory: every connection is on this gateway, and
/// the gateway's connection index ([`Outbox::online`]) says who is
/// connected, so delivery needs no lookup of its own. Presence counts the
/// connections registered here.
pub struct LocalDirectory {
    gateway: String,
    outbox: Arc<dyn Outbox>,
    presence: DashMap<UserId, LocalPresence>,
    clock: Arc<dyn Clock>,
}

impl LocalDirectory {
    /// The directory of the gateway `gateway` whose connections `outbox` holds.
    pub fn new(gateway: String, outbox: Arc<dyn Outbox>) -> Self {
        Self::with_clock(gateway, outbox, Arc::new(SystemClock))
    }

    /// The same, with last-seen times from `clock`.
    pub fn with_clock(gateway: String, outbox: Arc<dyn Outbox>, clock: Arc<dyn Clock>) -> Self {
        Self {
            gateway,
            outbox,
            presence: DashMap::new(),
            clock,
        }
    }
}

#[async_trait]
impl Directory for LocalDirectory {
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError> {
        let mut entry = self.presence.entry(connection.user).or_default();
        entry.connections += 1;
        entry.last_seen_ms = self.clock.now_ms();
        Ok(())
    }

    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError> {
        let mut entry = self.presence.entry(connection.user).or_default();
        // A stray unregister cannot make the count negative.
        entry.connections = entry.connections.saturating_sub(1);
        entry.last_seen_ms = self.clock.now_ms();
        Ok(())
    }

    fn renew_every(&self) -> Option<Duration> {
        None
    }

    async fn renew_lease(&self, _gateway: &str) -> Result<bool, DirectoryError> {
        Ok(true)
    }

    async fn locate(
        &self,
        users: &[UserId],
        need_offline: bool,
    ) -> Result<Located, DirectoryError> {
        if !need_offline {
            return Ok(Located {
                online: vec![(self.gateway.clone(), users.to_vec())],
                offline: Vec::new(),
            });
        }
        let flags = self.outbox.online(users);
        let (mut online, mut offline) = (Vec::new(), Vec::new());
        for (user, is_online) in users.iter().zip(flags) {
            if is_online {
                online.push(*user);
            } else {
                offline.push(*user);
            }
        }
        Ok(Located {
            online: if online.is_empty() {
                Vec::new()
            } else {
                vec![(self.gateway.clone(), online)]
            },
            offline,
        })
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError> {
        let now = self.clock.now_ms();
        Ok(users
            .iter()
            .map(|user| match self.presence.get(user) {
                Some(p) if p.connections > 0 => Presence {
                    online: true,
                    last_seen_ms: now,
                },
                Some(p) => Presence {
                    online: false,
                    last_seen_ms: p.last_seen_ms,
                },
                None => Presence::default(),
            })
            .collect())
    }
}

/// What [`SharedDirectory`] keeps, under one lock.
#[derive(Default)]
struct SharedState {
    /// Each user's registered connections.
    connections: HashMap<UserId, Vec<Registration>>,
    /// Each gateway's lease end, Unix ms.
    leases: HashMap<Arc<str>, i64>,
    /// When each user was last connected (set on unregister and expiry).
    last_seen: HashMap<UserId, i64>,
}

impl SharedState {
    /// Drops every registration of gateways whose lease ended by `now`,
    /// noting their users as last seen when the lease ended.
    fn expire(&mut self, now: i64) {
        let lapsed: Vec<(Arc<str>, i64)> = self
            .leases
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(gateway, until)| (gateway.clone(), *until))
            .collect();
        if lapsed.is_empty() {
            return;
        }
        for (gateway, until) in &lapsed {
            self.leases.remove(gateway);
            for (user, connections) in self.connections.iter_mut() {
                let before = connections.len();
                connections.retain(|c| c.gateway != *gateway);
                if connections.len() != before {
                    let seen = self.last_seen.entry(*user).or_default();
                    *seen = (*seen).max(*until);
                }
            }
        }
        self.connections
            .retain(|_, connections| !connections.is_empty());
    }
}

/// A directory several routers in one process share (multi-node tests):
/// what the Redis directory does, in memory. Gateways hold leases of
/// `lease`; a gateway that stops renewing loses its registrations when the
/// lease ends. Time comes from the [`Clock`] given, so a test moves it
/// instead of sleeping.
pub struct SharedDirectory {
    state: std::sync::Mutex<SharedState>,
    lease: Duration,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SharedDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDirectory")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl SharedDirectory {
    /// An empty directory with leases of `lease` on `clock`.
    pub fn new(lease: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            state: Default::default(),
            lease,
            clock,
        }
    }

    /// The state with every lapsed lease already expired.
    fn current(&self) -> (std::sync::MutexGuard<'_, SharedState>, i64) {
        let now = self.clock.now_ms();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.expire(now);
        (state, now)
    }

    fn lease_end(&self, now: i64) -> i64 {
        now + self.lease.as_millis() as i64
    }

    /// Ends `gateway`'s lease now, as if it had lapsed: its users are
    /// offline at once. What a test does when it kills a node, instead of
    /// moving the shared clock past every other node's lease too.
    pub fn end_lease(&self, gateway: &str) {
        let (mut state, now) = self.current();
        if let Some(until) = state.leases.get_mut(gateway) {
            *until = now;
        }
        state.expire(now);
    }
}

#[async_trait]
impl Directory for SharedDirectory {
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError> {
        let (mut state, now) = self.current();
        let until = self.lease_end(now);
        state.leases.insert(connection.gateway.clone(), until);
        state
            .connections
            .entry(connection.user)
            .or_default()
            .push(connection.clone());
        Ok(())
    }

    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError> {
        let (mut state, now) = self.current();
        if let Some(connections) = state.connections.get_mut(&connection.user) {
            connections.retain(|c| c != connection);
            if connections.is_empty() {
                state.connections.remove(&connection.user);
            }
        }
        state.last_seen.insert(connection.user, now);
        Ok(())
    }

    fn renew_every(&self) -> Option<Duration> {
        Some(self.lease / 3)
    }

    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError> {
        let (mut state, now) = self.current();
        let until = self.lease_end(now);
        match state.leases.get_mut(gateway) {
            Some(lease) => {
                *lease = until;
                Ok(true)
            }
            None => {
                state.leases.insert(Arc::from(gateway), until);
                Ok(false)
            }
        }
    }

    async fn locate(
        &self,
        users: &[UserId],
        need_offline: bool,
    ) -> Result<Located, DirectoryError> {
        let (state, _) = self.current();
        let mut located = Located::default();
        let mut slot: HashMap<&str, usize> = HashMap::new();
        for user in users {
            let connections = state.connections.get(user).map_or(&[][..], Vec::as_slice);
            if connections.is_empty() {
                if need_offline {
                    located.offline.push(*user);
                }
                continue;
            }
            // A user with two devices on one gateway is listed there once.
            let mut gateways: Vec<&str> = connections.iter().map(|c| &*c.gateway).collect();
            gateways.sort_unstable();
            gateways.dedup();
            for gateway in gateways {
                let index = *slot.entry(gateway).or_insert_with(|| {
                    located.online.push((gateway.to_string(), Vec::new()));
                    located.online.len() - 1
                });
                located.online[index].1.push(*user);
            }
        }
        Ok(located)
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError> {
        let (state, now) = self.current();
        Ok(users
            .iter()
            .map(|user| {
                if state.connections.contains_key(user) {
                    Presence {
                        online: true,
                        last_seen_ms: now,
                    }
                } else {
                    Presence {
                        online: false,
                        last_seen_ms: state.last_seen.get(user).copied().unwrap_or(0),
                    }
                }
            })
            .collect())
    }
}

/// The behaviour every directory shares is tested once for all of them in
/// `router/tests/directory.rs`; what is the single-node directory's own is
/// here.
#[cfg(test)]
mod tests {
    use super::*;

    fn registration(user: UserId, gateway: &str, conn_id: u64) -> Registration {
        Registration {
            user,
            device: Arc::from("phone"),
            gateway: Arc::from(gateway),
            conn: ConnAddress { shard: 0, conn_id },
        }
    }

    struct NoOneOnline;

    impl Outbox for NoOneOnline {
        fn to_connection(&self, _: crate::port::ConnRef, _: bytes::Bytes) -> bool {
            false
        }
        fn to_users(
            &self,
            _: &[UserId],
            _: &bytes::Bytes,
            _: Option<crate::port::ConnRef>,
        ) -> usize {
            0
        }
        fn online(&self, users: &[UserId]) -> Vec<bool> {
            users.iter().map(|user| *user == 2).collect()
        }
        fn disconnect(&self, _: UserId, _: Option<&str>, _: bytes::Bytes) -> usize {
            0
        }
    }

    #[tokio::test]
    async fn local_directory_counts_connections_for_presence() {
        let clock = Arc::new(ManualClock::new(10));
        let directory =
            LocalDirectory::with_clock("gw".into(), Arc::new(NoOneOnline), clock.clone());
        assert_eq!(
            directory.presence(&[1]).await.unwrap(),
            [Presence::default()]
        );
        let (first, second) = (registration(1, "gw", 1), registration(1, "gw", 2));
        directory.register(&first).await.unwrap();
        directory.register(&second).await.unwrap();
        clock.advance(Duration::from_millis(10));
        directory.unregister(&first).await.unwrap();
        assert_eq!(
            directory.presence(&[1]).await.unwrap(),
            [Presence {
                online: true,
                last_seen_ms: 20
            }]
        );
        clock.advance(Duration::from_millis(20));
        directory.unregister(&second).await.unwrap();
        clock.advance(Duration::from_millis(10));
        assert_eq!(
            directory.presence(&[1]).await.unwrap(),
            [Presence {
                online: false,
                last_seen_ms: 40
            }]
        );
        // A stray unregister cannot make the count negative.
        directory.unregister(&second).await.unwrap();
        directory.register(&first).await.unwrap();
        assert!(directory.presence(&[1]).await.unwrap()[0].online);
        // Delivery asks the gateway's index, not the presence count.
        let located = directory.locate(&[1, 2], true).await.unwrap();
        assert_eq!(located.online, [("gw".to_string(), vec![2])]);
        assert_eq!(located.offline, [1]);
        assert_eq!(
            directory.locate(&[1, 2], false).await.unwrap().online,
            [("gw".to_string(), vec![1, 2])],
            "without push nothing is looked up"
        );
    }
}
