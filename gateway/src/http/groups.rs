//! Group routes: create, read, members (paged), bulk add, remove, leave.
//! Every call checks the caller's membership; changing membership needs
//! the owner or an admin, and only the owner manages admins. Huge groups
//! grow through repeated bulk adds of up to [`MAX_BULK_MEMBERS`] ids, which
//! reach the store in pages of [`pingme_storage::MAX_PAGE`].

use axum::http::StatusCode;
use pingme_protocol::ErrorCode;
use pingme_storage::{ConversationId, GroupId, GroupRecord, MAX_PAGE, Member, Role, UserId};
use serde::{Deserialize, Serialize};

use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, ApiState, ApiStateExt, Caller, now_ms,
};

/// Most user ids one create or bulk-add request may carry.
pub const MAX_BULK_MEMBERS: usize = 10_000;
/// Longest group name, in characters.
pub const MAX_GROUP_NAME_CHARS: usize = 64;
/// Default and largest page of `GET /v1/groups/{id}/members`.
const DEFAULT_MEMBER_PAGE: usize = 100;

#[derive(Serialize)]
pub(super) struct GroupView {
    group_id: GroupId,
    conversation_id: String,
    name: String,
    owner: UserId,
    member_count: u64,
    created_ms: i64,
}

impl From<GroupRecord> for GroupView {
    fn from(g: GroupRecord) -> Self {
        GroupView {
            conversation_id: ConversationId::Group(g.id).to_string(),
            group_id: g.id,
            name: g.name,
            owner: g.owner,
            member_count: g.member_count,
            created_ms: g.created_ms,
        }
    }
}

/// The caller's role in the group: `NOT_FOUND` if there is no such group,
/// `FORBIDDEN` if the caller is not a member.
async fn role_of(state: &ApiState, group: GroupId, user: UserId) -> ApiResult<Role> {
    if let Some(role) = state
        .stores()
        .conversations
        .member_role(group, user)
        .await?
    {
        return Ok(role);
    }
    match state.stores().conversations.group(group).await? {
        Some(_) => Err(ApiError::forbidden(format!("not a member of g:{group}"))),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no group g:{group}"),
        )),
    }
}

