//! Who may act on a conversation: the membership checks shared by the
//! requests answered on this node and the delivered-watermark writer, and
//! the error a refused request gets.

use pingme_protocol::ErrorCode;
use pingme_storage::{ConversationId, StoreError, UserId};

use crate::pipeline::PipelineContext;
use crate::wire::store_error_code;

/// A request's failure, as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestError {
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for RequestError {
    fn from(error: StoreError) -> Self {
        Self::new(store_error_code(&error), error.to_string())
    }
}

/// Parses a conversation id and checks that `user` belongs to it.
pub(crate) async fn member_conversation(
    ctx: &PipelineContext,
    conversation_id: &str,
    user: UserId,
) -> Result<ConversationId, RequestError> {
    let conversation: ConversationId =
        conversation_id
            .parse()
            .map_err(|e: pingme_storage::InvalidConversationId| {
                RequestError::new(ErrorCode::InvalidArgument, e.to_string())
            })?;
    check_member(ctx, conversation, user).await?;
    Ok(conversation)
}

/// Checks that `user` belongs to `conversation` (`FORBIDDEN` if not).
pub(crate) async fn check_member(
    ctx: &PipelineContext,
    conversation: ConversationId,
    user: UserId,
) -> Result<(), RequestError> {
    let forbidden = || {
        RequestError::new(
            ErrorCode::Forbidden,
            format!("not a member of {conversation}"),
        )
    };
    if matches!(conversation, ConversationId::Direct { .. }) && !conversation.is_direct_party(user)
    {
        return Err(forbidden());
    }
    match ctx.stores.conversations.is_member(conversation, user).await {
        Ok(true) => Ok(()),
        Ok(false) | Err(StoreError::NotFound(_)) | Err(StoreError::NotMember { .. }) => {
            Err(forbidden())
        }
        Err(error) => Err(error.into()),
    }
}
