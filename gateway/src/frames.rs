//! The frames the gateway writes itself rather than the router: `AuthOk`,
//! go-away, and the fatal errors every shard sends often, encoded once.

use std::time::Duration;

use bytes::Bytes;
use pingme_protocol::v1::{self, GoAwayReason, server_frame};
use pingme_protocol::{ErrorCode, ServerFrame, encode_frame};

use crate::auth::Claims;
use crate::limits::SessionLimits;

/// Frames every shard sends often, encoded once.
pub(crate) struct CannedFrames {
    pub(crate) idle: Bytes,
    pub(crate) too_large: Bytes,
    pub(crate) flood: Bytes,
    pub(crate) shutdown: Bytes,
}

impl CannedFrames {
    pub(crate) fn new(limits: &SessionLimits) -> Self {
        Self {
            idle: encode_frame(&ServerFrame::fatal(
                ErrorCode::IdleTimeout,
                "no frame within the idle timeout",
            )),
            too_large: encode_frame(&ServerFrame::fatal(
                ErrorCode::FrameTooLarge,
                "frame exceeds the maximum frame size",
            )),
            flood: encode_frame(&ServerFrame::fatal(
                ErrorCode::RateLimited,
                "sustained flood above the rate limit",
            )),
            shutdown: go_away(
                GoAwayReason::Shutdown,
                limits.shutdown_retry_after,
                "server shutting down",
            ),
        }
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

pub(crate) fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Wall clock, Unix milliseconds.
pub(crate) fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
