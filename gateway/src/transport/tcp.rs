//! TCP and TLS: SO_REUSEPORT listener groups (one socket per shard on the
//! same port), accept loops, and serving a byte stream through the
//! handshake and then the connection driver.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingme_protocol::{ErrorCode, split_frame};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::accept::AcceptBackoff;
use crate::connection::{CloseReason, Conn, Transport};
use crate::session::{FrameTransport, Refusal, handshake};
use crate::shard_context::{ShardCtx, count_disconnect};
use crate::transport::stream::drive_stream;
use crate::transport::tls_stream;

/// Binds `count` TCP listeners on the same address with SO_REUSEPORT, so
/// the kernel spreads new connections over the shards. Port 0 picks one
/// free port for all of them.
pub(crate) fn bind_tcp_group(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    bind_reuseport_group(addr, count, Type::STREAM, Protocol::TCP, |socket| {
        socket.listen(4096)?;
        Ok(socket.into())
    })
}

/// Kernel buffer asked for each QUIC socket, each way. A reconnect storm
/// sends thousands of Initial packets (1,200+ bytes each) at once; with the
/// kernel's default (about 200 KB, some 90 datagrams on loopback) most were
/// dropped (`RcvbufErrors` in /proc/net/snmp) and their clients waited for
/// retransmission timers: seconds per handshake. The kernel caps the size
/// at `net.core.rmem_max` / `wmem_max`; it is memory only while datagrams
/// wait, never per connection.
pub(crate) const UDP_SOCKET_BUFFER: usize = 8 << 20;

/// Binds `count` UDP sockets on the same address with SO_REUSEPORT (QUIC),
/// with [`UDP_SOCKET_BUFFER`] each way.
pub(crate) fn bind_udp_group(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    bind_reuseport_group(addr, count, Type::DGRAM, Protocol::UDP, |socket| {
        // Best effort: a kernel that refuses keeps its default.
        let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
        Ok(socket.into())
    })
}

/// The shared part: `count` non-blocking sockets bound to one address with
/// SO_REUSEPORT; after the first bind, the others reuse its port (so port
/// 0 means one free port for the whole group).
fn bind_reuseport_group<S>(
    mut addr: SocketAddr,
    count: usize,
    kind: Type,
    protocol: Protocol,
    finish: impl Fn(Socket) -> std::io::Result<S>,
) -> std::io::Result<Vec<S>> {
    let mut group = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        addr = socket.local_addr()?.as_socket().unwrap_or(addr);
        group.push(finish(socket)?);
    }
    Ok(group)
}

/// Accepts plain TCP connections until shutdown.
pub(crate) async fn accept_tcp(listener: TcpListener, ctx: Rc<ShardCtx>) {
    let mut backoff = AcceptBackoff::new("tcp");
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let deadline = auth_deadline(&ctx);
                // The task is the connection's only per-connection future:
                // spawned directly so nothing wraps (and copies) its state.
                tokio::task::spawn_local(serve_stream(
                    stream,
                    ctx.clone(),
                    Transport::Tcp,
                    deadline,
                ));
            }
            Err(error) => backoff.failed(&error).await,
        }
    }
}

/// When a connection accepted now must have authenticated: one deadline
/// from accept covers the TLS or QUIC handshake, Hello and Authenticate.
pub(crate) fn auth_deadline(ctx: &ShardCtx) -> tokio::time::Instant {
    tokio::time::Instant::now() + ctx.limits.auth_timeout
}

/// Accepts TLS connections until shutdown; the TLS handshake counts
/// against the auth timeout.
pub(crate) async fn accept_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    ctx: Rc<ShardCtx>,
) {
    let mut backoff = AcceptBackoff::new("tls");
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let deadline = auth_deadline(&ctx);
                let ctx = ctx.clone();
                let config = config.clone();
                tokio::task::spawn_local(async move {
                    // Boxed: the handshake's state (rustls' connection,
                    // about 1.3 KB) is freed when it ends, rather than
                    // sizing the task for the connection's whole life.
                    let handshake = Box::pin(tls_stream::accept(stream, config));
                    let tls = tokio::time::timeout_at(deadline, handshake).await;
                    match tls {
                        Ok(Ok(stream)) => {
                            serve_stream(stream, ctx, Transport::Tls, deadline).await;
                        }
                        Ok(Err(_)) => count_disconnect(Transport::Tls, CloseReason::IoError),
                        Err(_) => count_disconnect(Transport::Tls, CloseReason::AuthTimeout),
                    }
                });
            }
            Err(error) => backoff.failed(&error).await,
        }
    }
}

