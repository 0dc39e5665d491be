//! The transports: how bytes reach a session. TCP and TLS are byte streams
//! accepted by each shard's own listener; QUIC is one bidirectional stream
//! per connection on each shard's own UDP socket; WebSocket connections
//! are accepted by the HTTP server and handed to a shard. TLS handshakes
//! run on rustls' unbuffered API (`tls_stream`), and records after them on
//! our lean record layer over rustls' keys and AEADs (`tls_record`), so
//! idle connections hold no buffers and little state.

pub mod quic;
mod stream;
pub mod tcp;
pub mod tls;
mod tls_record;
mod tls_stream;
pub mod ws;
