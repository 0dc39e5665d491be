//! A shard: one OS thread pinned to one core, running its own
//! current-thread tokio runtime, its own listeners (SO_REUSEPORT), its own
//! connection map and its inbox. Nothing on the per-connection path takes a
//! lock: the map and every connection are `Rc`/`RefCell` owned by this
//! thread; other threads reach a connection only through the inbox.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingme_router::port::Dispatch;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::connection::{CloseReason, Conn};
use crate::frames::CannedFrames;
use crate::index::{Connections, ShardCommand};
use crate::limits::SessionLimits;
use crate::shard_context::ShardCtx;
use crate::transport::{quic, tcp, ws};

/// What a shard thread starts with. The sockets are bound by the caller
/// (so bind errors surface in `Gateway::start`).
pub(crate) struct ShardSetup {
    pub(crate) id: u16,
    pub(crate) core: Option<core_affinity::CoreId>,
    pub(crate) limits: SessionLimits,
    pub(crate) connections: Arc<Connections>,
    pub(crate) dispatch: Arc<dyn Dispatch>,
    pub(crate) authenticator: Arc<dyn Authenticator>,
    pub(crate) shutdown: CancellationToken,
    /// The grace period, set by `Gateway::shutdown` before it cancels.
    pub(crate) grace_ms: Arc<AtomicU64>,
    pub(crate) inbox: UnboundedReceiver<ShardCommand>,
    pub(crate) tcp: Option<std::net::TcpListener>,
    pub(crate) tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    pub(crate) quic: Option<(std::net::UdpSocket, quinn::ServerConfig)>,
}

/// Starts the shard thread.
pub(crate) fn spawn(setup: ShardSetup) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("pingme-shard-{}", setup.id))
        .spawn(move || {
            if let Some(core) = setup.core
                && !core_affinity::set_for_current(core)
            {
                tracing::warn!(shard = setup.id, "could not pin the shard to its core");
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(shard = setup.id, %error, "shard runtime failed to start");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, run(setup));
        })
}

async fn run(setup: ShardSetup) {
    let ShardSetup {
        id,
        limits,
        connections,
        dispatch,
        authenticator,
        shutdown,
        grace_ms,
        inbox,
        tcp,
        tls,
        quic,
        ..
    } = setup;
    let ctx = Rc::new(ShardCtx {
        id,
        frames: CannedFrames::new(&limits),
        limits,
        connections,
        dispatch,
        authenticator,
        shutdown,
        read_buf: RefCell::new(BytesMut::new()),
        conns: RefCell::new(HashMap::new()),
        epoch: Instant::now(),
        drained: Notify::new(),
        inbox_drained: Notify::new(),
        shard_label: id.to_string(),
    });
    if let Some(listener) = tcp {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => {
                tokio::task::spawn_local(tcp::accept_tcp(listener, ctx.clone()));
            }
            Err(error) => tracing::error!(shard = id, %error, "TCP listener failed"),
        }
    }
    if let Some((listener, acceptor)) = tls {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => {
                tokio::task::spawn_local(tcp::accept_tls(listener, acceptor, ctx.clone()));
            }
            Err(error) => tracing::error!(shard = id, %error, "TLS listener failed"),
        }
    }
    let endpoint = quic.and_then(
        |(socket, config)| match quic::endpoint(socket, config, id) {
            Ok(endpoint) => {
                tokio::task::spawn_local(quic::accept_quic(endpoint.clone(), ctx.clone()));
                Some(endpoint)
            }
            Err(error) => {
                tracing::error!(shard = id, %error, "QUIC endpoint failed");
                None
            }
        },
    );
    tokio::task::spawn_local(run_inbox(ctx.clone(), inbox));
    tokio::task::spawn_local(sweep_idle(ctx.clone()));

    ctx.shutdown.cancelled().await;
    let grace = Duration::from_millis(grace_ms.load(Ordering::Relaxed));
    let deadline = tokio::time::Instant::now() + grace;
    // The go-away goes out after what the router answered before shutdown
    // (its acks are ahead of the marker in the inbox), so a send in flight
    // at shutdown gets its ack before the go-away.
    let _ = tokio::time::timeout_at(deadline, ctx.inbox_drained.notified()).await;
    let open: Vec<Rc<Conn>> = ctx.conns.borrow().values().cloned().collect();
    tracing::info!(shard = id, connections = open.len(), "shard draining");
    for conn in open {
        conn.close(Some(ctx.frames.shutdown.clone()), CloseReason::Shutdown);
    }
    let _ = tokio::time::timeout_at(deadline, async {
        while !ctx.conns.borrow().is_empty() {
            ctx.drained.notified().await;
        }
    })
    .await;
    if let Some(endpoint) = endpoint {
        // Each QUIC connection closes itself once the client acknowledged
        // its last frames; closing the endpoint first could drop them.
        let _ = tokio::time::timeout_at(deadline, endpoint.wait_idle()).await;
        endpoint.close(0u32.into(), b"shutdown");
    }
    tracing::info!(shard = id, "shard stopped");
}

/// Applies the commands other threads send to this shard's connections.
async fn run_inbox(ctx: Rc<ShardCtx>, mut inbox: UnboundedReceiver<ShardCommand>) {
    let mut batch = Vec::with_capacity(64);
    while inbox.recv_many(&mut batch, 64).await > 0 {
        for command in batch.drain(..) {
            match command {
                ShardCommand::Deliver { conn_ids, frame } => deliver(&ctx, conn_ids, frame),
                ShardCommand::DeliverMany(frames) => {
                    for (conn_ids, frame) in frames {
                        deliver(&ctx, conn_ids, frame);
                    }
                }
                ShardCommand::Disconnect {
                    conn_ids,
                    frame,
                    reason,
                } => {
                    for conn_id in conn_ids {
                        if let Some(conn) = ctx.lookup(conn_id) {
                            conn.close(Some(frame.clone()), reason);
                        }
                    }
                }
                ShardCommand::Drained => ctx.inbox_drained.notify_one(),
                ShardCommand::AdoptWebSocket(socket, deadline) => {
                    tokio::task::spawn_local(ws::serve_websocket(socket, ctx.clone(), deadline));
                }
            }
        }
    }
}

/// Queues `frame` on those of `conn_ids` still open.
fn deliver(ctx: &ShardCtx, conn_ids: Vec<u64>, frame: Bytes) {
    for conn_id in conn_ids {
        if let Some(conn) = ctx.lookup(conn_id) {
            conn.enqueue(frame.clone(), &ctx.limits);
        }
    }
}

/// Closes sessions silent for longer than the idle timeout. One sweep over
/// the shard's map replaces a timer per connection.
async fn sweep_idle(ctx: Rc<ShardCtx>) {
    let idle_ms = ctx.limits.idle_timeout.as_millis() as u64;
    let period =
        (ctx.limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = ctx.now_ms();
        let silent: Vec<Rc<Conn>> = ctx
            .conns
            .borrow()
            .values()
            .filter(|conn| now.saturating_sub(conn.last_seen_ms()) > idle_ms)
            .cloned()
            .collect();
        for conn in silent {
            conn.close(Some(ctx.frames.idle.clone()), CloseReason::IdleTimeout);
        }
    }
}
