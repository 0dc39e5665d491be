//! The transports: how bytes reach a session. TCP and TLS are byte streams
//! accepted by each shard's own listener; QUIC is one bidirectional stream
//! per connection on each shard's own UDP socket; WebSocket connections
//! are accepted by the HTTP server and handed to a shard.

pub mod quic;
mod stream;
pub mod tcp;
pub mod tls;
pub mod ws;
