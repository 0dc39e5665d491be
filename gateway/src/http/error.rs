//! The API's error type: a stable [`ErrorCode`] and a message, sent as
//! `{"code": .., "message": ..}` with the HTTP status of the code table
//! (`docs/error-codes.md`). The one place where [`StoreError`] and axum's
//! extractor rejections become codes.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pingme_protocol::ErrorCode;
use pingme_router::store_error_code;
use pingme_storage::StoreError;
use serde::Serialize;

/// An error answer of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The stable code.
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u32,
    message: &'a str,
}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// `INVALID_ARGUMENT` with a message naming the field.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidArgument, message)
    }

    /// `FORBIDDEN`.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Forbidden, message)
    }

    /// An error for a bare code, with the code's name as message.
    pub fn from_code(code: ErrorCode) -> ApiError {
        ApiError::new(code, code.name())
    }
}

/// The HTTP status of a code, as in the table of `docs/error-codes.md`.
/// Codes that never travel over HTTP (connection-only) answer 500.
pub fn http_status(code: ErrorCode) -> StatusCode {
    use ErrorCode as E;
    match code {
        E::AuthRequired
        | E::TokenInvalid
        | E::TokenExpired
        | E::TokenRevoked
        | E::BadCredentials => StatusCode::UNAUTHORIZED,
        E::LoginRateLimited | E::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        E::UsernameTaken | E::Conflict => StatusCode::CONFLICT,
        E::Forbidden => StatusCode::FORBIDDEN,
        E::Malformed | E::InvalidArgument => StatusCode::BAD_REQUEST,
        E::FrameTooLarge | E::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        E::NotFound => StatusCode::NOT_FOUND,
        E::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        E::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        E::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        E::StorageUnavailable
        | E::AuthBusy
        | E::Overloaded
        | E::DirectoryUnavailable
        | E::ShuttingDown
        | E::KafkaError
        | E::KafkaProducerError => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http_status(self.code);
        let body = ErrorBody {
            code: self.code.code(),
            message: &self.message,
        };
        (status, axum::Json(body)).into_response()
    }
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> Self {
        ApiError::from_code(code)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let code = store_error_code(&error);
        if matches!(
            code,
            ErrorCode::StorageUnavailable | ErrorCode::StorageCorrupt
        ) {
            tracing::error!(%error, "store failure in HTTP API");
        }
        ApiError::new(code, error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let code = match &rejection {
            // Well-formed JSON of the wrong shape: a field is missing or mistyped.
            JsonRejection::JsonDataError(_) => ErrorCode::InvalidArgument,
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::BodyTooLarge,
            _ => ErrorCode::Malformed,
        };
        ApiError::new(code, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

/// Result of an API handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The status column of `docs/error-codes.md` is the contract: every code
    /// with an HTTP status there maps to exactly that status here.
    #[test]
    fn statuses_follow_the_code_table() {
        let table = include_str!("../../../docs/error-codes.md");
        let mut checked = 0;
        for line in table.lines().filter(|l| l.starts_with("| ")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (Ok(code), Ok(status)) = (cells[1].parse::<u32>(), cells[5].parse::<u16>()) else {
                continue;
            };
            let code = ErrorCode::from_code(code).expect("known code");
            assert_eq!(http_status(code).as_u16(), status, "{}", code.name());
            checked += 1;
        }
        assert!(checked > 20, "table parsed ({checked} rows)");
    }

    #[test]
    fn store_errors_map_to_codes() {
        let code = |e: StoreError| ApiError::from(e).code;
        assert_eq!(code(StoreError::NotFound("u".into())), ErrorCode::NotFound);
        assert_eq!(
            code(StoreError::NotMember {
                user: 1,
                conversation: "g:1".into()
            }),
            ErrorCode::Forbidden
        );
        assert_eq!(code(StoreError::Conflict("x".into())), ErrorCode::Conflict);
        assert_eq!(
            code(StoreError::Invalid("x".into())),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(StoreError::Unavailable("x".into())),
            ErrorCode::StorageUnavailable
        );
        assert_eq!(
            code(StoreError::Corrupt("x".into())),
            ErrorCode::StorageCorrupt
        );
    }
}
