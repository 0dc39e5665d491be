//! The cluster's presence directory: [`RedisDirectory`], the [`Directory`]
//! kept in Redis. Every gateway registers its connections in it, holds a
//! lease it renews, and every router locates a fanout page of users in one
//! round trip (one Lua script call). `docs/architecture.md` ("The Redis
//! directory") describes the layout; in short:
//!
//! - `{prefix}u:{user}`, a hash per user: one field per registered
//!   connection, `{shard}:{conn_id}:{gateway}` ->
//!   `{epoch}:{registered_ms}:{device}`, and `seen` -> when the user was
//!   last connected (Unix ms).
//! - `{prefix}gw:{gateway}`, a hash per gateway: `next` counts its lease
//!   epochs, and each epoch `{epoch}` -> when that lease ends (Unix ms).
//!
//! A connection entry is live while its epoch's lease has not ended. The
//! check happens inside the scripts, against the caller's [`Clock`], so a
//! gateway that dies without a word has its users offline once its lease
//! ends, with no sweep over users: the scripts drop a lapsed entry when
//! they meet it and move the user's last-seen time to the lease's end.
//!
//! Why epochs: a gateway whose lease lapsed (Redis unreachable for longer
//! than a lease, or the process restarted with the same id) must not bring
//! old entries back to life by renewing. Each process starts an epoch of
//! its own (ending any other live epoch of its gateway id), and a lapsed
//! or doubtful epoch is replaced by a new one under which this process
//! writes every connection it still holds ([`RedisDirectory`] keeps them),
//! so a Redis outage costs no registration once Redis is back.
//!
//! The scripts touch keys they compute from the prefix (the gateways'
//! lease hashes), so they need one Redis primary (standalone or
//! Sentinel), not Redis Cluster.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use pingme_storage::UserId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::directory::{
    Clock, Directory, DirectoryError, Located, Presence, Registration, ThrottledWarning,
};
use crate::port::Outbox;
use crate::records::ConnAddress;

/// Connection entries written per pipeline when an epoch is re-written.
const REWRITE_BATCH: usize = 1000;

/// How a [`RedisDirectory`] reaches Redis and how long its leases are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisDirectorySettings {
    /// The server, `redis://host:port[/db]`.
    pub url: String,
    /// Prefix of every key (several deployments or tests can share a server).
    pub key_prefix: String,
    /// How long a gateway's registrations outlive its last renewal; it is
    /// renewed every third of this, so two renewals may be lost.
    pub lease: Duration,
    /// Bound of one connection attempt and of one request's answer: a call
    /// fails after it rather than waiting on an unreachable server.
    pub timeout: Duration,
}

impl Default for RedisDirectorySettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "pingme:".into(),
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Shared by every script. `ARGV[1]`: now (Unix ms, the caller's clock);
/// `ARGV[2]`: the key prefix.
const PRELUDE: &str = r#"
local now = tonumber(ARGV[1])
local prefix = ARGV[2]
local lease_ends = {}
-- When `gateway`'s lease `epoch` ends (0: unknown), read once per call.
local function lease_end(gateway, epoch)
  local id = epoch .. ':' .. gateway
  local ends = lease_ends[id]
  if ends == nil then
    ends = tonumber(redis.call('HGET', prefix .. 'gw:' .. gateway, epoch)) or 0
    lease_ends[id] = ends
  end
  return ends
end
-- The gateways where the user of hash `key` has a live connection (each
-- once) and the user's last-seen time. Entries whose lease ended are
-- dropped here, moving last-seen to when that lease ended (or, if that is
-- unknown, to when the connection registered).
local function connections_of(key)
  local fields = redis.call('HGETALL', key)
  local gateways, seen, lapsed = {}, 0, {}
  for i = 1, #fields, 2 do
    local field, value = fields[i], fields[i + 1]
    if field == 'seen' then
      seen = math.max(seen, tonumber(value) or 0)
    else
      local gateway = string.match(field, '^%d+:%d+:(.*)$')
      local epoch, since = string.match(value, '^(%d+):(%d+):')
      local ends = 0
      if gateway and epoch then
        ends = lease_end(gateway, epoch)
      end
      if ends > now then
        local known = false
        for _, g in ipairs(gateways) do
          if g == gateway then known = true end
        end
        if not known then gateways[#gateways + 1] = gateway end
      else
        lapsed[#lapsed + 1] = field
        if ends == 0 then ends = tonumber(since) or 0 end
        seen = math.max(seen, ends)
      end
    end
  end
  if #lapsed > 0 then
    for _, field in ipairs(lapsed) do
      redis.call('HDEL', key, field)
    end
    redis.call('HSET', key, 'seen', seen)
  end
  return gateways, seen
end
"#;

/// KEYS: the users' hashes. Answers each user's gateways.
static LOCATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRELUDE}
local located = {{}}
for i, key in ipairs(KEYS) do
  local gateways = connections_of(key)
  located[i] = gateways
end
return located"
    ))
});

