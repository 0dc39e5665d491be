//! Groups, conversations and history over HTTP: membership checks on every
//! call, owner/admin rules, bulk adds for huge groups, paging.

mod api_support;

use api_support::start;
use bytes::Bytes;
use pingme_storage::{ConversationId, MessageStore, NewMessage, WatermarkStore};
use serde_json::{Value, json};

const FORBIDDEN: u64 = 10009;
const INVALID_ARGUMENT: u64 = 20006;
const NOT_FOUND: u64 = 20008;
const CONFLICT: u64 = 20009;

fn ids(page: &Value) -> Vec<u64> {
    page["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn create_a_group_and_read_it_as_members_only() {
    let api = start().await;
    let (owner, owner_token) = api.user("owner").await;
    let (bob, bob_token) = api.user("bob").await;
    let (_eve, eve_token) = api.user("eve").await;

    let created = api
        .post(
            "/v1/groups",
            Some(&owner_token),
            json!({"name": "  team  ", "members": [bob]}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["name"], "team");
    assert_eq!(created.body["owner"], owner);
    assert_eq!(created.body["member_count"], 2);
    let gid = created.body["group_id"].as_u64().unwrap();
    assert_eq!(created.body["conversation_id"], format!("g:{gid}"));

    let seen = api
        .get(&format!("/v1/groups/{gid}"), Some(&bob_token))
        .await;
    assert_eq!((seen.status, &seen.body["name"]), (200, &json!("team")));
    api.get(&format!("/v1/groups/{gid}"), Some(&eve_token))
        .await
        .assert_error(403, FORBIDDEN);
    api.get("/v1/groups/999999", Some(&eve_token))
        .await
        .assert_error(404, NOT_FOUND);
    api.get("/v1/groups/not-a-number", Some(&eve_token))
        .await
        .assert_error(400, INVALID_ARGUMENT);

    let members = api
        .get(&format!("/v1/groups/{gid}/members"), Some(&bob_token))
        .await;
    assert_eq!(members.status, 200);
    let roles: Vec<(u64, String)> = members.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_u64().unwrap(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(roles, vec![(owner, "owner".into()), (bob, "member".into())]);
    api.get(&format!("/v1/groups/{gid}/members"), Some(&eve_token))
        .await
        .assert_error(403, FORBIDDEN);

    // Bad input.
    for body in [
        json!({"name": ""}),
        json!({"name": "x".repeat(65)}),
        json!({"members": [bob]}),
        json!({"name": "t", "members": [0]}),
        json!({"name": "t", "members": "bob"}),
    ] {
        api.post("/v1/groups", Some(&owner_token), body)
            .await
            .assert_error(400, INVALID_ARGUMENT);
    }
    api.post(
        "/v1/groups",
        Some(&owner_token),
        json!({"name": "t", "members": [123456789]}),
    )
    .await
    .assert_error(404, NOT_FOUND);
    api.post("/v1/groups", None, json!({"name": "t"}))
        .await
        .assert_error(401, 10001);
}

#[tokio::test]
async fn owners_and_admins_manage_members_and_plain_members_cannot() {
    let api = start().await;
    let (owner, owner_token) = api.user("own").await;
    let (admin, admin_token) = api.user("adm").await;
    let (member, member_token) = api.user("mem").await;
    let (other, other_token) = api.user("oth").await;
    let extra = api.bulk_users("extra", 3).await;

    let gid = api
        .post(
            "/v1/groups",
            Some(&owner_token),
            json!({"name": "g", "members": [member]}),
        )
        .await
        .body["group_id"]
        .as_u64()
        .unwrap();
    let members_path = format!("/v1/groups/{gid}/members");

    // A plain member can neither add nor remove.
    api.post(
        &members_path,
        Some(&member_token),
        json!({"user_ids": [other]}),
    )
    .await
    .assert_error(403, FORBIDDEN);
    api.delete(&format!("{members_path}/{owner}"), Some(&member_token))
        .await
        .assert_error(403, FORBIDDEN);
    // A non-member neither.
    api.post(
        &members_path,
        Some(&other_token),
        json!({"user_ids": [other]}),
    )
    .await
    .assert_error(403, FORBIDDEN);

    // The owner makes an admin.
    let added = api
        .post(
            &members_path,
            Some(&owner_token),
            json!({"user_ids": [admin], "role": "admin"}),
        )
        .await;
    assert_eq!(added.status, 200, "{added:?}");
    assert_eq!(added.body["added"], 1);
    assert_eq!(added.body["member_count"], 3);

    // The admin adds members but not admins, and cannot remove the owner.
    let added = api
        .post(
            &members_path,
            Some(&admin_token),
            json!({"user_ids": extra}),
        )
        .await;
    assert_eq!((added.status, added.body["added"].as_u64()), (200, Some(3)));
    api.post(
        &members_path,
        Some(&admin_token),
        json!({"user_ids": [other], "role": "admin"}),
    )
    .await
    .assert_error(403, FORBIDDEN);
    api.delete(&format!("{members_path}/{owner}"), Some(&admin_token))
        .await
        .assert_error(403, FORBIDDEN);
    api.post(
        &members_path,
        Some(&owner_token),
        json!({"user_ids": [other], "role": "owner"}),
    )
    .await
    .assert_error(400, INVALID_ARGUMENT);
    api.post(
        &members_path,
        Some(&owner_token),
        json!({"user_ids": [other], "role": "emperor"}),
    )
    .await
    .assert_error(400, INVALID_ARGUMENT);
    api.post(
        &members_path,
        Some(&owner_token),
        json!({"user_ids": [987654321]}),
    )
    .await
    .assert_error(404, NOT_FOUND);

    // Adding someone twice adds nothing.
    let again = api
        .post(
            &members_path,
            Some(&owner_token),
            json!({"user_ids": [member]}),
        )
        .await;
    assert_eq!(again.body["added"], 0);

    // The admin removes a plain member; the member loses access.
    let removed = api
        .delete(&format!("{members_path}/{member}"), Some(&admin_token))
        .await;
    assert_eq!(removed.status, 204, "{removed:?}");
    api.get(&format!("/v1/groups/{gid}"), Some(&member_token))
        .await
        .assert_error(403, FORBIDDEN);
    api.delete(&format!("{members_path}/{member}"), Some(&admin_token))
        .await
        .assert_error(404, NOT_FOUND);

    // A second admin cannot remove the first; the owner can.
    let (admin2, admin2_token) = api.user("adm2").await;
    api.post(
        &members_path,
        Some(&owner_token),
        json!({"user_ids": [admin2], "role": "admin"}),
    )
    .await;
    api.delete(&format!("{members_path}/{admin}"), Some(&admin2_token))
        .await
        .assert_error(403, FORBIDDEN);
    assert_eq!(
        api.delete(&format!("{members_path}/{admin}"), Some(&owner_token))
            .await
            .status,
        204
    );

    // Leaving: members can, the owner cannot.
    assert_eq!(
        api.post(
            &format!("/v1/groups/{gid}/leave"),
            Some(&admin2_token),
            json!({})
        )
        .await
        .status,
        204
    );
    api.get(&members_path, Some(&admin2_token))
        .await
        .assert_error(403, FORBIDDEN);
    api.post(
        &format!("/v1/groups/{gid}/leave"),
        Some(&owner_token),
        json!({}),
    )
    .await
    .assert_error(409, CONFLICT);
    api.post(
        &format!("/v1/groups/{gid}/leave"),
        Some(&other_token),
        json!({}),
    )
    .await
    .assert_error(403, FORBIDDEN);
}

#[tokio::test]
async fn bulk_adds_take_ten_thousand_ids_and_members_page_through_them() {
    let api = start().await;
    let (owner, owner_token) = api.user("bulkowner").await;
    let users = api.bulk_users("m", 10_000).await;
    let gid = api
        .post("/v1/groups", Some(&owner_token), json!({"name": "huge"}))
        .await
        .body["group_id"]
        .as_u64()
        .unwrap();
    let path = format!("/v1/groups/{gid}/members");
    let added = api
        .post(&path, Some(&owner_token), json!({"user_ids": users}))
        .await;
    assert_eq!(added.status, 200, "{added:?}");
    assert_eq!(added.body["added"], 10_000);
    assert_eq!(added.body["member_count"], 10_001);

    let too_many: Vec<u64> = (1..=10_001).collect();
    api.post(&path, Some(&owner_token), json!({"user_ids": too_many}))
        .await
        .assert_error(400, INVALID_ARGUMENT);

    let mut seen: Vec<u64> = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .get(
                &format!("{path}?after={after}&limit=1000"),
                Some(&owner_token),
            )
            .await;
        assert_eq!(page.status, 200, "{page:?}");
        let page_ids = ids(&page.body);
        seen.extend(&page_ids);
        match page.body["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let mut expected = users.clone();
    expected.push(owner);
    expected.sort();
    assert_eq!(seen, expected);

    for bad in ["limit=0", "limit=1001", "after=x", "limit=-1"] {
        api.get(&format!("{path}?{bad}"), Some(&owner_token))
            .await
            .assert_error(400, INVALID_ARGUMENT);
    }
}

/// 100,000 members by ten bulk adds. Slow in debug builds: run with
/// `cargo test -p pingme-gateway --test api_groups -- --ignored`.
#[tokio::test]
#[ignore]
async fn a_group_grows_to_a_hundred_thousand_members() {
    let api = start().await;
    let (_owner, token) = api.user("hugeowner").await;
    let users = api.bulk_users("h", 100_000).await;
    let gid = api
        .post("/v1/groups", Some(&token), json!({"name": "stadium"}))
        .await
        .body["group_id"]
        .as_u64()
        .unwrap();
    let started = std::time::Instant::now();
    for chunk in users.chunks(10_000) {
        let a = api
            .post(
                &format!("/v1/groups/{gid}/members"),
                Some(&token),
                json!({"user_ids": chunk}),
            )
            .await;
        assert_eq!(a.status, 200, "{a:?}");
    }
    println!("100k bulk add: {:?}", started.elapsed());
    let group = api.get(&format!("/v1/groups/{gid}"), Some(&token)).await;
    assert_eq!(group.body["member_count"], 100_001);
}

async fn append(api: &api_support::TestApi, conversation: ConversationId, sender: u64, n: usize) {
    let batch: Vec<NewMessage> = (0..n)
        .map(|i| NewMessage {
            conversation,
            sender,
            sender_device: "dev-1".into(),
            client_msg_id: format!("c-{conversation}-{sender}-{i}"),
            msg_id: format!("m-{conversation}-{sender}-{i}"),
            content_type: 1,
            body: Bytes::from(format!("hello {i}")),
            server_time_ms: 1_000 + i as i64,
        })
        .collect();
    for result in api.store.append(batch).await.unwrap() {
        result.unwrap();
    }
}

#[tokio::test]
async fn history_reads_seq_pages_for_members_only() {
    let api = start().await;
    let (alice, alice_token) = api.user("alice").await;
    let (bob, bob_token) = api.user("bob").await;
    let (_eve, eve_token) = api.user("eve").await;
    let gid = api
        .post(
            "/v1/groups",
            Some(&alice_token),
            json!({"name": "chat", "members": [bob]}),
        )
        .await
        .body["group_id"]
        .as_u64()
        .unwrap();
    let group = ConversationId::Group(gid);
    append(&api, group, alice, 5).await;

    let path = format!("/v1/conversations/g:{gid}/messages");
    let page = api.get(&format!("{path}?limit=2"), Some(&bob_token)).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.body["conversation_id"], format!("g:{gid}"));
    assert_eq!(page.body["has_more"], true);
    let messages = page.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["seq"], 1);
    assert_eq!(messages[0]["sender"], alice);
    assert_eq!(messages[0]["body"], "aGVsbG8gMA=="); // base64("hello 0")
    let rest = api
        .get(&format!("{path}?after=2&limit=10"), Some(&bob_token))
        .await;
    let seqs: Vec<u64> = rest.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 4, 5]);
    assert_eq!(rest.body["has_more"], false);
    let window = api
        .get(&format!("{path}?after=1&until=3"), Some(&bob_token))
        .await;
    assert_eq!(window.body["messages"].as_array().unwrap().len(), 2);
    assert_eq!(window.body["has_more"], false);

    api.get(&path, Some(&eve_token))
        .await
        .assert_error(403, FORBIDDEN);
    for bad in ["limit=0", "limit=201", "after=5&until=3", "after=abc"] {
        api.get(&format!("{path}?{bad}"), Some(&bob_token))
            .await
            .assert_error(400, INVALID_ARGUMENT);
    }
    for bad_id in ["g:0", "dm:2:1", "x:1", "g:abc"] {
        api.get(
            &format!("/v1/conversations/{bad_id}/messages"),
            Some(&bob_token),
        )
        .await
        .assert_error(400, INVALID_ARGUMENT);
    }
    api.get(&path, None).await.assert_error(401, 10001);

    // Direct conversations: only their two users.
    let dm = ConversationId::direct(alice, bob).unwrap();
    append(&api, dm, bob, 1).await;
    let dm_path = format!("/v1/conversations/{dm}/messages");
    assert_eq!(api.get(&dm_path, Some(&alice_token)).await.status, 200);
    let dm_page = api.get(&dm_path, Some(&bob_token)).await;
    assert_eq!(dm_page.body["messages"][0]["sender"], bob);
    api.get(&dm_path, Some(&eve_token))
        .await
        .assert_error(403, FORBIDDEN);
}

