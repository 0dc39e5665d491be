//! Sessions: the handshake (Hello, then Authenticate within the auth
//! timeout) and what an authenticated
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
use crate::frames::{go_away, millis_u32, unix_millis};
use crate::limits::Admission;
use crate::shard_context::ShardCtx;

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
    /// Sends one encoded frame (prefix included): at once, or (a byte
    /// stream) before the transport next waits for the peer, or with the
    /// handshake's outcome, whichever comes first.
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
    conn.transport.frames_in(1);
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

fn u32_or_max(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

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
