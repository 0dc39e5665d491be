//! Starting and stopping the connection side of the gateway: binds every
//! listener (one socket per shard and transport, SO_REUSEPORT), starts one
//! pinned shard thread per core, attaches the shards to the connection
//! index, and runs the one shutdown path (go-away to every client, flush,
//! exit within a grace period).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pingme_router::port::Dispatch;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::index::{Connections, ShardLinks};
use crate::limits::SessionLimits;
use crate::shard::{self, ShardSetup};
use crate::transport::quic;
use crate::transport::tcp::{bind_tcp_group, bind_udp_group};
use crate::transport::tls::{TlsError, TlsMaterial};

/// Where the gateway listens; `None` disables a transport. WebSocket lives
/// on the HTTP port (see [`ws_router`](crate::transport::ws::ws_router)).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Plain TCP (default 127.0.0.1:7000).
    pub tcp: Option<SocketAddr>,
    /// TCP with TLS (default 127.0.0.1:7443).
    pub tls: Option<SocketAddr>,
    /// QUIC over UDP (default 127.0.0.1:7443).
    pub quic: Option<SocketAddr>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 7000))),
            tls: Some(SocketAddr::from(([127, 0, 0, 1], 7443))),
            quic: Some(SocketAddr::from(([127, 0, 0, 1], 7443))),
        }
    }
}

/// The connection side's configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Listening addresses.
    pub listeners: ListenerConfig,
    /// Number of shards; `None` means one per core.
    pub shards: Option<usize>,
    /// Pin each shard thread to its own core.
    pub pin_shards: bool,
    /// PEM certificate chain for TLS and QUIC.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS and QUIC.
    pub tls_key: Option<PathBuf>,
    /// Development mode: without a configured certificate, TLS and QUIC
    /// use a self-signed one. Outside development mode they refuse to start.
    pub dev_mode: bool,
    /// Per-session limits.
    pub limits: SessionLimits,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listeners: ListenerConfig::default(),
            shards: None,
            pin_shards: true,
            tls_cert: None,
            tls_key: None,
            dev_mode: true,
            limits: SessionLimits::default(),
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({transport}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// tcp, tls or quic.
        transport: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS material is missing or invalid.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC configuration was refused.
    #[error("QUIC configuration failed: {0}")]
    Quic(String),
    /// This connection index already serves a running gateway.
    #[error("the connection index is already attached to a gateway")]
    AlreadyStarted,
    /// A shard thread could not be created.
    #[error("cannot start a shard thread: {0}")]
    Thread(std::io::Error),
}

/// The addresses actually bound (useful with port 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct BoundAddrs {
    /// Plain TCP.
    pub tcp: Option<SocketAddr>,
    /// TLS.
    pub tls: Option<SocketAddr>,
    /// QUIC.
    pub quic: Option<SocketAddr>,
}

/// The running connection side: shards, listeners, index.
pub struct Gateway {
    connections: Arc<Connections>,
    shutdown: CancellationToken,
    grace_ms: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
    addrs: BoundAddrs,
    certificate: Option<CertificateDer<'static>>,
    shard_count: usize,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addrs", &self.addrs)
            .field("shards", &self.shard_count)
            .finish()
    }
}

impl Gateway {
    /// Binds every listener, starts the shards and attaches them to
    /// `connections` (the outbox the router was built with).
    pub fn start(
        config: GatewayConfig,
        connections: Arc<Connections>,
        dispatch: Arc<dyn Dispatch>,
        authenticator: Arc<dyn Authenticator>,
    ) -> Result<Gateway, StartError> {
        describe_metrics();
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let shard_count = config
            .shards
            .unwrap_or_else(|| cores.len().max(1))
            .clamp(1, usize::from(u16::MAX));
        let bind_error = |addr, transport| {
            move |source| StartError::Bind {
                addr,
                transport,
                source,
            }
        };

        let mut addrs = BoundAddrs::default();
        let mut tcp: Vec<Option<std::net::TcpListener>> = match config.listeners.tcp {
            Some(addr) => {
                let group = bind_tcp_group(addr, shard_count).map_err(bind_error(addr, "tcp"))?;
                addrs.tcp = group.first().and_then(|l| l.local_addr().ok());
                group.into_iter().map(Some).collect()
            }
            None => (0..shard_count).map(|_| None).collect(),
        };
        let needs_tls = config.listeners.tls.is_some() || config.listeners.quic.is_some();
        let material = if needs_tls {
            Some(TlsMaterial::load_or_generate(
                config.tls_cert.as_deref(),
                config.tls_key.as_deref(),
                config.dev_mode,
            )?)
        } else {
            None
        };
        let tls_config = material
            .as_ref()
            .map(TlsMaterial::server_config)
            .transpose()?;
        let mut tls: Vec<Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>> =
            match (config.listeners.tls, &tls_config) {
                (Some(addr), Some(tls_config)) => {
                    let group =
                        bind_tcp_group(addr, shard_count).map_err(bind_error(addr, "tls"))?;
                    addrs.tls = group.first().and_then(|l| l.local_addr().ok());
                    group
                        .into_iter()
                        .map(|listener| Some((listener, tls_config.clone())))
                        .collect()
                }
                _ => (0..shard_count).map(|_| None).collect(),
            };
        let mut quic: Vec<Option<(std::net::UdpSocket, quinn::ServerConfig)>> =
            match (config.listeners.quic, &tls_config) {
                (Some(addr), Some(tls_config)) => {
                    let server_config = quic::server_config(tls_config, config.limits.idle_timeout)
                        .map_err(StartError::Quic)?;
                    let group =
                        bind_udp_group(addr, shard_count).map_err(bind_error(addr, "quic"))?;
                    quic::steer_by_connection_id(&group).map_err(bind_error(addr, "quic"))?;
                    addrs.quic = group.first().and_then(|s| s.local_addr().ok());
                    group
                        .into_iter()
                        .map(|socket| Some((socket, server_config.clone())))
                        .collect()
                }
                _ => (0..shard_count).map(|_| None).collect(),
            };

        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..shard_count)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let links = Arc::new(ShardLinks::new(inboxes, config.limits.clone()));
        if !connections.attach(links) {
            return Err(StartError::AlreadyStarted);
        }

