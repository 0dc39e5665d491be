//! One authenticated connection inside its shard: the queue of encoded
//! frames waiting to be written, the slow-consumer limit and the close
//! state. An idle connection holds no buffer: its driver (in `transport`)
//! waits for readability, reads into the shard's buffer and keeps only an
//! unfinished frame here.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use pingme_protocol::{ErrorCode, LENGTH_PREFIX, ServerFrame, encode_frame};
use pingme_router::port::SessionInfo;
use tokio::io::AsyncWrite;

use crate::limits::{Admission, SessionLimits, TokenBucket};

/// The transport a connection arrived on (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TCP with TLS.
    Tls,
    /// A QUIC bidirectional stream.
    Quic,
    /// WebSocket on the HTTP port.
    WebSocket,
}

impl Transport {
    const ALL: [Transport; 4] = [
        Transport::Tcp,
        Transport::Tls,
        Transport::Quic,
        Transport::WebSocket,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Quic => "quic",
            Transport::WebSocket => "ws",
        }
    }

    /// Counts `n` frames read (`pingme_gateway_frames_in_total`).
    pub(crate) fn frames_in(self, n: u64) {
        FRAMES_IN.with(|counters| counters[self as usize].increment(n));
    }

    /// Counts `n` frames written (`pingme_gateway_frames_out_total`).
    pub(crate) fn frames_out(self, n: u64) {
        FRAMES_OUT.with(|counters| counters[self as usize].increment(n));
    }
}

/// One counter per transport of the metric `name`.
fn per_transport(name: &'static str) -> [metrics::Counter; 4] {
    Transport::ALL.map(|transport| metrics::counter!(name, "transport" => transport.label()))
}

thread_local! {
    // Looked up once per shard thread (the shards start after the metrics
    // recorder): a lookup builds the labelled key and finds it in the
    // registry, which cost more than the count, twice per chat message.
    static FRAMES_IN: [metrics::Counter; 4] = per_transport("pingme_gateway_frames_in_total");
    static FRAMES_OUT: [metrics::Counter; 4] = per_transport("pingme_gateway_frames_out_total");
}

/// Why a connection closed (the `reason` label of
/// `pingme_gateway_disconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the connection.
    PeerClosed,
    /// The transport failed.
    IoError,
    /// No Authenticate within the auth timeout.
    AuthTimeout,
    /// The token was refused.
    AuthFailed,
    /// No common protocol version.
    UnsupportedVersion,
    /// Wrong frames before authentication.
    UnexpectedMessage,
    /// Silent for longer than the idle timeout.
    IdleTimeout,
    /// An undecodable frame.
    Malformed,
    /// A frame above the maximum frame size.
    FrameTooLarge,
    /// A sustained flood above the rate limit.
    RateLimited,
    /// Too many bytes queued for a client that does not read.
    SlowConsumer,
    /// The same device logged in on another connection.
    Replaced,
    /// The router asked (logout, revocation, rebalance).
    Evicted,
    /// The gateway is shutting down.
    Shutdown,
}

impl CloseReason {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::IoError => "io_error",
            CloseReason::AuthTimeout => "auth_timeout",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::UnsupportedVersion => "unsupported_version",
            CloseReason::UnexpectedMessage => "unexpected_message",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Malformed => "malformed",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Replaced => "replaced",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// An authenticated connection, shared (`Rc`) by its shard's map and its
/// driver task. Only its own shard thread ever touches it.
pub(crate) struct Conn {
    pub(crate) session: SessionInfo,
    pub(crate) transport: Transport,
    last_seen_ms: Cell<u64>,
    out: RefCell<Outgoing>,
    bucket: Cell<TokenBucket>,
    /// An unfinished frame; `None` (one word, no allocation) between frames.
    partial: Cell<Option<Box<BytesMut>>>,
}

/// The write side of a connection.
struct Outgoing {
    /// Encoded frames, shared with every other recipient of the same frame.
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    /// The driver to wake when something is queued.
    waker: Option<Waker>,
    closing: Option<CloseReason>,
    /// The session end (index, router, metrics) has been recorded.
    ended: bool,
    /// The front frame is partly written: it must be finished before any
    /// other byte, or the stream is corrupt.
    front_started: bool,
}

impl Conn {
    pub(crate) fn new(
        session: SessionInfo,
        transport: Transport,
        limits: &SessionLimits,
        now_ms: u64,
        first: Bytes,
        leftover: BytesMut,
    ) -> Self {
        let mut queue = VecDeque::new();
        let queued_bytes = first.len();
        queue.push_back(first);
        Self {
            session,
            transport,
            last_seen_ms: Cell::new(now_ms),
            out: RefCell::new(Outgoing {
                queue,
                queued_bytes,
                waker: None,
                closing: None,
                ended: false,
                front_started: false,
            }),
            bucket: Cell::new(TokenBucket::full(limits, now_ms)),
            partial: Cell::new((!leftover.is_empty()).then(|| Box::new(leftover))),
        }
    }

    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_seen_ms.set(now_ms);
    }

