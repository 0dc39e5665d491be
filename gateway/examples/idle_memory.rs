//! Measures the gateway's memory per idle authenticated connection.
//!
//! `idle_memory [tcp|tls|quic|ws] [connections]` starts a gateway in this
//! process (test authenticator: token = "user:device", no-op dispatch),
//! spawns itself as a client process that opens `connections` sessions
//! (default 19,000) from source addresses spread over 127.0.0.0/8, waits
//! until every session is authenticated, then prints the server's RSS
//! growth per connection. Run it in release:
//!
//! `cargo run --release -p pingme-gateway --example idle_memory -- tcp 19000`

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use pingme_gateway::auth::{Authenticator, Claims};
use pingme_gateway::{
    Connections, Gateway, GatewayConfig, ListenerConfig, SessionLimits, ws_router,
};
use pingme_protocol::v1::{self, client_frame, server_frame};
use pingme_protocol::{
    ClientFrame, ErrorCode, ServerFrame, decode_message, encode_frame_into, split_frame,
};
use pingme_router::port::{Dispatch, SessionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct TokenIsIdentity;

#[async_trait]
impl Authenticator for TokenIsIdentity {
    async fn authenticate(&self, token: &str) -> Result<Claims, ErrorCode> {
        let (user, device) = token.split_once(':').ok_or(ErrorCode::TokenInvalid)?;
        Ok(Claims {
            user: user.parse().map_err(|_| ErrorCode::TokenInvalid)?,
            device: device.to_string(),
            generation: 0,
            expires_at: i64::MAX,
        })
    }
}

struct NoDispatch;

impl Dispatch for NoDispatch {
    fn connected(&self, _: &SessionInfo) {}
    fn disconnected(&self, _: &SessionInfo) {}
    fn frame(&self, _: &SessionInfo, _: u64, _: client_frame::Body) {}
}

/// A "Name:   123 kB" field of a /proc file, in bytes.
fn proc_field(file: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn rss_bytes() -> u64 {
    proc_field("/proc/self/status", "VmRSS:")
}

/// Resident pages the allocator already gave back with MADV_FREE: the
/// kernel reclaims them under memory pressure, but RSS still counts them.
fn lazy_free_bytes() -> u64 {
    proc_field("/proc/self/smaps_rollup", "LazyFree:")
}

fn main() -> anyhow::Result<()> {
    let tuning = pingme_gateway::allocator::tune();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        return client(&args[2..]);
    }
    let transport = args.get(1).cloned().unwrap_or_else(|| "tcp".into());
    let count: usize = args.get(2).map_or(Ok(19_000), |n| n.parse())?;
    server(&transport, count, tuning)
}

fn server(
    transport: &str,
    count: usize,
    tuning: pingme_gateway::allocator::Tuning,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let connections = Arc::new(Connections::new());
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let config = GatewayConfig {
        listeners: ListenerConfig {
            tcp: Some(any),
            tls: (transport == "tls").then_some(any),
            quic: (transport == "quic").then_some(any),
        },
        limits: SessionLimits {
            idle_timeout: Duration::from_secs(600),
            auth_timeout: Duration::from_secs(30),
            ..SessionLimits::default()
        },
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(
        config,
        connections.clone(),
        Arc::new(NoDispatch),
        Arc::new(TokenIsIdentity),
    )?;
    let addrs = gateway.local_addrs();
    let target = match transport {
        "tcp" => addrs.tcp,
        "tls" => addrs.tls,
        "quic" => addrs.quic,
        "ws" => {
            let http = std::net::TcpListener::bind(any)?;
            http.set_nonblocking(true)?;
            let addr = http.local_addr()?;
            let app = ws_router(connections.clone());
            runtime.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(http).expect("listener");
                let _ = axum::serve(listener, app).await;
            });
            Some(addr)
        }
        other => anyhow::bail!("unknown transport {other} (tcp, tls, quic, ws)"),
    }
    .expect("listener bound");
    let cert_path = std::env::temp_dir().join(format!("pingme-idle-{}.der", std::process::id()));
    if let Some(cert) = gateway.certificate() {
        std::fs::write(&cert_path, cert.as_ref())?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let baseline = rss_bytes();
    let baseline_lazy = lazy_free_bytes();

    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["client", transport, &target.to_string(), &count.to_string()])
        .arg(&cert_path)
        .stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    lines.read_line(&mut line)?;
    anyhow::ensure!(line.starts_with("ready"), "client failed: {line:?}");
    let ramp = started.elapsed();
    // Let the last sessions settle in the index.
    while connections.online_users() < count && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let online = connections.online_users();
    let loaded = rss_bytes();
    let loaded_lazy = lazy_free_bytes();
    let per_connection = loaded.saturating_sub(baseline) as f64 / online.max(1) as f64;
    let in_use = (loaded - loaded_lazy).saturating_sub(baseline - baseline_lazy);
    println!(
        "transport={transport} connections={online} shards={} arena_eager_commit={} thp={} ramp_s={:.1} rss_baseline_kib={} rss_loaded_kib={} lazy_free_kib={} bytes_per_connection={per_connection:.0} bytes_per_connection_excluding_lazy_free={:.0}",
        gateway.shard_count(),
        tuning.arena_eager_commit,
        !tuning.disabled_huge_pages,
        ramp.as_secs_f64(),
        baseline / 1024,
        loaded / 1024,
        loaded_lazy / 1024,
        in_use as f64 / online.max(1) as f64,
    );
    if let Some(stdin) = child.stdin.as_mut() {
        let _ = stdin.write_all(b"stop\n");
    }
    drop(child.stdin.take());
    let _ = child.wait();
    let _ = std::fs::remove_file(&cert_path);
    runtime.block_on(gateway.shutdown(Duration::from_secs(2)));
    Ok(())
}

