//! The high-level client: one background task (the driver) owns the
//! connection and all state; the cheap, cloneable [`Client`] handle talks to
//! it over a channel, and the application reads [`Event`]s.
//!
//! What the driver guarantees:
//! * sends are matched to their `SendAck`/`Error` by `request_id`, and stay
//!   pending across reconnects: they are re-sent with the SAME
//!   `client_msg_id`, so the server stores each message once;
//! * every message reaches the application once (duplicates, same
//!   conversation and seq, are dropped), gaps in a conversation are fetched, and after every
//!   (re)connect a sync (`SyncRequest` pages, then `FetchMessages` pages from
//!   the watermarks) brings in whatever was missed;
//! * delivery is acknowledged cumulatively per conversation;
//! * lost connections are retried with jittered exponential backoff,
//!   `GoAway` is obeyed (wait `retry_after_ms`, go to `reconnect_to`), and
//!   `REPLACED`/`LOGGED_OUT` or a rejected token stop for good.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use pingme_protocol::v1::{
    self, ContentType, DeliveryAck, FetchMessages, GoAway, GoAwayReason, MessagePage, Ping,
    PresenceEvent, PresenceList, PresenceQuery, ReadMarker, ReadReceipt, SendAck, SendMessage,
    SyncRequest, SyncResponse, Typing, TypingEvent, client_frame, server_frame,
};
use pingme_protocol::{ClientFrame, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::error::{ClientError, Result};
use crate::session::{Session, open_session};
use crate::transport::{ConnectOptions, Endpoint, FrameSink};
use crate::watermark::{Arrival, Watermarks};

/// Messages per `FetchMessages` page the client asks for (the server caps).
const FETCH_LIMIT: u32 = 200;
/// `FetchMessages` requests in flight at once. The server keeps each page
/// under a quarter of the connection's outbound budget, so two pages and
/// the live traffic fit and a prompt reader is never cut off as a slow
/// consumer (docs/protocol.md, "Paging").
const MAX_FETCHES_IN_FLIGHT: usize = 2;
/// Events buffered before the driver waits for the application.
const EVENT_BUFFER: usize = 4096;
/// Request ids below this are the handshake's.
const FIRST_REQUEST_ID: u64 = 1000;

/// Everything [`Client::connect`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The gateway and transport.
    pub endpoint: Endpoint,
    /// The access token from `POST /v1/auth/login`.
    pub token: String,
    /// Source address and other socket options.
    pub connect_options: ConnectOptions,
    /// Sent in `Hello` for the server's logs.
    pub client_name: String,
    /// Reconnect pacing.
    pub backoff: Backoff,
    /// How long connect + handshake may take.
    pub connect_timeout: Duration,
    /// How long a request (send, fetch, presence) waits for its answer,
    /// reconnects included.
    pub request_timeout: Duration,
    /// Watermarks the application persisted last time (conversation, seq).
    pub watermarks: Vec<(String, u64)>,
    /// Heartbeat period if the server does not announce one.
    pub default_heartbeat: Duration,
}

impl ClientConfig {
    /// A configuration with defaults for everything but where and who.
    pub fn new(endpoint: Endpoint, token: impl Into<String>) -> ClientConfig {
        ClientConfig {
            endpoint,
            token: token.into(),
            connect_options: ConnectOptions::default(),
            client_name: format!("pingme-client/{}", env!("CARGO_PKG_VERSION")),
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            watermarks: Vec::new(),
            default_heartbeat: Duration::from_secs(30),
        }
    }
}

/// What the application hears from the driver.
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

/// Events of one client, in the order they happened.
pub type Events = mpsc::Receiver<Event>;

enum Command {
    Request {
        request_id: u64,
        body: client_frame::Body,
        reply: Option<oneshot::Sender<Result<server_frame::Body>>>,
    },
    Cancel {
        request_id: u64,
    },
    Close,
}

/// A handle to a connected client. Clones share one connection.
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    next_request_id: Arc<AtomicU64>,
    watermarks: Arc<Mutex<Watermarks>>,
    request_timeout: Duration,
    user_id: u64,
    device_id: String,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Request { request_id, .. } => write!(f, "Request({request_id})"),
            Command::Cancel { request_id } => write!(f, "Cancel({request_id})"),
            Command::Close => f.write_str("Close"),
        }
    }
}

