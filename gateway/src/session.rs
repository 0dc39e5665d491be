//! Sessions: the limits a connection lives under, the handshake (Hello,
//! then Authenticate within the auth timeout) and what an authenticated
//! session does with each frame (Ping answered here, everything else handed
//! to the router's [`Dispatch`](pingme_router::port::Dispatch)). The code is
//! transport-agnostic: byte streams and WebSocket messages both end up as
//! frame payloads here.

use std::time::Duration;

use bytes::Bytes;
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_protocol::{
    ClientFrame, ErrorCode, LENGTH_PREFIX, ServerFrame, decode_message, encode_frame,
    negotiate_version,
};

use crate::auth::Claims;
use crate::connection::{CloseReason, Conn};
use crate::shard::ShardCtx;

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
        }
    }
}

/// How many frames a client may send before authenticating (Hello,
/// Authenticate and a few tolerated mistakes).
const MAX_FRAMES_BEFORE_AUTH: u32 = 8;

/// Why a handshake ended without a session. Each maps to the fatal frame
/// the client gets (if any) and a disconnect reason.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The peer closed or the transport failed: nobody to tell.
    Gone,
    /// A fatal error frame answering `request_id` (0: no request to
    /// answer, e.g. an undecodable frame), then close.
    Fatal {
        code: ErrorCode,
        message: &'static str,
        reason: CloseReason,
        request_id: u64,
    },
    /// The auth token of request `request_id` was refused: the
    /// authenticator's code.
    BadToken { code: ErrorCode, request_id: u64 },
    /// The gateway is shutting down.
    ShuttingDown,
}

impl Refusal {
    pub(crate) fn reason(&self) -> CloseReason {
        match self {
            Refusal::Gone => CloseReason::PeerClosed,
            Refusal::Fatal { reason, .. } => *reason,
            Refusal::BadToken { .. } => CloseReason::AuthFailed,
            Refusal::ShuttingDown => CloseReason::Shutdown,
        }
    }

    /// The frame telling the client why, if it can still be told.
    pub(crate) fn frame(&self, retry_after: Duration) -> Option<Bytes> {
        match self {
            Refusal::Gone => None,
            Refusal::Fatal {
                code,
                message,
                request_id,
                ..
            } => Some(encode_frame(&ServerFrame::fatal_answer(
                *request_id,
                *code,
                *message,
            ))),
            Refusal::BadToken { code, request_id } => Some(encode_frame(
                &ServerFrame::fatal_answer(*request_id, *code, "authentication failed"),
            )),
            Refusal::ShuttingDown => Some(go_away(
                v1::GoAwayReason::Shutdown,
                retry_after,
                "server shutting down",
            )),
        }
    }
}

/// The two halves of a handshake a transport must provide: the next
/// frame payload (prefix removed) and sending one encoded frame.
pub(crate) trait FrameTransport {
    /// The next frame's payload; `Ok(None)` when the peer closed.
    async fn next_payload(&mut self, max_frame_size: usize) -> Result<Option<Bytes>, ErrorCode>;
    /// Sends one encoded frame (prefix included) and flushes it.
    async fn send(&mut self, frame: Bytes) -> std::io::Result<()>;
}

/// Runs Hello then Authenticate on a fresh connection. The caller applies
/// the auth timeout and the shutdown signal around this future.
pub(crate) async fn handshake<T: FrameTransport>(
    transport: &mut T,
    ctx: &ShardCtx,
) -> Result<(Claims, u64), Refusal> {
    let limits = &ctx.limits;
    let mut greeted = false;
    let mut last_request_id = 0;
    for _ in 0..MAX_FRAMES_BEFORE_AUTH {
        let payload = match transport.next_payload(limits.max_frame_size).await {
            Ok(Some(payload)) => payload,
            Ok(None) => return Err(Refusal::Gone),
            Err(code) => return Err(fatal_for(code)),
        };
        let frame: ClientFrame =
            decode_message(payload).map_err(|_| fatal_for(ErrorCode::Malformed))?;
        let request_id = frame.request_id;
        last_request_id = request_id;
        let reply = match (greeted, frame.body) {
            (false, Some(client_frame::Body::Hello(hello))) => {
                let Some(version) = negotiate_version(hello.min_version, hello.max_version) else {
                    return Err(Refusal::Fatal {
                        code: ErrorCode::UnsupportedVersion,
                        message: "no common protocol version",
                        reason: CloseReason::UnsupportedVersion,
                        request_id,
                    });
                };
                greeted = true;
                ServerFrame {
                    request_id,
                    body: Some(server_frame::Body::HelloAck(v1::HelloAck {
                        version,
                        max_frame_size: u32_or_max(limits.max_frame_size),
                        heartbeat_interval_ms: millis_u32(limits.heartbeat_interval),
                        idle_timeout_ms: millis_u32(limits.idle_timeout),
                        messages_per_second: limits.messages_per_second,
                        send_burst: limits.burst,
                        // See `TokenBucket::admit`: a flood is a refusal
                        // beyond `burst` in a row.
                        refusals_before_disconnect: limits.burst.max(1),
                        max_body_bytes: u32_or_max(limits.max_body_bytes),
                        max_queued_bytes: u32_or_max(limits.max_queued_bytes),
                    })),
                }
            }
            (true, Some(client_frame::Body::Authenticate(auth))) => {
                return match ctx.authenticator.authenticate(&auth.token).await {
                    Ok(claims) => Ok((claims, request_id)),
                    Err(code) => Err(Refusal::BadToken { code, request_id }),
                };
            }
            (false, _) => ServerFrame::error(
                request_id,
                ErrorCode::UnexpectedMessage,
                "the first frame must be Hello",
            ),
            (true, _) => ServerFrame::error(
                request_id,
                ErrorCode::AuthRequired,
                "authenticate before anything else",
            ),
        };
        transport
            .send(encode_frame(&reply))
            .await
            .map_err(|_| Refusal::Gone)?;
    }
    Err(Refusal::Fatal {
        code: ErrorCode::UnexpectedMessage,
        message: "too many frames before authentication",
        reason: CloseReason::UnexpectedMessage,
        request_id: last_request_id,
    })
}