/// Hello + Authenticate for user `user`, one frame each.
fn login_frames(user: usize) -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(2);
    for (id, body) in [
        (
            1,
            client_frame::Body::Hello(v1::Hello {
                max_version: 1,
                min_version: 1,
                client_name: "idle-memory".into(),
            }),
        ),
        (
            2,
            client_frame::Body::Authenticate(v1::Authenticate {
                token: format!("{user}:d"),
            }),
        ),
    ] {
        let mut wire = BytesMut::new();
        encode_frame_into(
            &ClientFrame {
                request_id: id,
                body: Some(body),
            },
            &mut wire,
        );
        frames.push(wire.freeze());
    }
    frames
}

fn is_auth_ok(frame: &ServerFrame) -> bool {
    matches!(frame.body, Some(server_frame::Body::AuthOk(_)))
}

/// Logs in over a byte stream; the buffer is dropped afterwards.
async fn login_stream<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    user: usize,
) -> anyhow::Result<()> {
    io.write_all(&login_frames(user).concat()).await?;
    io.flush().await?;
    let mut buf = BytesMut::with_capacity(256);
    let mut frames = 0;
    while frames < 2 {
        while let Some(payload) = split_frame(&mut buf, 1 << 20)? {
            let frame: ServerFrame = decode_message(payload)?;
            frames += 1;
            if frames == 2 {
                anyhow::ensure!(is_auth_ok(&frame), "not authenticated: {frame:?}");
            }
        }
        if frames < 2 && io.read_buf(&mut buf).await? == 0 {
            anyhow::bail!("closed during login");
        }
    }
    Ok(())
}

/// Source addresses 127.0.0.2, 127.0.0.3, ...: 5,000 connections each.
fn source(i: usize) -> SocketAddr {
    let host = 2 + (i / 5_000) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0)
}

