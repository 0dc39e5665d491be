//! The sans-IO client core: the whole protocol state machine of a pingme
//! client (handshake and re-authentication, requests matched to their
//! answers, sync and gap fetch, delivery acks, heartbeats, reconnect pacing
//! and the server's retry hints) with no sockets, no tasks, no channels and
//! no clock of its own. It is what native SDKs wrap: the tokio driver in
//! [`crate::Client`] is one wrapper, a UniFFI binding driven from Kotlin or
//! Swift run loops is another.
//!
//! # Contract
//!
//! A [`ClientCore`] is fed *inputs*, each with the current time `now` (a
//! monotonic [`Instant`] the caller reads; the core never reads a clock):
//!
//! * [`ClientCore::handle_connected`] / [`ClientCore::handle_connect_failed`]:
//!   the transport the core asked for (with [`Transmit::Connect`]) is open,
//!   or could not be opened;
//! * [`ClientCore::handle_frame`]: a [`ServerFrame`] arrived;
//! * [`ClientCore::handle_connection_lost`]: the transport broke or the
//!   server closed it;
//! * [`ClientCore::handle_command`]: the application asks for something
//!   (send, fetch, presence, typing, read marker, close);
//! * [`ClientCore::handle_timeout`]: the instant last returned by
//!   [`ClientCore::poll_timeout`] has passed.
//!
//! After **every** input the caller drains the *outputs*, in any order
//! between the two queues but each queue in its own order:
//!
//! * [`ClientCore::poll_transmit`] until `None`: what to do on the wire, in
//!   order: open a transport, write a frame, close the transport. Frames
//!   always belong to the transport opened last; the core never queues a
//!   frame while no transport is open;
//! * [`ClientCore::poll_event`] until `None`: [`Event`]s for the
//!   application and [`CoreEvent::Answer`]s that complete requests;
//! * [`ClientCore::poll_timeout`]: when to call
//!   [`ClientCore::handle_timeout`] next (re-read after every input: it
//!   moves).
//!
//! Once [`ClientCore::is_closed`] is true and both queues are drained, the
//! core is finished: further inputs are ignored and commands are refused.
//!
//! Randomness (the jitter of reconnect delays) comes from an RNG seeded by
//! [`CoreConfig::rng_seed`], so a test with a fixed seed sees the same
//! delays every run.

mod sync;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pingme_protocol::v1::{
    self, Authenticate, FetchMessages, GoAway, GoAwayReason, Hello, HelloAck, MessagePage, Ping,
    PresenceEvent, PresenceList, PresenceQuery, ReadMarker, ReadReceipt, SendAck, SendMessage,
    Typing, TypingEvent, client_frame, server_frame,
};
use pingme_protocol::{
    ClientFrame, ErrorCode, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ServerFrame,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::backoff::Backoff;
use crate::error::ClientError;
use crate::watermark::Watermarks;
use sync::{Catchup, Held};

/// Request ids of the handshake frames; the core's own ids start above.
const HELLO_REQUEST: u64 = 1;
const AUTH_REQUEST: u64 = 2;
/// The shortest heartbeat period the core accepts.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// The first id of requests after the handshake.
const FIRST_REQUEST_ID: u64 = 1000;

/// Names one application request (send, fetch, presence query) until its
/// [`CoreEvent::Answer`]. It is also the frame's `request_id` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What the core needs to know up front.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The access token sent in `Authenticate` on every (re)connect.
    pub token: String,
    /// Sent in `Hello` for the server's logs.
    pub client_name: String,
    /// Reconnect pacing and the pacing of retried requests.
    pub backoff: Backoff,
    /// How long opening the transport plus the handshake may take.
    pub connect_timeout: Duration,
    /// How long a request (send, fetch, presence) waits for its answer,
    /// reconnects and retries included.
    pub request_timeout: Duration,
    /// Watermarks the application persisted last time (conversation, seq).
    pub watermarks: Vec<(String, u64)>,
    /// Heartbeat period if the server does not announce one.
    pub default_heartbeat: Duration,
    /// Heartbeat periods without any frame from the server after which the
    /// connection is declared dead (docs/protocol.md: "about three").
    pub dead_after_heartbeats: u32,
    /// How long a `DeliveryAck` may wait so that one frame acknowledges
    /// everything that arrived meanwhile (a burst in a busy group, a sync's
    /// pages). Acks also go out with the next frame the client writes
    /// anyway, and before a [`Command::Close`]. Zero: ack every read at
    /// once. The server writes delivered watermarks in windows of its own,
    /// and this device's sync starts from what it holds, so a short delay
    /// costs nothing but a few refetched seqs if the app is killed.
    pub ack_delay: Duration,
    /// Seed of the jitter RNG.
    pub rng_seed: u64,
    /// Whether a failure of the very first connection is retried like a
    /// lost connection (`true`, what a phone app that starts offline wants)
    /// or stops the core with that error (`false`, so `Client::connect`
    /// can return it).
    pub retry_first_connect: bool,
    /// The caller's wall clock (Unix milliseconds) at the `now` the core was
    /// created with; pings carry it advanced by the core's own monotonic
    /// time, so the core needs no clock.
    pub unix_ms_at_start: i64,
}