/// KEYS: the users' hashes. Answers `{online, last_seen}` per user.
static PRESENCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRELUDE}
local answers = {{}}
for i, key in ipairs(KEYS) do
  local gateways, seen = connections_of(key)
  if #gateways > 0 then
    answers[i] = {{1, now}}
  else
    answers[i] = {{0, seen}}
  end
end
return answers"
    ))
});

/// KEYS: the gateway's hash, the user's hash. ARGV[3..]: epoch, lease ms,
/// field, value. 0 if the epoch's lease has ended (nothing written).
static REGISTER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRELUDE}
local ends = tonumber(redis.call('HGET', KEYS[1], ARGV[3])) or 0
if ends <= now then return 0 end
redis.call('HSET', KEYS[1], ARGV[3], now + tonumber(ARGV[4]))
connections_of(KEYS[2])
redis.call('HSET', KEYS[2], ARGV[5], ARGV[6])
return 1"
    ))
});

/// KEYS: the user's hash. ARGV[3]: the connection's field.
static UNREGISTER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRELUDE}
redis.call('HDEL', KEYS[1], ARGV[3])
local seen = tonumber(redis.call('HGET', KEYS[1], 'seen')) or 0
redis.call('HSET', KEYS[1], 'seen', math.max(seen, now))
return 1"
    ))
});

/// KEYS: the gateway's hash. ARGV[3..]: epoch, lease ms. 0 if the lease
/// had ended (not renewed).
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRELUDE}
local ends = tonumber(redis.call('HGET', KEYS[1], ARGV[3])) or 0
if ends <= now then return 0 end
redis.call('HSET', KEYS[1], ARGV[3], now + tonumber(ARGV[4]))
return 1"
    ))
});

/// KEYS: the gateway's hash. ARGV[3]: lease ms. Starts (and answers) a
/// new epoch with a full lease; the older ones stay live until
/// [`END_OTHER_EPOCHS`].
static NEW_EPOCH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRELUDE}
local epoch = redis.call('HINCRBY', KEYS[1], 'next', 1)
redis.call('HSET', KEYS[1], epoch, now + tonumber(ARGV[3]))
return epoch"
    ))
});

/// KEYS: the gateway's hash. ARGV[3]: the epoch that stays. Ends every
/// other live epoch of the gateway now: their entries lapse.
static END_OTHER_EPOCHS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRELUDE}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local field = fields[i]
  if field ~= 'next' and field ~= ARGV[3] and (tonumber(fields[i + 1]) or 0) > now then
    redis.call('HSET', KEYS[1], field, now)
  end
end
return 1"
    ))
});

/// The presence directory of one gateway process, in Redis (module docs).
///
/// Built for one gateway id: it registers that gateway's connections and
/// renews that gateway's lease. It keeps the connections it registered
/// (and did not unregister), so when its lease lapses or a write failed
/// it starts a new epoch and writes them all again.
pub struct RedisDirectory {
    redis: ConnectionManager,
    gateway: Arc<str>,
    gateway_key: String,
    prefix: String,
    lease: Duration,
    clock: Arc<dyn Clock>,
    /// This process's lease epoch; 0 until the first one starts.
    epoch: AtomicU64,
    /// Held shared by registrations and unregistrations, exclusively while
    /// a new epoch starts and the live connections are written under it.
    epoch_change: tokio::sync::RwLock<()>,
    /// The connections registered here and not unregistered: what a new
    /// epoch writes again.
    live: DashMap<(UserId, ConnAddress), Arc<str>>,
    /// Set when a write may be missing from Redis (a failed register or
    /// unregister): the next renewal or health check starts a new epoch.
    repair: AtomicBool,
    /// Where deliveries go while Redis is unreachable: this gateway's own
    /// connections (see [`RedisDirectory::with_local_fallback`]).
    fallback: Option<Arc<dyn Outbox>>,
    fallback_warning: ThrottledWarning,
    /// Redis calls made (one per request or pipeline), for tests and
    /// benchmarks that count round trips.
    calls: AtomicU64,
}

