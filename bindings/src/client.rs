//! [`PingmeClient`]: one connected device, a thin wrapper of the Rust
//! `pingme_client::Client` handle and its event receiver. Requests run on
//! the owning [`crate::Pingme`]'s runtime; events are read straight from
//! the client's channel (not through a task), so a `next_event` cancelled
//! while it waits takes no event with it.

use std::sync::Arc;

use pingme_client::{Client, Events};

use crate::error::PingmeError;
use crate::runtime::Runtime;
use crate::types::{ClientEvent, ContentType, MessagePage, Presence, SendAck, Watermark};

/// A connected, authenticated device. It reconnects, re-sends and syncs by
/// itself until `PingmeClient.close` or a terminal error.
#[derive(uniffi::Object)]
pub struct PingmeClient {
    // Fields drop in order: the client handle (which closes the client)
    // before the runtime it runs on.
    client: Client,
    events: tokio::sync::Mutex<Events>,
    runtime: Arc<Runtime>,
}

impl PingmeClient {
    pub(crate) fn new(client: Client, events: Events, runtime: Arc<Runtime>) -> PingmeClient {
        PingmeClient {
            client,
            events: tokio::sync::Mutex::new(events),
            runtime,
        }
    }
}

#[uniffi::export]
impl PingmeClient {
    /// The authenticated user.
    pub fn user_id(&self) -> u64 {
        self.client.user_id()
    }

    /// The authenticated device.
    pub fn device_id(&self) -> String {
        self.client.device_id().to_string()
    }

    /// Sends a message to a conversation (`dm:{a}:{b}` for 1:1, a group's
    /// `g:{id}`) and waits until the server stored it. `client_msg_id` is
    /// the idempotency key: pass the one saved from an earlier attempt to
    /// retry after a restart, or none for a fresh one. The client re-sends
    /// it across reconnects with the same key until acknowledged.
    #[uniffi::method(default(client_msg_id = None))]
    pub async fn send(
        &self,
        conversation_id: String,
        content_type: ContentType,
        body: Vec<u8>,
        client_msg_id: Option<String>,
    ) -> Result<SendAck, PingmeError> {
        let client = self.client.clone();
        let content_type = content_type.into();
        self.runtime
            .run(async move {
                match client_msg_id {
                    Some(id) => {
                        client
                            .send_with_id(id, &conversation_id, content_type, body)
                            .await
                    }
                    None => client.send(&conversation_id, content_type, body).await,
                }
            })
            .await
            .map(SendAck::from)
    }

    /// Sends UTF-8 text (`send` with `ContentType.Text`).
    pub async fn send_text(
        &self,
        conversation_id: String,
        text: String,
    ) -> Result<SendAck, PingmeError> {
        self.send(conversation_id, ContentType::Text, text.into_bytes(), None)
            .await
    }

    /// One page of history: `after_seq < seq <= until_seq` (`until_seq` 0
    /// for the latest, `limit` 0 for the server's default). For browsing:
    /// these messages are not deduplicated against the events.
    pub async fn fetch(
        &self,
        conversation_id: String,
        after_seq: u64,
        until_seq: u64,
        limit: u32,
    ) -> Result<MessagePage, PingmeError> {
        let client = self.client.clone();
        self.runtime
            .run(async move {
                client
                    .fetch(&conversation_id, after_seq, until_seq, limit)
                    .await
            })
            .await
            .map(MessagePage::from)
    }

    /// The presence of some users (those sharing a conversation with this
    /// user; others read as offline).
    pub async fn query_presence(&self, user_ids: Vec<u64>) -> Result<Vec<Presence>, PingmeError> {
        let client = self.client.clone();
        let list = self
            .runtime
            .run(async move { client.query_presence(user_ids).await })
            .await?;
        Ok(list.users.into_iter().map(Presence::from).collect())
    }

    /// Tells the other members this user is typing (or stopped). Dropped
    /// while disconnected: typing is ephemeral.
    pub fn typing(&self, conversation_id: String, active: bool) -> Result<(), PingmeError> {
        Ok(self.client.typing(&conversation_id, active)?)
    }

    /// Marks a conversation read up to `seq` (the other members get a
    /// `ReadReceipt`).
    pub fn mark_read(&self, conversation_id: String, seq: u64) -> Result<(), PingmeError> {
        Ok(self.client.mark_read(&conversation_id, seq)?)
    }

    /// This device's watermark in a conversation: every seq up to it was
    /// received.
    pub fn watermark(&self, conversation_id: String) -> u64 {
        self.client.watermark(&conversation_id)
    }

    /// Every watermark: persist them and pass them back in
    /// `ConnectConfig.watermarks` next time.
    pub fn watermarks(&self) -> Vec<Watermark> {
        self.client
            .watermarks()
            .into_iter()
            .map(|(conversation_id, seq)| Watermark {
                conversation_id,
                seq,
            })
            .collect()
    }

    /// Tell the client the network changed (Wi-Fi to cellular, a new
    /// address; call it from the platform's network callback). Over QUIC
    /// the connection moves to a new UDP socket and migrates: the session
    /// goes on, nothing is re-sent or re-authenticated; the new local
    /// address (`ip:port`) is returned. Over TCP, TLS and WebSocket a
    /// connection cannot move: the client reconnects at once and returns
    /// none.
    pub fn network_changed(&self) -> Result<Option<String>, PingmeError> {
        let local = self.runtime.enter(|| self.client.rebind())?;
        Ok(local.map(|addr| addr.to_string()))
    }

    /// Drop the connection and reconnect now, without waiting for the
    /// backoff (e.g. when the platform says the network is back). The TLS
    /// session is resumed from the client's cache; pending sends go out
    /// again.
    pub fn reconnect(&self) -> Result<(), PingmeError> {
        Ok(self.client.reconnect()?)
    }

    /// The local address of the QUIC socket (`ip:port`); none for other
    /// transports.
    pub fn local_address(&self) -> Option<String> {
        self.client.local_addr().map(|addr| addr.to_string())
    }

    /// The next event, waiting for one; `None` once the client has stopped
    /// and every event was read. Keep calling it: the client buffers 4096
    /// events, then stops reading the socket until the app catches up.
    /// A wait cancelled before an event came takes none away (an event
    /// that completes the call at the very moment it is cancelled goes
    /// with it, as with any future).
    pub async fn next_event(&self) -> Option<ClientEvent> {
        // Both waits are cancel-safe and need no runtime: the driver task
        // on the runtime fills the channel.
        let mut events = self.events.lock().await;
        events.recv().await.map(ClientEvent::from)
    }

    /// Closes the connection and waits until the client has stopped.
    /// Pending requests fail with `Closed`; events not read yet are
    /// discarded.
    pub async fn close(&self) {
        self.client.close();
        let mut events = self.events.lock().await;
        // The channel ends when the driver task has finished.
        while events.recv().await.is_some() {}
    }
}
