//! The limits a session lives under (announced to clients in `HelloAck`)
//! and the token bucket that holds a session to its frame rate.

use std::time::Duration;

/// What every session is allowed; announced to clients in `HelloAck`.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Largest client frame (protobuf bytes, prefix excluded). Checked
    /// before anything is allocated for the frame.
    pub max_frame_size: usize,
    /// Time from connect to a successful Authenticate.
    pub auth_timeout: Duration,
    /// A session that sends nothing for this long is closed (IDLE_TIMEOUT).
    pub idle_timeout: Duration,
    /// How often clients should ping (announced, not enforced).
    pub heartbeat_interval: Duration,
    /// Sustained client frames per second per session.
    pub messages_per_second: u32,
    /// Frames a session may send at once above the sustained rate.
    pub burst: u32,
    /// Bytes queued for a session that does not read fast enough; above
    /// this the session is closed with SLOW_CONSUMER.
    pub max_queued_bytes: usize,
    /// The router's largest message body (announced in `HelloAck`; the
    /// router enforces it).
    pub max_body_bytes: usize,
    /// How long a closing connection may take to flush its last frames
    /// (the fatal error or go-away) before it is dropped.
    pub close_linger: Duration,
    /// The `retry_after_ms` hint in the shutdown go-away.
    pub shutdown_retry_after: Duration,
    /// QUIC handshakes in progress on one shard above which a client whose
    /// address is not validated yet is first sent a Retry (stateless: it
    /// costs the server a token, not a handshake). A client's first Initial
    /// makes the server do its most expensive work (key exchange and
    /// certificate signature) for an address that may be forged; below this
    /// many such handshakes at once that is affordable, above it only
    /// clients that prove their address get one.
    pub quic_handshakes_before_retry: usize,
    /// QUIC handshakes in progress on one shard above which new ones are
    /// refused (CONNECTION_REFUSED; clients back off and retry): every
    /// handshake holds its connection's state until it ends or times out
    /// (`auth_timeout`), so this bounds that memory.
    pub max_quic_handshakes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_frame_size: pingme_protocol::DEFAULT_MAX_FRAME_SIZE,
            auth_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            heartbeat_interval: Duration::from_secs(30),
            messages_per_second: 50,
            burst: 100,
            max_queued_bytes: 1024 * 1024,
            max_body_bytes: pingme_storage::MAX_BODY_BYTES,
            close_linger: Duration::from_secs(2),
            shutdown_retry_after: Duration::from_secs(5),
            // About a second of a shard's handshake work: forged sources
            // can keep at most this many expensive handshakes in flight.
            quic_handshakes_before_retry: 1024,
            // An established QUIC connection holds about 32 KB (more while
            // its handshake runs): a few hundred MB per shard at most.
            max_quic_handshakes: 8192,
        }
    }
}

/// The verdict of a session's token bucket on one frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Within the rate.
    Admitted,
    /// Over the rate: answer RATE_LIMITED and drop the frame.
    Refused,
    /// Over the rate for too long: close the session.
    Flood,
}

/// A token bucket in whole frames, refilled from a millisecond clock. Kept
/// small (12 bytes) because every session has one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    /// Tokens, in thousandths of a frame.
    milli_tokens: u32,
    /// Clock of the last refill (shard milliseconds, wrapping).
    refilled_at: u32,
    /// Frames refused since the last admitted one.
    refused_in_a_row: u32,
}

impl TokenBucket {
    pub(crate) fn full(limits: &SessionLimits, now_ms: u64) -> Self {
        Self {
            milli_tokens: limits.burst.saturating_mul(1000),
            refilled_at: now_ms as u32,
            refused_in_a_row: 0,
        }
    }

    pub(crate) fn admit(&mut self, now_ms: u64, limits: &SessionLimits) -> Admission {
        let elapsed = (now_ms as u32).wrapping_sub(self.refilled_at);
        self.refilled_at = now_ms as u32;
        // messages_per_second tokens per 1000 ms = messages_per_second milli-tokens per ms.
        let refill = u64::from(elapsed) * u64::from(limits.messages_per_second);
        let cap = u64::from(limits.burst.max(1)) * 1000;
        self.milli_tokens = (u64::from(self.milli_tokens) + refill).min(cap) as u32;
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            self.refused_in_a_row = 0;
            Admission::Admitted
        } else {
            self.refused_in_a_row += 1;
            // A client that keeps sending after a full burst's worth of
            // refusals is not slowing down: a flood.
            if self.refused_in_a_row > limits.burst.max(1) {
                Admission::Flood
            } else {
                Admission::Refused
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, burst: u32) -> SessionLimits {
        SessionLimits {
            messages_per_second: rate,
            burst,
            ..SessionLimits::default()
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_refuses_then_calls_a_flood() {
        let limits = limits(10, 3);
        let mut bucket = TokenBucket::full(&limits, 0);
        for _ in 0..3 {
            assert_eq!(bucket.admit(0, &limits), Admission::Admitted);
        }
        for _ in 0..3 {
            assert_eq!(bucket.admit(0, &limits), Admission::Refused);
        }
        assert_eq!(bucket.admit(0, &limits), Admission::Flood);
    }

    #[test]
    fn bucket_refills_at_the_sustained_rate() {
        let limits = limits(10, 1);
        let mut bucket = TokenBucket::full(&limits, 0);
        assert_eq!(bucket.admit(0, &limits), Admission::Admitted);
        assert_eq!(bucket.admit(50, &limits), Admission::Refused);
        // 10 per second: one frame every 100 ms.
        assert_eq!(bucket.admit(100, &limits), Admission::Admitted);
        // A long pause refills no more than the burst.
        assert_eq!(bucket.admit(100_000, &limits), Admission::Admitted);
        assert_eq!(bucket.admit(100_000, &limits), Admission::Refused);
    }
}