#[tokio::test]
async fn conversations_list_last_seq_and_unread() {
    let api = start().await;
    let (alice, alice_token) = api.user("alice").await;
    let (bob, _bob_token) = api.user("bob").await;
    let gid = api
        .post(
            "/v1/groups",
            Some(&alice_token),
            json!({"name": "chat", "members": [bob]}),
        )
        .await
        .body["group_id"]
        .as_u64()
        .unwrap();
    let group = ConversationId::Group(gid);
    let dm = ConversationId::direct(alice, bob).unwrap();
    append(&api, group, bob, 4).await;
    append(&api, dm, bob, 2).await;
    api.store.set_read(alice, group, 3).await.unwrap();

    let list = api.get("/v1/conversations", Some(&alice_token)).await;
    assert_eq!(list.status, 200, "{list:?}");
    let mut rows: Vec<(String, u64, u64, u64)> = list.body["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["conversation_id"].as_str().unwrap().to_string(),
                c["last_seq"].as_u64().unwrap(),
                c["read_seq"].as_u64().unwrap(),
                c["unread"].as_u64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    let mut expected = vec![(dm.to_string(), 2, 0, 2), (group.to_string(), 4, 3, 1)];
    expected.sort();
    assert_eq!(rows, expected);
    assert!(list.body.get("next_after").is_none());

    // Paging by one.
    let first = api
        .get("/v1/conversations?limit=1", Some(&alice_token))
        .await;
    let after = first.body["next_after"].as_str().unwrap().to_string();
    let second = api
        .get(
            &format!("/v1/conversations?limit=1&after={after}"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(second.body["conversations"].as_array().unwrap().len(), 1);
    assert_ne!(
        second.body["conversations"][0]["conversation_id"],
        first.body["conversations"][0]["conversation_id"]
    );

    for bad in ["limit=0", "after=nope"] {
        api.get(&format!("/v1/conversations?{bad}"), Some(&alice_token))
            .await
            .assert_error(400, INVALID_ARGUMENT);
    }
}

/// Prints the rate of authenticated history reads (token check + membership
/// + one page of 50) with 32 concurrent clients for 3 s. A measurement, not
/// an assertion: `cargo test -p pingme-gateway --test api_groups -- --ignored --nocapture history_read_rate`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn history_read_rate() {
    let api = std::sync::Arc::new(start().await);
    let (alice, token) = api.user("reader").await;
    let gid = api
        .post("/v1/groups", Some(&token), json!({"name": "bench"}))
        .await
        .body["group_id"]
        .as_u64()
        .unwrap();
    append(&api, ConversationId::Group(gid), alice, 200).await;
    let path = format!("/v1/conversations/g:{gid}/messages?after=100&limit=50");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (api, token, path) = (api.clone(), token.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while std::time::Instant::now() < deadline {
                assert_eq!(api.get(&path, Some(&token)).await.status, 200);
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    println!(
        "history reads: {total} in 3 s = {:.0}/s (32 clients, 50 messages a page)",
        total as f64 / 3.0
    );
}
