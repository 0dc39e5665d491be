//! The client against a fake server over real TCP: sends and acks, error
//! codes, resends with the same client_msg_id after a lost connection,
//! GoAway handling, sync paging, gap filling and dedup by seq.

mod support;

use std::time::Duration;

use pingme_client::v1::{ContentType, GoAway, GoAwayReason};
use pingme_client::{Backoff, Client, ClientConfig, ClientError, Endpoint, ErrorCode, Event};
use support::{FakeServer, USER, events_until, eventually, messages, next_event};

fn config(server: &FakeServer) -> ClientConfig {
    let mut config = ClientConfig::new(Endpoint::Tcp(server.addr), "good");
    config.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
        max_attempts: Some(50),
    };
    config
}

async fn connected(server: &FakeServer) -> (Client, pingme_client::Events) {
    let (client, mut events) = Client::connect(config(server)).await.unwrap();
    // Connected, then the (empty) initial sync completes.
    events_until(&mut events, |e| *e == Event::Synced).await;
    (client, events)
}

#[tokio::test]
async fn a_send_is_acked_with_its_server_coordinates() {
    let server = FakeServer::start().await;
    let (client, _events) = connected(&server).await;
    assert_eq!(client.user_id(), USER);
    let first = client
        .send("dm:2:7", ContentType::Text, "hi")
        .await
        .unwrap();
    let second = client
        .send("dm:2:7", ContentType::Text, "again")
        .await
        .unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(first.conversation_id, "dm:2:7");
    assert_ne!(first.client_msg_id, second.client_msg_id);
    let stored = server.with(|s| s.conversations["dm:2:7"].clone());
    assert_eq!(stored[0].client_msg_id, first.client_msg_id);
    assert_eq!(&stored[1].body[..], b"again");
}

#[tokio::test]
async fn the_servers_error_code_is_surfaced() {
    let server = FakeServer::start().await;
    let (client, _events) = connected(&server).await;
    let error = client
        .send_with_id("mine-1".into(), "g:forbidden", ContentType::Text, "x")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Forbidden));
    assert!(
        matches!(&error, ClientError::Server { client_msg_id, .. } if client_msg_id == "mine-1")
    );
    // The connection survives a request error.
    assert_eq!(
        client
            .send("g:1", ContentType::Text, "ok")
            .await
            .unwrap()
            .seq,
        1
    );

    // A rejected token fails connect with its code, and is terminal.
    let mut bad = config(&server);
    bad.token = "bad".into();
    let error = Client::connect(bad).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TokenInvalid));
    assert!(error.is_terminal());
}

#[tokio::test]
async fn a_send_whose_ack_was_lost_is_resent_with_the_same_client_msg_id() {
    let server = FakeServer::start().await;
    let (client, mut events) = connected(&server).await;
    server.with(|s| s.drop_before_ack = 1);
    let ack = client.send("g:9", ContentType::Text, "once").await.unwrap();
    assert_eq!(ack.seq, 1);
    let (seen, stored, connections) = server.with(|s| {
        (
            s.sends_seen.clone(),
            s.conversations["g:9"].len(),
            s.connections,
        )
    });
    assert_eq!(
        seen,
        vec![ack.client_msg_id.clone(), ack.client_msg_id.clone()]
    );
    assert_eq!(stored, 1, "stored once");
    assert_eq!(connections, 2);
    let seen = events_until(&mut events, |e| {
        matches!(
            e,
            Event::Connected {
                reconnected: true,
                ..
            }
        )
    })
    .await;
    assert!(seen.iter().any(|e| matches!(e, Event::Reconnecting { .. })));
}

#[tokio::test]
async fn sends_made_while_disconnected_go_out_after_reconnect() {
    let server = FakeServer::start().await;
    let (client, mut events) = connected(&server).await;
    server.kick();
    events_until(&mut events, |e| matches!(e, Event::Reconnecting { .. })).await;
    let ack = client
        .send("g:3", ContentType::Text, "later")
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    assert_eq!(server.with(|s| s.sends_seen.len()), 1);
}

#[tokio::test]
async fn go_away_replaced_stops_the_client_for_good() {
    let server = FakeServer::start().await;
    server.with(|s| {
        s.go_away_after_auth.push_back(GoAway {
            reason: GoAwayReason::Replaced as i32,
            retry_after_ms: 0,
            reconnect_to: String::new(),
            message: "signed in elsewhere".into(),
        })
    });
    let (client, mut events) = Client::connect(config(&server)).await.unwrap();
    let seen = events_until(&mut events, |e| matches!(e, Event::Closed { .. })).await;
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::GoAway(g) if g.reason() == GoAwayReason::Replaced))
    );
    assert!(!seen.iter().any(|e| matches!(e, Event::Reconnecting { .. })));
    assert!(matches!(
        client.send("g:1", ContentType::Text, "x").await,
        Err(ClientError::Closed)
    ));
    assert!(events.recv().await.is_none(), "no events after Closed");
    assert_eq!(server.with(|s| s.connections), 1);
}

