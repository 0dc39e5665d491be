//! A 10,000-member group with every member online receives a burst in
//! order, over real sockets against a real `pingme serve`, while a
//! one-to-one conversation keeps being served.

mod e2e;

use std::sync::Arc;

use e2e::{Conn, Server};
use futures::StreamExt;
use futures::stream;
use serde_json::json;

const MEMBERS: usize = 10_000;
const BURST: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_online_members_get_a_burst_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let http = Arc::new(server.http());
    let (_owner, owner_token) = http.user("owner", "phone").await;

    let members: Vec<(u64, String)> = stream::iter(0..MEMBERS)
        .map(|i| {
            let http = http.clone();
            async move { http.user(&format!("member{i}"), "phone").await }
        })
        // In order: members[i] is "member{i}".
        .buffered(64)
        .collect()
        .await;
    let group = http.group(&owner_token, "everyone", &[]).await;
    let group_id: u64 = group.trim_start_matches("g:").parse().unwrap();
    for page in members.chunks(5_000) {
        let ids: Vec<u64> = page.iter().map(|(id, _)| *id).collect();
        let (status, body) = http
            .post(
                &format!("/v1/groups/{group_id}/members"),
                Some(&owner_token),
                json!({"user_ids": ids}),
            )
            .await;
        assert_eq!(status, 200, "bulk add: {body}");
    }

    let tcp = server.tcp;
    let mut connections: Vec<Conn> = stream::iter(members.iter().map(|(_, token)| token.clone()))
        .map(|token| async move { Conn::connect(tcp, &token).await })
        .buffer_unordered(256)
        .collect()
        .await;

    let mut owner = Conn::connect(tcp, &owner_token).await;
    for seq in 1..=BURST {
        assert_eq!(
            owner
                .send(&group, &format!("burst-{seq}"), "to everyone")
                .await
                .unwrap()
                .seq,
            seq
        );
    }
    // A one-to-one conversation is still served while the fanout runs.
    // (From a second device: a new login of the same device would replace
    // member 0's connection.)
    let (a, b) = (members[0].0, members[1].0);
    let (_, laptop) = http.login("member0", "laptop").await;
    let mut side = Conn::connect(tcp, &laptop).await;
    let dm = format!("dm:{}:{}", a.min(b), a.max(b));
    assert_eq!(side.send(&dm, "side", "still here").await.unwrap().seq, 1);

    let received: Vec<Vec<u64>> = stream::iter(connections.iter_mut())
        .map(|conn| {
            let group = group.clone();
            async move {
                let mut seqs = Vec::new();
                while seqs.len() < BURST as usize {
                    let message = conn.deliver().await;
                    if message.conversation_id == group {
                        seqs.push(message.seq);
                    }
                }
                seqs
            }
        })
        .buffer_unordered(MEMBERS)
        .collect()
        .await;
    let expected: Vec<u64> = (1..=BURST).collect();
    assert_eq!(received.len(), MEMBERS);
    assert!(
        received.iter().all(|seqs| *seqs == expected),
        "every member got every message once, in order"
    );
}