impl CoreConfig {
    /// Defaults for everything but the token.
    pub fn new(token: impl Into<String>) -> CoreConfig {
        CoreConfig {
            token: token.into(),
            client_name: format!("pingme-client/{}", env!("CARGO_PKG_VERSION")),
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            watermarks: Vec::new(),
            default_heartbeat: Duration::from_secs(30),
            dead_after_heartbeats: 3,
            ack_delay: Duration::from_millis(100),
            rng_seed: 0,
            retry_first_connect: false,
            unix_ms_at_start: 0,
        }
    }
}

/// What the application asks the core to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Send a message; answered by [`Answer::Sent`]. Kept across reconnects
    /// and re-sent with the same `client_msg_id` until acknowledged, failed
    /// for good, or timed out.
    Send(SendMessage),
    /// Fetch one page of history; answered by [`Answer::Page`]. The
    /// messages are not deduplicated (history browsing).
    Fetch(FetchMessages),
    /// Ask for the presence of some users; answered by [`Answer::Presence`].
    QueryPresence(PresenceQuery),
    /// Tell the other members this user is (or stopped) typing. Dropped
    /// while no connection is up: typing is ephemeral.
    Typing(Typing),
    /// Mark a conversation read up to a seq. Dropped while no connection is
    /// up.
    MarkRead(ReadMarker),
    /// Drop the connection and open a new one now, without a backoff
    /// delay (the application knows the network changed or came back).
    /// Pending requests stay and go out again on the new connection; a
    /// connect already in progress is left to finish.
    Reconnect,
    /// Close the connection and stop for good; pending requests fail with
    /// [`ClientError::Closed`].
    Close,
}

/// What the core wants done on the wire, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// Open a transport (closing any previous one) and report with
    /// [`ClientCore::handle_connected`] or
    /// [`ClientCore::handle_connect_failed`]. `redirect` is the address a
    /// `GoAway` named (same transport, other gateway); `None` means the
    /// configured endpoint.
    Connect {
        /// Where to connect instead of the configured address.
        redirect: Option<SocketAddr>,
    },
    /// Write this frame to the open transport.
    Frame(ClientFrame),
    /// Close the transport (or abandon the connect in progress). No
    /// [`ClientCore::handle_connection_lost`] is expected for it.
    Disconnect,
}

/// What the application hears from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection is up and authenticated.
    Connected {
        /// The authenticated user.
        user_id: u64,
        /// The authenticated device.
        device_id: String,
        /// True after the first connection.
        reconnected: bool,
    },
    /// A message this device had not seen, pushed live or found by sync.
    Message(v1::Message),
    /// Another member read a conversation up to a seq.
    ReadReceipt(ReadReceipt),
    /// Another member is typing.
    Typing(TypingEvent),
    /// A user went online or offline.
    Presence(PresenceEvent),
    /// The server asked this client to go away.
    GoAway(GoAway),
    /// The sync after a (re)connect finished: every conversation is caught
    /// up to what the server reported.
    Synced,
    /// The connection was lost; a reconnect follows after `delay`.
    Reconnecting {
        /// Failed attempts in a row so far.
        attempt: u32,
        /// Wait before the next attempt.
        delay: Duration,
        /// Why the last connection or attempt failed.
        reason: String,
    },
    /// The client stopped for good (closed, replaced, logged out, token
    /// rejected, retries exhausted). No more events follow.
    Closed {
        /// Why.
        reason: String,
    },
}