impl Client {
    /// Connects, says hello, authenticates, and starts the driver. The first
    /// connection's failure is returned here; later ones are retried.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events)> {
        let session = open_session(
            &config.endpoint,
            &config.connect_options,
            &config.token,
            &config.client_name,
            config.connect_timeout,
        )
        .await?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, event_rx) = mpsc::channel(EVENT_BUFFER);
        let watermarks = Arc::new(Mutex::new(Watermarks::from_saved(
            config.watermarks.iter().cloned(),
        )));
        let client = Client {
            commands,
            next_request_id: Arc::new(AtomicU64::new(FIRST_REQUEST_ID)),
            watermarks: watermarks.clone(),
            request_timeout: config.request_timeout,
            user_id: session.auth_ok.user_id,
            device_id: session.auth_ok.device_id.clone(),
        };
        let driver = Driver {
            endpoint: config.endpoint.clone(),
            config,
            commands: command_rx,
            events,
            next_request_id: client.next_request_id.clone(),
            pending: BTreeMap::new(),
            internal: HashMap::new(),
            watermarks,
            acked: HashMap::new(),
            fetching: HashSet::new(),
            fetches_in_flight: 0,
            waiting_fetches: VecDeque::new(),
            sync_pages_done: false,
            synced_emitted: false,
        };
        tokio::spawn(driver.run(session));
        Ok((client, event_rx))
    }

    /// The authenticated user.
    pub fn user_id(&self) -> u64 {
        self.user_id
    }

    /// The authenticated device.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Sends a message with a fresh `client_msg_id` (a UUIDv7) and waits for
    /// the server's `SendAck`. Survives reconnects: the same message is
    /// re-sent with the same id until acknowledged.
    pub async fn send(
        &self,
        conversation_id: &str,
        content_type: ContentType,
        body: impl Into<Bytes>,
    ) -> Result<SendAck> {
        let client_msg_id = uuid::Uuid::now_v7().to_string();
        self.send_with_id(client_msg_id, conversation_id, content_type, body)
            .await
    }

    /// Sends with the caller's `client_msg_id` (an application retrying
    /// after a restart passes the id it saved).
    pub async fn send_with_id(
        &self,
        client_msg_id: String,
        conversation_id: &str,
        content_type: ContentType,
        body: impl Into<Bytes>,
    ) -> Result<SendAck> {
        let body = client_frame::Body::Send(SendMessage {
            client_msg_id,
            conversation_id: conversation_id.to_string(),
            content_type: content_type as i32,
            body: body.into(),
        });
        match self.request(body).await? {
            server_frame::Body::SendAck(ack) => Ok(ack),
            other => Err(unexpected("SendAck", &other)),
        }
    }

    /// Fetches one page of a conversation (`after_seq < seq <= until_seq`,
    /// `until_seq` 0 = latest). Fetched messages are not deduplicated: this
    /// is for history browsing.
    pub async fn fetch(
        &self,
        conversation_id: &str,
        after_seq: u64,
        until_seq: u64,
        limit: u32,
    ) -> Result<MessagePage> {
        let body = client_frame::Body::Fetch(FetchMessages {
            conversation_id: conversation_id.to_string(),
            after_seq,
            until_seq,
            limit,
        });
        match self.request(body).await? {
            server_frame::Body::Page(page) => Ok(page),
            other => Err(unexpected("MessagePage", &other)),
        }
    }

    /// Asks for the presence of some users.
    pub async fn query_presence(&self, user_ids: Vec<u64>) -> Result<PresenceList> {
        let body = client_frame::Body::PresenceQuery(PresenceQuery { user_ids });
        match self.request(body).await? {
            server_frame::Body::PresenceList(list) => Ok(list),
            other => Err(unexpected("PresenceList", &other)),
        }
    }

    /// Tells the other members this user is (or stopped) typing. Dropped if
    /// the client is between connections: typing is ephemeral.
    pub fn typing(&self, conversation_id: &str, active: bool) -> Result<()> {
        self.notify(client_frame::Body::Typing(Typing {
            conversation_id: conversation_id.to_string(),
            active,
        }))
    }

    /// Marks a conversation read up to `seq`.
    pub fn mark_read(&self, conversation_id: &str, seq: u64) -> Result<()> {
        self.notify(client_frame::Body::ReadMarker(ReadMarker {
            conversation_id: conversation_id.to_string(),
            seq,
        }))
    }

    /// This device's watermark in a conversation: every seq up to it was
    /// received.
    pub fn watermark(&self, conversation_id: &str) -> u64 {
        lock(&self.watermarks).get(conversation_id)
    }

    /// Every watermark, for the application to persist and pass back in
    /// [`ClientConfig::watermarks`] next time.
    pub fn watermarks(&self) -> Vec<(String, u64)> {
        lock(&self.watermarks).snapshot()
    }

    /// Closes the connection and stops the driver. Pending requests fail
    /// with [`ClientError::Closed`].
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }

    async fn request(&self, body: client_frame::Body) -> Result<server_frame::Body> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request {
                request_id,
                body,
                reply: Some(reply),
            })
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(self.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                let _ = self.commands.send(Command::Cancel { request_id });
                Err(ClientError::Timeout)
            }
        }
    }

    fn notify(&self, body: client_frame::Body) -> Result<()> {
        self.commands
            .send(Command::Request {
                request_id: 0,
                body,
                reply: None,
            })
            .map_err(|_| ClientError::Closed)
    }
}

