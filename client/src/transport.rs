//! Transports: TCP, TLS (tokio-rustls), QUIC (quinn, one bidirectional
//! stream) and WebSocket (tokio-tungstenite, one frame per binary message),
//! all turned into the same pair: a sink of [`ClientFrame`] and a stream of
//! [`ServerFrame`]. Everything above this module is transport-blind.
//!
//! A [`Connector`] is what one client keeps across its reconnects: the TLS
//! configurations with their session cache (a reconnect resumes the TLS
//! session instead of a full handshake: no certificate sent or verified),
//! and the QUIC endpoint, whose UDP socket [`Connector::rebind`] moves to a
//! new one when the network changes (the QUIC connection migrates; the
//! session on it goes on). 0-RTT stays off: see docs/architecture.md.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use pingme_protocol::{
    ClientFrame, FrameError, MAX_DOWNSTREAM_FRAME_SIZE, RawFrameCodec, ServerFrame, decode_message,
    encode_frame, split_frame,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::error::{ClientError, Result};

/// Frames going to the server.
pub type FrameSink = Pin<Box<dyn Sink<ClientFrame, Error = ClientError> + Send>>;
/// Frames coming from the server, each still encoded (one `ServerFrame`
/// without its length prefix); `None` when the server closed cleanly.
/// [`Connection::next_frame`] decodes them; a reader that only looks at a
/// few fields of a frame can skip the decode.
pub type RawFrameStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// Which certificates a TLS or QUIC client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates signed by the CA(s) in this PEM file.
    CaFile(PathBuf),
    /// Certificates signed by the CA(s) in this PEM text.
    CaPem(Vec<u8>),
    /// Any certificate at all, e.g. the server's self-signed development
    /// certificate. Never use this outside development: it gives up
    /// authenticating the server.
    AcceptAnyDevCert,
}

/// Where and how to reach a gateway.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Plain TCP, e.g. `127.0.0.1:7000`.
    Tcp(SocketAddr),
    /// TCP + TLS, e.g. `127.0.0.1:7443`.
    Tls {
        /// Gateway address.
        addr: SocketAddr,
        /// Name checked against the certificate.
        server_name: String,
        /// Which certificates to trust.
        trust: Trust,
    },
    /// QUIC, e.g. UDP `127.0.0.1:7443`.
    Quic {
        /// Gateway address.
        addr: SocketAddr,
        /// Name checked against the certificate.
        server_name: String,
        /// Which certificates to trust.
        trust: Trust,
    },
    /// WebSocket, e.g. `ws://127.0.0.1:8080/v1/ws`.
    WebSocket {
        /// Host and port to connect the TCP socket to.
        addr: SocketAddr,
        /// The URL sent in the upgrade request.
        url: String,
    },
}

impl Endpoint {
    /// Parses the compact form used by command lines:
    /// `tcp://host:port`, `tls://host:port`, `quic://host:port` (both with the
    /// development trust policy and server name `localhost`), or
    /// `ws://host:port/path`. A bare `host:port` means TCP.
    pub fn parse(text: &str) -> Result<Endpoint> {
        let (scheme, rest) = text.split_once("://").unwrap_or(("tcp", text));
        let host_port = rest.split('/').next().unwrap_or(rest);
        let addr = resolve(host_port)?;
        let dev = || (String::from("localhost"), Trust::AcceptAnyDevCert);
        Ok(match scheme {
            "tcp" => Endpoint::Tcp(addr),
            "tls" => {
                let (server_name, trust) = dev();
                Endpoint::Tls {
                    addr,
                    server_name,
                    trust,
                }
            }
            "quic" => {
                let (server_name, trust) = dev();
                Endpoint::Quic {
                    addr,
                    server_name,
                    trust,
                }
            }
            "ws" => Endpoint::WebSocket {
                addr,
                url: text.to_string(),
            },
            other => {
                return Err(ClientError::Protocol(format!(
                    "unknown transport scheme {other:?} (tcp, tls, quic, ws)"
                )));
            }
        })
    }