    pub(crate) fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.get()
    }

    pub(crate) fn admit(&self, now_ms: u64, limits: &SessionLimits) -> Admission {
        let mut bucket = self.bucket.get();
        let verdict = bucket.admit(now_ms, limits);
        self.bucket.set(bucket);
        verdict
    }

    /// Queues one encoded frame. A client that lets more than
    /// `max_queued_bytes` pile up is cut off: its queue is dropped, it gets
    /// SLOW_CONSUMER and the connection closes. Returns false if the frame
    /// was not queued.
    pub(crate) fn enqueue(&self, frame: Bytes, limits: &SessionLimits) -> bool {
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return false;
        }
        if out.queued_bytes + frame.len() > limits.max_queued_bytes {
            let unfinished = if out.front_started {
                out.queue.pop_front()
            } else {
                None
            };
            out.queue.clear();
            out.queued_bytes = 0;
            if let Some(front) = unfinished {
                out.queued_bytes = front.len();
                out.queue.push_back(front);
            }
            let fatal = encode_frame(&ServerFrame::fatal(
                ErrorCode::SlowConsumer,
                "the client fell too far behind; reconnect and sync",
            ));
            out.queued_bytes += fatal.len();
            out.queue.push_back(fatal);
            out.closing = Some(CloseReason::SlowConsumer);
            wake(&mut out);
            return false;
        }
        out.queued_bytes += frame.len();
        out.queue.push_back(frame);
        wake(&mut out);
        true
    }

    /// Starts closing: `last` (a fatal error or go-away) goes out after what
    /// is already queued, then the connection closes. The first reason wins.
    pub(crate) fn close(&self, last: Option<Bytes>, reason: CloseReason) {
        let mut out = self.out.borrow_mut();
        if out.closing.is_some() {
            return;
        }
        if let Some(frame) = last {
            out.queued_bytes += frame.len();
            out.queue.push_back(frame);
        }
        out.closing = Some(reason);
        wake(&mut out);
    }

    pub(crate) fn closing(&self) -> Option<CloseReason> {
        self.out.borrow().closing
    }

    /// True exactly once, when the session end must be recorded.
    pub(crate) fn take_end(&self) -> Option<CloseReason> {
        let mut out = self.out.borrow_mut();
        match out.closing {
            Some(reason) if !out.ended => {
                out.ended = true;
                Some(reason)
            }
            _ => None,
        }
    }

    pub(crate) fn register_waker(&self, waker: &Waker) {
        let mut out = self.out.borrow_mut();
        match &out.waker {
            Some(current) if current.will_wake(waker) => {}
            _ => out.waker = Some(waker.clone()),
        }
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.out.borrow().queue.is_empty()
    }

    /// Takes the next queued frame (message transports write frame by
    /// frame). A queued buffer may hold several frames back to back (a
    /// merged fanout delivery): the first is split off without a copy and
    /// the rest stays at the front.
    pub(crate) fn pop_frame(&self) -> Option<Bytes> {
        let mut out = self.out.borrow_mut();
        let mut frame = out.queue.pop_front()?;
        let first = frame
            .get(..LENGTH_PREFIX)
            .map(|prefix| {
                LENGTH_PREFIX + u32::from_be_bytes(prefix.try_into().unwrap_or_default()) as usize
            })
            .unwrap_or(frame.len());
        if first < frame.len() {
            let rest = frame.split_off(first);
            out.queue.push_front(rest);
        } else if out.queue.is_empty() {
            // An idle connection keeps no queue allocation (as with
            // `poll_flush_queue`).
            out.queue = VecDeque::new();
        }
        out.queued_bytes -= frame.len();
        Some(frame)
    }

    /// The unfinished frame this connection's last read left, if any.
    pub(crate) fn take_partial(&self) -> BytesMut {
        self.partial
            .take()
            .map_or_else(BytesMut::new, |partial| *partial)
    }

    /// Keeps an unfinished frame for the next read; an empty one is
    /// dropped with its allocation, so idle connections hold no buffer.
    pub(crate) fn keep_partial(&self, partial: BytesMut) {
        if !partial.is_empty() {
            self.partial.set(Some(Box::new(partial)));
        }
    }

    /// Writes as much of the queue as the transport takes, in vectored
    /// writes. Ready(Ok(frames)) once the queue is empty, Pending if the
    /// transport is full.
    pub(crate) fn poll_flush_queue<S: AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        const MAX_SLICES: usize = 64;
        let mut wrote_frames = 0u64;
        let result = loop {
            let mut out = self.out.borrow_mut();
            if out.queue.is_empty() {
                if out.queue.capacity() > 0 {
                    // An idle connection keeps no queue allocation.
                    out.queue = VecDeque::new();
                }
                break Poll::Ready(Ok(()));
            }
            let written = {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut count = 0;
                for (slot, frame) in slices.iter_mut().zip(out.queue.iter()) {
                    *slot = IoSlice::new(frame);
                    count += 1;
                }
                match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]) {
                    Poll::Ready(Ok(0)) => {
                        break Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                    Poll::Pending => break Poll::Pending,
                }
            };
            out.queued_bytes -= written;
            let mut remaining = written;
            while remaining > 0 {
                let Some(front) = out.queue.front_mut() else {
                    break;
                };
                if front.len() <= remaining {
                    remaining -= front.len();
                    out.queue.pop_front();
                    out.front_started = false;
                    wrote_frames += 1;
                } else {
                    front.advance(remaining);
                    out.front_started = true;
                    remaining = 0;
                }
            }
        };
        if wrote_frames > 0 {
            self.transport.frames_out(wrote_frames);
        }
        match result {
            Poll::Ready(Ok(())) => Pin::new(&mut *io).poll_flush(cx),
            other => other,
        }
    }
}

