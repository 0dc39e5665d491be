//! The tokio driver of the sans-IO [`ClientCore`](crate::core::ClientCore):
//! the way `quinn` drives `quinn-proto`. The core sits behind a mutex shared
//! by the cheap, cloneable [`Client`] handles and one background task (the
//! driver). A handle locks the core, hands it a command, registers where the
//! answer goes and wakes the driver; the driver owns the transport: it opens
//! and closes connections when the core asks, writes the frames the core
//! queues, feeds it the frames it reads, its timer and connection failures,
//! and passes events to the application and answers to the waiting handles.
//!
//! Everything the client guarantees (resend with the same `client_msg_id`,
//! dedup and gap filling, sync, heartbeats, backoff, `GoAway` and retry
//! hints) lives in the core and is tested there deterministically; this
//! file only moves bytes and wakes tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use pingme_protocol::v1::{
    ContentType, FetchMessages, MessagePage, PresenceList, PresenceQuery, ReadMarker, SendAck,
    SendMessage, Typing,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::Backoff;
pub use crate::core::Event;
use crate::core::{Answer, ClientCore, Command, CoreConfig, CoreEvent, RequestId, Transmit};
use crate::error::{ClientError, Result};
use crate::transport::{ConnectOptions, Connection, Connector, Endpoint, HandshakeCounts};

/// Events buffered before the driver waits for the application.
const EVENT_BUFFER: usize = 4096;

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
    /// How long a delivery ack may wait to cover what arrives meanwhile
    /// ([`CoreConfig::ack_delay`]; zero acks every read at once).
    pub ack_delay: Duration,
}

impl ClientConfig {
    /// A configuration with defaults for everything but where and who.
    pub fn new(endpoint: Endpoint, token: impl Into<String>) -> ClientConfig {
        let core = CoreConfig::new(token);
        ClientConfig {
            endpoint,
            token: core.token,
            connect_options: ConnectOptions::default(),
            client_name: core.client_name,
            backoff: core.backoff,
            connect_timeout: core.connect_timeout,
            request_timeout: core.request_timeout,
            watermarks: Vec::new(),
            default_heartbeat: core.default_heartbeat,
            ack_delay: core.ack_delay,
        }
    }

    fn core_config(&self) -> CoreConfig {
        CoreConfig {
            token: self.token.clone(),
            client_name: self.client_name.clone(),
            backoff: self.backoff.clone(),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            watermarks: self.watermarks.clone(),
            default_heartbeat: self.default_heartbeat,
            ack_delay: self.ack_delay,
            rng_seed: rand::random(),
            // The first failure is `connect`'s to return.
            retry_first_connect: false,
            unix_ms_at_start: unix_ms(),
            ..CoreConfig::new(String::new())
        }
    }
}

/// Events of one client, in the order they happened.
pub type Events = mpsc::Receiver<Event>;

/// The core and where its answers go, behind one lock.
struct State {
    core: ClientCore,
    /// Handles waiting for the answer to their request.
    waiting: HashMap<RequestId, oneshot::Sender<Result<Answer>>>,
}

/// What the handles and the driver share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the driver after a handle gave the core a command.
    wake: Notify,
    /// The way to the gateway, kept across reconnects (TLS session cache,
    /// the QUIC socket that [`Client::rebind`] moves).
    connector: Arc<Connector>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every core method leaves it consistent before returning, so a
        // panic elsewhere while the lock was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the core a command and wakes the driver to act on it.
    fn command(&self, command: Command) -> Option<(RequestId, oneshot::Receiver<Result<Answer>>)> {
        let answer = {
            let mut state = self.lock();
            if state.core.is_closed() {
                // The driver is gone or going: nobody would route an answer.
                return None;
            }
            let request = state.core.handle_command(now(), command);
            request.map(|request| {
                let (reply, answer) = oneshot::channel();
                state.waiting.insert(request, reply);
                (request, answer)
            })
        };
        self.wake.notify_one();
        answer
    }
}

