//! pingme client SDK. Two layers, as `quinn-proto` and `quinn`:
//!
//! * [`core`]: the sans-IO [`ClientCore`], the part native SDKs wrap: the
//!   handshake, sends matched to acks and re-sent with the same
//!   `client_msg_id`, watermarks with dedup and gap filling, sync after
//!   every (re)connect, heartbeats, reconnects with seeded jittered backoff
//!   that obey `GoAway` and the server's "later" errors. No sockets, no
//!   tasks, no clock: time comes in as an argument.
//! * [`Client`]: its tokio driver, over the [`transport`]s (TCP, TLS, QUIC,
//!   WebSocket), plus the HTTP login/register calls ([`HttpApi`]) and a bare
//!   handshake for load tools ([`session`]).
//!
//! ```no_run
//! # async fn demo() -> pingme_client::Result<()> {
//! use pingme_client::{Client, ClientConfig, Endpoint, Event, HttpApi};
//! use pingme_client::v1::ContentType;
//!
//! let api = HttpApi::new("http://127.0.0.1:8080");
//! let login = api.login("alice", "secret", "laptop").await?;
//! let endpoint = Endpoint::parse("tcp://127.0.0.1:7000")?;
//! let (client, mut events) = Client::connect(ClientConfig::new(endpoint, login.token)).await?;
//! let ack = client.send("dm:1:2", ContentType::Text, "hello").await?;
//! println!("stored as seq {}", ack.seq);
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(message) = event {
//!         println!("{}: {:?}", message.sender_id, message.body);
//!     }
//! }
//! # Ok(()) }
//! ```
// No unsafe code (the workspace denies it) but for the one setsockopt call
// in `transport` that no safe socket crate offers.
#![deny(unsafe_code)]

mod backoff;
mod client;
pub mod core;
mod error;
mod http;
pub mod session;
pub mod transport;
mod watermark;

pub use crate::core::{
    Answer, ClientCore, Command, CoreConfig, CoreEvent, Event, RequestId, Transmit,
};
pub use backoff::Backoff;
pub use client::{Client, ClientConfig, Events};
pub use error::{ClientError, Result};
pub use http::{Group, HttpApi, Login};
pub use pingme_protocol::{ErrorCode, v1};
pub use transport::{ConnectOptions, Connection, Connector, Endpoint, HandshakeCounts, Trust};
pub use watermark::{Arrival, Watermarks};
