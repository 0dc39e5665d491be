//! The pingme gateway: where clients connect. It owns the listeners (TCP,
//! TLS, QUIC, WebSocket), one shard per core with its own connection map,
//! sessions and their limits, the HTTP API, the browser chat page,
//! operations endpoints and the `pingme` binary's wiring.

pub mod accept;
pub mod allocator;
pub mod auth;
pub mod config;
pub mod connection;
pub mod directory;
pub mod exported_metrics;
mod frames;
pub mod http;
pub mod index;
pub mod limits;
pub mod ops;
pub mod provision;
pub mod serve;
pub mod server;
pub mod session;
mod shard;
mod shard_context;
pub mod transport;
pub mod webchat;

pub use index::Connections;
pub use limits::SessionLimits;
pub use server::{BoundAddrs, Gateway, GatewayConfig, ListenerConfig, StartError};
pub use transport::ws::ws_router;
pub use webchat::webchat_router;
