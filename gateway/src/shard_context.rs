//! What a shard's tasks share (one per shard thread, never shared across
//! threads): the limits, the canned frames, the shard's connection map,
//! the gateway's index and the router's dispatch; sessions open and end
//! here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingme_router::port::{ConnRef, Dispatch, SessionInfo};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, Claims};
use crate::connection::{CloseReason, Conn, Transport};
use crate::frames::{CannedFrames, auth_ok};
use crate::index::Connections;
use crate::limits::SessionLimits;

/// Everything a shard's tasks share. Lives on the shard thread only.
pub(crate) struct ShardCtx {
    pub(crate) id: u16,
    pub(crate) limits: SessionLimits,
    pub(crate) connections: Arc<Connections>,
    pub(crate) dispatch: Arc<dyn Dispatch>,
    pub(crate) authenticator: Arc<dyn Authenticator>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) frames: CannedFrames,
    /// Every read of a connection without an unfinished frame lands here.
    pub(crate) read_buf: RefCell<BytesMut>,
    pub(crate) conns: RefCell<HashMap<u64, Rc<Conn>>>,
    pub(crate) epoch: Instant,
    pub(crate) drained: Notify,
    /// Notified when [`ShardCommand::Drained`] comes out of the inbox.
    pub(crate) inbox_drained: Notify,
    pub(crate) shard_label: String,
}

impl ShardCtx {
    /// Milliseconds since the shard started (the session clock).
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers an authenticated session: shard map, gateway index, the
    /// router. `AuthOk` is the first queued frame, so it precedes anything
    /// the router sends; `held`, the handshake's answers not written yet
    /// (encoded frames back to back), goes out just before it, in the same
    /// write.
    pub(crate) fn open_session(
        &self,
        claims: &Claims,
        request_id: u64,
        transport: Transport,
        held: Bytes,
        leftover: BytesMut,
    ) -> Rc<Conn> {
        let conn_ref = ConnRef {
            shard: self.id,
            conn_id: self.connections.next_conn_id(),
        };
        let session = SessionInfo {
            user: claims.user,
            device: Arc::from(claims.device.as_str()),
            conn: conn_ref,
        };
        let conn = Rc::new(Conn::new(
            session,
            transport,
            &self.limits,
            self.now_ms(),
            with_held(held, auth_ok(request_id, claims)),
            leftover,
        ));
        self.conns
            .borrow_mut()
            .insert(conn_ref.conn_id, conn.clone());
        self.connections
            .insert(claims.user, &conn.session.device, conn_ref);
        metrics::gauge!("pingme_gateway_connections", "transport" => transport.label(), "shard" => self.shard_label.clone())
            .increment(1.0);
        self.dispatch.connected(&conn.session);
        if self.shutdown.is_cancelled() {
            conn.close(Some(self.frames.shutdown.clone()), CloseReason::Shutdown);
        }
        conn
    }

    /// Records the end of a session once: index, router, metrics. Called
    /// as soon as a connection starts closing, not when its last bytes
    /// are out.
    pub(crate) fn end_session(&self, conn: &Conn) {
        let Some(reason) = conn.take_end() else {
            return;
        };
        self.connections
            .remove(conn.session.user, conn.session.conn);
        self.dispatch.disconnected(&conn.session);
        metrics::gauge!("pingme_gateway_connections", "transport" => conn.transport.label(), "shard" => self.shard_label.clone())
            .decrement(1.0);
        count_disconnect(conn.transport, reason);
    }

    /// Drops a connection whose driver finished.
    pub(crate) fn forget(&self, conn: &Conn) {
        if conn.closing().is_none() {
            conn.close(None, CloseReason::IoError);
        }
        self.end_session(conn);
        let mut conns = self.conns.borrow_mut();
        conns.remove(&conn.session.conn.conn_id);
        if conns.is_empty() {
            self.drained.notify_one();
        }
    }

    pub(crate) fn lookup(&self, conn_id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&conn_id).cloned()
    }
}

/// A disconnect before or after authentication, by transport and reason.
pub(crate) fn count_disconnect(transport: Transport, reason: CloseReason) {
    metrics::counter!("pingme_gateway_disconnects_total", "transport" => transport.label(), "reason" => reason.label())
        .increment(1);
}

/// `first` with the `held` frames before it, as one buffer.
fn with_held(held: Bytes, first: Bytes) -> Bytes {
    if held.is_empty() {
        return first;
    }
    let mut both = BytesMut::with_capacity(held.len() + first.len());
    both.extend_from_slice(&held);
    both.extend_from_slice(&first);
    both.freeze()
}
