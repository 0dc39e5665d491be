//! The client SDK against a real `pingme serve`: a conversation over each
//! transport (TCP, TLS, QUIC, WebSocket), and a send made while the server
//! is down that the SDK re-sends after reconnecting, stored exactly once.

mod e2e;

use std::time::Duration;

use e2e::Server;
use pingme_client::v1::ContentType;
use pingme_client::{Client, ClientConfig, Endpoint, Event, Events, HttpApi, Trust};

const PASSWORD: &str = "correct horse battery";

async fn user(api: &HttpApi, name: &str) -> u64 {
    api.register(name, PASSWORD).await.unwrap()
}

async fn connect(api: &HttpApi, name: &str, device: &str, endpoint: Endpoint) -> (Client, Events) {
    let login = api.login(name, PASSWORD, device).await.unwrap();
    Client::connect(ClientConfig::new(endpoint, login.token))
        .await
        .unwrap()
}

/// Waits for the message with `seq` in `conversation`, skipping other events.
async fn message(events: &mut Events, conversation: &str, seq: u64) -> pingme_client::v1::Message {
    let wait = async {
        loop {
            match events.recv().await.expect("event stream ended") {
                Event::Message(m) if m.conversation_id == conversation && m.seq == seq => return m,
                Event::Closed { reason } => panic!("client closed: {reason}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), wait)
        .await
        .expect("message not received in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_chats_over_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let api = HttpApi::new(format!("http://{}", server.http));
    let alice = user(&api, "alice").await;
    let bob = user(&api, "bob").await;
    let conversation = format!("dm:{}:{}", alice.min(bob), alice.max(bob));
    let dev = || (String::from("localhost"), Trust::AcceptAnyDevCert);
    let endpoints = [
        ("tcp", Endpoint::Tcp(server.tcp)),
        (
            "tls",
            Endpoint::Tls {
                addr: server.tls,
                server_name: dev().0,
                trust: dev().1,
            },
        ),
        (
            "quic",
            Endpoint::Quic {
                addr: server.tls,
                server_name: dev().0,
                trust: dev().1,
            },
        ),
        (
            "ws",
            Endpoint::WebSocket {
                addr: server.http,
                url: format!("ws://{}/v1/ws", server.http),
            },
        ),
    ];
    for (name, endpoint) in endpoints {
        let (sender, _sender_events) = connect(&api, "alice", name, endpoint.clone()).await;
        let (receiver, mut receiver_events) = connect(&api, "bob", name, endpoint).await;
        let text = format!("hello over {name}");
        let ack = sender
            .send(&conversation, ContentType::Text, text.clone().into_bytes())
            .await
            .unwrap();
        let got = message(&mut receiver_events, &conversation, ack.seq).await;
        assert_eq!(
            (got.sender_id, &got.body[..]),
            (alice, text.as_bytes()),
            "over {name}"
        );
        sender.close();
        receiver.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_made_while_the_server_is_down_is_stored_once_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data")).await;
    let api = HttpApi::new(format!("http://{}", server.http));
    let alice = user(&api, "alice").await;
    let bob = user(&api, "bob").await;
    let conversation = format!("dm:{}:{}", alice.min(bob), alice.max(bob));
    let (sender, _events) = connect(&api, "alice", "phone", Endpoint::Tcp(server.tcp)).await;

    server.kill();
    let pending = {
        let (sender, conversation) = (sender.clone(), conversation.clone());
        tokio::spawn(async move {
            sender
                .send_with_id(
                    "made-while-down".into(),
                    &conversation,
                    ContentType::Text,
                    &b"patience"[..],
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await;
    let ack = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ack.seq, 1);
    // An application retrying with the same id gets the same ack.
    let again = sender
        .send_with_id(
            "made-while-down".into(),
            &conversation,
            ContentType::Text,
            &b"patience"[..],
        )
        .await
        .unwrap();
    assert_eq!(again, ack);

    let (_receiver, mut events) = connect(&api, "bob", "phone", Endpoint::Tcp(server.tcp)).await;
    let got = message(&mut events, &conversation, 1).await;
    assert_eq!(got.client_msg_id, "made-while-down");
    let next = sender
        .send(&conversation, ContentType::Text, &b"after"[..])
        .await
        .unwrap();
    assert_eq!(next.seq, 2, "the retried send took exactly one seq");
}