        let shutdown = CancellationToken::new();
        let grace_ms = Arc::new(AtomicU64::new(config.limits.close_linger.as_millis() as u64));
        let mut threads = Vec::with_capacity(shard_count);
        for (index, inbox) in receivers.into_iter().enumerate() {
            let setup = ShardSetup {
                id: index as u16,
                core: config
                    .pin_shards
                    .then(|| cores.get(index % cores.len().max(1)).copied())
                    .flatten(),
                limits: config.limits.clone(),
                connections: connections.clone(),
                dispatch: dispatch.clone(),
                authenticator: authenticator.clone(),
                shutdown: shutdown.clone(),
                grace_ms: grace_ms.clone(),
                inbox,
                tcp: tcp[index].take(),
                tls: tls[index].take(),
                quic: quic[index].take(),
            };
            match shard::spawn(setup) {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    shutdown.cancel();
                    return Err(StartError::Thread(error));
                }
            }
        }
        tracing::info!(
            shards = shard_count,
            tcp = ?addrs.tcp,
            tls = ?addrs.tls,
            quic = ?addrs.quic,
            "gateway listening"
        );
        Ok(Gateway {
            connections,
            shutdown,
            grace_ms,
            threads,
            addrs,
            certificate: material.and_then(|m| m.chain.into_iter().next()),
            shard_count,
        })
    }

    /// The addresses actually bound.
    pub fn local_addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The TLS/QUIC leaf certificate (for development clients to trust the
    /// self-signed one).
    pub fn certificate(&self) -> Option<&CertificateDer<'static>> {
        self.certificate.as_ref()
    }

    /// The connection index (the router's outbox).
    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// How many shards run.
    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// Stops accepting, sends GoAway{SHUTDOWN} to every client after the
    /// frames already handed to the outbox (so call it after the router's
    /// shutdown: every accepted send is answered first), lets the queues
    /// flush and returns once every shard stopped or `grace` passed.
    pub async fn shutdown(mut self, grace: Duration) {
        self.grace_ms
            .store(grace.as_millis() as u64, Ordering::Relaxed);
        self.connections.mark_drained();
        self.shutdown.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        // Shards stop by themselves at the grace deadline; the margin only
        // covers thread teardown.
        if tokio::time::timeout(grace + Duration::from_secs(1), joined)
            .await
            .is_err()
        {
            tracing::warn!("shards did not stop within the grace period");
        }
    }
}

/// Help texts for the connection side's metrics (shown by the exporter).
pub(crate) fn describe_metrics() {
    metrics::describe_gauge!(
        "pingme_gateway_connections",
        "authenticated sessions, by transport and shard"
    );
    metrics::describe_counter!(
        "pingme_gateway_frames_in_total",
        "frames received on authenticated sessions, by transport"
    );
    metrics::describe_counter!(
        "pingme_gateway_frames_out_total",
        "frames written to authenticated sessions, by transport"
    );
    metrics::describe_counter!(
        "pingme_gateway_disconnects_total",
        "closed connections, by transport and reason"
    );
    metrics::describe_gauge!(
        quic::QUIC_HANDSHAKES,
        "QUIC handshakes in progress, by shard (compare with session.quic_retry_above and session.max_quic_handshakes)"
    );
    metrics::describe_counter!(
        quic::QUIC_INCOMING,
        "new QUIC connection attempts, by what the shard did: accepted, retry (the client must prove its address first, under load) or refused (too many handshakes in progress)"
    );
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.connections.mark_drained();
        self.shutdown.cancel();
    }
}