/// Closes the client when the last handle is dropped.
struct LastHandle(Arc<Shared>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        self.0.command(Command::Close);
    }
}

/// A handle to a connected client. Clones share one connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _last: Arc<LastHandle>,
    user_id: u64,
    device_id: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects, says hello, authenticates, and starts the driver. The first
    /// connection's failure is returned here; later ones are retried.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events)> {
        let connector = Arc::new(Connector::new(
            config.endpoint.clone(),
            config.connect_options.clone(),
        )?);
        let core = ClientCore::new(config.core_config(), now());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core,
                waiting: HashMap::new(),
            }),
            wake: Notify::new(),
            connector: connector.clone(),
        });
        let (events, event_rx) = mpsc::channel(EVENT_BUFFER);
        let (ready, first) = oneshot::channel();
        let driver = Driver {
            shared: shared.clone(),
            connector,
            events,
            ready: Some(ready),
        };
        // Made before waiting, so a caller that gives up on `connect`
        // (drops its future) closes the client it would have had.
        let last = Arc::new(LastHandle(shared.clone()));
        tokio::spawn(driver.run());
        let (user_id, device_id) = first.await.map_err(|_| ClientError::Closed)??;
        let client = Client {
            _last: last,
            shared,
            user_id,
            device_id,
        };
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
        let command = Command::Send(SendMessage {
            client_msg_id,
            conversation_id: conversation_id.to_string(),
            content_type: content_type as i32,
            body: body.into(),
        });
        match self.request(command).await? {
            Answer::Sent(ack) => Ok(ack),
            other => Err(mismatched(other)),
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
        let command = Command::Fetch(FetchMessages {
            conversation_id: conversation_id.to_string(),
            after_seq,
            until_seq,
            limit,
        });
        match self.request(command).await? {
            Answer::Page(page) => Ok(page),
            other => Err(mismatched(other)),
        }
    }

    /// Asks for the presence of some users.
    pub async fn query_presence(&self, user_ids: Vec<u64>) -> Result<PresenceList> {
        let command = Command::QueryPresence(PresenceQuery { user_ids });
        match self.request(command).await? {
            Answer::Presence(list) => Ok(list),
            other => Err(mismatched(other)),
        }
    }

    /// Tells the other members this user is (or stopped) typing. Dropped if
    /// the client is between connections: typing is ephemeral.
    pub fn typing(&self, conversation_id: &str, active: bool) -> Result<()> {
        self.notify(Command::Typing(Typing {
            conversation_id: conversation_id.to_string(),
            active,
        }))
    }

    /// Marks a conversation read up to `seq`.
    pub fn mark_read(&self, conversation_id: &str, seq: u64) -> Result<()> {
        self.notify(Command::MarkRead(ReadMarker {
            conversation_id: conversation_id.to_string(),
            seq,
        }))
    }

    /// This device's watermark in a conversation: every seq up to it was
    /// received.
    pub fn watermark(&self, conversation_id: &str) -> u64 {
        self.shared.lock().core.watermark(conversation_id)
    }

    /// Every watermark, for the application to persist and pass back in
    /// [`ClientConfig::watermarks`] next time.
    pub fn watermarks(&self) -> Vec<(String, u64)> {
        self.shared.lock().core.watermarks()
    }

    /// Tells the client the network changed (Wi-Fi to cellular, a new
    /// address): over QUIC the connection moves to a new UDP socket and
    /// migrates, keeping the session (no reconnect, no new authentication,
    /// nothing re-sent); the new local address is returned. A TCP
    /// connection cannot move: over TCP, TLS and WebSocket this reconnects
    /// at once ([`Client::reconnect`]) and returns `None`. Must be called
    /// inside a tokio runtime.
    pub fn rebind(&self) -> Result<Option<SocketAddr>> {
        if self.shared.lock().core.is_closed() {
            return Err(ClientError::Closed);
        }
        match self.shared.connector.rebind()? {
            Some(local) => Ok(Some(local)),
            None if matches!(self.shared.connector.endpoint(), Endpoint::Quic { .. }) => {
                // No QUIC connection yet: the next one uses a new socket
                // anyway.
                Ok(None)
            }
            None => {
                self.reconnect()?;
                Ok(None)
            }
        }
    }

    /// Drops the connection and opens a new one now, without waiting for
    /// the backoff (the network came back, or the app wants a fresh
    /// connection). Requests in flight go out again on the new connection;
    /// the TLS session is resumed from the client's cache.
    pub fn reconnect(&self) -> Result<()> {
        self.notify(Command::Reconnect)
    }

    /// The local address of the QUIC socket (`None` for other transports).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.connector.local_addr()
    }

    /// How this client's TLS and QUIC handshakes went: full or resumed
    /// from the session cache the client keeps across its reconnects.
    pub fn handshakes(&self) -> HandshakeCounts {
        self.shared.connector.handshakes()
    }

    /// Closes the connection and stops the driver. Pending requests fail
    /// with [`ClientError::Closed`].
    pub fn close(&self) {
        self.shared.command(Command::Close);
    }

    async fn request(&self, command: Command) -> Result<Answer> {
        // The core times requests out itself and answers every pending one
        // when it stops, so the answer always comes; a stopped core takes no
        // request at all.
        let (_, answer) = self.shared.command(command).ok_or(ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
    }

    fn notify(&self, command: Command) -> Result<()> {
        if self.shared.lock().core.is_closed() {
            return Err(ClientError::Closed);
        }
        self.shared.command(command);
        Ok(())
    }
}

