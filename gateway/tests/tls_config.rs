//! TLS material: production mode refuses TLS/QUIC without a certificate;
//! configured PEM files are served as-is.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{Seen, TestAuth, TestClient, TestDispatch};
use pingme_gateway::transport::tls::TlsError;
use pingme_gateway::{Connections, Gateway, GatewayConfig, ListenerConfig, StartError};

fn parts() -> (Arc<Connections>, Arc<TestDispatch>) {
    let connections = Arc::new(Connections::new());
    let dispatch = Arc::new(TestDispatch {
        outbox: connections.clone(),
        seen: Mutex::new(Seen::default()),
    });
    (connections, dispatch)
}

fn listeners() -> ListenerConfig {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    ListenerConfig {
        tcp: None,
        tls: Some(any),
        quic: Some(any),
    }
}

#[test]
fn production_mode_refuses_tls_without_a_certificate() {
    let (connections, dispatch) = parts();
    let config = GatewayConfig {
        listeners: listeners(),
        dev_mode: false,
        ..GatewayConfig::default()
    };
    let result = Gateway::start(config, connections, dispatch, Arc::new(TestAuth));
    assert!(matches!(
        result,
        Err(StartError::Tls(TlsError::NoCertificate))
    ));
}

#[tokio::test]
async fn configured_pem_files_are_served() {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();

    let (connections, dispatch) = parts();
    let config = GatewayConfig {
        listeners: listeners(),
        dev_mode: false,
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        shards: Some(1),
        pin_shards: false,
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(config, connections, dispatch, Arc::new(TestAuth)).unwrap();
    let cert = generated.cert.der().clone();
    assert_eq!(gateway.certificate(), Some(&cert));
    let addrs = gateway.local_addrs();
    let mut tls = TestClient::tls(addrs.tls.unwrap(), &cert).await;
    tls.login(1, "a").await;
    let mut quic = TestClient::quic(addrs.quic.unwrap(), &cert).await;
    quic.login(2, "b").await;
    quic.ping().await;
    gateway.shutdown(std::time::Duration::from_secs(1)).await;
}
