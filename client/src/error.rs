//! The one error type of the SDK. Every failure the server reports keeps its
//! stable [`ErrorCode`], so applications branch on codes, never on text.

use pingme_protocol::v1::GoAwayReason;
use pingme_protocol::{ErrorCode, FrameError};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered the request with an `Error` frame.
    #[error("server error {code} ({}): {message}", name_of(*.code))]
    Server {
        /// The raw wire code (see [`ClientError::code`] for the typed one).
        code: u32,
        /// The server's human-readable detail.
        message: String,
        /// For failed sends, the `client_msg_id` of the send.
        client_msg_id: String,
    },
    /// The HTTP API refused the request.
    #[error("HTTP {status}: {code} {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable error code of the JSON body (0 if the body had none).
        code: u32,
        /// The body's message.
        message: String,
    },
    /// The HTTP request itself failed (connection refused, bad JSON, ...).
    #[error("HTTP transport: {0}")]
    Http(#[from] reqwest::Error),
    /// A socket failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be decoded or was too large.
    #[error("framing: {0}")]
    Frame(FrameError),
    /// TLS setup failed (bad CA file, bad server name).
    #[error("TLS: {0}")]
    Tls(String),
    /// The QUIC connection failed.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The WebSocket failed.
    #[error("WebSocket: {0}")]
    WebSocket(String),
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server and this SDK share no protocol version.
    #[error("no common protocol version")]
    UnsupportedVersion,
    /// The server closed the connection.
    #[error("connection closed by the server")]
    ConnectionClosed,
    /// The server told this client to go away and not come back on its own
    /// (`REPLACED`, `LOGGED_OUT` stop the client; other reasons only end
    /// the current connection).
    #[error("server sent GoAway ({reason:?}): {message}")]
    GoAway {
        /// The server's reason.
        reason: GoAwayReason,
        /// The server's detail.
        message: String,
    },
    /// The client was closed (by the application or for good after a
    /// terminal error); no more requests are accepted.
    #[error("client closed")]
    Closed,
    /// No answer within the request timeout. A send that timed out is no
    /// longer retried; sending again with the same `client_msg_id` is safe.
    #[error("request timed out")]
    Timeout,
}

fn name_of(code: u32) -> &'static str {
    ErrorCode::from_code(code).map_or("UNKNOWN", ErrorCode::name)
}

impl ClientError {
    /// The stable error code, when the server (wire or HTTP) gave one that
    /// this build knows.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::Api { code, .. } => {
                ErrorCode::from_code(*code)
            }
            ClientError::Frame(e) => Some(e.code()),
            ClientError::UnsupportedVersion => Some(ErrorCode::UnsupportedVersion),
            _ => None,
        }
    }

    /// True for errors after which reconnecting with the same token cannot
    /// help: the token is bad or revoked, or the server said not to.
    pub fn is_terminal(&self) -> bool {
        if let ClientError::GoAway { reason, .. } = self {
            return matches!(reason, GoAwayReason::Replaced | GoAwayReason::LoggedOut);
        }
        matches!(self, ClientError::Closed | ClientError::UnsupportedVersion)
            || matches!(
                self.code(),
                Some(
                    ErrorCode::TokenInvalid
                        | ErrorCode::TokenExpired
                        | ErrorCode::TokenRevoked
                        | ErrorCode::AuthRequired
                        | ErrorCode::BadCredentials
                )
            )
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(io) => ClientError::Io(io),
            other => ClientError::Frame(other),
        }
    }
}

/// Result of SDK operations.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