impl std::fmt::Debug for RedisDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDirectory")
            .field("gateway", &self.gateway)
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn unavailable(error: redis::RedisError) -> DirectoryError {
    DirectoryError::Unavailable(format!("redis: {error}"))
}

impl RedisDirectory {
    /// The directory of gateway `gateway`, with times from `clock`. Does
    /// not connect yet (the first call does, and every call after a
    /// failure tries again), so a process starts while Redis is down.
    /// Must be called inside a tokio runtime.
    pub fn new(
        settings: &RedisDirectorySettings,
        gateway: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DirectoryError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| DirectoryError::Settings(format!("redis url: {e}")))?;
        // Fail fast while the server is unreachable: the caller has its own
        // retries (deliveries, renewals, the health check's back-off).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(settings.timeout);
        let redis = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| DirectoryError::Settings(format!("redis: {e}")))?;
        if settings.lease < Duration::from_millis(3) {
            return Err(DirectoryError::Settings(
                "the lease must be at least 3 ms".into(),
            ));
        }
        Ok(Self {
            redis,
            gateway: Arc::from(gateway),
            gateway_key: format!("{}gw:{gateway}", settings.key_prefix),
            prefix: settings.key_prefix.clone(),
            lease: settings.lease,
            clock,
            epoch: AtomicU64::new(0),
            epoch_change: tokio::sync::RwLock::new(()),
            live: DashMap::new(),
            repair: AtomicBool::new(false),
            fallback: None,
            fallback_warning: ThrottledWarning::new(Duration::from_secs(10)),
            calls: AtomicU64::new(0),
        })
    }

    /// While Redis is unreachable, `locate` answers from `outbox` (this
    /// gateway's connection index) instead of failing: the users connected
    /// here still get their deliveries live, users on other gateways get
    /// the stored messages when they next sync, and nobody is reported
    /// offline (no push is sent on a guess).
    pub fn with_local_fallback(mut self, outbox: Arc<dyn Outbox>) -> Self {
        self.fallback = Some(outbox);
        self
    }

    /// Redis calls made so far (one per script call or pipeline).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Whether Redis answers; repairs this gateway's registrations first if
    /// a write failed earlier (a new epoch). The health check of `/health`.
    pub async fn check(&self) -> Result<(), DirectoryError> {
        let mut redis = self.redis.clone();
        self.calls.fetch_add(1, Ordering::Relaxed);
        redis::cmd("PING")
            .query_async::<()>(&mut redis)
            .await
            .map_err(unavailable)?;
        if self.repair.load(Ordering::Acquire) {
            self.start_epoch(self.epoch.load(Ordering::Acquire)).await?;
        }
        Ok(())
    }

    /// When `gateway`'s latest lease ends or ended (Unix ms, the lease
    /// holder's clock); `None` if it never held one under this prefix.
    pub async fn lease_end(&self, gateway: &str) -> Result<Option<i64>, DirectoryError> {
        let mut redis = self.redis.clone();
        self.calls.fetch_add(1, Ordering::Relaxed);
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{}gw:{gateway}", self.prefix))
            .query_async(&mut redis)
            .await
            .map_err(unavailable)?;
        Ok(fields
            .iter()
            .filter(|(epoch, _)| epoch.as_str() != "next")
            .filter_map(|(_, ends)| ends.parse::<i64>().ok())
            .max())
    }

    fn user_key(&self, user: UserId) -> String {
        format!("{}u:{user}", self.prefix)
    }

    fn field(&self, conn: ConnAddress) -> String {
        format!("{}:{}:{}", conn.shard, conn.conn_id, self.gateway)
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    fn ours(&self, gateway: &str) -> Result<(), DirectoryError> {
        if gateway == &*self.gateway {
            Ok(())
        } else {
            Err(DirectoryError::Settings(format!(
                "the directory of gateway {} was asked about gateway {gateway}",
                self.gateway
            )))
        }
    }

    /// Runs `script` with the shared arguments (now, prefix) then `args`.
    async fn call<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[&str],
    ) -> Result<T, DirectoryError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(self.clock.now_ms()).arg(&self.prefix);
        for arg in args {
            invocation.arg(*arg);
        }
        let mut redis = self.redis.clone();
        self.calls.fetch_add(1, Ordering::Relaxed);
        invocation
            .invoke_async(&mut redis)
            .await
            .map_err(unavailable)
    }

    /// This process's epoch, starting the first one if needed.
    async fn current_epoch(&self) -> Result<u64, DirectoryError> {
        match self.epoch.load(Ordering::Acquire) {
            0 => self.start_epoch(0).await,
            epoch => Ok(epoch),
        }
    }

    /// Replaces epoch `stale` (0: none yet) by a new one, unless another
    /// caller did already: a new lease, every live connection written
    /// under it, then every other epoch of this gateway ended (entries a
    /// failed unregister left behind, or a previous process's, lapse).
    /// Both epochs are live while the connections are written, so no
    /// reader sees this gateway's users offline meanwhile.
    async fn start_epoch(&self, stale: u64) -> Result<u64, DirectoryError> {
        let _exclusive = self.epoch_change.write().await;
        let current = self.epoch.load(Ordering::Acquire);
        if current != stale {
            return Ok(current);
        }
        let result = self.write_new_epoch().await;
        match result {
            Ok(epoch) => {
                self.epoch.store(epoch, Ordering::Release);
                self.repair.store(false, Ordering::Release);
                if stale != 0 {
                    tracing::info!(gateway = %self.gateway, epoch, connections = self.live.len(),
                        "directory lease renewed under a new epoch; this gateway's connections are registered again");
                }
            }
            Err(_) => self.repair.store(true, Ordering::Release),
        }
        result
    }

    async fn write_new_epoch(&self) -> Result<u64, DirectoryError> {
        let lease = self.lease_ms().to_string();
        let keys = [self.gateway_key.clone()];
        let epoch: u64 = self.call(&NEW_EPOCH, &keys, &[&lease]).await?;
        let now = self.clock.now_ms();
        let live: Vec<_> = self
            .live
            .iter()
            .map(|entry| (*entry.key(), entry.value().clone()))
            .collect();
        let mut redis = self.redis.clone();
        for batch in live.chunks(REWRITE_BATCH) {
            let mut pipe = redis::pipe();
            for ((user, conn), device) in batch {
                pipe.hset(
                    self.user_key(*user),
                    self.field(*conn),
                    format!("{epoch}:{now}:{device}"),
                )
                .ignore();
            }
            self.calls.fetch_add(1, Ordering::Relaxed);
            pipe.query_async::<()>(&mut redis)
                .await
                .map_err(unavailable)?;
        }
        let epoch_arg = epoch.to_string();
        self.call::<i64>(&END_OTHER_EPOCHS, &keys, &[&epoch_arg])
            .await?;
        Ok(epoch)
    }

    /// Splits the answer of the locate script (each user's gateways) per
    /// gateway, as [`Directory::locate`] answers.
    fn split(users: &[UserId], gateways: Vec<Vec<String>>, need_offline: bool) -> Located {
        let mut located = Located::default();
        let mut slot: std::collections::HashMap<String, usize> = Default::default();
        for (user, mut at) in users.iter().zip(gateways) {
            if at.is_empty() {
                if need_offline {
                    located.offline.push(*user);
                }
                continue;
            }
            at.sort_unstable();
            for gateway in at {
                let index = match slot.get(&gateway) {
                    Some(index) => *index,
                    None => {
                        located.online.push((gateway.clone(), Vec::new()));
                        slot.insert(gateway, located.online.len() - 1);
                        located.online.len() - 1
                    }
                };
                located.online[index].1.push(*user);
            }
        }
        located
    }

    /// Deliveries while Redis is unreachable: the users connected to this
    /// gateway, nobody offline.
    fn locate_here(
        &self,
        outbox: &dyn Outbox,
        users: &[UserId],
        error: &DirectoryError,
    ) -> Located {
        metrics::counter!(crate::telemetry::DIRECTORY_FALLBACKS).increment(1);
        if let Some(held_back) = self.fallback_warning.due() {
            tracing::warn!(%error, held_back, gateway = %self.gateway,
                "Redis directory unreachable: delivering to this gateway's own connections only; \
                 users elsewhere get the stored messages when they sync");
        }
        let here: Vec<UserId> = users
            .iter()
            .zip(outbox.online(users))
            .filter_map(|(user, online)| online.then_some(*user))
            .collect();
        Located {
            online: if here.is_empty() {
                Vec::new()
            } else {
                vec![(self.gateway.to_string(), here)]
            },
            offline: Vec::new(),
        }
    }
}