fn client_tls(cert_path: &str) -> anyhow::Result<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(std::fs::read(
        cert_path,
    )?))?;
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Everything a client process keeps open (held, never read: they only
/// need to stay open).
#[allow(dead_code)]
enum Held {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    Quic(quinn::Connection, quinn::SendStream, quinn::RecvStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>),
}

fn client(args: &[String]) -> anyhow::Result<()> {
    let transport = args[0].clone();
    let target: SocketAddr = args[1].parse()?;
    let count: usize = args[2].parse()?;
    let cert_path = args[3].clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let tls = if transport == "tls" || transport == "quic" {
            Some(Arc::new(client_tls(&cert_path)?))
        } else {
            None
        };
        let quic_endpoint = match &tls {
            Some(tls) if transport == "quic" => {
                let mut quic_tls = (**tls).clone();
                quic_tls.alpn_protocols = vec![pingme_protocol::QUIC_ALPN.to_vec()];
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(quic_tls)?;
                // A large socket buffer, as the gateway's: the server's
                // handshake flights for a whole batch arrive at once.
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )?;
                let _ = socket.set_recv_buffer_size(8 << 20);
                let _ = socket.set_send_buffer_size(8 << 20);
                socket.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())?;
                let runtime = quinn::default_runtime().expect("inside tokio");
                let mut endpoint = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket.into(),
                    runtime,
                )?;
                let mut config = quinn::ClientConfig::new(Arc::new(crypto));
                // quinn's default idle timeout (30 s) would close the first
                // sessions while the last are still opening; without one
                // the server's (the session's idle timeout) applies.
                let mut transport = quinn::TransportConfig::default();
                transport.max_idle_timeout(None);
                config.transport_config(Arc::new(transport));
                endpoint.set_default_client_config(config);
                Some(endpoint)
            }
            _ => None,
        };
        let mut held = Vec::with_capacity(count);
        // QUIC handshakes burst several datagrams each: a smaller batch
        // keeps them within the UDP socket buffers (no retransmission
        // delays).
        let batch = if transport == "quic" { 128 } else { 256 };
        for start in (0..count).step_by(batch) {
            let mut tasks = Vec::new();
            for i in start..(start + batch).min(count) {
                let transport = transport.clone();
                let tls = tls.clone();
                let quic_endpoint = quic_endpoint.clone();
                tasks.push(tokio::spawn(async move {
                    let user = i + 1;
                    let connect_tcp = || async move {
                        let socket = tokio::net::TcpSocket::new_v4()?;
                        socket.bind(source(i))?;
                        anyhow::Ok(socket.connect(target).await?)
                    };
                    let held = match transport.as_str() {
                        "tcp" => {
                            let mut stream = connect_tcp().await?;
                            login_stream(&mut stream, user).await?;
                            Held::Tcp(stream)
                        }
                        "tls" => {
                            let connector = tokio_rustls::TlsConnector::from(tls.expect("tls"));
                            let name = rustls::pki_types::ServerName::try_from("localhost")?;
                            let mut stream = connector.connect(name, connect_tcp().await?).await?;
                            login_stream(&mut stream, user).await?;
                            Held::Tls(Box::new(stream))
                        }
                        "quic" => {
                            let endpoint = quic_endpoint.expect("endpoint");
                            let connection = endpoint.connect(target, "localhost")?.await?;
                            let (send, recv) = connection.open_bi().await?;
                            let mut io = tokio::io::join(recv, send);
                            login_stream(&mut io, user).await?;
                            let (recv, send) = io.into_inner();
                            Held::Quic(connection, send, recv)
                        }
                        _ => {
                            let stream = connect_tcp().await?;
                            let (mut socket, _) = tokio_tungstenite::client_async(
                                format!("ws://{target}/v1/ws"),
                                stream,
                            )
                            .await?;
                            for frame in login_frames(user) {
                                socket
                                    .send(tokio_tungstenite::tungstenite::Message::Binary(frame))
                                    .await?;
                            }
                            let mut frames = 0;
                            while frames < 2 {
                                let Some(message) = socket.next().await else {
                                    anyhow::bail!("closed during login");
                                };
                                if let tokio_tungstenite::tungstenite::Message::Binary(data) =
                                    message?
                                {
                                    frames += 1;
                                    let mut buf = BytesMut::from(&data[..]);
                                    if frames == 2 {
                                        let payload =
                                            split_frame(&mut buf, 1 << 20)?.expect("a frame");
                                        let frame: ServerFrame = decode_message(payload)?;
                                        anyhow::ensure!(is_auth_ok(&frame), "not authenticated");
                                    }
                                }
                            }
                            Held::Ws(Box::new(socket))
                        }
                    };
                    anyhow::Ok(held)
                }));
            }
            for task in tasks {
                held.push(task.await??);
            }
        }
        println!("ready {}", held.len());
        std::io::stdout().flush()?;
        // Hold every session idle until the server says stop.
        let mut stdin = tokio::io::stdin();
        let mut byte = [0u8; 1];
        let _ = stdin.read(&mut byte).await;
        drop(held);
        anyhow::Ok(())
    })
}