/// The successful answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A [`Command::Send`] was stored.
    Sent(SendAck),
    /// A [`Command::Fetch`] page.
    Page(MessagePage),
    /// A [`Command::QueryPresence`] answer.
    Presence(PresenceList),
}

/// One output of [`ClientCore::poll_event`].
#[derive(Debug)]
pub enum CoreEvent {
    /// Something for the application.
    App(Event),
    /// A request finished.
    Answer {
        /// The id [`ClientCore::handle_command`] returned.
        request: RequestId,
        /// The answer, or why there is none.
        result: Result<Answer, ClientError>,
    },
}

/// An application request not answered yet.
struct Pending {
    body: client_frame::Body,
    deadline: Instant,
    /// Retryable refusals so far (they pace the next retry).
    refusals: u32,
    /// When a refused request goes out again on this connection.
    retry_at: Option<Instant>,
}

/// Where the connection is.
#[derive(Debug)]
enum Link {
    /// No transport; open one at `until`.
    Waiting { until: Instant },
    /// [`Transmit::Connect`] queued; waiting for the transport.
    Opening { deadline: Instant },
    /// `Hello` and `Authenticate` sent together; `hello_ack` once it came.
    Handshake {
        deadline: Instant,
        hello_ack: Option<HelloAck>,
    },
    /// Authenticated.
    Ready(Liveness),
    /// Stopped for good.
    Closed,
}

/// Heartbeat bookkeeping of an authenticated connection.
#[derive(Debug)]
struct Liveness {
    heartbeat: Duration,
    last_heard: Instant,
    last_ping: Instant,
}

/// The output queues, and the bookkeeping every queued frame needs.
struct Outbox {
    transmits: VecDeque<Transmit>,
    events: VecDeque<CoreEvent>,
    next_request_id: u64,
    /// The `now` of the input being handled.
    now: Instant,
    /// When the last frame was queued (the server counts any frame as a
    /// sign of life, so a busy client needs no pings).
    last_sent: Instant,
}

impl Outbox {
    fn frame(&mut self, request_id: u64, body: client_frame::Body) {
        self.last_sent = self.now;
        self.transmits.push_back(Transmit::Frame(ClientFrame {
            request_id,
            body: Some(body),
        }));
    }