fn lock(watermarks: &Mutex<Watermarks>) -> std::sync::MutexGuard<'_, Watermarks> {
    // A panic while holding the lock cannot leave watermarks half-updated in
    // a way worse than losing the update, so poisoning is ignored.
    watermarks.lock().unwrap_or_else(|e| e.into_inner())
}

fn unexpected(wanted: &str, got: &server_frame::Body) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {got:?}"))
}

/// A request from the application still waiting for its answer.
struct Pending {
    body: client_frame::Body,
    reply: oneshot::Sender<Result<server_frame::Body>>,
}

/// A request the driver made for itself.
enum Internal {
    Sync,
    Fetch {
        conversation_id: String,
        until_seq: u64,
    },
}

/// Why a connection ended.
enum Ended {
    /// The application closed the client.
    ByApplication,
    /// The connection broke; reconnect.
    Lost(ClientError),
    /// The server sent `GoAway`.
    GoAway(GoAway),
    /// The server rejected us for good.
    Terminal(ClientError),
}

struct Driver {
    config: ClientConfig,
    endpoint: Endpoint,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<Event>,
    next_request_id: Arc<AtomicU64>,
    /// Application requests by request id; ascending ids keep re-sends in
    /// the original order.
    pending: BTreeMap<u64, Pending>,
    /// The driver's own sync and fetch requests on the current connection.
    internal: HashMap<u64, Internal>,
    watermarks: Arc<Mutex<Watermarks>>,
    /// Highest seq acknowledged to the server per conversation.
    acked: HashMap<String, u64>,
    /// Conversations with a gap fetch in flight or waiting for a slot.
    fetching: HashSet<String>,
    /// Driver fetches sent and not answered yet.
    fetches_in_flight: usize,
    /// Fetches waiting for one of the [`MAX_FETCHES_IN_FLIGHT`] slots.
    waiting_fetches: VecDeque<FetchMessages>,
    /// The sync's `SyncRequest` pages are all answered on this connection.
    sync_pages_done: bool,
    /// `Event::Synced` was emitted on this connection.
    synced_emitted: bool,
}

