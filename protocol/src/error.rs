//! The system-wide error code table. The codes are defined once, in the
//! `ErrorCode` enum of the .proto contract; this module adds what Rust code
//! needs around them: families, iteration, constructors of error frames.

use crate::v1::{self, server_frame};
use crate::{ErrorCode, ServerFrame};

/// The family an error code belongs to (its leading digit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// 1xxxx: authentication and authorisation.
    Auth,
    /// 2xxxx: the request itself is wrong.
    Request,
    /// 3xxxx: the store failed.
    Storage,
    /// 4xxxx: routing, sessions, load.
    Routing,
    /// 5xxxx: Kafka (cluster mode).
    Kafka,
}

impl ErrorCode {
    /// The code as it travels on the wire and in JSON bodies.
    pub fn code(self) -> u32 {
        self as i32 as u32
    }

    /// Looks a wire code up; `None` for codes this build does not know.
    pub fn from_code(code: u32) -> Option<ErrorCode> {
        i32::try_from(code)
            .ok()
            .and_then(|c| ErrorCode::try_from(c).ok())
            .filter(|c| *c != ErrorCode::Unspecified)
    }

    /// Every defined code, ascending.
    pub fn all() -> impl Iterator<Item = ErrorCode> {
        (1..60_000u32).filter_map(ErrorCode::from_code)
    }

    /// The family of this code.
    pub fn family(self) -> Family {
        match self.code() / 10_000 {
            1 => Family::Auth,
            2 => Family::Request,
            3 => Family::Storage,
            5 => Family::Kafka,
            _ => Family::Routing,
        }
    }

    /// The stable symbolic name (as in the .proto file).
    pub fn name(self) -> &'static str {
        self.as_str_name()
    }

    /// Whether an error answer with this code says "try again later": the
    /// request was not carried out, and repeating it (a send with the same
    /// `client_msg_id`) is safe (docs/protocol.md, "Requests on an
    /// authenticated session").
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Overloaded
                | ErrorCode::ShuttingDown
                | ErrorCode::StorageUnavailable
                | ErrorCode::DirectoryUnavailable
        )
    }

    /// [`ErrorCode::is_retryable`] for a wire code (false for unknown codes).
    pub fn is_retryable_code(code: u32) -> bool {
        ErrorCode::from_code(code).is_some_and(ErrorCode::is_retryable)
    }
}

impl ServerFrame {
    /// An error answer to request `request_id`.
    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame {
            request_id,
            body: Some(server_frame::Body::Error(v1::Error {
                code: code.code(),
                message: message.into(),
                client_msg_id: String::new(),
                fatal: false,
            })),
        }
    }

    /// An error after which the server closes the connection, answering
    /// no particular request (`request_id` 0).
    pub fn fatal(code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame::fatal_answer(0, code, message)
    }

    /// A fatal error answering request `request_id` (a refused `Hello` or
    /// `Authenticate`): clients match it to their request like any answer.
    pub fn fatal_answer(
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> ServerFrame {
        let mut frame = ServerFrame::error(request_id, code, message);
        if let Some(server_frame::Body::Error(error)) = frame.body.as_mut() {
            error.fatal = true;
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_again_later_codes_are_retryable_and_refusals_are_not() {
        assert!(ErrorCode::is_retryable_code(ErrorCode::Overloaded.code()));
        assert!(ErrorCode::RateLimited.is_retryable());
        assert!(!ErrorCode::is_retryable_code(ErrorCode::Forbidden.code()));
        assert!(!ErrorCode::is_retryable_code(99_999));
    }

    #[test]
    fn kafka_family_matches_the_seed_exactly() {
        let kafka: Vec<(u32, &str)> = ErrorCode::all()
            .filter(|c| c.family() == Family::Kafka)
            .map(|c| (c.code(), c.name()))
            .collect();
        assert_eq!(
            kafka,
            vec![
                (50001, "KAFKA_ERROR"),
                (50002, "KAFKA_UNMARSHAL_FAILED"),
                (50003, "KAFKA_PERSIST_FAILED"),
                (50004, "KAFKA_DELIVERY_FAILED"),
                (50005, "KAFKA_CONSUMER_GROUP_ERROR"),
                (50006, "KAFKA_RETRY_EXHAUSTED_SENT_TO_DLQ"),
                (50007, "KAFKA_DLQ_SEND_FAILED"),
                (50008, "KAFKA_PRODUCER_ERROR"),
            ]
        );
    }

    #[test]
    fn families_follow_the_leading_digit() {
        assert_eq!(ErrorCode::TokenExpired.family(), Family::Auth);
        assert_eq!(ErrorCode::FrameTooLarge.family(), Family::Request);
        assert_eq!(ErrorCode::StorageUnavailable.family(), Family::Storage);
        assert_eq!(ErrorCode::SlowConsumer.family(), Family::Routing);
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(99_999), None);
    }

    /// `docs/error-codes.md` is the operators' copy of the table; it must list
    /// every code with its name, and nothing else.
    #[test]
    fn the_documented_table_matches_the_code() {
        let doc = include_str!("../../docs/error-codes.md");
        let documented: Vec<(u32, String)> = doc
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let code = cells.get(1)?.parse::<u32>().ok()?;
                Some((code, cells.get(2)?.trim_matches('`').to_string()))
            })
            .collect();
        let defined: Vec<(u32, String)> = ErrorCode::all()
            .map(|c| (c.code(), c.name().to_string()))
            .collect();
        assert_eq!(documented, defined);
    }
}
