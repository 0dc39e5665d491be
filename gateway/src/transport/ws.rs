//! WebSocket at `/v1/ws` on the HTTP port. The HTTP server (the API's axum
//! app, with [`ws_router`] merged in) accepts the upgrade and hands the
//! socket to a shard, which serves it like any other connection. Each
//! binary WebSocket message carries exactly one frame, length prefix
//! included, in both directions.

use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use pingme_protocol::{ErrorCode, ServerFrame, encode_frame};
use tokio::time::Sleep;

use crate::connection::{CloseReason, Conn, Transport};
use crate::index::Connections;
use crate::session::{FrameTransport, on_frame, whole_message_payload};
use crate::shard_context::{ShardCtx, count_disconnect};
use crate::transport::stream::after_flush;
use crate::transport::tcp::guarded_handshake;

/// Read buffer of a WebSocket connection, held for the connection's life
/// (tungstenite keeps it): most of a client's frames fit (acks, typing,
/// reads, a short chat message; a larger frame reserves its whole length
/// once its header is read). Also the most asked of the socket per read,
/// so a larger frame takes several reads: an Authenticate with its token
/// two, a 64 KiB frame some 340. A browser sends little; every idle tab
/// holds this.
pub(crate) const WS_READ_BUFFER: usize = 192;

/// The WebSocket route (`GET /v1/ws`), to merge into the HTTP app. It
/// answers 503 until the gateway has started.
pub fn ws_router(connections: Arc<Connections>) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .with_state(connections)
}

async fn upgrade(
    State(connections): State<Arc<Connections>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // The unauthenticated deadline starts with the upgrade request, not
    // when a shard adopts the socket.
    let deadline = tokio::time::Instant::now();
    let Some(links) = connections.links().cloned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "gateway not started").into_response();
    };
    let deadline = deadline + links.limits.auth_timeout;
    let max_message = websocket_message_limit(links.limits.max_frame_size);
    upgrade
        // tungstenite's defaults (128 KiB read and write buffers) would cost
        // far more than the rest of an idle session; writes are flushed per
        // batch by the shard, and a full socket pushes back into the
        // session's own queue, where the slow-consumer limit applies.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| async move {
            if !links.adopt_websocket(socket, deadline) {
                count_disconnect(Transport::WebSocket, CloseReason::Shutdown);
            }
        })
}

/// tungstenite's own message limit: twice a maximum frame (prefix
/// included). Above pingme's limit, so an oversize frame reaches pingme's
/// check and gets `FRAME_TOO_LARGE` before the close; still a bound, so a
/// peer cannot make us buffer an unbounded message (beyond it the library
/// closes the socket with 1009, message too big).
fn websocket_message_limit(max_frame_size: usize) -> usize {
    2 * (max_frame_size + pingme_protocol::LENGTH_PREFIX)
}

struct WsHandshake<'a> {
    socket: &'a mut WebSocket,
}

impl FrameTransport for WsHandshake<'_> {
    async fn next_payload(&mut self, max_frame_size: usize) -> Result<Option<Bytes>, ErrorCode> {
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Binary(message))) => {
                    return whole_message_payload(message, max_frame_size).map(Some);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => return Err(ErrorCode::Malformed),
                Some(Ok(Message::Close(_)) | Err(_)) | None => return Ok(None),
            }
        }
    }

    async fn send(&mut self, frame: Bytes) -> std::io::Result<()> {
        self.socket
            .send(Message::Binary(frame))
            .await
            .map_err(std::io::Error::other)
    }
}

/// Serves one WebSocket on this shard. The socket stays boxed: a future
/// holding it by value can keep more than one slot of its size across
/// awaits, which made every idle WebSocket's task about 1.2 KB.
pub(crate) async fn serve_websocket(
    mut socket: Box<WebSocket>,
    ctx: Rc<ShardCtx>,
    deadline: tokio::time::Instant,
) {
    // Boxed: the handshake, its timers and the refusal path live only
    // while they run, so the connection's task stays small afterwards.
    if let Some(conn) = Box::pin(admit(&mut socket, &ctx, deadline)).await {
        let mut linger: Option<Pin<Box<Sleep>>> = None;
        poll_fn(|cx| poll_websocket(&mut socket, &conn, &ctx, &mut linger, cx)).await;
        ctx.forget(&conn);
    }
    // Boxed: the timer exists only while closing.
    let _ = Box::pin(tokio::time::timeout(
        ctx.limits.close_linger,
        socket.close(),
    ))
    .await;
}

