//! The pingme client SDK for Kotlin, Swift and Python, through UniFFI
//! proc-macros (namespace `pingme`). It wraps `pingme-client` and adds no
//! client logic of its own: handshakes, acks, resend with the same
//! `client_msg_id`, sync, dedup, heartbeats and reconnects all happen in
//! the Rust client; this crate only converts types and runs that client on
//! a tokio runtime owned by the [`Pingme`] object.
//!
//! * [`Pingme`]: one per app; owns the runtime and the HTTP API calls
//!   (register, login, groups), and opens connections
//!   ([`Pingme::connect`]) over TCP, TLS, QUIC or WebSocket.
//! * [`PingmeClient`]: one connected, authenticated device: send, fetch
//!   history, presence, typing, read markers, watermarks, and
//!   [`PingmeClient::next_event`] for what the server pushes (messages,
//!   sync finished, reconnecting, ...).
//! * [`PingmeError`]: every failure, with the stable pingme error code
//!   where the server gave one.
//!
//! Every call that waits is `async` in the foreign language (a Kotlin
//! `suspend fun`, a Swift `async` method, a Python coroutine); the waiting
//! happens on the runtime, never on the caller's thread.

// The extern "C" scaffolding that UniFFI's macros generate is unsafe code;
// the code written in this crate has none.
#![allow(unsafe_code)]

uniffi::setup_scaffolding!("pingme");

mod client;
mod error;
mod runtime;
mod sdk;
mod types;

pub use client::PingmeClient;
pub use error::PingmeError;
pub use sdk::Pingme;
pub use types::{
    ClientEvent, ConnectConfig, ContentType, GoAwayReason, Group, Login, Message, MessagePage,
    Presence, SendAck, Trust, Watermark, direct_conversation_id,
};