fn check_member_ids(ids: &[UserId], field: &str) -> ApiResult<()> {
    if ids.len() > MAX_BULK_MEMBERS {
        return Err(ApiError::invalid(format!(
            "{field}: at most {MAX_BULK_MEMBERS} user ids per request"
        )));
    }
    if ids.contains(&0) {
        return Err(ApiError::invalid(format!(
            "{field}: user id 0 does not exist"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateGroupRequest {
    name: String,
    #[serde(default)]
    members: Vec<UserId>,
}

pub(super) async fn create(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<CreateGroupRequest>,
) -> ApiResult<(StatusCode, ApiJson<GroupView>)> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > MAX_GROUP_NAME_CHARS {
        return Err(ApiError::invalid(format!(
            "name: must be 1 to {MAX_GROUP_NAME_CHARS} characters"
        )));
    }
    check_member_ids(&req.members, "members")?;
    // The first page goes in with the group; the rest as bulk adds, so the
    // store never sees more than one page per call.
    let (first, rest) = req.members.split_at(req.members.len().min(MAX_PAGE));
    let mut group = state
        .stores()
        .conversations
        .create_group(caller.user, name, first, now_ms())
        .await?;
    if !rest.is_empty() {
        add_in_pages(&state, group.id, rest, Role::Member).await?;
        if let Some(updated) = state.stores().conversations.group(group.id).await? {
            group = updated;
        }
    }
    tracing::info!(
        group = group.id,
        owner = caller.user,
        members = group.member_count,
        "group created"
    );
    Ok((StatusCode::CREATED, ApiJson(group.into())))
}

pub(super) async fn get(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiPath(group_id): ApiPath<GroupId>,
) -> ApiResult<ApiJson<GroupView>> {
    role_of(&state, group_id, caller.user).await?;
    let group = state
        .stores()
        .conversations
        .group(group_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no group g:{group_id}")))?;
    Ok(ApiJson(group.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MembersQuery {
    #[serde(default)]
    after: UserId,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub(super) struct MemberView {
    user_id: UserId,
    role: Role,
}

#[derive(Serialize)]
pub(super) struct MembersPage {
    members: Vec<MemberView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<UserId>,
}

pub(super) async fn members(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiPath(group_id): ApiPath<GroupId>,
    ApiQuery(query): ApiQuery<MembersQuery>,
) -> ApiResult<ApiJson<MembersPage>> {
    let limit = query.limit.unwrap_or(DEFAULT_MEMBER_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit: must be 1 to {MAX_PAGE}")));
    }
    role_of(&state, group_id, caller.user).await?;
    let page = state
        .stores()
        .conversations
        .members_page(group_id, query.after, limit)
        .await?;
    let next_after = (page.len() == limit)
        .then(|| page.last().map(|m| m.user))
        .flatten();
    Ok(ApiJson(MembersPage {
        members: page
            .into_iter()
            .map(|m| MemberView {
                user_id: m.user,
                role: m.role,
            })
            .collect(),
        next_after,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddMembersRequest {
    user_ids: Vec<UserId>,
    /// `member` (default) or `admin` (owner only).
    #[serde(default = "default_role")]
    role: Role,
}

fn default_role() -> Role {
    Role::Member
}

#[derive(Serialize)]
pub(super) struct AddMembersResponse {
    /// How many of the ids were not members before.
    added: u64,
    /// The group's member count afterwards.
    member_count: u64,
}

async fn add_in_pages(
    state: &ApiState,
    group: GroupId,
    users: &[UserId],
    role: Role,
) -> ApiResult<u64> {
    let mut added = 0;
    for page in users.chunks(MAX_PAGE) {
        let members: Vec<Member> = page.iter().map(|&user| Member { user, role }).collect();
        added += state
            .stores()
            .conversations
            .add_members(group, &members)
            .await?;
    }
    Ok(added)
}

pub(super) async fn add_members(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiPath(group_id): ApiPath<GroupId>,
    ApiJson(req): ApiJson<AddMembersRequest>,
) -> ApiResult<ApiJson<AddMembersResponse>> {
    check_member_ids(&req.user_ids, "user_ids")?;
    let caller_role = role_of(&state, group_id, caller.user).await?;
    match (caller_role, req.role) {
        (_, Role::Owner) => return Err(ApiError::invalid("role: must be member or admin")),
        (Role::Member, _) => {
            return Err(ApiError::forbidden(
                "only the owner or an admin can add members",
            ));
        }
        (Role::Admin, Role::Admin) => {
            return Err(ApiError::forbidden("only the owner can add admins"));
        }
        _ => {}
    }
    let added = add_in_pages(&state, group_id, &req.user_ids, req.role).await?;
    let member_count = state
        .stores()
        .conversations
        .group(group_id)
        .await?
        .map_or(0, |g| g.member_count);
    Ok(ApiJson(AddMembersResponse {
        added,
        member_count,
    }))
}

pub(super) async fn remove_member(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiPath((group_id, user_id)): ApiPath<(GroupId, UserId)>,
) -> ApiResult<StatusCode> {
    let caller_role = role_of(&state, group_id, caller.user).await?;
    if user_id == caller.user {
        return leave_group(&state, group_id, caller.user, caller_role).await;
    }
    if caller_role == Role::Member {
        return Err(ApiError::forbidden(
            "only the owner or an admin can remove members",
        ));
    }
    let target_role = state
        .stores()
        .conversations
        .member_role(group_id, user_id)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("user {user_id} is not a member of g:{group_id}"),
            )
        })?;
    match (caller_role, target_role) {
        (_, Role::Owner) => return Err(ApiError::forbidden("the owner cannot be removed")),
        (Role::Admin, Role::Admin) => {
            return Err(ApiError::forbidden("only the owner can remove admins"));
        }
        _ => {}
    }
    state
        .stores()
        .conversations
        .remove_member(group_id, user_id)
        .await?;
    tracing::info!(
        group = group_id,
        user = user_id,
        by = caller.user,
        "member removed"
    );
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn leave(
    state: ApiStateExt,
    Caller(caller): Caller,
    ApiPath(group_id): ApiPath<GroupId>,
) -> ApiResult<StatusCode> {
    let role = role_of(&state, group_id, caller.user).await?;
    leave_group(&state, group_id, caller.user, role).await
}

async fn leave_group(
    state: &ApiState,
    group: GroupId,
    user: UserId,
    role: Role,
) -> ApiResult<StatusCode> {
    if role == Role::Owner {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the owner cannot leave the group",
        ));
    }
    state
        .stores()
        .conversations
        .remove_member(group, user)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