#[tokio::test]
async fn go_away_shutdown_waits_and_reconnects_where_told() {
    let old = FakeServer::start().await;
    let new = FakeServer::start().await;
    old.with(|s| {
        s.go_away_after_auth.push_back(GoAway {
            reason: GoAwayReason::Shutdown as i32,
            retry_after_ms: 30,
            reconnect_to: new.addr.to_string(),
            message: "draining".into(),
        })
    });
    let (client, mut events) = Client::connect(config(&old)).await.unwrap();
    let seen = events_until(&mut events, |e| {
        matches!(
            e,
            Event::Connected {
                reconnected: true,
                ..
            }
        )
    })
    .await;
    let delay = seen.iter().find_map(|e| match e {
        Event::Reconnecting { delay, .. } => Some(*delay),
        _ => None,
    });
    assert!(
        delay.expect("a reconnect was scheduled") >= Duration::from_millis(30),
        "obeys retry_after"
    );
    client
        .send("g:1", ContentType::Text, "moved")
        .await
        .unwrap();
    assert_eq!(
        new.with(|s| s.sends_seen.len()),
        1,
        "the send went to the new gateway"
    );
    assert_eq!(old.with(|s| s.connections), 1);
}

#[tokio::test]
async fn sync_pages_bring_in_everything_missed() {
    let server = FakeServer::start().await;
    for i in 0..450 {
        server.store("g:1", 2, &format!("m{i}"));
    }
    for i in 0..3 {
        server.store("g:2", 3, &format!("n{i}"));
    }
    server.store("dm:2:7", 2, "hello");
    server.with(|s| {
        s.sync_page = 1;
        s.fetch_page = 200;
    });
    let (client, mut events) = Client::connect(config(&server)).await.unwrap();
    let seen = events_until(&mut events, |e| *e == Event::Synced).await;
    // Pages of different conversations may interleave; within each
    // conversation every seq arrives once, in order.
    let mut per_conversation: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for (conversation_id, seq) in messages(&seen) {
        per_conversation
            .entry(conversation_id)
            .or_default()
            .push(seq);
    }
    assert_eq!(per_conversation.len(), 3);
    assert_eq!(per_conversation["dm:2:7"], vec![1]);
    assert_eq!(per_conversation["g:1"], (1..=450).collect::<Vec<u64>>());
    assert_eq!(per_conversation["g:2"], vec![1, 2, 3]);
    assert_eq!(
        server.with(|s| s.syncs_seen),
        3,
        "one sync page per conversation"
    );
    assert_eq!(
        server.with(|s| s.fetches_seen.iter().filter(|f| f.0 == "g:1").count()),
        3,
        "450 messages in pages of 200"
    );
    assert_eq!(client.watermark("g:1"), 450);
    eventually(&server, |s| {
        s.delivered.get("g:1") == Some(&450) && s.delivered.get("g:2") == Some(&3)
    })
    .await;

    // Reconnecting finds nothing new: no message is handed over twice.
    server.kick();
    let seen = events_until(&mut events, |e| *e == Event::Synced).await;
    assert!(messages(&seen).is_empty(), "{seen:?}");
}

#[tokio::test]
async fn a_live_gap_is_fetched_and_duplicates_are_dropped() {
    let server = FakeServer::start().await;
    let (client, mut events) = connected(&server).await;
    let m1 = server.store("g:5", 2, "one");
    server.store("g:5", 2, "two");
    server.store("g:5", 2, "three");
    let m4 = server.store("g:5", 2, "four");
    server.deliver(m1.clone());
    server.deliver(m1);
    server.deliver(m4.clone());
    server.deliver(m4);
    let mut got = Vec::new();
    while got.len() < 4 {
        if let Event::Message(m) = next_event(&mut events).await {
            got.push(m.seq);
        }
    }
    assert_eq!(got, vec![1, 4, 2, 3]);
    assert_eq!(client.watermark("g:5"), 4);
    assert_eq!(
        server.with(|s| s.fetches_seen.clone()),
        vec![("g:5".to_string(), 1, 3)]
    );
    eventually(&server, |s| s.delivered.get("g:5") == Some(&4)).await;

    // Messages missed while disconnected come in through sync, once, even
    // when the server also pushes one of them again.
    server.kick();
    events_until(&mut events, |e| matches!(e, Event::Reconnecting { .. })).await;
    server.store("g:5", 2, "five");
    server.store("g:5", 2, "six");
    let seen = events_until(&mut events, |e| *e == Event::Synced).await;
    assert_eq!(
        messages(&seen),
        vec![("g:5".to_string(), 5), ("g:5".to_string(), 6)]
    );
    let m6 = server.with(|s| s.conversations["g:5"][5].clone());
    server.deliver(m6);
    let seven = server.store("g:5", 2, "seven");
    server.deliver(seven);
    let next = loop {
        if let Event::Message(m) = next_event(&mut events).await {
            break m.seq;
        }
    };
    assert_eq!(next, 7, "the re-pushed seq 6 was dropped");
}

#[tokio::test]
async fn watermarks_restored_from_the_application_skip_held_messages() {
    let server = FakeServer::start().await;
    for i in 0..5 {
        server.store("g:8", 2, &format!("m{i}"));
    }
    let mut config = config(&server);
    config.watermarks = vec![("g:8".to_string(), 3)];
    let (client, mut events) = Client::connect(config).await.unwrap();
    let seen = events_until(&mut events, |e| *e == Event::Synced).await;
    assert_eq!(
        messages(&seen),
        vec![("g:8".to_string(), 4), ("g:8".to_string(), 5)]
    );
    assert_eq!(client.watermarks(), vec![("g:8".to_string(), 5)]);
}