#[async_trait]
impl Directory for RedisDirectory {
    async fn register(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.ours(&connection.gateway)?;
        // First, so a new epoch writes it even if this call fails.
        self.live.insert(
            (connection.user, connection.conn),
            connection.device.clone(),
        );
        let keys = [self.gateway_key.clone(), self.user_key(connection.user)];
        let field = self.field(connection.conn);
        let lease = self.lease_ms().to_string();
        let registered = async {
            let epoch = self.current_epoch().await?;
            let _shared = self.epoch_change.read().await;
            // A new epoch started meanwhile has written this connection.
            let epoch = self.epoch.load(Ordering::Acquire).max(epoch);
            let value = format!("{epoch}:{}:{}", self.clock.now_ms(), connection.device);
            let written: i64 = self
                .call(
                    &REGISTER,
                    &keys,
                    &[&epoch.to_string(), &lease, &field, &value],
                )
                .await?;
            Ok::<_, DirectoryError>((written == 1, epoch))
        }
        .await;
        match registered {
            Ok((true, _)) => Ok(()),
            // The lease lapsed (Redis unreachable, or this process stalled,
            // for longer than a lease): a new epoch writes every live
            // connection, this one included.
            Ok((false, epoch)) => self.start_epoch(epoch).await.map(|_| ()),
            Err(error) => {
                self.repair.store(true, Ordering::Release);
                Err(error)
            }
        }
    }

