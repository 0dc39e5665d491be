//! Requests answered on the node that received them: read markers (with
//! receipts), typing, sync, fetch and presence queries. Each one that names a
//! conversation is checked for membership first; a non-member gets
//! `FORBIDDEN` and nothing else. Receipts and typing reach the other
//! members' connected devices only, and are not relayed in groups above
//! the large-group threshold.

use bytes::Bytes;
use pingme_protocol::ErrorCode;
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_storage::{ConversationId, Seq, UserId};
use prost::Message as _;

use crate::bus::conversation_key;
use crate::config::PAGE_OVERHEAD_BYTES;
use crate::fanout::all_members;
use crate::membership::{RequestError, member_conversation};
use crate::pipeline::{Outgoing, PipelineContext};
use crate::port::SessionInfo;
use crate::wire::{error_frame, frame, wire_message};
use crate::{visibility, watermarks};

/// Store pages one `SyncRequest` may scan looking for conversations with
/// news, so a user with thousands of quiet conversations cannot make one
/// request unbounded (the answer then has `has_more` and a cursor).
const SYNC_SCAN_PAGES: usize = 4;

/// Handles one request and answers its connection.
pub(crate) async fn handle(
    ctx: &PipelineContext,
    session: &SessionInfo,
    request_id: u64,
    body: client_frame::Body,
) {
    let answer = match body {
        client_frame::Body::ReadMarker(marker) => {
            read_marker(ctx, session, marker).await.map(|()| None)
        }
        client_frame::Body::Typing(typing) => {
            typing_event(ctx, session, typing).await.map(|()| None)
        }
        client_frame::Body::Sync(request) => sync(ctx, session, request).await.map(Some),
        client_frame::Body::PresenceQuery(query) => presence(ctx, session, query).await.map(Some),
        client_frame::Body::Fetch(request) => fetch(ctx, session, request).await.map(Some),
        _ => Err(RequestError::new(
            ErrorCode::UnexpectedMessage,
            "not a request the router answers",
        )),
    };
    let reply = match answer {
        Ok(None) => return,
        Ok(Some(body)) => frame(request_id, body),
        Err(error) => {
            crate::telemetry::failed(error.code, 1);
            error_frame(request_id, error.code, error.message, "")
        }
    };
    ctx.outbox.to_connection(session.conn, reply);
}

/// Presence and last-seen of the users asked about, from the directory
/// (any gateway), for those who share a conversation with the asker; the
/// others answer like unknown ids. The count was bounded at ingress.
async fn presence(
    ctx: &PipelineContext,
    session: &SessionInfo,
    query: v1::PresenceQuery,
) -> Result<server_frame::Body, RequestError> {
    let visible = visibility::visible_to(ctx, session.user, &query.user_ids).await?;
    let shown: Vec<UserId> = query
        .user_ids
        .iter()
        .copied()
        .filter(|user| visible.contains(user))
        .collect();
    let presence =
        ctx.directory.presence(&shown).await.map_err(|error| {
            RequestError::new(ErrorCode::DirectoryUnavailable, error.to_string())
        })?;
    let mut presence = shown.into_iter().zip(presence);
    let mut next = presence.next();
    let users = query
        .user_ids
        .iter()
        .map(|user| {
            let (online, last_seen_ms) = match &next {
                Some((shown, found)) if shown == user => {
                    let answer = (found.online, found.last_seen_ms);
                    next = presence.next();
                    answer
                }
                _ => (false, 0),
            };
            v1::PresenceEvent {
                user_id: *user,
                online,
                last_seen_ms,
            }
        })
        .collect();
    Ok(server_frame::Body::PresenceList(v1::PresenceList { users }))
}

/// A client-given seq, never beyond the conversation's latest (a watermark
/// ahead of the timeline would hide future messages from sync).
async fn clamp_seq(
    ctx: &PipelineContext,
    conversation: ConversationId,
    seq: Seq,
) -> Result<Seq, RequestError> {
    let latest = ctx.stores.messages.latest_seqs(&[conversation]).await?;
    Ok(seq.min(latest.first().copied().unwrap_or(0)))
}

/// The other members of a conversation that get receipts and typing, or
/// `None` for groups above the large-group threshold.
async fn others(
    ctx: &PipelineContext,
    conversation: ConversationId,
    user: UserId,
) -> Result<Option<Vec<UserId>>, RequestError> {
    let members = match conversation {
        ConversationId::Direct { low, high } => vec![low, high],
        ConversationId::Group(group) => {
            let record = ctx.stores.conversations.group(group).await?;
            match record {
                Some(record) if record.member_count <= ctx.config.large_group_threshold => {
                    all_members(ctx, group).await?
                }
                _ => return Ok(None),
            }
        }
    };
    Ok(Some(members.into_iter().filter(|m| *m != user).collect()))
}

async fn relay(
    ctx: &PipelineContext,
    conversation: ConversationId,
    users: &[UserId],
    frame: Bytes,
) -> Result<(), RequestError> {
    let out = Outgoing::default();
    let relayed = ctx
        .to_users(
            users,
            &frame,
            None,
            conversation_key(&conversation),
            0,
            false,
            &out,
        )
        .await;
    ctx.hand_over(&out);
    relayed
        .map(|_| ())
        .map_err(|e| RequestError::new(ErrorCode::Internal, e))
}