impl Driver {
    async fn run(mut self, first: Session) {
        let mut session = Some(first);
        let mut reconnected = false;
        let mut failures: u32 = 0;
        loop {
            let current = match session.take() {
                Some(current) => current,
                None => match open_session(
                    &self.endpoint,
                    &self.config.connect_options,
                    &self.config.token,
                    &self.config.client_name,
                    self.config.connect_timeout,
                )
                .await
                {
                    Ok(current) => current,
                    Err(e) if is_terminal(&e) => return self.stop(e).await,
                    Err(e) => {
                        failures += 1;
                        if !self.back_off(failures, e.to_string()).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            failures = 0;
            let ended = self.serve(current, reconnected).await;
            reconnected = true;
            match ended {
                Ended::ByApplication => return self.stop(ClientError::Closed).await,
                Ended::Terminal(e) => return self.stop(e).await,
                Ended::Lost(e) => {
                    if !self.back_off(0, e.to_string()).await {
                        return;
                    }
                }
                Ended::GoAway(go_away) => match go_away.reason() {
                    GoAwayReason::Replaced | GoAwayReason::LoggedOut => {
                        let error = ClientError::GoAway {
                            reason: go_away.reason(),
                            message: go_away.message.clone(),
                        };
                        return self.stop(error).await;
                    }
                    _ => {
                        if let Ok(addr) = go_away.reconnect_to.parse() {
                            self.endpoint = self.endpoint.with_addr(addr);
                        }
                        let retry_after = Duration::from_millis(go_away.retry_after_ms.into());
                        // At least what the server asked, plus a spread so
                        // its clients do not all return in the same instant.
                        let spread = retry_after / 4 + self.config.backoff.initial;
                        let delay = retry_after + spread.mul_f64(rand::random::<f64>());
                        if !self.wait(0, delay, go_away.message.clone()).await {
                            return;
                        }
                    }
                },
            }
        }
    }

    /// Waits the backoff delay for `failures` failures in a row; false if
    /// the client must stop (closed meanwhile or retries exhausted).
    async fn back_off(&mut self, failures: u32, reason: String) -> bool {
        if self.config.backoff.exhausted(failures) {
            self.stop(ClientError::Protocol(format!(
                "gave up after {failures} reconnect attempts: {reason}"
            )))
            .await;
            return false;
        }
        let delay = self.config.backoff.delay(failures, &mut rand::rng());
        self.wait(failures, delay, reason).await
    }

    /// Sleeps before a reconnect while still taking commands (requests queue
    /// up and go out on the next connection). False if closed meanwhile.
    async fn wait(&mut self, attempt: u32, delay: Duration, reason: String) -> bool {
        self.emit(Event::Reconnecting {
            attempt,
            delay,
            reason,
        })
        .await;
        let deadline = tokio::time::sleep(delay);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return true,
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => {
                        self.stop(ClientError::Closed).await;
                        return false;
                    }
                    Some(Command::Request { request_id, body, reply: Some(reply) }) => {
                        self.pending.insert(request_id, Pending { body, reply });
                    }
                    // Typing and read markers between connections are dropped.
                    Some(Command::Request { reply: None, .. }) => {}
                    Some(Command::Cancel { request_id }) => {
                        self.pending.remove(&request_id);
                    }
                },
            }
        }
    }

    /// Fails every pending request and tells the application we stopped.
    async fn stop(&mut self, error: ClientError) {
        let reason = error.to_string();
        for (_, pending) in std::mem::take(&mut self.pending) {
            let _ = pending.reply.send(Err(copy_error(&error)));
        }
        self.emit(Event::Closed { reason }).await;
    }

    async fn emit(&self, event: Event) {
        // The application may have dropped its receiver; the client still
        // works for sending.
        let _ = self.events.send(event).await;
    }

    /// Runs one authenticated connection until it ends.
    async fn serve(&mut self, session: Session, reconnected: bool) -> Ended {
        let Session {
            connection,
            hello_ack,
            auth_ok,
        } = session;
        let (mut sink, mut stream) = (connection.sink, connection.stream);
        self.internal.clear();
        self.fetching.clear();
        self.fetches_in_flight = 0;
        self.waiting_fetches.clear();
        self.sync_pages_done = false;
        self.synced_emitted = false;
        self.emit(Event::Connected {
            user_id: auth_ok.user_id,
            device_id: auth_ok.device_id,
            reconnected,
        })
        .await;

        // Unanswered requests first, with their original bodies: a send goes
        // out again with the same client_msg_id.
        for (request_id, pending) in &self.pending {
            let frame = ClientFrame {
                request_id: *request_id,
                body: Some(pending.body.clone()),
            };
            if let Err(e) = sink.feed(frame).await {
                return Ended::Lost(e);
            }
        }
        if let Err(e) = self.start_sync(&mut sink, String::new()).await {
            return Ended::Lost(e);
        }

        let heartbeat_period = match hello_ack.heartbeat_interval_ms {
            0 => self.config.default_heartbeat,
            ms => Duration::from_millis(ms.into()),
        };
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_period, heartbeat_period);
        let mut last_heard = Instant::now();

