//! Who may see whose presence: a user's online state and last-seen are shown
//! only to users who share a conversation with them (a direct conversation
//! with at least one message, since the implicit `dm:{a}:{b}` of two
//! strangers does not count, or a group both belong to) and to the user
//! themself. Everyone else is answered exactly like an unknown id (offline,
//! never seen), so a query learns nothing about strangers, not even whether
//! they exist. The directory says where users are; this says who may know.

use std::collections::HashSet;

use pingme_storage::{ConversationId, MAX_PAGE, StoreError, UserId};

use crate::pipeline::PipelineContext;

/// Pages of the asker's conversations read looking for shared groups.
const ASKER_CONVERSATION_PAGES: usize = 4;
/// Up to this many asker groups, each queried user is checked against each
/// group; above it, each queried user's own conversations are listed once.
const GROUPS_CHECKED_ONE_BY_ONE: usize = 32;

/// Which of `users` share a conversation with `asker` (the asker included).
pub(crate) async fn visible_to(
    ctx: &PipelineContext,
    asker: UserId,
    users: &[UserId],
) -> Result<HashSet<UserId>, StoreError> {
    let mut visible = HashSet::new();
    let mut others: Vec<UserId> = Vec::new();
    for user in users {
        if *user == asker {
            visible.insert(asker);
        } else if !others.contains(user) {
            others.push(*user);
        }
    }
    // Direct conversations that have a message.
    let (dms, with_dm): (Vec<ConversationId>, Vec<UserId>) = others
        .iter()
        .filter_map(|user| ConversationId::direct(asker, *user).map(|dm| (dm, *user)))
        .unzip();
    let latest = ctx.stores.messages.latest_seqs(&dms).await?;
    for (user, latest) in with_dm.iter().zip(latest) {
        if latest > 0 {
            visible.insert(*user);
        }
    }
    let unresolved: Vec<UserId> = with_dm
        .into_iter()
        .filter(|user| !visible.contains(user))
        .collect();
    if unresolved.is_empty() {
        return Ok(visible);
    }
    let groups = groups_of(ctx, asker).await?;
    if groups.is_empty() {
        return Ok(visible);
    }
    for user in unresolved {
        let shares = if groups.len() <= GROUPS_CHECKED_ONE_BY_ONE {
            let mut shares = false;
            for group in &groups {
                if ctx.stores.conversations.is_member(*group, user).await? {
                    shares = true;
                    break;
                }
            }
            shares
        } else {
            groups_of(ctx, user)
                .await?
                .iter()
                .any(|group| groups.contains(group))
        };
        if shares {
            visible.insert(user);
        }
    }
    Ok(visible)
}

/// The group conversations of `user` (the first pages of them).
async fn groups_of(ctx: &PipelineContext, user: UserId) -> Result<Vec<ConversationId>, StoreError> {
    let mut groups = Vec::new();
    let mut cursor = None;
    for _ in 0..ASKER_CONVERSATION_PAGES {
        let page = ctx
            .stores
            .conversations
            .user_conversations(user, cursor, MAX_PAGE)
            .await?;
        cursor = page.last().copied();
        groups.extend(
            page.iter()
                .filter(|c| matches!(c, ConversationId::Group(_)))
                .copied(),
        );
        if page.len() < MAX_PAGE {
            break;
        }
    }
    Ok(groups)
}