    /// Queues a request of the core's own under a fresh id.
    fn request(&mut self, body: client_frame::Body) -> u64 {
        let request_id = self.fresh_id();
        self.frame(request_id, body);
        request_id
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    fn event(&mut self, event: Event) {
        self.events.push_back(CoreEvent::App(event));
    }

    fn answer(&mut self, request_id: u64, result: Result<Answer, ClientError>) {
        self.events.push_back(CoreEvent::Answer {
            request: RequestId(request_id),
            result,
        });
    }
}

/// The client state machine; see the module documentation for the
/// contract.
pub struct ClientCore {
    config: CoreConfig,
    rng: StdRng,
    /// The `now` the core was created with (the origin of ping times).
    started: Instant,
    link: Link,
    out: Outbox,
    /// Application requests by id; ascending ids keep re-sends in the
    /// original order.
    pending: BTreeMap<u64, Pending>,
    /// Request timeouts, soonest first.
    deadlines: BTreeSet<(Instant, u64)>,
    /// Refused requests waiting to go out again, soonest first.
    retries: BTreeSet<(Instant, u64)>,
    /// What this device holds; survives reconnects.
    held: Held,
    /// The sync and gap fetches of the current connection.
    catchup: Catchup,
    /// Failed connection attempts in a row.
    failures: u32,
    /// Whether a connection was ever authenticated.
    ever_connected: bool,
    /// The gateway a `GoAway` sent us to.
    redirect: Option<SocketAddr>,
    /// Who the server says we are (after the first `AuthOk`).
    identity: Option<(u64, String)>,
    /// Why the core stopped.
    error: Option<ClientError>,
}

impl std::fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCore")
            .field("link", &self.link)
            .field("pending", &self.pending.len())
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl ClientCore {
    /// A core that starts by asking for a transport
    /// ([`Transmit::Connect`]).
    pub fn new(config: CoreConfig, now: Instant) -> ClientCore {
        let held = Held::new(
            Watermarks::from_saved(config.watermarks.iter().cloned()),
            config.ack_delay,
        );
        let mut core = ClientCore {
            rng: StdRng::seed_from_u64(config.rng_seed),
            started: now,
            link: Link::Closed,
            out: Outbox {
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                next_request_id: FIRST_REQUEST_ID,
                now,
                last_sent: now,
            },
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            retries: BTreeSet::new(),
            held,
            catchup: Catchup::default(),
            failures: 0,
            ever_connected: false,
            redirect: None,
            identity: None,
            error: None,
            config,
        };
        core.open(now);
        core
    }

    // ----- inputs -----

    /// The transport asked for by [`Transmit::Connect`] is open: the
    /// handshake starts.
    pub fn handle_connected(&mut self, now: Instant) {
        self.out.now = now;
        let Link::Opening { deadline } = self.link else {
            // A transport nobody asked for (any more): close it.
            if !self.is_closed() {
                self.out.transmits.push_back(Transmit::Disconnect);
            }
            return;
        };
        // Hello and Authenticate go out together (docs/protocol.md: the
        // server handles pipelined frames in order): a reconnecting phone
        // waits one round trip less than if it waited for HelloAck. An
        // unsupported version still fails the attempt when HelloAck (or
        // the fatal error) comes back; the token only ever goes to the
        // server this transport was opened to.
        self.out.frame(
            HELLO_REQUEST,
            client_frame::Body::Hello(Hello {
                max_version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                client_name: self.config.client_name.clone(),
            }),
        );
        self.out.frame(
            AUTH_REQUEST,
            client_frame::Body::Authenticate(Authenticate {
                token: self.config.token.clone(),
            }),
        );
        self.link = Link::Handshake {
            deadline,
            hello_ack: None,
        };
    }

    /// The transport could not be opened.
    pub fn handle_connect_failed(&mut self, now: Instant, error: ClientError) {
        self.out.now = now;
        if matches!(self.link, Link::Opening { .. }) {
            self.attempt_failed(now, error, None);
        }
    }

    /// The transport broke, or the server closed it.
    pub fn handle_connection_lost(&mut self, now: Instant, error: ClientError) {
        self.out.now = now;
        match self.link {
            Link::Opening { .. } | Link::Handshake { .. } => {
                self.out.transmits.push_back(Transmit::Disconnect);
                self.attempt_failed(now, error, None);
            }
            Link::Ready(_) => self.session_lost(now, error),
            Link::Waiting { .. } | Link::Closed => {}
        }
    }

    /// A frame from the server.
    pub fn handle_frame(&mut self, now: Instant, frame: ServerFrame) {
        self.out.now = now;
        match &mut self.link {
            Link::Handshake { .. } => self.handshake_frame(now, frame),
            Link::Ready(liveness) => {
                liveness.last_heard = now;
                self.session_frame(now, frame);
            }
            // Nothing is read outside a connection.
            Link::Waiting { .. } | Link::Opening { .. } | Link::Closed => {}
        }
    }

    /// An application command. Returns the request's id for commands that
    /// are answered ([`Command::Send`], [`Command::Fetch`],
    /// [`Command::QueryPresence`]); after the core closed, those are
    /// answered at once with [`ClientError::Closed`].
    pub fn handle_command(&mut self, now: Instant, command: Command) -> Option<RequestId> {
        self.out.now = now;
        let body = match command {
            Command::Close => {
                if !self.is_closed() {
                    let ready = matches!(self.link, Link::Ready(_));
                    // Stopping drops the frames still queued for this
                    // connection; what this device holds is told after
                    // that, right before it goes.
                    self.stop(ClientError::Closed);
                    if ready {
                        self.held.flush_acks(&mut self.out);
                    }
                    self.out.transmits.push_back(Transmit::Disconnect);
                }
                return None;
            }
            Command::Reconnect => {
                self.reconnect_now(now);
                return None;
            }
            Command::Typing(typing) => {
                self.notify(client_frame::Body::Typing(typing));
                return None;
            }
            Command::MarkRead(marker) => {
                self.notify(client_frame::Body::ReadMarker(marker));
                return None;
            }
            Command::Send(send) => client_frame::Body::Send(send),
            Command::Fetch(fetch) => client_frame::Body::Fetch(fetch),
            Command::QueryPresence(query) => client_frame::Body::PresenceQuery(query),
        };
        let request_id = self.out.fresh_id();
        if self.is_closed() {
            self.out.answer(request_id, Err(ClientError::Closed));
            return Some(RequestId(request_id));
        }
        if matches!(self.link, Link::Ready(_)) {
            self.held.flush_acks(&mut self.out);
            self.out.frame(request_id, body.clone());
        }
        // Otherwise it goes out once the next connection is authenticated.
        let deadline = now + self.config.request_timeout;
        self.deadlines.insert((deadline, request_id));
        self.pending.insert(
            request_id,
            Pending {
                body,
                deadline,
                refusals: 0,
                retry_at: None,
            },
        );
        Some(RequestId(request_id))
    }

    /// The instant from [`ClientCore::poll_timeout`] has passed (calling it
    /// early or twice is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.out.now = now;
        let dead_after = self.config.dead_after_heartbeats.max(1);
        while let Some(&(deadline, request_id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(pending) = self.pending.remove(&request_id) {
                if let Some(at) = pending.retry_at {
                    self.retries.remove(&(at, request_id));
                }
                self.out.answer(request_id, Err(ClientError::Timeout));
            }
        }
        match &mut self.link {
            Link::Waiting { until } if *until <= now => self.open(now),
            Link::Opening { deadline } | Link::Handshake { deadline, .. } if *deadline <= now => {
                self.out.transmits.push_back(Transmit::Disconnect);
                self.attempt_failed(now, ClientError::Timeout, None);
            }
            Link::Ready(liveness) => {
                if now >= liveness.last_heard + liveness.heartbeat.saturating_mul(dead_after) {
                    return self.session_lost(now, ClientError::Timeout);
                }
                if self.held.ack_due().is_some_and(|due| due <= now) {
                    self.held.flush_acks(&mut self.out);
                }
                if now >= next_ping(liveness, self.out.last_sent) {
                    liveness.last_ping = now;
                    let client_time_ms = self.config.unix_ms_at_start
                        + now.duration_since(self.started).as_millis() as i64;
                    self.out
                        .frame(0, client_frame::Body::Ping(Ping { client_time_ms }));
                }
                while let Some(&(at, request_id)) = self.retries.first() {
                    if at > now {
                        break;
                    }
                    self.retries.pop_first();
                    if let Some(pending) = self.pending.get_mut(&request_id) {
                        pending.retry_at = None;
                        self.out.frame(request_id, pending.body.clone());
                    }
                }
            }
            _ => {}
        }
    }

    // ----- outputs -----

    /// The next thing to do on the wire.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next event or answer.
    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        self.out.events.pop_front()
    }