    /// The gateway address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Endpoint::Tcp(addr)
            | Endpoint::Tls { addr, .. }
            | Endpoint::Quic { addr, .. }
            | Endpoint::WebSocket { addr, .. } => *addr,
        }
    }

    /// The same transport at another address (a `GoAway.reconnect_to`).
    pub fn with_addr(&self, new: SocketAddr) -> Endpoint {
        let mut next = self.clone();
        match &mut next {
            Endpoint::Tcp(addr)
            | Endpoint::Tls { addr, .. }
            | Endpoint::Quic { addr, .. }
            | Endpoint::WebSocket { addr, .. } => *addr = new,
        }
        if let Endpoint::WebSocket { url, .. } = &mut next {
            let path = url
                .split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
                .unwrap_or_default();
            *url = format!("ws://{new}{path}");
        }
        next
    }
}

fn resolve(host_port: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| ClientError::Protocol(format!("cannot resolve {host_port:?}")))
}

/// Per-connection options.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Local address to bind before connecting (load tests spread
    /// connections over many source addresses to get past the 64k ports of
    /// one address).
    pub local_ip: Option<IpAddr>,
    /// Keep TLS sessions (TLS and QUIC) in memory, so the next connection
    /// of the same [`Connector`] resumes instead of a full handshake. On by
    /// default; off only to measure the difference.
    pub tls_resumption: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            local_ip: None,
            tls_resumption: true,
        }
    }
}

/// Kernel buffer asked for a QUIC endpoint's socket, each way (the kernel
/// caps it at `net.core.rmem_max` / `wmem_max`). One endpoint carries
/// every connection of its connector; a load tool's connector carries
/// thousands of handshakes at once, whose server flights the kernel's
/// default (about 200 KB) dropped.
const QUIC_SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket for a QUIC endpoint, bound to `addr`, with
/// [`QUIC_SOCKET_BUFFER`] each way (best effort: a kernel that refuses
/// keeps its default).
fn quic_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        // Dual-stack where the system allows, as quinn's own client does.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(QUIC_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Sessions the TLS cache holds (one per server name is all a client uses;
/// redirects to other gateways add a few).
const TLS_SESSIONS: usize = 32;

/// An open transport: frames out, frames in.
pub struct Connection {
    /// Frames to the server.
    pub sink: FrameSink,
    /// Frames from the server, encoded.
    pub frames: RawFrameStream,
}

impl Connection {
    /// The next frame from the server, decoded; `None` when the server
    /// closed cleanly.
    pub async fn next_frame(&mut self) -> Option<Result<ServerFrame>> {
        let payload = self.frames.next().await?;
        Some(payload.and_then(|payload| Ok(decode_message(payload)?)))
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}

/// Opens one connection over `endpoint` (a fresh [`Connector`]: nothing
/// is resumed; load tools opening many independent sessions use this).
pub async fn connect(endpoint: &Endpoint, options: &ConnectOptions) -> Result<Connection> {
    Connector::new(endpoint.clone(), options.clone())?
        .connect()
        .await
}

/// How a connector's TLS and QUIC handshakes went so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandshakeCounts {
    /// Full handshakes: the server's certificate was sent and verified.
    pub full: u64,
    /// Resumed handshakes: a session ticket from an earlier connection.
    pub resumed: u64,
}

