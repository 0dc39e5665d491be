//! `pingme serve`: starts the parts in order, marks the process ready, and
//! waits for SIGTERM/SIGINT. One shutdown path: a [`CancellationToken`]
//! cancelled by the signal (or by the caller of [`run_until`]); then, in
//! this order: readiness is cleared (`/health` answers 503 while the rest
//! drains), the router answers every send it accepted, the gateway sends
//! go-away after those answers, the HTTP API finishes the routes running
//! within [`SHUTDOWN_GRACE`] (connections with none, idle or with a request
//! still arriving, close at once), the ops port (health, metrics) stops,
//! and the store is dropped last.
//!
//! With `kafka.brokers` the process is a cluster node: the pipeline runs on
//! the Kafka bus (start-up waits for the brokers up to
//! `kafka.startup_timeout`, then exits with 69), `/health` follows the
//! brokers and this gateway's downstream assignment, and `app.role` picks
//! what runs: a worker opens no listeners and no HTTP API (its ops port
//! still serves health, metrics and the dead-letter routes).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pingme_router::port::Outbox;
use pingme_router::{KafkaBus, Router};
use pingme_storage::embedded::{Durability, EmbeddedStore};
use pingme_storage::mysql::MysqlStore;
use pingme_storage::scylla::ScyllaStore;
use pingme_storage::{StoreError, StoreResult, Stores};
use tokio_util::sync::CancellationToken;