fn mismatched(answer: Answer) -> ClientError {
    ClientError::Protocol(format!("answer of another kind: {answer:?}"))
}

/// The driver task: the core's I/O.
struct Driver {
    shared: Arc<Shared>,
    connector: Arc<Connector>,
    events: mpsc::Sender<Event>,
    /// Tells `Client::connect` how the first connection went.
    ready: Option<oneshot::Sender<Result<(u64, String)>>>,
}

type Opening = std::pin::Pin<Box<dyn Future<Output = Result<Connection>> + Send>>;

impl Driver {
    async fn run(mut self) {
        let mut transport: Option<Connection> = None;
        let mut opening: Option<Opening> = None;
        loop {
            self.transmit(&mut transport, &mut opening).await;
            let (events, deadline, closed) = self.collect();
            for event in events {
                self.emit(event).await;
            }
            if closed {
                // Both queues are drained; the core is finished.
                return;
            }

            // Every branch is cancel-safe: `next` loses no frame, the connect
            // future lives outside the select, `notified` keeps its permit
            // and the sleep is recreated each round. Reads come first so
            // frames already buffered count as signs of life before the core
            // checks for a dead connection; commands need no turn of their
            // own (the handles already gave them to the core, the wake only
            // gets their frames written, which every round does first), and
            // timers that lose the race are checked after the select.
            tokio::select! {
                biased;
                frame = next_frame(&mut transport) => {
                    let mut state = self.shared.lock();
                    match frame {
                        Some(Ok(frame)) => state.core.handle_frame(now(), frame),
                        Some(Err(e)) => {
                            transport = None;
                            state.core.handle_connection_lost(now(), e);
                        }
                        None => {
                            transport = None;
                            state.core.handle_connection_lost(now(), ClientError::ConnectionClosed);
                        }
                    }
                }
                opened = connecting(&mut opening) => {
                    opening = None;
                    let mut state = self.shared.lock();
                    match opened {
                        Ok(connection) => {
                            transport = Some(connection);
                            state.core.handle_connected(now());
                        }
                        Err(e) => state.core.handle_connect_failed(now(), e),
                    }
                }
                () = self.shared.wake.notified() => {}
                () = sleep_until(deadline) => {}
            }
            // Timers that came due while other inputs kept the select busy.
            let mut state = self.shared.lock();
            let now = now();
            if state.core.poll_timeout().is_some_and(|at| at <= now) {
                state.core.handle_timeout(now);
            }
        }
    }