/// The handshake: a new session, or the refusal told to the client.
async fn admit(
    socket: &mut WebSocket,
    ctx: &ShardCtx,
    deadline: tokio::time::Instant,
) -> Option<Rc<Conn>> {
    let mut transport = WsHandshake { socket };
    match guarded_handshake(&mut transport, ctx, deadline).await {
        Ok((claims, request_id)) => Some(ctx.open_session(
            &claims,
            request_id,
            Transport::WebSocket,
            Bytes::new(),
            Default::default(),
        )),
        Err(refusal) => {
            count_disconnect(Transport::WebSocket, refusal.reason());
            if let Some(frame) = refusal.frame(ctx.limits.shutdown_retry_after) {
                let _ = tokio::time::timeout(
                    ctx.limits.close_linger,
                    transport.socket.send(Message::Binary(frame)),
                )
                .await;
            }
            None
        }
    }
}

fn poll_websocket(
    socket: &mut WebSocket,
    conn: &Rc<Conn>,
    ctx: &Rc<ShardCtx>,
    linger: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    conn.register_waker(cx.waker());
    let mut messages = 0;
    loop {
        let flush = poll_send_queue(socket, conn, cx);
        if let Some(done) = after_flush(flush, conn, ctx, linger, cx) {
            return done;
        }
        if messages == 64 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        messages += 1;
        match Pin::new(&mut *socket).poll_next(cx) {
            Poll::Ready(Some(Ok(Message::Binary(message)))) => {
                match whole_message_payload(message, ctx.limits.max_frame_size) {
                    Ok(payload) => on_frame(conn, ctx, payload),
                    Err(ErrorCode::FrameTooLarge) => {
                        conn.close(
                            Some(ctx.frames.too_large.clone()),
                            CloseReason::FrameTooLarge,
                        );
                    }
                    Err(_) => conn.close(Some(malformed()), CloseReason::Malformed),
                }
            }
            Poll::Ready(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {
                conn.touch(ctx.now_ms());
            }
            Poll::Ready(Some(Ok(Message::Text(_)))) => {
                conn.close(Some(malformed()), CloseReason::Malformed);
            }
            Poll::Ready(Some(Ok(Message::Close(_)))) | Poll::Ready(None) => {
                conn.close(None, CloseReason::PeerClosed);
            }
            Poll::Ready(Some(Err(_))) => conn.close(None, CloseReason::IoError),
            Poll::Pending => return Poll::Pending,
        }
    }
}

fn malformed() -> Bytes {
    encode_frame(&ServerFrame::fatal(
        ErrorCode::Malformed,
        "each binary message must hold exactly one frame",
    ))
}

/// Sends queued frames, one binary message each, then flushes.
fn poll_send_queue(
    socket: &mut WebSocket,
    conn: &Conn,
    cx: &mut Context<'_>,
) -> Poll<Result<(), ()>> {
    let mut sent = 0u64;
    while conn.has_queued() {
        match Pin::new(&mut *socket).poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
            Poll::Pending => break,
        }
        let Some(frame) = conn.pop_frame() else {
            break;
        };
        if Pin::new(&mut *socket)
            .start_send(Message::Binary(frame))
            .is_err()
        {
            return Poll::Ready(Err(()));
        }
        sent += 1;
    }
    if sent > 0 {
        Transport::WebSocket.frames_out(sent);
    }
    match Pin::new(&mut *socket).poll_flush(cx) {
        Poll::Ready(Ok(())) if !conn.has_queued() => Poll::Ready(Ok(())),
        Poll::Ready(Ok(())) => Poll::Pending,
        Poll::Ready(Err(_)) => Poll::Ready(Err(())),
        Poll::Pending => Poll::Pending,
    }
}