use crate::auth::jwt::JwtAuthenticator;
use crate::config::{Config, StorageBackend, StorageDurability};
use crate::http::{self, ApiState};
use crate::ops::{self, Readiness};
use crate::{Connections, Gateway, directory, webchat_router, ws_router};

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
    let span_export = ops::init_logging(&config)?;
    let _metrics = ops::metrics_handle();
    let readiness = Readiness::new();
    let version = ops::version_info();
    tracing::info!(
        version = version.version,
        git_commit = version.git_commit,
        env = ?config.app.env,
        "pingme starting"
    );

    // 2. The stores.
    let opened = open_stores(&config, &shutdown).await?;
    let stores = opened.stores.clone();

    // 3. Authentication, shared by the HTTP API and the gateway sessions.
    let (auth, generated) = JwtAuthenticator::from_config(&config.auth, stores.users.clone());
    if generated {
        tracing::warn!(
            "auth.jwt_secret (JWT_SECRET) is not set: using a random secret; \
             tokens stop working when the process restarts (development mode only)"
        );
    }
    let auth = Arc::new(auth);

    // 4. Connections and routing. The gateway's connection index is the
    //    router's outbox; the router is the shards' dispatch. The index
    //    exists first because the router needs it to be built. The
    //    presence directory is this index, or Redis (`redis.enabled`),
    //    whose health `/health` then follows. The bus is in-process, or
    //    Kafka for a cluster node.
    let connections = Arc::new(Connections::new());
    let chosen = directory::choose(&config, connections.clone(), &readiness)
        .context("setting up the presence directory (redis)")?;
    let (router, kafka_watches) = match config.kafka() {
        None => (
            Router::start_single_node(
                stores.clone(),
                connections.clone(),
                config.router(),
                chosen.directory.clone(),
            ),
            Vec::new(),
        ),
        Some(settings) => {
            let bus = connect_brokers(settings, config.kafka.startup_timeout, &shutdown).await?;
            let router = Router::start_with(
                stores.clone(),
                connections.clone(),
                config.router(),
                bus.clone(),
                chosen.directory.clone(),
            )
            .context("joining the Kafka topics and consumer groups")?;
            tracing::info!(brokers = %config.kafka.brokers, role = ?config.app.role, "cluster node: pipeline on Kafka");
            let mut watches = vec![tokio::spawn(watch_brokers(
                bus.clone(),
                router.clone(),
                readiness.dependency("kafka"),
            ))];
            if let (true, Some(redis)) = (config.app.role.router().worker(), &chosen.redis) {
                watches.push(tokio::spawn(pingme_router::stale_downstream::watch(
                    bus,
                    redis.clone(),
                    Arc::new(pingme_router::SystemClock),
                    config.kafka.downstream_topic_prefix.clone(),
                    config.kafka.stale_downstream_after,
                )));
            }
            (router, watches)
        }
    };
    let gateway = if config.app.role.router().gateway() {
        let gateway = Gateway::start(
            config.gateway(),
            connections.clone(),
            router.clone(),
            auth.clone(),
        )
        .context("starting the gateway listeners")?;
        let addrs = gateway.local_addrs();
        tracing::info!(tcp = ?addrs.tcp, tls = ?addrs.tls, quic = ?addrs.quic, shards = gateway.shard_count(), "gateway listening");
        Some(gateway)
    } else {
        None
    };
    let outbox: Arc<dyn Outbox> = connections.clone();

    // 5. HTTP API, with the WebSocket transport and the browser chat page.
    let state = ApiState::new(
        stores.clone(),
        auth.clone(),
        outbox,
        &config.auth,
        readiness.clone(),
    )?;
    let app = http::router(state)
        .merge(ws_router(connections.clone()))
        .merge(webchat_router())
        .method_not_allowed_fallback(http::method_not_allowed);
    // A worker serves no clients: no HTTP API.
    let http_listener = match gateway {
        Some(_) => Some(
            tokio::net::TcpListener::bind(config.http_bind())
                .await
                .with_context(|| format!("binding the HTTP API on {}", config.http_bind()))?,
        ),
        None => None,
    };
    let http_addr = http_listener
        .as_ref()
        .map(|listener| listener.local_addr())
        .transpose()?;

    // 6. Metrics and health on the ops port.
    let ops_listener = tokio::net::TcpListener::bind(config.listeners.metrics)
        .await
        .with_context(|| format!("binding the metrics port {}", config.listeners.metrics))?;
    let ops_addr = ops_listener.local_addr()?;

    // The servers stop late in the drain, each on its own signal, so
    // `/health` keeps answering (503) while the rest drains.
    let (http_stop, ops_stop) = (CancellationToken::new(), CancellationToken::new());
    let limits = config.http_limits();
    let http_task = http_listener
        .map(|listener| tokio::spawn(http::serve(listener, app, limits, http_stop.clone())));
    // Operators only: metrics, health and the dead-letter admin routes.
    let ops_app = ops::ops_app(
        readiness.clone(),
        http::admin::routes(router.clone(), &config.ops.admin_token),
        &config.ops,
    );
    let ops_task = tokio::spawn(ops::serve_ops(
        ops_listener,
        ops_app,
        limits,
        ops_stop.clone(),
    ));

    // 7. Everything is up.
    readiness.set(true);
    tracing::info!(http_addr = ?http_addr, %ops_addr, "pingme ready");

    // 8. Wait, then drain: `/health` says 503 from the first moment; the
    //    router refuses new sends (SHUTTING_DOWN) and stores and answers
    //    what it accepted; only then do clients get a go-away (behind those
    //    answers) and their queued frames; then the HTTP server finishes the
    //    routes running (a half-sent request does not hold it), the ops
    //    port stops, and the store closes last.
    shutdown.cancelled().await;
    readiness.set(false);
    tracing::info!("pingme shutting down");
    router.shutdown().await;
    if let Some(watch) = &chosen.watch {
        watch.abort();
    }
    for watch in &kafka_watches {
        watch.abort();
    }
    if let Some(gateway) = gateway {
        gateway.shutdown(SHUTDOWN_GRACE).await;
    }
    router.finish_closing(SHUTDOWN_GRACE).await;
    http_stop.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        if let Some(task) = http_task {
            task.await??;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => tracing::warn!("shutdown grace period elapsed with requests in flight"),
    }
    ops_stop.cancel();
    match tokio::time::timeout(SHUTDOWN_GRACE, ops_task).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!("the ops port did not stop within the grace period"),
    }
    drop(stores);
    opened.close().await;
    tracing::info!("pingme stopped");
    // Last, so the spans of the drain above are exported too.
    span_export.shutdown().await;
    Ok(())
}

/// The Kafka brokers did not answer within `kafka.startup_timeout`; the
/// binary exits with [`EXIT_STORE_UNREACHABLE`] (a supervisor may restart
/// it later).
#[derive(Debug, thiserror::Error)]
#[error(
    "the Kafka brokers ({brokers}) were unreachable for {waited:?} (kafka.startup_timeout {window:?}); last error: {reason}"
)]
pub struct BrokersUnreachable {
    /// `kafka.brokers`.
    pub brokers: String,
    /// How long start-up tried.
    pub waited: Duration,
    /// The configured window.
    pub window: Duration,
    /// The last attempt's error.
    pub reason: String,
}

