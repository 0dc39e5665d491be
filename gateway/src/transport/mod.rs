//! The transports: how bytes reach a session. TCP and TLS are byte streams
//! accepted by each shard's own listener; QUIC is one bidirectional stream
//! per connection on each shard's own UDP socket; WebSocket connections
//! are accepted by the HTTP server and handed to a shard. TLS runs on
//! rustls' unbuffered API (`tls_stream`), so idle connections hold no
//! buffers.

pub mod quic;
mod stream;
pub mod tcp;
pub mod tls;
mod tls_stream;
pub mod ws;
