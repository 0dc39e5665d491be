//! Test doubles and a small protocol client for the gateway's integration
//! tests: an authenticator reading "user:device" tokens, a dispatch that
//! acknowledges sends and delivers dm messages through the outbox, and a
//! client speaking the frame codec over TCP, TLS, QUIC and WebSocket.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use pingme_gateway::auth::{Authenticator, Claims};
use pingme_gateway::{
    Connections, Gateway, GatewayConfig, ListenerConfig, SessionLimits, ws_router,
};
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_protocol::{ClientCodec, ClientFrame, ErrorCode, ServerFrame, encode_frame};
use pingme_router::port::{Dispatch, Outbox, SessionInfo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

/// Tokens are "user:device"; "expired" is expired, "revoked" revoked;
/// anything else is invalid.
pub struct TestAuth;

#[async_trait]
impl Authenticator for TestAuth {
    async fn authenticate(&self, token: &str) -> Result<Claims, ErrorCode> {
        match token {
            "expired" => return Err(ErrorCode::TokenExpired),
            "revoked" => return Err(ErrorCode::TokenRevoked),
            _ => {}
        }
        let (user, device) = token.split_once(':').ok_or(ErrorCode::TokenInvalid)?;
        Ok(Claims {
            user: user.parse().map_err(|_| ErrorCode::TokenInvalid)?,
            device: device.to_string(),
            generation: 0,
            expires_at: i64::MAX,
        })
    }
}

/// What the dispatch saw.
#[derive(Default)]
pub struct Seen {
    pub connected: Vec<SessionInfo>,
    pub disconnected: Vec<SessionInfo>,
    pub frames: usize,
}

/// Acknowledges every SendMessage with a SendAck and delivers it to the
/// other member of a "dm:{a}:{b}" conversation, through the outbox.
pub struct TestDispatch {
    pub outbox: Arc<Connections>,
    pub seen: Mutex<Seen>,
}

impl TestDispatch {
    pub fn connected_sessions(&self) -> Vec<SessionInfo> {
        self.seen.lock().unwrap().connected.clone()
    }

    pub fn disconnected_count(&self) -> usize {
        self.seen.lock().unwrap().disconnected.len()
    }

    /// Waits until `check` holds (at most 10 s).
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Seen) -> bool) {
        for _ in 0..1000 {
            if check(&self.seen.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }
}

impl Dispatch for TestDispatch {
    fn connected(&self, session: &SessionInfo) {
        self.seen.lock().unwrap().connected.push(session.clone());
    }

    fn disconnected(&self, session: &SessionInfo) {
        self.seen.lock().unwrap().disconnected.push(session.clone());
    }

    fn frame(&self, session: &SessionInfo, request_id: u64, body: client_frame::Body) {
        let seq = {
            let mut seen = self.seen.lock().unwrap();
            seen.frames += 1;
            seen.frames as u64
        };
        let client_frame::Body::Send(send) = body else {
            return;
        };
        let ack = ServerFrame {
            request_id,
            body: Some(server_frame::Body::SendAck(v1::SendAck {
                client_msg_id: send.client_msg_id.clone(),
                msg_id: format!("m-{seq}"),
                conversation_id: send.conversation_id.clone(),
                seq,
                server_time_ms: 0,
            })),
        };
        self.outbox.to_connection(session.conn, encode_frame(&ack));
        let members: Vec<u64> = send
            .conversation_id
            .strip_prefix("dm:")
            .map(|ids| ids.split(':').filter_map(|id| id.parse().ok()).collect())
            .unwrap_or_default();
        let deliver = encode_frame(&ServerFrame {
            request_id: 0,
            body: Some(server_frame::Body::Deliver(v1::Deliver {
                message: Some(v1::Message {
                    conversation_id: send.conversation_id,
                    seq,
                    msg_id: format!("m-{seq}"),
                    sender_id: session.user,
                    sender_device: session.device.to_string(),
                    client_msg_id: send.client_msg_id,
                    content_type: send.content_type,
                    body: send.body,
                    server_time_ms: 0,
                }),
            })),
        });
        self.outbox.to_users(&members, &deliver, Some(session.conn));
    }
}

/// A running gateway with its doubles and an HTTP server for WebSocket.
pub struct Harness {
    pub gateway: Option<Gateway>,
    pub connections: Arc<Connections>,
    pub dispatch: Arc<TestDispatch>,
    pub ws_addr: SocketAddr,
    pub cert: rustls::pki_types::CertificateDer<'static>,
}

impl Harness {
    pub async fn start(limits: SessionLimits, shards: usize) -> Harness {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let connections = Arc::new(Connections::new());
        let dispatch = Arc::new(TestDispatch {
            outbox: connections.clone(),
            seen: Mutex::new(Seen::default()),
        });
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let config = GatewayConfig {
            listeners: ListenerConfig {
                tcp: Some(any),
                tls: Some(any),
                quic: Some(any),
            },
            shards: Some(shards),
            pin_shards: false,
            dev_mode: true,
            limits,
            ..GatewayConfig::default()
        };
        let gateway = Gateway::start(
            config,
            connections.clone(),
            dispatch.clone(),
            Arc::new(TestAuth),
        )
        .expect("gateway starts");
        let http = tokio::net::TcpListener::bind(any).await.unwrap();
        let ws_addr = http.local_addr().unwrap();
        let app = ws_router(connections.clone());
        tokio::spawn(async move {
            let _ = axum::serve(http, app).await;
        });
        let cert = gateway.certificate().expect("dev certificate").clone();
        Harness {
            gateway: Some(gateway),
            connections,
            dispatch,
            ws_addr,
            cert,
        }
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().unwrap()
    }

    pub async fn connect(&self, transport: Kind) -> TestClient {
        let addrs = self.gateway().local_addrs();
        match transport {
            Kind::Tcp => TestClient::tcp(addrs.tcp.unwrap()).await,
            Kind::Tls => TestClient::tls(addrs.tls.unwrap(), &self.cert).await,
            Kind::Quic => TestClient::quic(addrs.quic.unwrap(), &self.cert).await,
            Kind::Ws => TestClient::ws(self.ws_addr).await,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Tcp,
    Tls,
    Quic,
    Ws,
}

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum Wire {
    Stream(Framed<Pin<Box<dyn Io>>, ClientCodec>),
    Ws(Box<WsStream>),
}

/// A minimal protocol client.
pub struct TestClient {
    wire: Wire,
    /// Keeps the QUIC connection alive.
    _quic: Option<(quinn::Endpoint, quinn::Connection)>,
    next_request: u64,
}

pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

fn client_tls(cert: &rustls::pki_types::CertificateDer<'static>) -> rustls::ClientConfig {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A QUIC client's TLS side trusting `cert` and offering `alpn` (nothing
/// if empty); quinn's and quinn-proto's client configs both take it.
pub fn quic_client_crypto(
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> Arc<quinn::crypto::rustls::QuicClientConfig> {
    let mut tls = client_tls(cert);
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap())
}

/// A QUIC connection offering `alpn` (nothing if empty).
pub async fn quic_connect(
    addr: SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(quic_client_crypto(cert, alpn)));
    let connection = endpoint.connect(addr, "localhost").unwrap().await?;
    Ok((endpoint, connection))
}

impl TestClient {
    fn over(io: Pin<Box<dyn Io>>) -> Self {
        Self {
            wire: Wire::Stream(Framed::new(io, ClientCodec::default())),
            _quic: None,
            next_request: 1,
        }
    }

    pub async fn tcp(addr: SocketAddr) -> Self {
        Self::over(Box::pin(
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ))
    }

    /// A TCP client with a tiny receive buffer (a slow reader).
    pub async fn tcp_small_window(addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        Self::over(Box::pin(socket.connect(addr).await.unwrap()))
    }

    pub async fn tls(addr: SocketAddr, cert: &rustls::pki_types::CertificateDer<'static>) -> Self {
        Self::tls_after_pause(addr, cert, Duration::ZERO).await
    }

    /// TLS that connects, waits `pause`, then does the TLS handshake.
    pub async fn tls_after_pause(
        addr: SocketAddr,
        cert: &rustls::pki_types::CertificateDer<'static>,
        pause: Duration,
    ) -> Self {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(cert)));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(pause).await;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        Self::over(Box::pin(connector.connect(name, tcp).await.unwrap()))
    }

    pub async fn quic(addr: SocketAddr, cert: &rustls::pki_types::CertificateDer<'static>) -> Self {
        Self::quic_after_pause(addr, cert, Duration::ZERO).await
    }

    /// QUIC that does its handshake, waits `pause`, then opens the stream.
    pub async fn quic_after_pause(
        addr: SocketAddr,
        cert: &rustls::pki_types::CertificateDer<'static>,
        pause: Duration,
    ) -> Self {
        let (endpoint, connection) = quic_connect(addr, cert, &[pingme_protocol::QUIC_ALPN])
            .await
            .unwrap();
        tokio::time::sleep(pause).await;
        let (send, recv) = connection.open_bi().await.unwrap();
        let mut client = Self::over(Box::pin(tokio::io::join(recv, send)));
        client._quic = Some((endpoint, connection));
        client
    }

    pub async fn ws(addr: SocketAddr) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
            .await
            .unwrap();
        Self {
            wire: Wire::Ws(Box::new(socket)),
            _quic: None,
            next_request: 1,
        }
    }

    /// Sends raw bytes (one WebSocket message on WebSocket).
    pub async fn send_raw(&mut self, bytes: Bytes) {
        match &mut self.wire {
            Wire::Stream(framed) => {
                use tokio::io::AsyncWriteExt;
                let io = framed.get_mut();
                let _ = io.write_all(&bytes).await;
                let _ = io.flush().await;
            }
            Wire::Ws(socket) => {
                let _ = socket
                    .send(tokio_tungstenite::tungstenite::Message::Binary(bytes))
                    .await;
            }
        }
    }

    /// Sends a frame body, returning its request id.
    pub async fn send(&mut self, body: client_frame::Body) -> u64 {
        let request_id = self.next_request;
        self.next_request += 1;
        let frame = ClientFrame {
            request_id,
            body: Some(body),
        };
        self.send_raw(encode_frame(&frame)).await;
        request_id
    }

    /// The next frame; `None` at end of stream (or a transport error).
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        let next = tokio::time::timeout(RECV_TIMEOUT, async {
            match &mut self.wire {
                Wire::Stream(framed) => framed.next().await.and_then(Result::ok),
                Wire::Ws(socket) => loop {
                    match socket.next().await {
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(message))) => {
                            let mut buf = bytes::BytesMut::from(&message[..]);
                            let payload = pingme_protocol::split_frame(&mut buf, usize::MAX)
                                .ok()
                                .flatten()?;
                            assert!(buf.is_empty(), "one frame per WebSocket message");
                            break pingme_protocol::decode_message(payload).ok();
                        }
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))
                        | Some(Err(_))
                        | None => break None,
                        Some(Ok(_)) => {}
                    }
                },
            }
        })
        .await;
        next.expect("a frame or the end of the stream within the timeout")
    }

    /// The next frame's body, panicking at end of stream.
    pub async fn recv_body(&mut self) -> (u64, server_frame::Body) {
        let frame = self
            .recv()
            .await
            .expect("a frame, not the end of the stream");
        (frame.request_id, frame.body.expect("a body"))
    }

    /// Reads until the end of the stream, returning what arrived.
    pub async fn drain_to_end(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.recv().await {
            frames.push(frame);
        }
        frames
    }

    pub async fn hello(&mut self) -> v1::HelloAck {
        self.send(client_frame::Body::Hello(v1::Hello {
            max_version: 1,
            min_version: 1,
            client_name: "gateway-tests".into(),
        }))
        .await;
        match self.recv_body().await {
            (_, server_frame::Body::HelloAck(ack)) => ack,
            other => panic!("expected HelloAck, got {other:?}"),
        }
    }

    /// Hello + Authenticate with a "user:device" token.
    pub async fn login(&mut self, user: u64, device: &str) -> v1::AuthOk {
        self.hello().await;
        let request_id = self
            .send(client_frame::Body::Authenticate(v1::Authenticate {
                token: format!("{user}:{device}"),
            }))
            .await;
        match self.recv_body().await {
            (id, server_frame::Body::AuthOk(ok)) if id == request_id => ok,
            other => panic!("expected AuthOk, got {other:?}"),
        }
    }

    pub async fn ping(&mut self) -> v1::Pong {
        let request_id = self
            .send(client_frame::Body::Ping(v1::Ping { client_time_ms: 42 }))
            .await;
        loop {
            match self.recv_body().await {
                (id, server_frame::Body::Pong(pong)) if id == request_id => return pong,
                (_, server_frame::Body::Deliver(_)) => {}
                other => panic!("expected Pong, got {other:?}"),
            }
        }
    }
}

pub fn send_message(conversation: &str, client_msg_id: &str) -> client_frame::Body {
    client_frame::Body::Send(v1::SendMessage {
        client_msg_id: client_msg_id.into(),
        conversation_id: conversation.into(),
        content_type: v1::ContentType::Text as i32,
        body: Bytes::from_static(b"hello"),
    })
}

/// The error code and fatal flag of an Error body.
pub fn error_of(body: &server_frame::Body) -> Option<(ErrorCode, bool)> {
    match body {
        server_frame::Body::Error(error) => Some((ErrorCode::from_code(error.code)?, error.fatal)),
        _ => None,
    }
}

pub fn limits() -> SessionLimits {
    SessionLimits {
        auth_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(30),
        close_linger: Duration::from_secs(3),
        ..SessionLimits::default()
    }
}
