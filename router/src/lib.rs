//! The router decides where a message goes and in what order: it checks a
//! send, makes it durable with its per-conversation seq, acknowledges it,
//! and plans its delivery to every device that should have it.
//!
//! Its boundary with the gateway is [`port`]: the gateway hands the router
//! every post-authentication frame through [`port::Dispatch`], and the
//! router reaches connections through [`port::Outbox`]. Neither side knows
//! how the other is built, so the gateway's tests can use a double of the
//! router and the router's tests a double of the gateway.

pub mod port;