    /// When [`ClientCore::handle_timeout`] must be called next; `None`:
    /// only other inputs can move the core.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = match &self.link {
            Link::Waiting { until } => Some(*until),
            Link::Opening { deadline } | Link::Handshake { deadline, .. } => Some(*deadline),
            Link::Ready(liveness) => {
                let dead = liveness.last_heard + self.dead_after(liveness.heartbeat);
                let retry = self.retries.first().map(|(at, _)| *at);
                Some(
                    next_ping(liveness, self.out.last_sent)
                        .min(dead)
                        .min(retry.unwrap_or(dead))
                        .min(self.held.ack_due().unwrap_or(dead)),
                )
            }
            Link::Closed => None,
        };
        let request = self.deadlines.first().map(|(at, _)| *at);
        match (link, request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ----- state for the application -----

    /// Whether the core stopped for good.
    pub fn is_closed(&self) -> bool {
        matches!(self.link, Link::Closed)
    }

    /// Whether a connection is authenticated right now.
    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Ready(_))
    }

    /// Why the core stopped (taken once), e.g. to return the first
    /// connection's failure to the caller of a connect function.
    pub fn take_error(&mut self) -> Option<ClientError> {
        self.error.take()
    }

    /// The authenticated user and device, once a connection was.
    pub fn identity(&self) -> Option<(u64, &str)> {
        self.identity.as_ref().map(|(u, d)| (*u, d.as_str()))
    }

    /// This device's watermark in a conversation: every seq up to it was
    /// received.
    pub fn watermark(&self, conversation_id: &str) -> u64 {
        self.held.marks.get(conversation_id)
    }

    /// Every watermark, for the application to persist and pass back in
    /// [`CoreConfig::watermarks`] next time.
    pub fn watermarks(&self) -> Vec<(String, u64)> {
        self.held.marks.snapshot()
    }

    /// Requests not answered yet.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    // ----- the connection's life -----

    /// Asks for a transport.
    fn open(&mut self, now: Instant) {
        self.out.transmits.push_back(Transmit::Connect {
            redirect: self.redirect,
        });
        self.link = Link::Opening {
            deadline: now + self.config.connect_timeout,
        };
    }

    fn dead_after(&self, heartbeat: Duration) -> Duration {
        heartbeat.saturating_mul(self.config.dead_after_heartbeats.max(1))
    }

    /// A connection attempt (transport or handshake) failed. `hint` is a
    /// `GoAway` the server answered the handshake with.
    fn attempt_failed(&mut self, now: Instant, error: ClientError, hint: Option<GoAway>) {
        if error.is_terminal() || (!self.ever_connected && !self.config.retry_first_connect) {
            return self.stop(error);
        }
        self.failures += 1;
        if self.config.backoff.exhausted(self.failures) {
            let failures = self.failures;
            return self.stop(ClientError::Protocol(format!(
                "gave up after {failures} reconnect attempts: {error}"
            )));
        }
        let mut delay = self.config.backoff.delay(self.failures, &mut self.rng);
        if let Some(go_away) = hint {
            delay = delay.max(self.follow(&go_away));
        }
        self.wait(now, self.failures, delay, error.to_string());
    }

    /// An authenticated connection ended without a word from the server.
    fn session_lost(&mut self, now: Instant, error: ClientError) {
        self.out.transmits.push_back(Transmit::Disconnect);
        self.end_session();
        if error.is_terminal() {
            return self.stop(error);
        }
        if self.config.backoff.exhausted(0) {
            return self.stop(ClientError::Protocol(format!(
                "gave up after 0 reconnect attempts: {error}"
            )));
        }
        let delay = self.config.backoff.delay(0, &mut self.rng);
        self.wait(now, 0, delay, error.to_string());
    }

    /// [`Command::Reconnect`]: a connection up or in its handshake is
    /// closed, and a new one opened at once, as is a wait for the next
    /// attempt cut short.
    fn reconnect_now(&mut self, now: Instant) {
        match self.link {
            Link::Closed | Link::Opening { .. } => return,
            Link::Waiting { .. } => {}
            Link::Handshake { .. } | Link::Ready(_) => {
                self.out.transmits.push_back(Transmit::Disconnect);
                self.end_session();
            }
        }
        self.out.event(Event::Reconnecting {
            attempt: self.failures,
            delay: Duration::ZERO,
            reason: "reconnect asked for".into(),
        });
        self.open(now);
    }

    /// Forgets what belonged to the connection that just ended. Frames
    /// still queued were meant for it; pending requests stay and go out
    /// again on the next one.
    fn end_session(&mut self) {
        self.out
            .transmits
            .retain(|t| !matches!(t, Transmit::Frame(_)));
        self.catchup = Catchup::default();
        for (_, request_id) in std::mem::take(&mut self.retries) {
            if let Some(pending) = self.pending.get_mut(&request_id) {
                pending.retry_at = None;
            }
        }
    }

    /// Records a `GoAway`'s redirect and returns how long it asks to wait:
    /// at least `retry_after_ms`, plus a spread so the server's clients do
    /// not all return in the same instant.
    fn follow(&mut self, go_away: &GoAway) -> Duration {
        if let Ok(addr) = go_away.reconnect_to.parse() {
            self.redirect = Some(addr);
        }
        let retry_after = Duration::from_millis(go_away.retry_after_ms.into());
        let spread = retry_after / 4 + self.config.backoff.initial;
        retry_after + spread.mul_f64(rand::Rng::random::<f64>(&mut self.rng))
    }

    fn wait(&mut self, now: Instant, attempt: u32, delay: Duration, reason: String) {
        self.out.event(Event::Reconnecting {
            attempt,
            delay,
            reason,
        });
        self.link = Link::Waiting { until: now + delay };
    }

    /// Stops for good: every pending request fails, the application hears
    /// `Closed`.
    fn stop(&mut self, error: ClientError) {
        self.end_session();
        for (request_id, _) in std::mem::take(&mut self.pending) {
            self.out.answer(request_id, Err(copy_error(&error)));
        }
        self.deadlines.clear();
        self.out.event(Event::Closed {
            reason: error.to_string(),
        });
        self.error = Some(error);
        self.link = Link::Closed;
    }

    fn handshake_frame(&mut self, now: Instant, frame: ServerFrame) {
        let Link::Handshake {
            deadline,
            hello_ack,
        } = &mut self.link
        else {
            return;
        };
        let deadline = *deadline;
        let failure = match (frame.body, hello_ack.take()) {
            // An empty frame carries nothing; a newer server may send
            // bodies this build does not know, which decode as `None` too.
            (None, kept) => {
                *hello_ack = kept;
                return;
            }
            (Some(server_frame::Body::Error(error)), _) => (server_error(error), None),
            (Some(server_frame::Body::GoAway(go_away)), _) => (
                ClientError::GoAway {
                    reason: go_away.reason(),
                    message: go_away.message.clone(),
                },
                Some(go_away),
            ),
            (Some(server_frame::Body::HelloAck(ack)), None) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&ack.version) {
                    (ClientError::UnsupportedVersion, None)
                } else {
                    // Authenticate went out with Hello: AuthOk is next.
                    self.link = Link::Handshake {
                        deadline,
                        hello_ack: Some(ack),
                    };
                    return;
                }
            }
            (Some(server_frame::Body::AuthOk(ok)), Some(ack)) => {
                return self.authenticated(now, ack, ok);
            }
            (Some(other), kept) => {
                let wanted = if kept.is_some() { "AuthOk" } else { "HelloAck" };
                (unexpected(wanted, &other), None)
            }
        };
        self.out.transmits.push_back(Transmit::Disconnect);
        let (error, hint) = failure;
        self.attempt_failed(now, error, hint);
    }

    fn authenticated(&mut self, now: Instant, hello_ack: HelloAck, ok: v1::AuthOk) {
        self.failures = 0;
        let reconnected = self.ever_connected;
        self.ever_connected = true;
        self.identity = Some((ok.user_id, ok.device_id.clone()));
        let heartbeat = match hello_ack.heartbeat_interval_ms {
            0 => self.config.default_heartbeat,
            ms => Duration::from_millis(ms.into()),
        }
        // A zero period would ask for a ping on every turn.
        .max(MIN_HEARTBEAT);
        self.link = Link::Ready(Liveness {
            heartbeat,
            last_heard: now,
            last_ping: now,
        });
        self.out.event(Event::Connected {
            user_id: ok.user_id,
            device_id: ok.device_id,
            reconnected,
        });
        // Acks a lost connection never sent, then unanswered requests with
        // their original bodies: a send goes out again with the same
        // client_msg_id.
        self.held.flush_acks(&mut self.out);
        for (request_id, pending) in &self.pending {
            self.out.frame(*request_id, pending.body.clone());
        }
        self.catchup = Catchup::start(&mut self.out);
    }

    fn session_frame(&mut self, now: Instant, frame: ServerFrame) {
        use server_frame::Body;
        let request_id = frame.request_id;
        let Some(body) = frame.body else {
            return;
        };
        // A fatal error ends the connection whatever it answers.
        if let Body::Error(error) = &body
            && error.fatal
        {
            let error = error.clone();
            // The request it answers fails with it, unless it only says
            // "later" (then it is re-sent on the next connection).
            if !ErrorCode::is_retryable_code(error.code)
                && let Some(pending) = self.pending.remove(&request_id)
            {
                self.deadlines.remove(&(pending.deadline, request_id));
                self.out
                    .answer(request_id, Err(server_error(error.clone())));
            }
            return self.session_lost(now, server_error(error));
        }
        if request_id != 0 {
            if self.catchup.owns(request_id) {
                return self
                    .catchup
                    .on_answer(request_id, body, &mut self.held, &mut self.out);
            }
            if self.pending.contains_key(&request_id) {
                return self.answered(now, request_id, body);
            }
        }
        match body {
            Body::Deliver(deliver) => {
                if let Some(message) = deliver.message {
                    self.catchup
                        .accept(vec![message], &mut self.held, &mut self.out);
                }
            }
            Body::ReadReceipt(receipt) => self.out.event(Event::ReadReceipt(receipt)),
            Body::Typing(typing) => self.out.event(Event::Typing(typing)),
            Body::Presence(presence) => self.out.event(Event::Presence(presence)),
            Body::GoAway(go_away) => {
                self.out.event(Event::GoAway(go_away.clone()));
                self.out.transmits.push_back(Transmit::Disconnect);
                self.end_session();
                match go_away.reason() {
                    GoAwayReason::Replaced | GoAwayReason::LoggedOut => {
                        self.stop(ClientError::GoAway {
                            reason: go_away.reason(),
                            message: go_away.message.clone(),
                        });
                    }
                    _ => {
                        let delay = self.follow(&go_away);
                        self.wait(now, 0, delay, go_away.message);
                    }
                }
            }
            Body::Error(error) => {
                tracing::warn!(code = error.code, message = %error.message, "server error");
            }
            // Pongs (liveness is any frame) and answers to requests that
            // timed out.
            _ => {}
        }
    }

    /// The answer to an application request.
    fn answered(&mut self, now: Instant, request_id: u64, body: server_frame::Body) {
        use server_frame::Body;
        let result = match (body, &self.pending[&request_id].body) {
            (Body::Error(error), _) if ErrorCode::is_retryable_code(error.code) => {
                let pending = self.pending.get_mut(&request_id).expect("checked");
                let delay = self.config.backoff.delay(pending.refusals, &mut self.rng);
                pending.refusals += 1;
                if now + delay < pending.deadline {
                    // The server said "later": go again after a backoff
                    // delay, same request id, same client_msg_id.
                    pending.retry_at = Some(now + delay);
                    self.retries.insert((now + delay, request_id));
                    return;
                }
                Err(server_error(error))
            }
            (Body::Error(error), _) => Err(server_error(error)),
            (Body::SendAck(ack), client_frame::Body::Send(_)) => Ok(Answer::Sent(ack)),
            (Body::Page(page), client_frame::Body::Fetch(_)) => Ok(Answer::Page(page)),
            (Body::PresenceList(list), client_frame::Body::PresenceQuery(_)) => {
                Ok(Answer::Presence(list))
            }
            (other, asked) => Err(unexpected(answer_name(asked), &other)),
        };
        let pending = self.pending.remove(&request_id).expect("checked");
        self.deadlines.remove(&(pending.deadline, request_id));
        if let Ok(Answer::Sent(ack)) = &result {
            self.catchup
                .hold_own(&ack.conversation_id, ack.seq, &mut self.held, &mut self.out);
        }
        self.out.answer(request_id, result);
    }

    /// Sends a fire-and-forget frame if a connection is up.
    fn notify(&mut self, body: client_frame::Body) {
        if matches!(self.link, Link::Ready(_)) {
            self.held.flush_acks(&mut self.out);
            self.out.frame(0, body);
        }
    }
}