/// A byte stream during the handshake: its own small buffer, dropped
/// once the session is open.
struct StreamHandshake<'a, S> {
    io: &'a mut S,
    buf: BytesMut,
    /// Answers not written yet: they go out when the handshake next waits
    /// for the peer, or with `AuthOk` or the refusal. A client that
    /// pipelines Hello and Authenticate (the SDK does) so gets HelloAck and
    /// AuthOk in one write (one send, one wake-up on each side, and for TLS
    /// one record fewer). At most `MAX_FRAMES_BEFORE_AUTH` small answers.
    held: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> StreamHandshake<'_, S> {
    /// The held answers, taken.
    fn take_held(&mut self) -> Bytes {
        std::mem::take(&mut self.held).freeze()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameTransport for StreamHandshake<'_, S> {
    async fn next_payload(&mut self, max_frame_size: usize) -> Result<Option<Bytes>, ErrorCode> {
        loop {
            match split_frame(&mut self.buf, max_frame_size) {
                Ok(Some(payload)) => return Ok(Some(payload)),
                Ok(None) => {}
                Err(error) => return Err(error.code()),
            }
            // The peer may be waiting for our answers before it sends more.
            if !self.held.is_empty() {
                let held = self.take_held();
                if self.io.write_all(&held).await.is_err() || self.io.flush().await.is_err() {
                    return Ok(None);
                }
            }
            self.buf.reserve(512);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    async fn send(&mut self, frame: Bytes) -> std::io::Result<()> {
        self.held.extend_from_slice(&frame);
        Ok(())
    }
}

/// Serves one byte-stream connection from its first byte to its close and
/// gives the stream back (QUIC finishes its stream afterwards).
pub(crate) async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    ctx: Rc<ShardCtx>,
    transport: Transport,
    deadline: tokio::time::Instant,
) -> S {
    // Boxed: the handshake's buffers, timers and refusal path live only
    // while it runs, so the connection's task stays small afterwards.
    let Some(conn) = Box::pin(admit(&mut io, &ctx, transport, deadline)).await else {
        return io;
    };
    drive_stream(&mut io, &conn, &ctx).await;
    // Boxed: the timer exists only while closing.
    let _ = Box::pin(tokio::time::timeout(ctx.limits.close_linger, io.shutdown())).await;
    ctx.forget(&conn);
    io
}

/// The handshake: a new session, or the refusal told to the client.
async fn admit<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    ctx: &ShardCtx,
    transport: Transport,
    deadline: tokio::time::Instant,
) -> Option<Rc<Conn>> {
    let mut handshake = StreamHandshake {
        io: &mut *io,
        buf: BytesMut::new(),
        held: BytesMut::new(),
    };
    match guarded_handshake(&mut handshake, ctx, deadline).await {
        Ok((claims, request_id)) => {
            let held = handshake.take_held();
            // Keep frames pipelined after Authenticate, in a buffer of their own.
            let leftover = if handshake.buf.is_empty() {
                BytesMut::new()
            } else {
                BytesMut::from(&handshake.buf[..])
            };
            Some(ctx.open_session(&claims, request_id, transport, held, leftover))
        }
        Err(refusal) => {
            count_disconnect(transport, refusal.reason());
            let mut last_words = BytesMut::from(&handshake.take_held()[..]);
            if let Some(frame) = refusal.frame(ctx.limits.shutdown_retry_after) {
                last_words.extend_from_slice(&frame);
            }
            if !last_words.is_empty() {
                let _ = tokio::time::timeout(ctx.limits.close_linger, async {
                    io.write_all(&last_words).await?;
                    io.shutdown().await
                })
                .await;
            }
            None
        }
    }
}

/// The handshake under the connection's auth deadline (see
/// [`auth_deadline`]) and the shutdown signal.
pub(crate) async fn guarded_handshake<T: FrameTransport>(
    transport: &mut T,
    ctx: &ShardCtx,
    deadline: tokio::time::Instant,
) -> Result<(crate::auth::Claims, u64), Refusal> {
    tokio::select! {
        outcome = tokio::time::timeout_at(deadline, handshake(transport, ctx)) => {
            outcome.unwrap_or(Err(Refusal::Fatal {
                code: ErrorCode::AuthTimeout,
                message: "no successful Authenticate within the auth timeout",
                reason: CloseReason::AuthTimeout,
                request_id: 0,
            }))
        }
        _ = ctx.shutdown.cancelled() => Err(Refusal::ShuttingDown),
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A frame on the wire: length prefix, then `payload`.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(payload);
        wire
    }

    #[tokio::test]
    async fn answers_are_held_until_the_handshake_would_wait_for_the_peer() {
        let (mut server_side, mut peer) = tokio::io::duplex(4096);
        // The peer pipelines two frames.
        peer.write_all(&[framed(b"hello"), framed(b"auth")].concat())
            .await
            .unwrap();
        let mut handshake = StreamHandshake {
            io: &mut server_side,
            buf: BytesMut::new(),
            held: BytesMut::new(),
        };
        let first = handshake.next_payload(1024).await.unwrap().unwrap();
        assert_eq!(&first[..], b"hello");
        handshake
            .send(Bytes::from_static(b"hello-ack"))
            .await
            .unwrap();
        // The second frame is already here: taking it writes nothing.
        let second = handshake.next_payload(1024).await.unwrap().unwrap();
        assert_eq!(&second[..], b"auth");
        let mut probe = [0u8; 64];
        assert!(
            peer.read(&mut probe).now_or_never().is_none(),
            "an answer went out while the peer's next frame was waiting"
        );
        handshake.send(Bytes::from_static(b"error")).await.unwrap();
        // Nothing left to read: the held answers go out, in order, before
        // the handshake waits, and the peer's answer to them comes back.
        let peer_side = async {
            let mut answers = [0u8; 14];
            peer.read_exact(&mut answers).await.unwrap();
            assert_eq!(&answers, b"hello-ackerror");
            peer.write_all(&framed(b"retry")).await.unwrap();
        };
        let (third, ()) = tokio::join!(handshake.next_payload(1024), peer_side);
        assert_eq!(&third.unwrap().unwrap()[..], b"retry");
        assert!(handshake.take_held().is_empty());
    }
}
