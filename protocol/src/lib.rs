//! The pingme wire contract and nothing else: frames, protobuf messages,
//! versioning and the system-wide error codes. No sockets live here: the
//! gateway, the client SDK and the load generator drive these types over
//! whatever transport they own.
//!
//! A frame is a 4-byte big-endian length followed by one protobuf message
//! ([`ClientFrame`] upstream, [`ServerFrame`] downstream). Decoding works on
//! [`bytes::Bytes`], so message bodies are slices of the read buffer, and a
//! frame encoded once with [`encode_frame`] can be shared by any number of
//! connections by cloning the `Bytes`.

mod codec;
mod error;
mod frame;

/// Messages generated from `proto/pingme/v1/pingme.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/pingme.v1.rs"));
}

pub use codec::{ClientCodec, EncodedFrame, FrameCodec, RawFrameCodec, ServerCodec};
pub use error::Family;
pub use frame::{
    DEFAULT_MAX_FRAME_SIZE, FrameError, LENGTH_PREFIX, MAX_DOWNSTREAM_FRAME_SIZE, decode_message,
    encode_frame, encode_frame_into, split_frame,
};
pub use v1::{ClientFrame, ErrorCode, ServerFrame};

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The QUIC application protocol (ALPN) of this protocol version. A QUIC
/// client must offer it; the server refuses a handshake without it (QUIC
/// requires ALPN, RFC 9001 section 8.1). TCP+TLS does not use ALPN.
pub const QUIC_ALPN: &[u8] = b"pingme/1";

/// Picks the version both sides speak: the highest version in the overlap of
/// the client's `[min, max]` range and ours, or `None` if they do not overlap.
pub fn negotiate_version(client_min: u32, client_max: u32) -> Option<u32> {
    let high = client_max.min(PROTOCOL_VERSION);
    let low = client_min.max(MIN_PROTOCOL_VERSION);
    (low <= high).then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate_version(1, 1), Some(1));
        assert_eq!(negotiate_version(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate_version(0, 0), None);
        assert_eq!(
            negotiate_version(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 5),
            None
        );
        // A client that sends nothing (proto3 zero defaults) speaks no version.
        assert_eq!(negotiate_version(0, 0), None);
    }
}
