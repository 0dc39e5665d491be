//! The connection side's metrics, read back through a Prometheus recorder
//! (its own test binary: the recorder is process-global).

mod common;

use std::sync::OnceLock;

use common::{Harness, Kind, limits};
use metrics_exporter_prometheus::PrometheusHandle;
use pingme_gateway::SessionLimits;

/// The process's recorder, installed by the first test that asks.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("first recorder");
        handle
    })
}

/// Held by the tests that read the QUIC counters, which they share: one
/// at a time, so each sees only its own connections counted.
static QUIC_COUNTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A shard as under handshake load: every client that has not proven its
/// address is sent a Retry first.
fn retry_unproven_addresses() -> SessionLimits {
    SessionLimits {
        quic_handshakes_before_retry: 0,
        ..limits()
    }
}

/// New QUIC connection attempts with this `outcome` so far.
fn quic_incoming(handle: &PrometheusHandle, outcome: &str) -> f64 {
    series(
        handle,
        &format!("pingme_gateway_quic_incoming_total{{outcome=\"{outcome}\"}}"),
    )
}

/// The value of one series (`name{labels}`), 0 if absent.
fn series(handle: &PrometheusHandle, series: &str) -> f64 {
    handle
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn sessions_frames_and_disconnect_reasons_are_counted() {
    let handle = recorder();

    let harness = Harness::start(limits(), 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    client.login(1, "d").await;
    client.ping().await;
    let text = handle.render();
    assert!(
        text.contains(r#"pingme_gateway_connections{transport="tcp",shard="0"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"pingme_gateway_frames_in_total{transport="tcp"} 1"#),
        "{text}"
    );

    drop(client);
    harness
        .dispatch
        .wait_for("the disconnect", |seen| seen.disconnected.len() == 1)
        .await;
    let text = handle.render();
    assert!(
        text.contains(r#"pingme_gateway_connections{transport="tcp",shard="0"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"pingme_gateway_disconnects_total{transport="tcp",reason="peer_closed"} 1"#
        ),
        "{text}"
    );
    // AuthOk and Pong went out.
    assert!(
        text.contains(r#"pingme_gateway_frames_out_total{transport="tcp"} 2"#),
        "{text}"
    );
}

/// A shard under handshake load (here: a threshold of zero handshakes in
/// progress) asks a client to prove its address with a Retry before it
/// starts the expensive handshake; the client answers it and gets its
/// session. At the maximum of handshakes in progress (zero) a new one is
/// refused. Both outcomes are counted.
#[tokio::test]
async fn quic_handshakes_under_load_are_retried_then_refused() {
    let _alone = QUIC_COUNTERS.lock().await;
    let handle = recorder();
    let outcome = |outcome: &str| quic_incoming(handle, outcome);
    let (accepted, retried, refused) = (outcome("accepted"), outcome("retry"), outcome("refused"));

    let retrying = Harness::start(retry_unproven_addresses(), 1).await;
    let mut client = retrying.connect(Kind::Quic).await;
    client.login(1, "d").await;
    client.ping().await;
    assert_eq!(outcome("retry"), retried + 1.0, "one Retry first");
    assert_eq!(
        outcome("accepted"),
        accepted + 1.0,
        "then the handshake, for the proven address"
    );

    let full = Harness::start(
        SessionLimits {
            max_quic_handshakes: 0,
            ..limits()
        },
        1,
    )
    .await;
    let addr = full.gateway().local_addrs().quic.unwrap();
    let result = common::quic_connect(addr, &full.cert, &[pingme_protocol::QUIC_ALPN]).await;
    assert!(
        matches!(result, Err(quinn::ConnectionError::ConnectionClosed(ref close))
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{result:?}"
    );
    assert_eq!(outcome("refused"), refused + 1.0);
}

/// Counts the address tokens (NEW_TOKEN) a client endpoint receives.
#[derive(Default)]
struct RecordingTokens {
    tokens: quinn::TokenMemoryCache,
    received: std::sync::atomic::AtomicUsize,
}

impl quinn::TokenStore for RecordingTokens {
    fn insert(&self, server_name: &str, token: bytes::Bytes) {
        self.received
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.tokens.insert(server_name, token);
    }

    fn take(&self, server_name: &str) -> Option<bytes::Bytes> {
        self.tokens.take(server_name)
    }
}

/// A client that connected before holds an address token from the
/// server (NEW_TOKEN), so when it comes back to a shard under handshake
/// load it proves its address at once and is not sent a Retry: a phone's
/// reconnect after a network change or a gateway restart costs no extra
/// round trip. Fails if the server sends no tokens (quinn without its
/// `bloom` feature sends none) or does not accept them.
#[tokio::test]
async fn a_returning_quic_client_proves_its_address_with_the_token_it_was_given() {
    let _alone = QUIC_COUNTERS.lock().await;
    let handle = recorder();
    let harness = Harness::start(retry_unproven_addresses(), 1).await;
    let addr = harness.gateway().local_addrs().quic.unwrap();
    let tokens = std::sync::Arc::new(RecordingTokens::default());
    let mut config = quinn::ClientConfig::new(common::quic_client_crypto(
        &harness.cert,
        &[pingme_protocol::QUIC_ALPN],
    ));
    config.token_store(tokens.clone());
    let mut endpoint =
        quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(config);

    let first = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    pingme_testkit::eventually(|| {
        (tokens.received.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    first.close(0u32.into(), b"bye");
    let retries = quic_incoming(handle, "retry");

    let again = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    assert_eq!(
        quic_incoming(handle, "retry"),
        retries,
        "the token proved the address: no Retry"
    );
    again.close(0u32.into(), b"bye");
}

/// A shard exports its QUIC handshakes in progress: a client that sent
/// its first packet and went silent holds one (until `auth_timeout`, a
/// minute here), and a client that completes its handshake holds one only
/// until then.
#[tokio::test]
async fn a_shard_exports_its_quic_handshakes_in_progress() {
    let _alone = QUIC_COUNTERS.lock().await;
    let handle = recorder();
    let harness = Harness::start(
        SessionLimits {
            auth_timeout: std::time::Duration::from_secs(60),
            ..limits()
        },
        1,
    )
    .await;
    let addr = harness.gateway().local_addrs().quic.unwrap();
    let in_progress = || {
        series(
            handle,
            r#"pingme_gateway_quic_handshakes_in_progress{shard="0"}"#,
        )
    };

    // A client's first packet, and then silence.
    let crypto = common::quic_client_crypto(&harness.cert, &[pingme_protocol::QUIC_ALPN]);
    let mut silent = quinn_proto::Endpoint::new(
        std::sync::Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = std::time::Instant::now();
    let (_, mut connection) = silent
        .connect(
            now,
            quinn_proto::ClientConfig::new(crypto),
            addr,
            "localhost",
        )
        .unwrap();
    let mut initial = Vec::new();
    let transmit = connection.poll_transmit(now, 1, &mut initial).unwrap();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&initial[..transmit.size], addr)
        .await
        .unwrap();
    pingme_testkit::eventually(|| (in_progress() == 1.0).then_some(())).await;

    let mut client = harness.connect(Kind::Quic).await;
    client.login(1, "d").await;
    client.ping().await;
    assert_eq!(in_progress(), 1.0, "the served client's handshake is over");
}