/// How long one broker check may take.
const BROKER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `/health` asks the brokers while they answer.
const BROKER_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The node's Kafka bus, once a broker answered; tried with back-off until
/// `window` or `shutdown`.
async fn connect_brokers(
    settings: pingme_router::KafkaSettings,
    window: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<KafkaBus>> {
    let brokers = settings.brokers.clone();
    let bus = Arc::new(KafkaBus::new(settings).context("creating the Kafka clients")?);
    let started = std::time::Instant::now();
    let mut pause = RETRY_FIRST;
    for attempt in 1u32.. {
        let checking = bus.clone();
        let reason =
            match tokio::task::spawn_blocking(move || checking.check(BROKER_CHECK_TIMEOUT)).await {
                Ok(Ok(())) => {
                    tracing::info!(%brokers, attempt, "Kafka brokers reachable");
                    return Ok(bus);
                }
                Ok(Err(error)) => error.to_string(),
                Err(error) => error.to_string(),
            };
        let waited = started.elapsed();
        if waited + pause > window {
            return Err(BrokersUnreachable {
                brokers,
                waited,
                window,
                reason,
            }
            .into());
        }
        tracing::warn!(%brokers, attempt, error = %reason, retry_in = ?pause, "Kafka brokers unreachable at start; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("shutdown requested while the Kafka brokers were still unreachable"),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
    unreachable!("the attempt counter does not run out")
}

/// Keeps the `kafka` dependency of `/health` true: up while a broker
/// answers and this gateway's downstream consumers hold all their
/// partitions (frames for its connections would wait on the bus before).
/// Logs when it changes. Runs until aborted.
async fn watch_brokers(bus: Arc<KafkaBus>, router: Arc<Router>, dependency: ops::Dependency) {
    let mut was: Option<bool> = None;
    loop {
        let checking = bus.clone();
        let reachable =
            tokio::task::spawn_blocking(move || checking.check(BROKER_CHECK_TIMEOUT)).await;
        let (up, why) = match reachable {
            Ok(Ok(())) if router.serving_downstream() => (true, String::new()),
            Ok(Ok(())) => (
                false,
                "this gateway's downstream topic is not assigned yet".to_string(),
            ),
            Ok(Err(error)) => (false, error.to_string()),
            Err(error) => (false, error.to_string()),
        };
        dependency.set_up(up);
        if was != Some(up) {
            if up {
                tracing::info!("Kafka brokers reachable and partitions assigned: ready");
            } else {
                tracing::warn!(reason = %why, "Kafka not ready: /health reports not ready");
            }
            was = Some(up);
        }
        // Quick checks until first ready (the assignment takes seconds).
        let every = if up {
            BROKER_CHECK_EVERY
        } else {
            Duration::from_millis(250)
        };
        tokio::time::sleep(every).await;
    }
}

/// Exit code of the binary when the store stays unreachable for
/// `storage.startup_timeout` at start (EX_UNAVAILABLE): a supervisor may
/// restart the process later.
pub const EXIT_STORE_UNREACHABLE: i32 = 69;

/// Why `pingme serve` could not open its store. The binary exits with
/// [`EXIT_STORE_UNREACHABLE`] for `Unreachable` and with
/// [`crate::config::EXIT_CONFIG`] for `Refused`.
#[derive(Debug, thiserror::Error)]
pub enum StoreStartError {
    /// Every attempt within `storage.startup_timeout` failed; the last
    /// reason is kept.
    #[error(
        "the {backend} store was unreachable for {waited:?} (storage.startup_timeout {window:?}); \
         last error: {reason}"
    )]
    Unreachable {
        /// `mysql` or `scylla`.
        backend: &'static str,
        /// How long start-up tried.
        waited: Duration,
        /// The configured window.
        window: Duration,
        /// The last attempt's error.
        reason: StoreError,
    },
    /// The store answered and refused the configuration (login, database
    /// or keyspace): retrying would not help.
    #[error("the {backend} store refused the configuration ({fields}): {reason}")]
    Refused {
        /// `mysql` or `scylla`.
        backend: &'static str,
        /// The settings to look at.
        fields: &'static str,
        /// What the store said.
        reason: StoreError,
    },
    /// The shutdown signal came while start-up was still retrying.
    #[error("shutdown requested while the {backend} store was still unreachable")]
    Cancelled {
        /// `mysql` or `scylla`.
        backend: &'static str,
    },
}

/// The stores `pingme serve` opened, and what closing them needs.
pub struct OpenStores {
    /// One handle per role.
    pub stores: Stores,
    /// The MySQL store, when it serves: closed at shutdown so its append
    /// writer finishes its last round before the pool goes.
    mysql: Option<MysqlStore>,
}

impl OpenStores {
    /// Closes the stores (the embedded and ScyllaDB stores close on drop).
    pub async fn close(self) {
        drop(self.stores);
        if let Some(mysql) = self.mysql {
            mysql.close().await;
        }
    }
}

/// Opens the configured stores. A remote store (MySQL, ScyllaDB) is tried
/// until `storage.startup_timeout` (or `shutdown`) while it is unreachable,
/// each failure logged, so processes started together with their database
/// wait for it; a refused login fails at once.
pub async fn open_stores(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<OpenStores> {
    let window = config.storage.startup_timeout;
    match config.storage.backend {
        StorageBackend::Embedded => {
            let dir = &config.storage.data_dir;
            create_private_dir(dir)
                .with_context(|| format!("creating storage.data_dir {}", dir.display()))?;
            let durability = match config.storage.durability {
                StorageDurability::Sync => Durability::Sync,
                StorageDurability::UnsafeNoSyncForBenchmarks => {
                    tracing::warn!("storage.durability: writes are not fsynced (benchmarks only)");
                    Durability::UnsafeNoSyncForBenchmarks
                }
            };
            let interval = config.storage.group_commit_interval;
            let store = EmbeddedStore::open_with(dir, durability, interval)
                .with_context(|| format!("opening the embedded store in {}", dir.display()))?;
            Ok(OpenStores {
                stores: Stores::all_from(Arc::new(store)),
                mysql: None,
            })
        }
        StorageBackend::Mysql => {
            let mysql = config.mysql();
            tracing::info!(host = %mysql.host, port = mysql.port, database = %mysql.database, pool_size = mysql.pool_size, "connecting to MySQL");
            let store = connect_with_retries(
                "mysql",
                "database.host, database.port, database.username, database.password, database.name",
                window,
                shutdown,
                || MysqlStore::connect(&mysql),
            )
            .await?;
            Ok(OpenStores {
                stores: Stores::all_from(Arc::new(store.clone())),
                mysql: Some(store),
            })
        }
        StorageBackend::Scylla => {
            let scylla = config.scylla();
            tracing::info!(nodes = ?scylla.nodes, keyspace = %scylla.keyspace, "connecting to ScyllaDB");
            let store = connect_with_retries(
                "scylla",
                "storage.scylla_nodes, storage.scylla_keyspace",
                window,
                shutdown,
                || ScyllaStore::connect(&scylla),
            )
            .await?;
            Ok(OpenStores {
                stores: Stores::all_from(Arc::new(store)),
                mysql: None,
            })
        }
    }
}

/// First pause between start-up attempts; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Calls `connect` until it succeeds, fails other than `Unavailable`, the
/// next attempt would start after `window`, or `shutdown` comes.
async fn connect_with_retries<T, F, Fut>(
    backend: &'static str,
    fields: &'static str,
    window: Duration,
    shutdown: &CancellationToken,
    mut connect: F,
) -> Result<T, StoreStartError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let started = std::time::Instant::now();
    let mut pause = RETRY_FIRST;
    for attempt in 1u32.. {
        let reason = match connect().await {
            Ok(store) => {
                if attempt > 1 {
                    tracing::info!(backend, attempt, "store reachable");
                }
                return Ok(store);
            }
            Err(reason @ StoreError::Unavailable(_)) => reason,
            Err(reason) => {
                return Err(StoreStartError::Refused {
                    backend,
                    fields,
                    reason,
                });
            }
        };
        let waited = started.elapsed();
        if waited + pause > window {
            return Err(StoreStartError::Unreachable {
                backend,
                waited,
                window,
                reason,
            });
        }
        tracing::warn!(backend, attempt, error = %reason, retry_in = ?pause, "store unreachable at start; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Err(StoreStartError::Cancelled { backend }),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
    unreachable!("the attempt counter does not run out")
}

/// Creates `dir` (and its parents) readable by the owner only: it holds
/// message bodies and password hashes. An existing directory open to
/// others is closed (with a warning).
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = %format!("{mode:o}"), "storage.data_dir was open to other users: set to 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes every file and directory this process creates from now on
/// private to its owner (umask 077): the store's files (message bodies,
/// password hashes) come out 0600, whatever library creates them. Call it
/// before anything is created.
#[allow(unsafe_code)]
pub fn restrict_new_file_modes() {
    // SAFETY: umask only swaps the process's file-mode creation mask; it
    // touches no memory and cannot fail.
    unsafe {
        libc::umask(0o077);
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