async fn read_marker(
    ctx: &PipelineContext,
    session: &SessionInfo,
    marker: v1::ReadMarker,
) -> Result<(), RequestError> {
    let conversation = member_conversation(ctx, &marker.conversation_id, session.user).await?;
    let seq = clamp_seq(ctx, conversation, marker.seq).await?;
    ctx.stores
        .watermarks
        .set_read(session.user, conversation, seq)
        .await?;
    let Some(others) = others(ctx, conversation, session.user).await? else {
        return Ok(());
    };
    let receipt = frame(
        0,
        server_frame::Body::ReadReceipt(v1::ReadReceipt {
            conversation_id: conversation.to_string(),
            user_id: session.user,
            seq,
        }),
    );
    relay(ctx, conversation, &others, receipt).await
}

async fn typing_event(
    ctx: &PipelineContext,
    session: &SessionInfo,
    typing: v1::Typing,
) -> Result<(), RequestError> {
    let conversation = member_conversation(ctx, &typing.conversation_id, session.user).await?;
    let Some(others) = others(ctx, conversation, session.user).await? else {
        return Ok(());
    };
    let event = frame(
        0,
        server_frame::Body::Typing(v1::TypingEvent {
            conversation_id: conversation.to_string(),
            user_id: session.user,
            active: typing.active,
        }),
    );
    relay(ctx, conversation, &others, event).await
}

async fn sync(
    ctx: &PipelineContext,
    session: &SessionInfo,
    request: v1::SyncRequest,
) -> Result<server_frame::Body, RequestError> {
    // The device's own acks of the current window count for its sync.
    watermarks::write(
        ctx,
        ctx.delivered_acks
            .take_device(session.user, &session.device),
    )
    .await;
    let limit = match request.limit as usize {
        0 => ctx.config.sync_page_max,
        asked => asked.min(ctx.config.sync_page_max),
    };
    let mut cursor = if request.after_conversation_id.is_empty() {
        None
    } else {
        Some(
            request
                .after_conversation_id
                .parse::<ConversationId>()
                .map_err(|e| RequestError::new(ErrorCode::InvalidArgument, e.to_string()))?,
        )
    };
    let mut states = Vec::new();
    let mut has_more = true;
    let mut scanned = 0;
    while states.len() < limit && has_more && scanned < SYNC_SCAN_PAGES {
        scanned += 1;
        let page = ctx
            .stores
            .conversations
            .user_conversations(session.user, cursor, limit)
            .await?;
        has_more = page.len() >= limit;
        if page.is_empty() {
            break;
        }
        let latest = ctx.stores.messages.latest_seqs(&page).await?;
        let marks = ctx
            .stores
            .watermarks
            .watermarks(session.user, &session.device, &page)
            .await?;
        for (i, conversation) in page.iter().enumerate() {
            cursor = Some(*conversation);
            let latest = latest.get(i).copied().unwrap_or(0);
            let marks = marks.get(i).copied().unwrap_or_default();
            if latest > marks.delivered {
                states.push(v1::ConversationState {
                    conversation_id: conversation.to_string(),
                    latest_seq: latest,
                    delivered_seq: marks.delivered,
                    read_seq: marks.read,
                });
            }
            if states.len() == limit {
                has_more |= i + 1 < page.len();
                break;
            }
        }
    }
    Ok(server_frame::Body::Sync(v1::SyncResponse {
        conversations: states,
        has_more,
        next_after_conversation_id: cursor.map(|c| c.to_string()).unwrap_or_default(),
    }))
}

async fn fetch(
    ctx: &PipelineContext,
    session: &SessionInfo,
    request: v1::FetchMessages,
) -> Result<server_frame::Body, RequestError> {
    let conversation = member_conversation(ctx, &request.conversation_id, session.user).await?;
    let limit = match request.limit as usize {
        0 => ctx.config.fetch_page_max,
        asked => asked.min(ctx.config.fetch_page_max),
    };
    // One more than the page, to know whether more remain.
    let stored = ctx
        .stores
        .messages
        .messages(
            conversation,
            request.after_seq,
            request.until_seq,
            limit + 1,
        )
        .await?;
    let mut has_more = stored.len() > limit;
    // Bounded by bytes too: a page must fit the connection's outbound
    // budget (see `RouterConfig::fetch_page_max_bytes`); the first message
    // always goes in, and the configuration guarantees it fits.
    let budget = ctx.config.fetch_page_max_bytes - PAGE_OVERHEAD_BYTES;
    let mut used = 0;
    let mut messages = Vec::new();
    for message in stored.iter().take(limit) {
        let wire = wire_message(message);
        // Field tag, length varint, message.
        let size = wire.encoded_len() + 1 + prost::length_delimiter_len(wire.encoded_len());
        if used + size > budget && !messages.is_empty() {
            has_more = true;
            break;
        }
        used += size;
        messages.push(wire);
    }
    Ok(server_frame::Body::Page(v1::MessagePage {
        conversation_id: conversation.to_string(),
        messages,
        has_more,
    }))
}