        loop {
            // Every branch is cancel-safe: `recv`, `next` and `tick` lose
            // nothing when another branch wins; writes happen in the bodies.
            let result = tokio::select! {
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => {
                        let _ = sink.close().await;
                        return Ended::ByApplication;
                    }
                    Some(Command::Request { request_id, body, reply }) => {
                        let frame = ClientFrame { request_id, body: Some(body.clone()) };
                        if let Some(reply) = reply {
                            self.pending.insert(request_id, Pending { body, reply });
                        }
                        sink.send(frame).await
                    }
                    Some(Command::Cancel { request_id }) => {
                        self.pending.remove(&request_id);
                        Ok(())
                    }
                },
                frame = stream.next() => match frame {
                    None => return Ended::Lost(ClientError::ConnectionClosed),
                    Some(Err(e)) => return Ended::Lost(e),
                    Some(Ok(frame)) => {
                        last_heard = Instant::now();
                        match self.handle(frame, &mut sink).await {
                            Ok(None) => Ok(()),
                            Ok(Some(ended)) => return ended,
                            Err(e) => Err(e),
                        }
                    }
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > heartbeat_period * 3 {
                        return Ended::Lost(ClientError::Timeout);
                    }
                    let ping = ClientFrame {
                        request_id: 0,
                        body: Some(client_frame::Body::Ping(Ping { client_time_ms: unix_ms() })),
                    };
                    sink.send(ping).await
                }
            };
            if let Err(e) = result {
                return Ended::Lost(e);
            }
        }
    }

    /// Handles one server frame; `Some` ends the connection.
    async fn handle(&mut self, frame: ServerFrame, sink: &mut FrameSink) -> Result<Option<Ended>> {
        use server_frame::Body;
        let request_id = frame.request_id;
        let Some(body) = frame.body else {
            return Ok(None);
        };
        if request_id != 0 {
            if let Some(internal) = self.internal.remove(&request_id) {
                self.handle_internal(internal, body, sink).await?;
                return Ok(None);
            }
            if let Some(pending) = self.pending.remove(&request_id) {
                let answer = match body {
                    Body::Error(error) => Err(server_error(error)),
                    other => Ok(other),
                };
                let _ = pending.reply.send(answer);
                return Ok(None);
            }
        }
        match body {
            Body::Deliver(deliver) => {
                if let Some(message) = deliver.message {
                    self.accept(vec![message], sink).await?;
                }
            }
            Body::ReadReceipt(receipt) => self.emit(Event::ReadReceipt(receipt)).await,
            Body::Typing(typing) => self.emit(Event::Typing(typing)).await,
            Body::Presence(presence) => self.emit(Event::Presence(presence)).await,
            Body::GoAway(go_away) => {
                self.emit(Event::GoAway(go_away.clone())).await;
                return Ok(Some(Ended::GoAway(go_away)));
            }
            Body::Error(error) if error.fatal => {
                let error = server_error(error);
                return Ok(Some(if is_terminal(&error) {
                    Ended::Terminal(error)
                } else {
                    Ended::Lost(error)
                }));
            }
            Body::Error(error) => {
                tracing::warn!(code = error.code, message = %error.message, "server error");
            }
            // Pongs (liveness is any frame) and answers to cancelled requests.
            _ => {}
        }
        Ok(None)
    }

    async fn handle_internal(
        &mut self,
        internal: Internal,
        body: server_frame::Body,
        sink: &mut FrameSink,
    ) -> Result<()> {
        if matches!(internal, Internal::Fetch { .. }) {
            self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
        }
        match (internal, body) {
            (Internal::Sync, server_frame::Body::Sync(response)) => {
                self.sync_page(response, sink).await?;
            }
            (
                Internal::Fetch {
                    conversation_id,
                    until_seq,
                },
                server_frame::Body::Page(page),
            ) => {
                let last = page.messages.last().map(|m| m.seq);
                self.accept(page.messages, sink).await?;
                match last {
                    Some(last) if page.has_more => {
                        self.fetch(sink, conversation_id, last, until_seq).await?;
                    }
                    _ => {
                        self.fetching.remove(&conversation_id);
                        self.fill_gap(sink, &conversation_id).await?;
                    }
                }
            }
            (
                Internal::Fetch {
                    conversation_id, ..
                },
                other,
            ) => {
                // The fetch failed (e.g. no longer a member): stop fetching
                // this conversation instead of looping.
                tracing::warn!(conversation_id, answer = ?other, "gap fetch failed");
                self.fetching.remove(&conversation_id);
            }
            (Internal::Sync, other) => {
                tracing::warn!(answer = ?other, "sync failed");
                self.sync_pages_done = true;
            }
        }
        while self.fetches_in_flight < MAX_FETCHES_IN_FLIGHT {
            let Some(request) = self.waiting_fetches.pop_front() else {
                break;
            };
            self.send_fetch(sink, request).await?;
        }
        self.maybe_synced().await;
        Ok(())
    }

    async fn start_sync(&mut self, sink: &mut FrameSink, after: String) -> Result<()> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        self.internal.insert(request_id, Internal::Sync);
        sink.send(ClientFrame {
            request_id,
            body: Some(client_frame::Body::Sync(SyncRequest {
                after_conversation_id: after,
                limit: 0,
            })),
        })
        .await
    }

    async fn sync_page(&mut self, response: SyncResponse, sink: &mut FrameSink) -> Result<()> {
        for state in response.conversations {
            let after = {
                let mut marks = lock(&self.watermarks);
                if !marks.knows(&state.conversation_id) {
                    // A conversation new to this process starts where the
                    // server says this device is.
                    marks.raise(&state.conversation_id, state.delivered_seq);
                }
                marks.get(&state.conversation_id)
            };
            if state.latest_seq > after && !self.fetching.contains(&state.conversation_id) {
                self.fetching.insert(state.conversation_id.clone());
                self.fetch(sink, state.conversation_id, after, state.latest_seq)
                    .await?;
            }
        }
        if response.has_more && !response.next_after_conversation_id.is_empty() {
            self.start_sync(sink, response.next_after_conversation_id)
                .await
        } else {
            self.sync_pages_done = true;
            Ok(())
        }
    }

    /// Emits `Synced` once per connection, when the sync pages and every
    /// fetch they started are done.
    async fn maybe_synced(&mut self) {
        if self.sync_pages_done && self.fetching.is_empty() && !self.synced_emitted {
            self.synced_emitted = true;
            self.emit(Event::Synced).await;
        }
    }

    async fn fetch(
        &mut self,
        sink: &mut FrameSink,
        conversation_id: String,
        after_seq: u64,
        until_seq: u64,
    ) -> Result<()> {
        let request = FetchMessages {
            conversation_id,
            after_seq,
            until_seq,
            limit: FETCH_LIMIT,
        };
        if self.fetches_in_flight >= MAX_FETCHES_IN_FLIGHT {
            self.waiting_fetches.push_back(request);
            return Ok(());
        }
        self.send_fetch(sink, request).await
    }

    async fn send_fetch(&mut self, sink: &mut FrameSink, request: FetchMessages) -> Result<()> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        self.internal.insert(
            request_id,
            Internal::Fetch {
                conversation_id: request.conversation_id.clone(),
                until_seq: request.until_seq,
            },
        );
        self.fetches_in_flight += 1;
        sink.send(ClientFrame {
            request_id,
            body: Some(client_frame::Body::Fetch(request)),
        })
        .await
    }

    /// Fetches the first remaining gap of a conversation, if any and if no
    /// fetch for it is already running.
    async fn fill_gap(&mut self, sink: &mut FrameSink, conversation_id: &str) -> Result<()> {
        if self.fetching.contains(conversation_id) {
            return Ok(());
        }
        let gap = lock(&self.watermarks).first_gap(conversation_id);
        if let Some((after, until)) = gap {
            self.fetching.insert(conversation_id.to_string());
            self.fetch(sink, conversation_id.to_string(), after, until)
                .await?;
        }
        Ok(())
    }

    /// Passes new messages to the application, drops duplicates, fetches
    /// gaps and acknowledges the new watermarks.
    async fn accept(&mut self, messages: Vec<v1::Message>, sink: &mut FrameSink) -> Result<()> {
        let mut touched: Vec<String> = Vec::new();
        for message in messages {
            let arrival = lock(&self.watermarks).arrive(&message.conversation_id, message.seq);
            if let Arrival::New { gap } = arrival {
                let conversation_id = message.conversation_id.clone();
                self.emit(Event::Message(message)).await;
                if gap.is_some() {
                    self.fill_gap(sink, &conversation_id).await?;
                }
                if !touched.contains(&conversation_id) {
                    touched.push(conversation_id);
                }
            }
        }
        for conversation_id in touched {
            let watermark = lock(&self.watermarks).get(&conversation_id);
            let acked = self.acked.entry(conversation_id.clone()).or_default();
            if watermark > *acked {
                *acked = watermark;
                sink.feed(ClientFrame {
                    request_id: 0,
                    body: Some(client_frame::Body::DeliveryAck(DeliveryAck {
                        conversation_id,
                        seq: watermark,
                    })),
                })
                .await?;
            }
        }
        sink.flush().await
    }
}

fn server_error(error: v1::Error) -> ClientError {
    ClientError::Server {
        code: error.code,
        message: error.message,
        client_msg_id: error.client_msg_id,
    }
}

fn is_terminal(error: &ClientError) -> bool {
    error.is_terminal()
}

/// The error each pending request gets when the client stops.
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

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
