//! `pingme serve`: starts the parts in order, marks the process ready, and
//! waits for SIGTERM/SIGINT. One shutdown path: a [`CancellationToken`]
//! cancelled by the signal (or by the caller of [`run_until`]) that every
//! server loop watches; then readiness is cleared, in-flight HTTP requests
//! finish within [`SHUTDOWN_GRACE`], and the store is dropped last.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use pingme_router::port::{ConnRef, Outbox, UserId};
use pingme_storage::Store;
use pingme_storage::embedded::{Durability, EmbeddedStore};
use tokio_util::sync::CancellationToken;

use crate::auth::jwt::JwtAuthenticator;
use crate::config::{Config, StorageBackend, StorageDurability};
use crate::http::{self, ApiState};
use crate::ops::{self, Readiness};

/// How long in-flight work may take after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        signal.cancel();
    });
    run_until(config, shutdown).await
}

/// Runs the server until `shutdown` is cancelled (tests and embedders).
pub async fn run_until(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // 1. Operations first, so every later step can log and count.
    ops::init_logging(config.log_format, &config.log_level);
    let _metrics = ops::metrics_handle();
    let readiness = Readiness::new();
    let version = ops::version_info();
    tracing::info!(
        version = version.version,
        git_commit = version.git_commit,
        env = ?config.app.env,
        "pingme starting"
    );

    // 2. The store.
    let store = open_store(&config).await?;

    // 3. Authentication, shared by the HTTP API and the gateway sessions.
    let (auth, generated) = JwtAuthenticator::from_config(&config.auth, store.clone());
    if generated {
        tracing::warn!(
            "auth.jwt_secret (JWT_SECRET) is not set: using a random secret; \
             tokens stop working when the process restarts (development mode only)"
        );
    }
    let auth = Arc::new(auth);

    // 4. Connections and routing. INTEGRATION: build the gateway's
    //    connection index here and use it as the outbox, start the router
    //    (in-process bus or Kafka) with `store` and that outbox, then the
    //    gateway shards (`config.shard_count()`, `config.listeners`,
    //    `config.session`) with `auth` and the router's `Dispatch`. Until
    //    then logout revokes tokens but has no connection to close.
    let outbox: Arc<dyn Outbox> = Arc::new(NoConnections);

    // 5. HTTP API (+ WebSocket and dead-letter admin routes, merged by the
    //    integrator: `.merge(ws_routes).nest(http::ADMIN_PREFIX, admin_routes)`).
    let state = ApiState::new(auth.clone(), outbox, &config.auth, readiness.clone())
        .context("auth.password_hash_memory_kib / auth.password_hash_iterations")?;
    let app = http::router(state);
    let http_listener = tokio::net::TcpListener::bind(config.http_bind())
        .await
        .with_context(|| format!("binding the HTTP API on {}", config.http_bind()))?;
    let http_addr = http_listener.local_addr()?;

    // 6. Metrics and health on the ops port.
    let ops_listener = tokio::net::TcpListener::bind(config.listeners.metrics)
        .await
        .with_context(|| format!("binding the metrics port {}", config.listeners.metrics))?;
    let ops_addr = ops_listener.local_addr()?;

    let http_task = tokio::spawn(http::serve(http_listener, app, shutdown.clone()));
    let ops_task = tokio::spawn(ops::serve_ops(
        ops_listener,
        readiness.clone(),
        shutdown.clone(),
    ));

    // 7. Everything is up.
    readiness.set(true);
    tracing::info!(%http_addr, %ops_addr, "pingme ready");

    // 8. Wait, then drain.
    shutdown.cancelled().await;
    readiness.set(false);
    tracing::info!("pingme shutting down");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let (http_result, ops_result) = tokio::join!(http_task, ops_task);
        http_result??;
        ops_result??;
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => tracing::warn!("shutdown grace period elapsed with requests in flight"),
    }
    drop(store);
    tracing::info!("pingme stopped");
    Ok(())
}

/// Opens the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match config.storage.backend {
        StorageBackend::Embedded => {
            let dir = &config.storage.data_dir;
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating storage.data_dir {}", dir.display()))?;
            let durability = match config.storage.durability {
                StorageDurability::Sync => Durability::Sync,
                StorageDurability::UnsafeNoSyncForBenchmarks => {
                    tracing::warn!("storage.durability: writes are not fsynced (benchmarks only)");
                    Durability::UnsafeNoSyncForBenchmarks
                }
            };
            let store = EmbeddedStore::open(dir, durability)
                .with_context(|| format!("opening the embedded store in {}", dir.display()))?;
            Ok(Arc::new(store))
        }
        other => anyhow::bail!("storage.backend {other:?} is not available in this build yet"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The outbox of a process with no client connections (until the gateway
/// shards are wired in): nothing is online, nothing to close.
#[derive(Debug, Default)]
pub struct NoConnections;

impl Outbox for NoConnections {
    fn to_connection(&self, _conn: ConnRef, _frame: Bytes) -> bool {
        false
    }

    fn to_users(&self, _users: &[UserId], _frame: &Bytes, _skip: Option<ConnRef>) -> usize {
        0
    }

    fn online(&self, users: &[UserId]) -> Vec<bool> {
        vec![false; users.len()]
    }

    fn disconnect(&self, _user: UserId, _device: Option<&str>, _frame: Bytes) -> usize {
        0
    }
}
