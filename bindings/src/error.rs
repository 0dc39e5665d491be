//! The one error type of the bindings: each [`ClientError`] of the Rust
//! client maps to a variant, and every failure the server reports keeps its
//! stable pingme error code (docs/error-codes.md) and its symbolic name, so
//! apps branch on codes, never on text. In Kotlin and Python the variants
//! are exception classes (`PingmeException.Server`, `PingmeError.Server`),
//! in Swift the cases of an `Error` enum.

use pingme_client::{ClientError, ErrorCode};

use crate::types::GoAwayReason;

/// Why a pingme call failed.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum PingmeError {
    /// The gateway refused the request (an `Error` frame).
    #[error("server error {code} ({name}): {detail}")]
    Server {
        /// The stable pingme error code, e.g. 20006 (`INVALID_ARGUMENT`).
        code: u32,
        /// Its symbolic name, e.g. `INVALID_ARGUMENT`; empty if
        /// this build does not know the code.
        name: String,
        /// The server's human-readable detail.
        detail: String,
        /// For a failed send, its `client_msg_id`.
        client_msg_id: String,
    },
    /// The HTTP API refused the request (register, login, groups).
    #[error("HTTP {status}: error {code} ({name}): {detail}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable pingme error code of the JSON body (0 if it had none).
        code: u32,
        /// Its symbolic name (empty if unknown).
        name: String,
        /// The body's message.
        detail: String,
    },
    /// The network failed: connection refused or lost, TLS, QUIC,
    /// WebSocket or HTTP transport trouble. Trying again later may work.
    #[error("network: {detail}")]
    Network {
        /// What failed.
        detail: String,
    },
    /// The server sent something the protocol does not allow, a frame did
    /// not decode, or the server speaks no common protocol version.
    #[error("protocol error {code} ({name}): {detail}")]
    Protocol {
        /// The stable pingme error code (0 when the failure has none).
        code: u32,
        /// Its symbolic name (empty if none).
        name: String,
        /// What was wrong.
        detail: String,
    },
    /// The server told this client to go away (while connecting, or for
    /// good: replaced by another login of the device, logged out).
    #[error("GoAway ({reason:?}): {detail}")]
    GoAway {
        /// The server's reason.
        reason: GoAwayReason,
        /// The server's detail.
        detail: String,
    },
    /// The client is closed (by the app, or for good after a terminal
    /// error); it takes no more requests.
    #[error("client closed")]
    Closed,
    /// No answer within the request timeout. Sending again with the same
    /// `client_msg_id` is safe: the server stores a message once.
    #[error("request timed out")]
    Timeout,
    /// An argument the bindings could not use (a gateway URL that does not
    /// parse, TLS without a trust policy).
    #[error("invalid argument: {detail}")]
    InvalidArgument {
        /// What was wrong with it.
        detail: String,
    },
    /// The bindings themselves failed (the runtime did not start, a task
    /// panicked). A bug, not a condition to handle.
    #[error("internal error: {detail}")]
    Internal {
        /// What failed.
        detail: String,
    },
}

/// The symbolic name of a wire code, empty when unknown or 0.
fn name_of(code: u32) -> String {
    ErrorCode::from_code(code).map_or_else(String::new, |c| c.name().to_string())
}

impl From<ClientError> for PingmeError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Server {
                code,
                message,
                client_msg_id,
            } => PingmeError::Server {
                code,
                name: name_of(code),
                detail: message,
                client_msg_id,
            },
            ClientError::Api {
                status,
                code,
                message,
            } => PingmeError::Api {
                status,
                code,
                name: name_of(code),
                detail: message,
            },
            ClientError::Http(_)
            | ClientError::Io(_)
            | ClientError::Tls(_)
            | ClientError::Quic(_)
            | ClientError::WebSocket(_)
            | ClientError::ConnectionClosed => PingmeError::Network {
                detail: error.to_string(),
            },
            ClientError::Frame(_) | ClientError::Protocol(_) | ClientError::UnsupportedVersion => {
                let code = error.code().map_or(0, ErrorCode::code);
                PingmeError::Protocol {
                    code,
                    name: name_of(code),
                    detail: error.to_string(),
                }
            }
            ClientError::GoAway { reason, message } => PingmeError::GoAway {
                reason: reason.into(),
                detail: message,
            },
            ClientError::Closed => PingmeError::Closed,
            ClientError::Timeout => PingmeError::Timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_their_stable_code_and_name() {
        let code = ErrorCode::BadCredentials.code();
        let error = PingmeError::from(ClientError::Api {
            status: 401,
            code,
            message: "wrong password".into(),
        });
        match error {
            PingmeError::Api {
                status,
                code: got,
                name,
                detail,
            } => {
                assert_eq!((status, got), (401, code));
                assert_eq!(name, ErrorCode::BadCredentials.name());
                assert_eq!(detail, "wrong password");
            }
            other => panic!("expected Api, got {other:?}"),
        }

        let code = ErrorCode::Forbidden.code();
        let error = PingmeError::from(ClientError::Server {
            code,
            message: "not a member".into(),
            client_msg_id: "m-1".into(),
        });
        assert!(
            matches!(&error, PingmeError::Server { code: c, name, client_msg_id, .. }
                if *c == code && name == ErrorCode::Forbidden.name() && client_msg_id == "m-1"),
            "{error:?}"
        );
    }

    #[test]
    fn failures_without_a_server_code_map_by_kind() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            PingmeError::from(ClientError::Io(refused)),
            PingmeError::Network { .. }
        ));
        assert!(matches!(
            PingmeError::from(ClientError::UnsupportedVersion),
            PingmeError::Protocol { code, .. } if code == ErrorCode::UnsupportedVersion.code()
        ));
        assert!(matches!(
            PingmeError::from(ClientError::Protocol("odd".into())),
            PingmeError::Protocol { code: 0, .. }
        ));
        assert!(matches!(
            PingmeError::from(ClientError::Closed),
            PingmeError::Closed
        ));
        assert!(matches!(
            PingmeError::from(ClientError::Timeout),
            PingmeError::Timeout
        ));
        let unknown = PingmeError::from(ClientError::Server {
            code: 59_999,
            message: String::new(),
            client_msg_id: String::new(),
        });
        assert!(
            matches!(unknown, PingmeError::Server { code: 59_999, name, .. } if name.is_empty())
        );
    }
}
