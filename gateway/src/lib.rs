//! The pingme gateway: where clients connect. It owns the listeners (TCP,
//! TLS, QUIC, WebSocket), one shard per core with its own connection map,
//! sessions and their limits, the HTTP API, operations endpoints and the
//! `pingme` binary's wiring.

pub mod auth;
pub mod config;
pub mod http;
pub mod ops;
pub mod serve;
