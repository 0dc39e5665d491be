//! Which presence directory `pingme serve` runs, chosen from the config,
//! and the watch that keeps `/health` honest about Redis.
//!
//! - `redis.enabled: false` (the default): the single-node directory, this
//!   gateway's connection index ([`pingme_router::LocalDirectory`]).
//! - `redis.enabled: true` (or `REDIS_HOST`/`REDIS_PORT` set): presence and
//!   last-seen in Redis ([`RedisDirectory`]), for users on any gateway,
//!   with this gateway's lease renewed by the router. In a cluster (Kafka)
//!   the router locates users on every gateway through it and publishes to
//!   their gateways' downstream topics. While the pipeline runs on the
//!   in-process bus (no Kafka), nothing can carry a delivery to another
//!   gateway, so deliveries are planned from this gateway's own
//!   connections ([`LocalDelivery`]); users connected elsewhere read the
//!   stored messages when they sync.
//!
//! While Redis does not answer: `/health` is not ready (`"unavailable":
//! ["redis"]`), one error line when it goes, a reminder every minute while
//! it stays away and a line when it is back; checks back off from 250 ms to
//! 5 s. Nothing crashes and no message is lost: sends are stored as ever,
//! deliveries fall back to this gateway's own connections, presence
//! queries answer `DIRECTORY_UNAVAILABLE`, and registrations that failed
//! are written again once Redis answers (the directory starts a new lease
//! epoch).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingme_router::port::{Outbox, UserId};
use pingme_router::{
    Directory, DirectoryError, LocalDirectory, Located, Presence, RedisDirectory, Registration,
    SystemClock,
};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::ops::{Dependency, Readiness};

/// Checks while Redis answers.
const HEALTHY_CHECK_EVERY: Duration = Duration::from_secs(1);
/// First and largest wait between checks while Redis does not answer.
const DOWN_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// How often a Redis that stays down is logged again.
const DOWN_REMINDER_EVERY: Duration = Duration::from_secs(60);

/// The directory the router gets, and the task watching Redis (if used).
pub struct ChosenDirectory {
    /// What the router registers in, locates with and asks presence of.
    pub directory: Arc<dyn Directory>,
    /// The Redis health watch; aborted at shutdown.
    pub watch: Option<JoinHandle<()>>,
    /// The Redis directory itself, when it is used.
    pub redis: Option<Arc<RedisDirectory>>,
}

impl std::fmt::Debug for ChosenDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChosenDirectory")
            .field("redis", &self.watch.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds the directory `config` asks for, over this gateway's connection
/// index `outbox`; a Redis one gets a health watch feeding `readiness`.
/// A cluster node (`config.kafka()`) locates through Redis itself.
/// Must be called inside the tokio runtime.
pub fn choose(
    config: &Config,
    outbox: Arc<dyn Outbox>,
    readiness: &Readiness,
) -> anyhow::Result<ChosenDirectory> {
    let gateway = config.app.gateway_id.clone();
    let Some(settings) = config.redis_directory() else {
        return Ok(ChosenDirectory {
            directory: Arc::new(LocalDirectory::new(gateway, outbox)),
            watch: None,
            redis: None,
        });
    };
    let redis = Arc::new(
        RedisDirectory::new(&settings, &gateway, Arc::new(SystemClock))?
            .with_local_fallback(outbox.clone()),
    );
    tracing::info!(url = %settings.url, lease = ?settings.lease, "presence directory: Redis");
    let watch = tokio::spawn(watch_redis(redis.clone(), readiness.dependency("redis")));
    let directory: Arc<dyn Directory> = if config.kafka().is_some() {
        redis.clone()
    } else {
        Arc::new(LocalDelivery {
            presence: redis.clone(),
            here: LocalDirectory::new(gateway, outbox),
        })
    };
    Ok(ChosenDirectory {
        directory,
        watch: Some(watch),
        redis: Some(redis),
    })
}

/// Checks Redis until aborted, marking `dependency` up or down and logging
/// the changes (module docs).
pub async fn watch_redis(directory: Arc<RedisDirectory>, dependency: Dependency) {
    let mut backoff = DOWN_BACKOFF.0;
    let mut down_since: Option<Instant> = None;
    let mut reminded = Instant::now();
    loop {
        match directory.check().await {
            Ok(()) => {
                if let Some(since) = down_since.take() {
                    tracing::info!(down_for = ?since.elapsed(), "Redis directory reachable again: ready");
                }
                dependency.set_up(true);
                backoff = DOWN_BACKOFF.0;
                tokio::time::sleep(HEALTHY_CHECK_EVERY).await;
            }
            Err(error) => {
                dependency.set_up(false);
                match down_since {
                    None => {
                        tracing::error!(%error, "Redis directory unreachable: /health reports not ready; \
                            deliveries go to this gateway's own connections; retrying with back-off");
                        down_since = Some(Instant::now());
                        reminded = Instant::now();
                    }
                    Some(since) if reminded.elapsed() >= DOWN_REMINDER_EVERY => {
                        tracing::warn!(%error, down_for = ?since.elapsed(), "Redis directory still unreachable");
                        reminded = Instant::now();
                    }
                    Some(_) => {}
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DOWN_BACKOFF.1);
            }
        }
    }
}

/// Presence, last-seen and leases in Redis; deliveries planned from this
/// gateway's own connections (the in-process bus reaches no other gateway).
struct LocalDelivery {
    presence: Arc<RedisDirectory>,
    here: LocalDirectory,
}

#[async_trait]
impl Directory for LocalDelivery {
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.presence.register(connection).await
    }

    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.presence.unregister(connection).await
    }

    fn renew_every(&self) -> Option<Duration> {
        self.presence.renew_every()
    }

    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError> {
        self.presence.renew_lease(gateway).await
    }

    async fn locate(
        &self,
        users: &[UserId],
        need_offline: bool,
    ) -> Result<Located, DirectoryError> {
        self.here.locate(users, need_offline).await
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError> {
        self.presence.presence(users).await
    }
}
