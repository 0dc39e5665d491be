//! The client SDK against a real `pingme serve`: a conversation over each
//! transport (TCP, TLS, QUIC, WebSocket), and a send made while the server
//! is down that the SDK re-sends after reconnecting, stored exactly once;
//! a multi-MiB backlog that syncs over TCP, WebSocket and QUIC without the
//! reader being cut off; a QUIC session that survives its clients changing
//! address (connection migration), and reconnects that resume the TLS
//! session over QUIC and TLS.

mod e2e;

use std::time::Duration;

use e2e::{Server, dm};
use pingme_client::v1::ContentType;
use pingme_client::{
    Client, ClientConfig, Endpoint, Event, Events, HandshakeCounts, HttpApi, Trust,
};

const PASSWORD: &str = "correct horse battery";

/// A server keeping its data in `dir`, its API, and users alice and bob
/// registered there; the third value is their direct conversation.
async fn alice_and_bob(dir: &std::path::Path) -> (Server, HttpApi, String) {
    let server = Server::start(&dir.join("data")).await;
    let api = HttpApi::new(format!("http://{}", server.http));
    let alice = user(&api, "alice").await;
    let bob = user(&api, "bob").await;
    (server, api, dm(alice, bob))
}

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
    let conversation = dm(alice, bob);
    let endpoints = [
        ("tcp", Endpoint::Tcp(server.tcp)),
        ("tls", tls(&server)),
        ("quic", quic(&server)),
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
    let (mut server, api, conversation) = alice_and_bob(dir.path()).await;
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

/// Registers `name` and sends bodies of `sizes` bytes into its DM with
/// `peer` over TCP, 32 at a time; returns the conversation id.
async fn send_backlog(
    api: &HttpApi,
    server: &Server,
    name: &str,
    peer: u64,
    sizes: &[usize],
) -> String {
    use futures::StreamExt;
    let me = user(api, name).await;
    let conversation = format!("dm:{}:{}", me.min(peer), me.max(peer));
    let (sender, _events) = connect(api, name, "phone", Endpoint::Tcp(server.tcp)).await;
    let acked: Vec<u64> = futures::stream::iter(sizes.iter().enumerate())
        .map(|(i, size)| {
            let (sender, conversation) = (&sender, &conversation);
            let body = vec![b'a' + (i % 26) as u8; *size];
            async move {
                sender
                    .send(conversation, ContentType::Text, body)
                    .await
                    .unwrap()
                    .seq
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(acked.len(), sizes.len());
    sender.close();
    conversation
}

/// Issue 15, item 1: a backlog of several MiB (one DM with 200 messages of
/// 6 KiB and 20 of 60 KiB, plus four more DMs of 300 KiB each that sync
/// fetches side by side) syncs completely over TCP, WebSocket and QUIC with
/// the default limits (1 MiB outbound budget). Fetch pages are bounded by
/// bytes and the SDK keeps two fetches in flight, so a prompt reader is
/// never cut off as a slow consumer (which would show as a reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_mib_backlog_syncs_over_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let api = HttpApi::new(format!("http://{}", server.http));
    let bob = user(&api, "bob").await;
    let mut expected = std::collections::HashMap::new();
    let mut sizes = vec![6 * 1024; 200];
    sizes.extend([60 * 1024; 20]);
    let conversation = send_backlog(&api, &server, "alice", bob, &sizes).await;
    expected.insert(conversation, sizes.len() as u64);
    for name in ["carol", "dave", "erin", "frank"] {
        let conversation = send_backlog(&api, &server, name, bob, &[60 * 1024; 5]).await;
        expected.insert(conversation, 5);
    }

    let dev = || (String::from("localhost"), Trust::AcceptAnyDevCert);
    let endpoints = [
        ("tcp", Endpoint::Tcp(server.tcp)),
        (
            "ws",
            Endpoint::WebSocket {
                addr: server.http,
                url: format!("ws://{}/v1/ws", server.http),
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
    ];
    for (name, endpoint) in endpoints {
        // A new device of bob's: nothing acknowledged, the whole backlog.
        let (receiver, mut events) = connect(&api, "bob", name, endpoint).await;
        let mut got: std::collections::HashMap<String, Vec<u64>> = Default::default();
        let wait = async {
            loop {
                match events.recv().await.expect("event stream ended") {
                    Event::Message(m) => got.entry(m.conversation_id).or_default().push(m.seq),
                    Event::Synced => return,
                    Event::Reconnecting { reason, .. } => {
                        panic!("over {name}: the connection was cut during sync: {reason}")
                    }
                    Event::Closed { reason } => panic!("over {name}: client closed: {reason}"),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("over {name}: sync did not finish"));
        for (conversation, count) in &expected {
            assert_eq!(
                got.get(conversation).cloned().unwrap_or_default(),
                (1..=*count).collect::<Vec<_>>(),
                "over {name}: {conversation}"
            );
        }
        receiver.close();
    }
}

/// A TLS-terminating proxy in front of `backend`, as a deployment's front
/// proxy is in front of the HTTP API: a certificate for `localhost` signed
/// by a CA of the test's own. Returns the proxy's address and the CA's PEM.
async fn tls_front_proxy(backend: std::net::SocketAddr) -> (std::net::SocketAddr, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A failed handshake (an untrusting client) just ends here.
                let Ok(mut front) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut back) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_calls_the_api_over_https_and_checks_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let (proxy, ca_pem) = tls_front_proxy(server.http).await;
    let url = format!("https://localhost:{}", proxy.port());

    // The app's CA: register and log in over HTTPS, then chat with the token.
    let api = HttpApi::with_trust(&url, &Trust::CaPem(ca_pem.into_bytes())).unwrap();
    user(&api, "carol").await;
    let (client, _events) = connect(&api, "carol", "phone", Endpoint::Tcp(server.tcp)).await;
    client.close();

    // Mozilla's roots do not know the test's CA: refused before any
    // password is sent.
    let public = HttpApi::new(&url);
    let refused = public.login("carol", PASSWORD, "laptop").await.unwrap_err();
    assert!(
        matches!(refused, pingme_client::ClientError::Http(_)),
        "{refused:?}"
    );
    let chain = format!("{:?}", std::error::Error::source(&refused));
    assert!(
        chain.contains("certificate") || chain.contains("Certificate"),
        "{chain}"
    );
}

fn quic(server: &Server) -> Endpoint {
    Endpoint::Quic {
        addr: server.tls,
        server_name: "localhost".into(),
        trust: Trust::AcceptAnyDevCert,
    }
}

fn tls(server: &Server) -> Endpoint {
    Endpoint::Tls {
        addr: server.tls,
        server_name: "localhost".into(),
        trust: Trust::AcceptAnyDevCert,
    }
}

/// [`message`] on a session that must not be replaced: a reconnect (or a
/// second `Connected`) fails the test.
async fn message_on_the_same_session(
    events: &mut Events,
    conversation: &str,
    seq: u64,
) -> pingme_client::v1::Message {
    let wait = async {
        loop {
            match events.recv().await.expect("event stream ended") {
                Event::Message(m) if m.conversation_id == conversation && m.seq == seq => return m,
                Event::Reconnecting { reason, .. } => panic!("the session was lost: {reason}"),
                Event::Connected { .. } => panic!("a second session was opened"),
                Event::Closed { reason } => panic!("client closed: {reason}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("message not received in time")
}

/// The sum of a metric's series with `transport="quic"` on the server's
/// ops port (0 when it has none).
async fn quic_metric(server: &Server, name: &str) -> f64 {
    server
        .metrics_text()
        .await
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) && line.contains("transport=\"quic\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 16: a phone changing networks keeps its session. Alice and Bob
/// chat over QUIC; four times both move their client to a new UDP socket
/// (a new local port: to the server, a new address, and with two shards a
/// different reuseport hash each time) and chat on. Every message arrives
/// once and in order, on the one session each opened: no reconnect, no
/// second authentication (the clients see one `Connected`, the server
/// counts two QUIC connections and no QUIC disconnect). Fails if the
/// server refuses migration (the session times out and reconnects) or if
/// a migrated client's packets reach a shard that does not own its
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_session_survives_its_clients_changing_address() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api, conversation) = alice_and_bob(dir.path()).await;
    let (alice_client, mut alice_events) = connect(&api, "alice", "phone", quic(&server)).await;
    let (bob_client, mut bob_events) = connect(&api, "bob", "phone", quic(&server)).await;
    // The first `Connected` of each: later ones fail the waits below.
    for events in [&mut alice_events, &mut bob_events] {
        match events.recv().await.expect("events") {
            Event::Connected { .. } => {}
            other => panic!("expected Connected first, got {other:?}"),
        }
    }

    let mut sent: Vec<(u64, String)> = Vec::new();
    for round in 0..5 {
        if round > 0 {
            for client in [&alice_client, &bob_client] {
                let before = client.local_addr().expect("a QUIC socket");
                let after = client.rebind().unwrap().expect("rebound");
                assert_ne!(before.port(), after.port(), "a new local port");
                assert_eq!(client.local_addr(), Some(after));
            }
        }
        for i in 0..3 {
            let body = format!("alice {round}.{i}");
            let ack = alice_client
                .send(&conversation, ContentType::Text, body.clone().into_bytes())
                .await
                .unwrap();
            let got = message_on_the_same_session(&mut bob_events, &conversation, ack.seq).await;
            assert_eq!(got.body, body.as_bytes());
            sent.push((ack.seq, body));
        }
        let body = format!("bob {round}");
        let ack = bob_client
            .send(&conversation, ContentType::Text, body.clone().into_bytes())
            .await
            .unwrap();
        let got = message_on_the_same_session(&mut alice_events, &conversation, ack.seq).await;
        assert_eq!(got.body, body.as_bytes());
        sent.push((ack.seq, body));
    }

    // Nothing lost, nothing twice, in the order sent.
    let seqs: Vec<u64> = sent.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=sent.len() as u64).collect::<Vec<_>>());
    let page = bob_client.fetch(&conversation, 0, 0, 100).await.unwrap();
    let history: Vec<(u64, String)> = page
        .messages
        .iter()
        .map(|m| (m.seq, String::from_utf8_lossy(&m.body).into_owned()))
        .collect();
    assert_eq!(history, sent);
    // One session each, as the server saw it.
    assert_eq!(
        quic_metric(&server, "pingme_gateway_connections").await,
        2.0
    );
    assert_eq!(
        quic_metric(&server, "pingme_gateway_disconnects_total").await,
        0.0
    );
    alice_client.close();
    bob_client.close();
}

/// Issue 16: a reconnect of the same client resumes its TLS session (the
/// server's ticket, the client's in-memory cache) over QUIC and over TLS;
/// with the cache off, every reconnect is a full handshake again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_resumes_the_tls_session_over_quic_and_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api, conversation) = alice_and_bob(dir.path()).await;
    for (name, endpoint) in [("quic", quic(&server)), ("tls", tls(&server))] {
        for resumption in [true, false] {
            let device = format!("{name}-{resumption}");
            let login = api.login("alice", PASSWORD, &device).await.unwrap();
            let mut config = ClientConfig::new(endpoint.clone(), login.token);
            config.connect_options.tls_resumption = resumption;
            let (client, mut events) = Client::connect(config).await.unwrap();
            assert_eq!(
                client.handshakes(),
                HandshakeCounts {
                    full: 1,
                    resumed: 0
                },
                "{device}"
            );
            for round in 0..2 {
                client.reconnect().unwrap();
                let wait = async {
                    loop {
                        match events.recv().await.expect("event stream ended") {
                            Event::Connected {
                                reconnected: true, ..
                            } => return,
                            Event::Closed { reason } => panic!("client closed: {reason}"),
                            _ => {}
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(30), wait)
                    .await
                    .expect("reconnected in time");
                // The new connection carries the session on.
                client
                    .send(
                        &conversation,
                        ContentType::Text,
                        format!("{device} {round}").into_bytes(),
                    )
                    .await
                    .unwrap();
            }
            let expected = if resumption {
                HandshakeCounts {
                    full: 1,
                    resumed: 2,
                }
            } else {
                HandshakeCounts {
                    full: 3,
                    resumed: 0,
                }
            };
            assert_eq!(client.handshakes(), expected, "{device}");
            client.close();
        }
    }
}