    async fn unregister(&self, connection: &Registration) -> Result<(), DirectoryError> {
        self.ours(&connection.gateway)?;
        let _shared = self.epoch_change.read().await;
        self.live.remove(&(connection.user, connection.conn));
        let keys = [self.user_key(connection.user)];
        let field = self.field(connection.conn);
        match self.call::<i64>(&UNREGISTER, &keys, &[&field]).await {
            Ok(_) => Ok(()),
            Err(error) => {
                // Left in Redis: the repair's new epoch ends it.
                self.repair.store(true, Ordering::Release);
                Err(error)
            }
        }
    }

    fn renew_every(&self) -> Option<Duration> {
        Some(self.lease / 3)
    }

    async fn renew_lease(&self, gateway: &str) -> Result<bool, DirectoryError> {
        self.ours(gateway)?;
        let epoch = self.epoch.load(Ordering::Acquire);
        if epoch == 0 {
            // This process's first lease: nothing of it could lapse.
            self.current_epoch().await?;
            return Ok(true);
        }
        let keys = [self.gateway_key.clone()];
        let renewed: i64 = self
            .call(
                &RENEW,
                &keys,
                &[&epoch.to_string(), &self.lease_ms().to_string()],
            )
            .await?;
        if renewed == 1 && !self.repair.load(Ordering::Acquire) {
            return Ok(true);
        }
        self.start_epoch(epoch).await?;
        Ok(renewed == 1)
    }

    async fn locate(
        &self,
        users: &[UserId],
        need_offline: bool,
    ) -> Result<Located, DirectoryError> {
        if users.is_empty() {
            return Ok(Located::default());
        }
        let keys: Vec<String> = users.iter().map(|user| self.user_key(*user)).collect();
        match self.call::<Vec<Vec<String>>>(&LOCATE, &keys, &[]).await {
            Ok(gateways) => Ok(Self::split(users, gateways, need_offline)),
            Err(error) => match &self.fallback {
                Some(outbox) => Ok(self.locate_here(outbox.as_ref(), users, &error)),
                None => Err(error),
            },
        }
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>, DirectoryError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = users.iter().map(|user| self.user_key(*user)).collect();
        let answers: Vec<(i64, i64)> = self.call(&PRESENCE, &keys, &[]).await?;
        Ok(answers
            .into_iter()
            .map(|(online, last_seen_ms)| Presence {
                online: online == 1,
                last_seen_ms,
            })
            .collect())
    }
}