fn wake(out: &mut Outgoing) {
    if let Some(waker) = out.waker.take() {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pingme_router::port::ConnRef;

    use super::*;

    fn frame(request_id: u64) -> Bytes {
        encode_frame(&ServerFrame {
            request_id,
            body: None,
        })
    }

    #[test]
    fn message_transports_get_merged_frames_one_by_one() {
        let limits = SessionLimits::default();
        let session = SessionInfo {
            user: 1,
            device: Arc::from("d"),
            conn: ConnRef {
                shard: 0,
                conn_id: 1,
            },
        };
        let conn = Conn::new(
            session,
            Transport::WebSocket,
            &limits,
            0,
            frame(1),
            BytesMut::new(),
        );
        // A merged fanout delivery: three frames in one buffer.
        let mut merged = BytesMut::new();
        for id in [2, 3, 4] {
            merged.extend_from_slice(&frame(id));
        }
        let merged = merged.freeze();
        assert!(conn.enqueue(merged.clone(), &limits));
        assert!(conn.enqueue(frame(5), &limits));
        let mut popped = Vec::new();
        while let Some(next) = conn.pop_frame() {
            popped.push(next);
        }
        assert_eq!(
            popped,
            vec![frame(1), frame(2), frame(3), frame(4), frame(5)]
        );
        // Split, not copied: the pieces point into the merged buffer.
        assert_eq!(popped[2].as_ptr(), merged[frame(2).len()..].as_ptr());
        assert_eq!(conn.out.borrow().queued_bytes, 0);
        // Drained, the queue gives its allocation back: an idle
        // connection holds none.
        assert_eq!(conn.out.borrow().queue.capacity(), 0);
    }
}
