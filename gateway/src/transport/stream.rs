//! The driver of a stream connection (TCP, TLS, a QUIC stream) once it is
//! authenticated: it writes the connection's queued frames, reads into the
//! shard's buffer and hands every complete frame to the session, until the
//! connection closes. What happens after a flush is shared with the
//! WebSocket driver.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use pingme_protocol::split_frame;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use crate::connection::{CloseReason, Conn};
use crate::session::on_frame;
use crate::shard_context::ShardCtx;

/// Bytes asked of the transport per read into the shard buffer.
const READ_CHUNK: usize = 16 * 1024;
/// Reads per wake-up before yielding to the other connections of the shard.
const READS_PER_TURN: usize = 16;

/// Drives an authenticated stream connection until it closes (the caller
/// then shuts the transport down). The driver is four words: it is the
/// idle connection's whole state inside its task.
pub(crate) fn drive_stream<'a, S: AsyncRead + AsyncWrite + Unpin>(
    io: &'a mut S,
    conn: &'a Rc<Conn>,
    ctx: &'a Rc<ShardCtx>,
) -> StreamDriver<'a, S> {
    // Frames that arrived in the same read as Authenticate.
    let mut partial = conn.take_partial();
    process_buffer(&mut partial, conn, ctx);
    conn.keep_partial(partial);
    StreamDriver {
        io,
        conn,
        ctx,
        linger: None,
    }
}

/// See [`drive_stream`].
pub(crate) struct StreamDriver<'a, S> {
    io: &'a mut S,
    conn: &'a Rc<Conn>,
    ctx: &'a Rc<ShardCtx>,
    /// Started when the connection starts closing: how long its last
    /// frames may take to flush.
    linger: Option<Pin<Box<Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for StreamDriver<'_, S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        poll_stream(this.io, this.conn, this.ctx, &mut this.linger, cx)
    }
}

fn poll_stream<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    conn: &Rc<Conn>,
    ctx: &Rc<ShardCtx>,
    linger: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    conn.register_waker(cx.waker());
    let mut reads = 0;
    loop {
        let flush = conn.poll_flush_queue(io, cx).map(|r| r.map_err(drop));
        if let Some(done) = after_flush(flush, conn, ctx, linger, cx) {
            return done;
        }
        if reads == READS_PER_TURN {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        reads += 1;
        match poll_read_frames(io, conn, ctx, cx) {
            Poll::Ready(Ok(true)) => continue,
            Poll::Ready(Ok(false)) => {
                conn.close(None, CloseReason::PeerClosed);
                continue;
            }
            Poll::Ready(Err(_)) => {
                conn.close(None, CloseReason::IoError);
                continue;
            }
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// What a driver does after trying to flush its queue, the same for every
/// transport: a failed write ends the session at once; a closing connection
/// ends its session and is done when its last frames are out or its linger
/// time has passed. `None`: the connection goes on, read from it.
pub(crate) fn after_flush(
    flush: Poll<Result<(), ()>>,
    conn: &Rc<Conn>,
    ctx: &Rc<ShardCtx>,
    linger: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Option<Poll<()>> {
    let flushed = match flush {
        Poll::Ready(Ok(())) => true,
        Poll::Ready(Err(())) => {
            conn.close(None, CloseReason::IoError);
            ctx.end_session(conn);
            return Some(Poll::Ready(()));
        }
        Poll::Pending => false,
    };
    if conn.closing().is_some() {
        ctx.end_session(conn);
        if flushed {
            return Some(Poll::Ready(()));
        }
        let sleep =
            linger.get_or_insert_with(|| Box::pin(tokio::time::sleep(ctx.limits.close_linger)));
        return Some(sleep.as_mut().poll(cx));
    }
    None
}

/// Reads once and handles every complete frame. Ready(Ok(false)) at end of
/// stream. A connection with an unfinished frame reads into its own buffer
/// (sized for that frame); every other read lands in the shard's buffer.
fn poll_read_frames<S: AsyncRead + Unpin>(
    io: &mut S,
    conn: &Rc<Conn>,
    ctx: &Rc<ShardCtx>,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<bool>> {
    let mut partial = conn.take_partial();
    if !partial.is_empty() {
        partial.reserve(READ_CHUNK.min(ctx.limits.max_frame_size + 4));
        let read = tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut partial);
        let result = match read {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(_)) => {
                process_buffer(&mut partial, conn, ctx);
                Poll::Ready(Ok(true))
            }
            other => other.map_ok(|_| true),
        };
        conn.keep_partial(partial);
        return result;
    }
    // Frame handling never touches the shard buffer (router answers come
    // back through the inboxes), so it stays borrowed while frames are
    // handled straight out of it.
    let mut shared = ctx.read_buf.borrow_mut();
    shared.clear();
    shared.reserve(READ_CHUNK);
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut *shared) {
        Poll::Ready(Ok(0)) => Poll::Ready(Ok(false)),
        Poll::Ready(Ok(_)) => {
            process_buffer(&mut shared, conn, ctx);
            if !shared.is_empty() {
                // Copy the unfinished frame out so the shard buffer is free
                // for the next connection.
                conn.keep_partial(BytesMut::from(&shared[..]));
                shared.clear();
            }
            Poll::Ready(Ok(true))
        }
        other => other.map_ok(|_| true),
    }
}

/// Handles every complete frame at the front of `buf`.
fn process_buffer(buf: &mut BytesMut, conn: &Rc<Conn>, ctx: &Rc<ShardCtx>) {
    while conn.closing().is_none() {
        match split_frame(buf, ctx.limits.max_frame_size) {
            Ok(Some(payload)) => on_frame(conn, ctx, payload),
            Ok(None) => return,
            Err(_) => {
                conn.close(
                    Some(ctx.frames.too_large.clone()),
                    CloseReason::FrameTooLarge,
                );
                buf.clear();
                return;
            }
        }
    }
    buf.clear();
}