/// One client's way to its gateway, kept across reconnects: the TLS
/// configuration (and with it the session cache), the QUIC endpoint (one
/// UDP socket for every connection, rebound on [`Connector::rebind`]) and
/// handshake counts. Reconnects go to the same endpoint or to another
/// address of the same transport and trust (a `GoAway` redirect).
pub struct Connector {
    endpoint: Endpoint,
    options: ConnectOptions,
    /// TLS over TCP, or QUIC's TLS: built once, so its session cache lives
    /// as long as the connector.
    tls: Option<Arc<rustls::ClientConfig>>,
    quic_config: Option<quinn::ClientConfig>,
    quic_endpoint: Mutex<Option<quinn::Endpoint>>,
    /// Certificates verified: a resumed handshake verifies none.
    verified: Arc<AtomicU64>,
    counts: Mutex<HandshakeCounts>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("endpoint", &self.endpoint)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector for `endpoint` (checks the trust settings now).
    pub fn new(endpoint: Endpoint, options: ConnectOptions) -> Result<Connector> {
        let verified = Arc::new(AtomicU64::new(0));
        let (tls, quic_config) = match &endpoint {
            Endpoint::Tls { trust, .. } => {
                let config = client_tls_config(trust, false, &options, verified.clone())?;
                (Some(Arc::new(config)), None)
            }
            Endpoint::Quic { trust, .. } => {
                let mut config = client_tls_config(trust, true, &options, verified.clone())?;
                config.alpn_protocols = vec![pingme_protocol::QUIC_ALPN.to_vec()];
                let config = Arc::new(config);
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config.clone())
                    .map_err(|e| ClientError::Quic(e.to_string()))?;
                (
                    Some(config),
                    Some(quinn::ClientConfig::new(Arc::new(crypto))),
                )
            }
            Endpoint::Tcp(_) | Endpoint::WebSocket { .. } => (None, None),
        };
        Ok(Connector {
            endpoint,
            options,
            tls,
            quic_config,
            quic_endpoint: Mutex::new(None),
            verified,
            counts: Mutex::new(HandshakeCounts::default()),
        })
    }

    /// The endpoint this connector was made for.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Opens a connection to the endpoint.
    pub async fn connect(&self) -> Result<Connection> {
        self.connect_to(self.endpoint.addr()).await
    }

    /// Opens a connection to `addr` with the endpoint's transport and trust
    /// (a `GoAway` redirect).
    pub async fn connect_to(&self, addr: SocketAddr) -> Result<Connection> {
        let endpoint = self.endpoint.with_addr(addr);
        let verified_before = self.verified.load(Ordering::Relaxed);
        let connection = match &endpoint {
            Endpoint::Tcp(addr) => {
                let tcp = tcp_connect(*addr, self.options.local_ip).await?;
                // Owned halves: reading and writing without the lock that
                // `tokio::io::split` takes on every poll.
                let (read, write) = tcp.into_split();
                return Ok(framed_halves(read, write));
            }
            Endpoint::Tls {
                addr, server_name, ..
            } => {
                let config = self.tls.clone().expect("built for TLS endpoints");
                let name = ServerName::try_from(server_name.clone())
                    .map_err(|e| ClientError::Tls(format!("server name {server_name:?}: {e}")))?;
                let tcp = tcp_connect(*addr, self.options.local_ip).await?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                framed(tls)
            }
            Endpoint::Quic {
                addr, server_name, ..
            } => self.quic_connect(*addr, server_name).await?,
            Endpoint::WebSocket { addr, url } => {
                let tcp = tcp_connect(*addr, self.options.local_ip).await?;
                let (ws, _response) = tokio_tungstenite::client_async(url.as_str(), tcp)
                    .await
                    .map_err(|e| ClientError::WebSocket(e.to_string()))?;
                return Ok(websocket(ws));
            }
        };
        // Connections of one connector open one at a time, so a count that
        // did not move means this handshake verified no certificate.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.verified.load(Ordering::Relaxed) == verified_before {
            counts.resumed += 1;
        } else {
            counts.full += 1;
        }
        Ok(connection)
    }

    /// How the TLS and QUIC handshakes went so far (none over TCP and
    /// WebSocket).
    pub fn handshakes(&self) -> HandshakeCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The local address of the QUIC endpoint's socket (`None` before the
    /// first QUIC connection, and for the other transports).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        let endpoint = self.quic_endpoint();
        endpoint.and_then(|e| e.local_addr().ok())
    }

    /// The network changed: moves the QUIC endpoint to a new UDP socket (a
    /// new local port, on the address the system now routes from). The
    /// open connection migrates: quinn validates the new path and the
    /// server keeps the connection, so the session goes on without a
    /// reconnect. Returns the new local address; `None` for the other
    /// transports (a TCP connection cannot move: the heartbeat notices a
    /// dead one and the client reconnects) or before the first QUIC
    /// connection. Must run inside a tokio runtime.
    pub fn rebind(&self) -> Result<Option<SocketAddr>> {
        let Some(endpoint) = self.quic_endpoint() else {
            return Ok(None);
        };
        let family_any = match endpoint.local_addr()? {
            SocketAddr::V4(_) => IpAddr::from([0, 0, 0, 0]),
            SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
        };
        let ip = self.options.local_ip.unwrap_or(family_any);
        let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
        endpoint.rebind(socket)?;
        Ok(Some(endpoint.local_addr()?))
    }

    fn quic_endpoint(&self) -> Option<quinn::Endpoint> {
        self.quic_endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The endpoint for a connection to `addr`: the one every connection of
    /// this connector shares, made on first use (or again if `addr` is of
    /// the other IP family).
    fn quic_endpoint_for(&self, addr: SocketAddr) -> Result<quinn::Endpoint> {
        let mut slot = self.quic_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(endpoint) = slot.as_ref()
            && endpoint
                .local_addr()
                .is_ok_and(|local| local.is_ipv4() == addr.is_ipv4())
        {
            return Ok(endpoint.clone());
        }
        let bind_ip = self.options.local_ip.unwrap_or(if addr.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        });
        let socket = quic_socket(SocketAddr::new(bind_ip, 0))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| ClientError::Quic("no async runtime for QUIC".into()))?;
        let mut endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?;
        endpoint
            .set_default_client_config(self.quic_config.clone().expect("built for QUIC endpoints"));
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    async fn quic_connect(&self, addr: SocketAddr, server_name: &str) -> Result<Connection> {
        let endpoint = self.quic_endpoint_for(addr)?;
        let connection = endpoint
            .connect(addr, server_name)
            .map_err(|e| ClientError::Quic(e.to_string()))?
            .await
            .map_err(|e| ClientError::Quic(e.to_string()))?;
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| ClientError::Quic(e.to_string()))?;
        // The endpoint and connection handles must outlive the stream
        // halves; they ride along inside the stream.
        let keep_alive = (endpoint, connection);
        let Connection { sink, frames } = framed_halves(recv, send);
        let frames = frames.map(move |frame| {
            let _ = &keep_alive;
            frame
        });
        Ok(Connection {
            sink,
            frames: Box::pin(frames),
        })
    }
}