/// When the next ping is due: a heartbeat after the later of the last ping
/// and the quieter direction, so a connection busy both ways needs none,
/// and one where only the server talks (or only we do) still gets one.
fn next_ping(liveness: &Liveness, last_sent: Instant) -> Instant {
    liveness.last_ping.max(last_sent.min(liveness.last_heard)) + liveness.heartbeat
}

fn answer_name(asked: &client_frame::Body) -> &'static str {
    match asked {
        client_frame::Body::Send(_) => "SendAck",
        client_frame::Body::Fetch(_) => "MessagePage",
        client_frame::Body::PresenceQuery(_) => "PresenceList",
        _ => "an answer",
    }
}

pub(crate) fn server_error(error: v1::Error) -> ClientError {
    ClientError::Server {
        code: error.code,
        message: error.message,
        client_msg_id: error.client_msg_id,
    }
}

pub(crate) fn unexpected(wanted: &str, got: &server_frame::Body) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {got:?}"))
}

/// The error each pending request gets when the core stops.
fn copy_error(error: &ClientError) -> ClientError {
    match error {
        ClientError::Server {
            code,
            message,
            client_msg_id,
        } => ClientError::Server {
            code: *code,
            message: message.clone(),
            client_msg_id: client_msg_id.clone(),
        },
        ClientError::GoAway { reason, message } => ClientError::GoAway {
            reason: *reason,
            message: message.clone(),
        },
        _ => ClientError::Closed,
    }
}
