//! TLS and QUIC transports against a self-signed certificate (rcgen): the
//! development trust policy and a pinned CA both connect, an unrelated CA is
//! refused; QUIC negotiates ALPN `pingme/1`. The server side answers the
//! handshake and a send.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use pingme_client::v1::{AuthOk, ContentType, HelloAck, SendAck, client_frame, server_frame};
use pingme_client::{Client, ClientConfig, Endpoint, Trust};
use pingme_protocol::{ClientFrame, ServerCodec, ServerFrame};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

fn answer(frame: ClientFrame) -> Option<ServerFrame> {
    let body = match frame.body? {
        client_frame::Body::Hello(_) => server_frame::Body::HelloAck(HelloAck {
            version: 1,
            max_frame_size: 65536,
            heartbeat_interval_ms: 60_000,
            idle_timeout_ms: 180_000,
            ..Default::default()
        }),
        client_frame::Body::Authenticate(_) => server_frame::Body::AuthOk(AuthOk {
            user_id: 5,
            device_id: "d".into(),
            server_time_ms: 0,
        }),
        client_frame::Body::Send(send) => server_frame::Body::SendAck(SendAck {
            client_msg_id: send.client_msg_id,
            msg_id: "m".into(),
            conversation_id: send.conversation_id,
            seq: 9,
            server_time_ms: 0,
        }),
        client_frame::Body::Sync(_) => server_frame::Body::Sync(Default::default()),
        _ => return None,
    };
    Some(ServerFrame {
        request_id: frame.request_id,
        body: Some(body),
    })
}

async fn serve<T: AsyncRead + AsyncWrite + Unpin>(io: T) {
    let mut framed = Framed::new(io, ServerCodec::default());
    while let Some(Ok(frame)) = framed.next().await {
        if let Some(reply) = answer(frame)
            && framed.send(reply).await.is_err()
        {
            return;
        }
    }
}

struct Cert {
    der: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    pem: String,
}

fn self_signed() -> Cert {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    Cert {
        der: certified.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()),
        pem: certified.cert.pem(),
    }
}

async fn send_once(endpoint: Endpoint) -> pingme_client::Result<u64> {
    let (client, _events) = Client::connect(ClientConfig::new(endpoint, "t")).await?;
    Ok(client.send("g:1", ContentType::Text, "secure").await?.seq)
}

#[tokio::test]
async fn tls_with_dev_trust_or_the_right_ca_connects_and_a_wrong_ca_is_refused() {
    let cert = self_signed();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der.clone()],
            PrivateKeyDer::Pkcs8(cert.key.clone_key()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(socket).await {
                    serve(tls).await;
                }
            });
        }
    });
    let tls = |trust| Endpoint::Tls {
        addr,
        server_name: "localhost".into(),
        trust,
    };
    assert_eq!(send_once(tls(Trust::AcceptAnyDevCert)).await.unwrap(), 9);
    assert_eq!(
        send_once(tls(Trust::CaPem(cert.pem.into_bytes())))
            .await
            .unwrap(),
        9
    );
    let stranger = self_signed();
    assert!(
        send_once(tls(Trust::CaPem(stranger.pem.into_bytes())))
            .await
            .is_err()
    );
}

/// The SDK offers ALPN `pingme/1`, which a pingme QUIC server requires
/// (this server, like pingme's, refuses a handshake without it).
#[tokio::test]
async fn quic_carries_frames_on_one_bidirectional_stream() {
    let cert = self_signed();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der.clone()],
            PrivateKeyDer::Pkcs8(cert.key.clone_key()),
        )
        .unwrap();
    tls.alpn_protocols = vec![pingme_protocol::QUIC_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                let Ok((send, recv)) = connection.accept_bi().await else {
                    return;
                };
                serve(tokio::io::join(recv, send)).await;
            });
        }
    });
    let quic = Endpoint::Quic {
        addr,
        server_name: "localhost".into(),
        trust: Trust::CaPem(cert.pem.into_bytes()),
    };
    assert_eq!(send_once(quic).await.unwrap(), 9);
}