async fn tcp_connect(addr: SocketAddr, local_ip: Option<IpAddr>) -> Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local_ip {
        // Port 0 with the port chosen at connect time, not at bind time:
        // a bound port is otherwise reserved for every destination, so tens
        // of thousands of connections (plus the previous run's TIME_WAIT
        // sockets) exhaust one address's ports and each bind searches the
        // whole range first.
        defer_port_choice(&socket)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux): a bind to port 0 reserves no
/// port; `connect` picks one unique for the 4-tuple.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn defer_port_choice(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let enable: libc::c_int = 1;
    // SAFETY: a valid socket descriptor owned by `socket`, and a pointer to
    // a live c_int with its exact size, as setsockopt(2) requires.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_port_choice(_socket: &TcpSocket) -> std::io::Result<()> {
    Ok(())
}

/// Starting capacity of a byte-stream connection's read buffer.
const READ_BUFFER_START: usize = RawFrameCodec::READ_ROOM_MIN;

/// A byte-stream transport with the length-prefix codec on both halves.
fn framed<T: AsyncRead + AsyncWrite + Send + 'static>(io: T) -> Connection {
    let (read, write) = tokio::io::split(io);
    framed_halves(read, write)
}

fn framed_halves<R, W>(read: R, write: W) -> Connection
where
    R: AsyncRead + Send + 'static,
    W: AsyncWrite + Send + 'static,
{
    // Small starting buffers (tokio-util starts both at 8 KiB): they grow
    // to the frames a connection meets, and a process holding many idle
    // connections (the load generator's idle runs hold up to 20,000
    // each) should not keep 16 KiB of unused capacity per connection. The
    // codec sizes the reads from there: larger during a burst, small
    // again after it.
    let frames = FramedRead::with_capacity(
        read,
        RawFrameCodec::new(MAX_DOWNSTREAM_FRAME_SIZE),
        READ_BUFFER_START,
    )
    .map(|r| r.map_err(ClientError::from));
    let mut write = FramedWrite::new(write, RawFrameCodec::new(MAX_DOWNSTREAM_FRAME_SIZE));
    *write.write_buffer_mut() = bytes::BytesMut::new();
    let sink = SinkExt::<ClientFrame>::sink_map_err(write, |e: FrameError| ClientError::from(e));
    Connection {
        sink: Box::pin(sink),
        frames: Box::pin(frames),
    }
}

fn websocket<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (write, read) = ws.split();
    let sink = write
        .sink_map_err(|e| ClientError::WebSocket(e.to_string()))
        .with(|frame: ClientFrame| async move {
            Ok::<_, ClientError>(WsMessage::Binary(encode_frame(&frame)))
        });
    let frames = read.filter_map(|message| async move {
        match message {
            Ok(WsMessage::Binary(data)) => Some(ws_frame_payload(data)),
            Ok(WsMessage::Close(_)) => None,
            // Pings are answered by tungstenite itself; text is not ours.
            Ok(_) => None,
            Err(e) => Some(Err(ClientError::WebSocket(e.to_string()))),
        }
    });
    Connection {
        sink: Box::pin(sink),
        frames: Box::pin(frames),
    }
}