    /// Carries out what the core queued for the wire, one step at a time:
    /// a failed write is reported to the core, which then drops the rest of
    /// that connection's frames (and may queue a `Disconnect`).
    async fn transmit(
        &mut self,
        transport: &mut Option<Connection>,
        opening: &mut Option<Opening>,
    ) {
        loop {
            let mut wrote = false;
            loop {
                let next = self.shared.lock().core.poll_transmit();
                let Some(next) = next else { break };
                match next {
                    Transmit::Connect { redirect } => {
                        *transport = None;
                        let addr = redirect.unwrap_or(self.connector.endpoint().addr());
                        let connector = self.connector.clone();
                        *opening = Some(Box::pin(async move { connector.connect_to(addr).await }));
                    }
                    Transmit::Disconnect => {
                        *opening = None;
                        if let Some(mut connection) = transport.take() {
                            // The server learns we left; a slow close is
                            // not worth waiting for.
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                connection.sink.close(),
                            )
                            .await;
                        }
                    }
                    Transmit::Frame(frame) => {
                        let Some(connection) = transport.as_mut() else {
                            continue;
                        };
                        if let Err(e) = connection.sink.feed(frame).await {
                            *transport = None;
                            self.shared.lock().core.handle_connection_lost(now(), e);
                        } else {
                            wrote = true;
                        }
                    }
                }
            }
            let Some(connection) = transport.as_mut().filter(|_| wrote) else {
                return;
            };
            match connection.sink.flush().await {
                Ok(()) => return,
                Err(e) => {
                    *transport = None;
                    self.shared.lock().core.handle_connection_lost(now(), e);
                }
            }
        }
    }

    /// Takes the core's events (routing answers to their handles on the
    /// way), its next deadline, and whether it is finished.
    fn collect(&mut self) -> (Vec<Event>, Option<Instant>, bool) {
        let mut state = self.shared.lock();
        let mut events = Vec::new();
        while let Some(output) = state.core.poll_event() {
            match output {
                CoreEvent::App(event) => {
                    match (&event, self.ready.take()) {
                        (
                            Event::Connected {
                                user_id, device_id, ..
                            },
                            Some(ready),
                        ) => {
                            let _ = ready.send(Ok((*user_id, device_id.clone())));
                        }
                        (Event::Closed { .. }, Some(ready)) => {
                            let error = state.core.take_error().unwrap_or(ClientError::Closed);
                            let _ = ready.send(Err(error));
                        }
                        (_, ready) => self.ready = ready,
                    }
                    events.push(event);
                }
                CoreEvent::Answer { request, result } => {
                    if let Some(reply) = state.waiting.remove(&request) {
                        // The handle may have stopped waiting.
                        let _ = reply.send(result);
                    }
                }
            }
        }
        let deadline = state.core.poll_timeout().map(Instant::from_std);
        (events, deadline, state.core.is_closed())
    }

    async fn emit(&self, event: Event) {
        // The application may have dropped its receiver; the client still
        // works for sending. A full channel makes the driver wait: the
        // socket is not read until the application catches up.
        let _ = self.events.send(event).await;
    }
}

/// The next frame of the open transport; pending forever without one.
async fn next_frame(
    transport: &mut Option<Connection>,
) -> Option<Result<pingme_protocol::ServerFrame>> {
    match transport {
        Some(connection) => connection.next_frame().await,
        None => std::future::pending().await,
    }
}

/// The connect in progress; pending forever without one.
async fn connecting(opening: &mut Option<Opening>) -> Result<Connection> {
    match opening {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The core's clock: tokio's, so tests with paused time drive it too.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_gets_the_configured_ack_delay() {
        let endpoint = Endpoint::Tcp("127.0.0.1:7000".parse().unwrap());
        let mut config = ClientConfig::new(endpoint, "t");
        assert_eq!(config.core_config().ack_delay, Duration::from_millis(100));
        config.ack_delay = Duration::ZERO;
        assert_eq!(config.core_config().ack_delay, Duration::ZERO);
    }
}