/// The refusal of a frame that could not be read at all: there is no
/// request id to echo.
fn fatal_for(code: ErrorCode) -> Refusal {
    match code {
        ErrorCode::FrameTooLarge => Refusal::Fatal {
            code,
            message: "frame exceeds the maximum frame size",
            reason: CloseReason::FrameTooLarge,
            request_id: 0,
        },
        _ => Refusal::Fatal {
            code: ErrorCode::Malformed,
            message: "frame could not be decoded",
            reason: CloseReason::Malformed,
            request_id: 0,
        },
    }
}

/// The `AuthOk` answer for a new session.
pub(crate) fn auth_ok(request_id: u64, claims: &Claims) -> Bytes {
    encode_frame(&ServerFrame {
        request_id,
        body: Some(server_frame::Body::AuthOk(v1::AuthOk {
            user_id: claims.user,
            device_id: claims.device.clone(),
            server_time_ms: unix_millis(),
        })),
    })
}

/// A go-away frame.
pub(crate) fn go_away(reason: v1::GoAwayReason, retry_after: Duration, message: &str) -> Bytes {
    encode_frame(&ServerFrame {
        request_id: 0,
        body: Some(server_frame::Body::GoAway(v1::GoAway {
            reason: reason as i32,
            retry_after_ms: millis_u32(retry_after),
            reconnect_to: String::new(),
            message: message.to_string(),
        })),
    })
}

/// The payload of a frame that arrived as one whole message (WebSocket):
/// the prefix must announce exactly the rest of the message.
pub(crate) fn whole_message_payload(
    message: Bytes,
    max_frame_size: usize,
) -> Result<Bytes, ErrorCode> {
    let Some(prefix) = message.get(..LENGTH_PREFIX) else {
        return Err(ErrorCode::Malformed);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max_frame_size {
        return Err(ErrorCode::FrameTooLarge);
    }
    if len != message.len() - LENGTH_PREFIX {
        return Err(ErrorCode::Malformed);
    }
    Ok(message.slice(LENGTH_PREFIX..))
}

/// One frame of an authenticated session: rate limit, then Ping answered
/// here, Hello/Authenticate refused, everything else to the router.
/// Replies and fatal errors are queued on `conn`.
pub(crate) fn on_frame(conn: &Conn, ctx: &ShardCtx, payload: Bytes) {
    let now_ms = ctx.now_ms();
    conn.touch(now_ms);
    metrics::counter!("pingme_gateway_frames_in_total", "transport" => conn.transport.label())
        .increment(1);
    let Ok(frame) = decode_message::<ClientFrame>(payload) else {
        conn.close(
            Some(encode_frame(&ServerFrame::fatal(
                ErrorCode::Malformed,
                "frame could not be decoded",
            ))),
            CloseReason::Malformed,
        );
        return;
    };
    let request_id = frame.request_id;
    match conn.admit(now_ms, &ctx.limits) {
        Admission::Admitted => {}
        Admission::Refused => {
            conn.enqueue(
                encode_frame(&ServerFrame::error(
                    request_id,
                    ErrorCode::RateLimited,
                    "too many frames; slow down",
                )),
                &ctx.limits,
            );
            return;
        }
        Admission::Flood => {
            conn.close(Some(ctx.frames.flood.clone()), CloseReason::RateLimited);
            return;
        }
    }
    match frame.body {
        Some(client_frame::Body::Ping(ping)) => {
            let pong = ServerFrame {
                request_id,
                body: Some(server_frame::Body::Pong(v1::Pong {
                    client_time_ms: ping.client_time_ms,
                    server_time_ms: unix_millis(),
                })),
            };
            conn.enqueue(encode_frame(&pong), &ctx.limits);
        }
        Some(client_frame::Body::Hello(_) | client_frame::Body::Authenticate(_)) | None => {
            conn.enqueue(
                encode_frame(&ServerFrame::error(
                    request_id,
                    ErrorCode::UnexpectedMessage,
                    "not allowed on an authenticated session",
                )),
                &ctx.limits,
            );
        }
        Some(body) => ctx.dispatch.frame(&conn.session, request_id, body),
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

fn u32_or_max(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Wall clock, Unix milliseconds.
pub(crate) fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

    #[test]
    fn whole_message_frames_must_match_their_prefix() {
        let good = encode_frame(&ServerFrame::default());
        assert!(whole_message_payload(good.clone(), 1024).is_ok());
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(
            whole_message_payload(Bytes::from(long), 1024),
            Err(ErrorCode::Malformed)
        );
        assert_eq!(
            whole_message_payload(Bytes::from_static(&[0, 0]), 1024),
            Err(ErrorCode::Malformed)
        );
        let mut huge = 5000u32.to_be_bytes().to_vec();
        huge.extend(std::iter::repeat_n(0, 5000));
        assert_eq!(
            whole_message_payload(Bytes::from(huge), 1024),
            Err(ErrorCode::FrameTooLarge)
        );
    }
}