/// One WebSocket binary message holds exactly one frame, prefix included;
/// its payload, still encoded.
fn ws_frame_payload(data: Bytes) -> Result<Bytes> {
    let mut buf = bytes::BytesMut::from(data);
    match split_frame(&mut buf, MAX_DOWNSTREAM_FRAME_SIZE)? {
        Some(payload) if buf.is_empty() => Ok(payload),
        _ => Err(ClientError::Protocol(
            "a WebSocket message must hold exactly one frame".into(),
        )),
    }
}

/// The rustls client configuration for `trust`, with the ring provider
/// (never the process-wide default, so the SDK works whatever the app
/// installed). QUIC requires TLS 1.3. Sessions are cached in memory (the
/// rustls default), which helps only if the configuration is reused: a
/// [`Connector`] does.
pub fn tls_config(trust: &Trust, tls13_only: bool) -> Result<rustls::ClientConfig> {
    let options = ConnectOptions::default();
    client_tls_config(trust, tls13_only, &options, Arc::new(AtomicU64::new(0)))
}

/// [`tls_config`] with the connector's resumption choice and a counter of
/// verified certificates. Early data (0-RTT) stays off: the first frames
/// carry the access token, and 0-RTT data can be replayed.
fn client_tls_config(
    trust: &Trust,
    tls13_only: bool,
    options: &ConnectOptions,
    verified: Arc<AtomicU64>,
) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone());
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(|e| ClientError::Tls(e.to_string()))?;
    let inner: Arc<dyn ServerCertVerifier> = match trust {
        Trust::AcceptAnyDevCert => Arc::new(AcceptAnyCert {
            provider: provider.clone(),
        }),
        Trust::CaFile(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| ClientError::Tls(format!("reading {}: {e}", path.display())))?;
            webpki_verifier(&pem, provider.clone())?
        }
        Trust::CaPem(pem) => webpki_verifier(pem, provider.clone())?,
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CountingVerifier { inner, verified }))
        .with_no_client_auth();
    config.resumption = if options.tls_resumption {
        rustls::client::Resumption::in_memory_sessions(TLS_SESSIONS)
    } else {
        rustls::client::Resumption::disabled()
    };
    config.enable_early_data = false;
    Ok(config)
}

fn webpki_verifier(
    pem: &[u8],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(pem)?),
        provider,
    )
    .build()
    .map_err(|e| ClientError::Tls(format!("CA certificates: {e}")))?;
    Ok(verifier)
}

/// Counts the certificates verified (each full handshake verifies one; a
/// resumed one none), passing every call to the real verifier.
#[derive(Debug)]
struct CountingVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    verified: Arc<AtomicU64>,
}

impl ServerCertVerifier for CountingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.verified.fetch_add(1, Ordering::Relaxed);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

fn roots(pem: &[u8]) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("bad PEM: {e}")))?;
        store
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("bad CA certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(ClientError::Tls("no CA certificate in the PEM".into()));
    }
    Ok(store)
}

/// Accepts any server certificate but still checks the handshake
/// signatures, so the session is encrypted to whoever holds the key.
#[derive(Debug)]
struct AcceptAnyCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_from_the_command_line_form() {
        assert!(
            matches!(Endpoint::parse("127.0.0.1:7000").unwrap(), Endpoint::Tcp(a) if a.port() == 7000)
        );
        assert!(matches!(
            Endpoint::parse("quic://127.0.0.1:7443").unwrap(),
            Endpoint::Quic { .. }
        ));
        let ws = Endpoint::parse("ws://127.0.0.1:8080/v1/ws").unwrap();
        let moved = ws.with_addr("127.0.0.2:9000".parse().unwrap());
        assert!(
            matches!(&moved, Endpoint::WebSocket { url, .. } if url == "ws://127.0.0.2:9000/v1/ws")
        );
        assert!(Endpoint::parse("smtp://127.0.0.1:25").is_err());
    }

    #[test]
    fn a_ws_message_must_be_exactly_one_frame() {
        let frame = encode_frame(&ServerFrame::default());
        assert!(ws_frame_payload(frame.clone()).is_ok());
        let mut two = frame.to_vec();
        two.extend_from_slice(&frame);
        assert!(matches!(
            ws_frame_payload(two.into()),
            Err(ClientError::Protocol(_))
        ));
        assert!(ws_frame_payload(frame.slice(..2)).is_err());
    }
}
