//! Conversation routes: the caller's conversations with their last seq and
//! unread count, and a conversation's history in seq pages. Direct
//! conversations are implicit (`dm:{low}:{high}`); reading any conversation
//! requires membership.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use pingme_storage::{ConversationId, MAX_PAGE, Seq, StoredMessage, UserId};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, ApiStateExt, Caller};

/// Default and largest page of `GET /v1/conversations`.
const DEFAULT_CONVERSATION_PAGE: usize = 50;
/// Default page of history.
const DEFAULT_HISTORY_PAGE: usize = 50;
/// Largest page of history (bodies can be 64 KiB each).
pub const MAX_HISTORY_PAGE: usize = 200;

fn parse_conversation(text: &str, field: &str) -> ApiResult<ConversationId> {
    text.parse()
        .map_err(|e: pingme_storage::InvalidConversationId| {
            ApiError::invalid(format!("{field}: {e}"))
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub(super) struct ConversationView {
    conversation_id: String,
    /// Seq of the newest message (0: none yet).
    last_seq: Seq,
    /// The caller's read watermark.
    read_seq: Seq,
    /// `last_seq - read_seq`.
    unread: u64,
}

#[derive(Serialize)]
pub(super) struct ConversationPage {
    conversations: Vec<ConversationView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<String>,
}

pub(super) async fn list(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<ApiJson<ConversationPage>> {
    let limit = query.limit.unwrap_or(DEFAULT_CONVERSATION_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit: must be 1 to {MAX_PAGE}")));
    }
    let after = query
        .after
        .as_deref()
        .map(|a| parse_conversation(a, "after"))
        .transpose()?;
    let stores = state.stores();
    let ids = stores
        .conversations
        .user_conversations(caller.user, after, limit)
        .await?;
    let last = stores.messages.latest_seqs(&ids).await?;
    let marks = stores
        .watermarks
        .watermarks(caller.user, &caller.device, &ids)
        .await?;
    let next_after = (ids.len() == limit)
        .then(|| ids.last().map(ToString::to_string))
        .flatten();
    let conversations = ids
        .iter()
        .zip(last)
        .zip(marks)
        .map(|((id, last_seq), marks)| ConversationView {
            conversation_id: id.to_string(),
            last_seq,
            read_seq: marks.read,
            unread: last_seq.saturating_sub(marks.read),
        })
        .collect();
    Ok(ApiJson(ConversationPage {
        conversations,
        next_after,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    /// Messages with seq greater than this (default 0: from the start).
    #[serde(default)]
    after: Seq,
    /// Up to and including this seq (default 0: no upper bound).
    #[serde(default)]
    until: Seq,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub(super) struct MessageView {
    seq: Seq,
    msg_id: String,
    sender: UserId,
    sender_device: String,
    client_msg_id: String,
    content_type: i32,
    /// The opaque body, base64 (standard alphabet, padded).
    body: String,
    server_time_ms: i64,
}

impl From<StoredMessage> for MessageView {
    fn from(m: StoredMessage) -> Self {
        MessageView {
            seq: m.seq,
            msg_id: m.msg_id,
            sender: m.sender,
            sender_device: m.sender_device,
            client_msg_id: m.client_msg_id,
            content_type: m.content_type,
            body: BASE64.encode(&m.body),
            server_time_ms: m.server_time_ms,
        }
    }
}

#[derive(Serialize)]
pub(super) struct HistoryPage {
    conversation_id: String,
    messages: Vec<MessageView>,
    /// True if messages remain after the last one (within `until`).
    has_more: bool,
}

pub(super) async fn history(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiPath(conversation): ApiPath<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> ApiResult<ApiJson<HistoryPage>> {
    let conversation = parse_conversation(&conversation, "conversation_id")?;
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY_PAGE);
    if !(1..=MAX_HISTORY_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit: must be 1 to {MAX_HISTORY_PAGE}"
        )));
    }
    if query.until != 0 && query.until <= query.after {
        return Err(ApiError::invalid(
            "until: must be greater than after (or 0)",
        ));
    }
    if !state
        .stores()
        .conversations
        .is_member(conversation, caller.user)
        .await?
    {
        return Err(ApiError::forbidden(format!(
            "not a member of {conversation}"
        )));
    }
    // One extra message tells whether another page exists.
    let mut messages = state
        .stores()
        .messages
        .messages(conversation, query.after, query.until, limit + 1)
        .await?;
    let has_more = messages.len() > limit;
    messages.truncate(limit);
    Ok(ApiJson(HistoryPage {
        conversation_id: conversation.to_string(),
        messages: messages.into_iter().map(MessageView::from).collect(),
        has_more,
    }))
}
