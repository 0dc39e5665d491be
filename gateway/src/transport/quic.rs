//! QUIC: each shard runs its own quinn endpoint on its own UDP socket
//! (SO_REUSEPORT on a shared port). A client opens one bidirectional stream
//! right after the handshake and both sides write frames on it as on TCP,
//! so the session code is the same as for TCP. The handshake must
//! negotiate ALPN `pingme/1` ([`pingme_protocol::QUIC_ALPN`]).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::connection::{CloseReason, Transport};
use crate::shard_context::{ShardCtx, count_disconnect};
use crate::transport::tcp::{auth_deadline, serve_stream};

/// A quinn server configuration over a rustls one. QUIC's own idle timeout
/// sits a little above the session's, so the session decides. The TLS
/// configuration is the TCP+TLS one plus ALPN `pingme/1`: rustls then
/// refuses a QUIC client that offers no ALPN or only others.
pub(crate) fn server_config(
    tls: &rustls::ServerConfig,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![pingme_protocol::QUIC_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout + Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    transport.max_idle_timeout(Some(idle));
    // Clients open exactly one bidirectional stream.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The shard's endpoint on its own socket (must run inside the shard's runtime).
pub(crate) fn endpoint(
    socket: std::net::UdpSocket,
    config: quinn::ServerConfig,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Accepts QUIC connections until shutdown.
pub(crate) async fn accept_quic(endpoint: quinn::Endpoint, ctx: Rc<ShardCtx>) {
    loop {
        let incoming = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            return;
        };
        tokio::task::spawn_local(serve_quic(incoming, ctx.clone()));
    }
}

async fn serve_quic(incoming: quinn::Incoming, ctx: Rc<ShardCtx>) {
    // One deadline from the first packet: QUIC handshake, stream, Hello
    // and Authenticate.
    let deadline = auth_deadline(&ctx);
    let connection = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(_)) => return count_disconnect(Transport::Quic, CloseReason::IoError),
        Err(_) => return count_disconnect(Transport::Quic, CloseReason::AuthTimeout),
    };
    let (send, recv) = match tokio::time::timeout_at(deadline, connection.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return count_disconnect(Transport::Quic, CloseReason::PeerClosed),
        Err(_) => {
            connection.close(0u32.into(), b"auth timeout");
            return count_disconnect(Transport::Quic, CloseReason::AuthTimeout);
        }
    };
    let io = serve_stream(
        tokio::io::join(recv, send),
        ctx.clone(),
        Transport::Quic,
        deadline,
    )
    .await;
    let (_recv, send) = io.into_inner();
    // The stream is finished; dropping the connection now could lose its
    // last frames, so wait (bounded) until the client has them.
    let _ = tokio::time::timeout(ctx.limits.close_linger, send.stopped()).await;
    connection.close(0u32.into(), b"closed");
}
