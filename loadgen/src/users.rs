//! Where the load generator's users come from: registered and logged in
//! through the HTTP API before connecting (bounded concurrency), or read
//! from a file of pre-provisioned tokens (`user_id token` per line; line i
//! is user i, so `--shard` slices the file like it slices registration).

use std::io::BufRead;
use std::ops::Range;

use futures::StreamExt;
use pingme_client::{ErrorCode, Group, HttpApi};

/// One user the load generator connects as.
#[derive(Debug, Clone)]
pub struct User {
    /// Server-assigned id.
    pub user_id: u64,
    /// Access token for `Authenticate`.
    pub token: String,
}

/// Registers (or finds already registered) and logs in users
/// `{prefix}{i}` for every i in `range`, `concurrency` requests at a time.
pub async fn register_and_login(
    api: &HttpApi,
    prefix: &str,
    password: &str,
    range: Range<u64>,
    concurrency: usize,
) -> anyhow::Result<Vec<User>> {
    let results: Vec<anyhow::Result<User>> = futures::stream::iter(range)
        .map(|i| async move {
            let username = format!("{prefix}{i}");
            match api.register(&username, password).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::UsernameTaken) => {}
                Err(e) => return Err(anyhow::anyhow!("register {username}: {e}")),
            }
            let login = api
                .login(&username, password, "loadgen")
                .await
                .map_err(|e| anyhow::anyhow!("login {username}: {e}"))?;
            Ok(User {
                user_id: login.user_id,
                token: login.token,
            })
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// Most user ids one API call takes (create or bulk add).
const MEMBERS_PER_CALL: usize = 10_000;

/// A new group owned by the first of `users` with all of them as members,
/// added in bulk pages.
pub async fn create_group(api: &HttpApi, name: &str, users: &[User]) -> anyhow::Result<Group> {
    let (owner, members) = users
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("a group needs at least its owner"))?;
    let ids: Vec<u64> = members.iter().map(|u| u.user_id).collect();
    let mut pages = ids.chunks(MEMBERS_PER_CALL);
    let mut group = api
        .create_group(&owner.token, name, pages.next().unwrap_or_default())
        .await
        .map_err(|e| anyhow::anyhow!("create group {name}: {e}"))?;
    for page in pages {
        group.member_count = api
            .add_members(&owner.token, group.group_id, page)
            .await
            .map_err(|e| anyhow::anyhow!("add members to {}: {e}", group.conversation_id))?;
    }
    Ok(group)
}

/// Reads the users of `range` from a tokens file, line by line: only the
/// shard's own lines are kept (a million-user file is ~250 MB, and fifty
/// shards reading it whole at once would hold it fifty times).
pub fn from_tokens_file(input: impl BufRead, range: Range<u64>) -> anyhow::Result<Vec<User>> {
    let mut users = Vec::with_capacity((range.end - range.start) as usize);
    let mut index = 0u64;
    for line in input.lines() {
        if index >= range.end {
            break;
        }
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if index >= range.start {
            let (id, token) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| anyhow::anyhow!("tokens line {line:?} is not `user_id token`"))?;
            users.push(User {
                user_id: id.parse()?,
                token: token.trim().to_string(),
            });
        }
        index += 1;
    }
    if index < range.end {
        anyhow::bail!(
            "the tokens file has {index} users, the run needs {}",
            range.end
        );
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_reads_its_lines_of_the_tokens_file() {
        let file = "# users\n1 tok-a\n2 tok-b\n\n3 tok-c\n4 tok-d\n";
        let users = from_tokens_file(file.as_bytes(), 1..3).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!((users[0].user_id, users[0].token.as_str()), (2, "tok-b"));
        assert_eq!((users[1].user_id, users[1].token.as_str()), (3, "tok-c"));
        assert!(from_tokens_file(file.as_bytes(), 0..5).is_err());
        assert!(from_tokens_file("x".as_bytes(), 0..1).is_err());
    }
}
