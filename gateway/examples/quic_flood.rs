//! Measures what QUIC Initial packets from sources that never answer cost
//! the gateway, the shape of a forged-source flood: each is a real client's
//! first packet (a fresh key share and ClientHello), sent from one of 64
//! sockets that never reply.
//!
//! `quic_flood [initials] [per_second] [default|no-retry]` starts a gateway
//! with one shard in this process, sends `initials` (default 20,000) at
//! `per_second` (default 5,000), waits until the shard is idle again, and
//! prints the shard's CPU per Initial and what it did with them
//! (`pingme_gateway_quic_incoming_total`). `no-retry` lifts the Retry
//! threshold and the handshake cap, as before they existed. Run it in
//! release:
//!
//! `cargo run --release -p pingme-gateway --example quic_flood -- 20000 5000 default`

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingme_gateway::auth::{Authenticator, Claims};
use pingme_gateway::{Connections, Gateway, GatewayConfig, ListenerConfig, SessionLimits};
use pingme_protocol::ErrorCode;
use pingme_protocol::v1::client_frame;
use pingme_router::port::{Dispatch, SessionInfo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct NobodyAuthenticates;

#[async_trait]
impl Authenticator for NobodyAuthenticates {
    async fn authenticate(&self, _: &str) -> Result<Claims, ErrorCode> {
        Err(ErrorCode::TokenInvalid)
    }
}

struct NoDispatch;

impl Dispatch for NoDispatch {
    fn connected(&self, _: &SessionInfo) {}
    fn disconnected(&self, _: &SessionInfo) {}
    fn frame(&self, _: &SessionInfo, _: u64, _: client_frame::Body) {}
}

/// CPU seconds of this process's shard threads.
fn shard_cpu_seconds() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("pingme-shard") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: utime and stime are the
        // 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        total += (field(11) + field(12)) / ticks;
    }
    total
}

fn main() -> anyhow::Result<()> {
    pingme_gateway::allocator::tune();
    let args: Vec<String> = std::env::args().collect();
    let initials: usize = args.get(1).map_or(Ok(20_000), |n| n.parse())?;
    let per_second: u64 = args.get(2).map_or(Ok(5_000), |n| n.parse())?;
    let protected = args.get(3).map_or("default", String::as_str) != "no-retry";

    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let mut limits = SessionLimits::default();
    if !protected {
        limits.quic_handshakes_before_retry = usize::MAX;
        limits.max_quic_handshakes = usize::MAX;
    }
    let config = GatewayConfig {
        listeners: ListenerConfig {
            tcp: None,
            tls: None,
            quic: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        },
        shards: Some(1),
        pin_shards: false,
        limits,
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(
        config,
        Arc::new(Connections::new()),
        Arc::new(NoDispatch),
        Arc::new(NobodyAuthenticates),
    )?;
    let server = gateway.local_addrs().quic.expect("a QUIC listener");
    let cert = gateway.certificate().expect("a development certificate");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone())?;
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![pingme_protocol::QUIC_ALPN.to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let client_config = quinn_proto::ClientConfig::new(Arc::new(crypto));
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let sockets: Vec<UdpSocket> = (0..64)
        .map(|i| UdpSocket::bind(SocketAddr::from(([127, 0, 1, 2 + i as u8], 0))))
        .collect::<Result<_, _>>()?;

    let cpu_before = shard_cpu_seconds();
    let started = Instant::now();
    let mut datagram = Vec::with_capacity(1500);
    for i in 0..initials {
        // Paced: the i-th Initial leaves at i / per_second.
        let due = started + Duration::from_micros(i as u64 * 1_000_000 / per_second.max(1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        let (_, mut connection) =
            endpoint.connect(now, client_config.clone(), server, "localhost")?;
        datagram.clear();
        let transmit = connection
            .poll_transmit(now, 1, &mut datagram)
            .expect("a client's first packet");
        // Full socket buffers drop datagrams, as a flood's would be.
        let _ = sockets[i % sockets.len()].send_to(&datagram[..transmit.size], server);
    }
    let sent_in = started.elapsed();

    // Until the shard has been idle for a second (bounded).
    let mut last = shard_cpu_seconds();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = shard_cpu_seconds();
        if now - last < 0.01 || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let cpu = shard_cpu_seconds() - cpu_before;
    let outcome = |outcome: &str| -> f64 {
        let series = format!("pingme_gateway_quic_incoming_total{{outcome=\"{outcome}\"}}");
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str())?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    println!(
        "{}: {initials} Initials from 64 silent sources in {:.2}s; the shard: {} handshakes started, \
         {} Retries, {} refused; {:.2} CPU-s in all = {:.0} us per Initial",
        if protected {
            "default limits"
        } else {
            "no Retry, no cap"
        },
        sent_in.as_secs_f64(),
        outcome("accepted"),
        outcome("retry"),
        outcome("refused"),
        cpu,
        cpu * 1e6 / initials as f64,
    );
    runtime.block_on(gateway.shutdown(Duration::from_secs(1)));
    Ok(())
}
