//! The `pingme` configuration: one typed tree read from a YAML file (every
//! field optional, defaults below), then the environment overrides named by
//! the seeds (`APP_HOST`, `APP_PORT`, `APP_ENV`, `DB_*`, `REDIS_*`,
//! `KAFKA_BROKERS`, `JWT_SECRET`, `OTEL_EXPORTER_OTLP_ENDPOINT` and
//! `PINGME_ADMIN_TOKEN`, `SCYLLA_URI`), then
//! validation. Every error names the
//! field it is about; the binary exits with code 64 on any of them.
//!
//! `config/pingme.example.yaml` lists every field with its default; a test
//! keeps the two in step. The defaults of settings a component also has
//! (session limits, the router's task settings) are that component's own
//! defaults, read from it, so the YAML, `Config::default()` and a component
//! built with `Default` cannot disagree.
//!
//! `kafka.brokers` (or `KAFKA_BROKERS`) makes the process a cluster node
//! ([`Config::kafka`]): it then needs the shared directory (Redis) and a
//! shared store (MySQL or ScyllaDB), and `app.role` says which part of the
//! pipeline it runs. Without brokers it is the single node, unchanged.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Whether `url` is `http://` or `https://` followed by a non-empty host
/// (no spaces): the shape an OTLP/HTTP endpoint must have.
fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(rest) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = authority
                .rsplit_once(':')
                .map_or(authority, |(host, _)| host);
            !host.is_empty() && !url.contains(char::is_whitespace)
        }
        None => false,
    }
}

/// Exit code of the binary for an invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Why a configuration was refused. Each variant names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML did not match the schema (unknown field, wrong type).
    #[error("{0}")]
    Parse(String),
    /// An environment variable holds a value its field cannot take.
    #[error("{field} (from env {var}): {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// The field it overrides.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A field's value is out of its allowed range.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as a dotted path.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The process: where the HTTP API listens, which mode it runs in.
    pub app: AppConfig,
    /// Log line format: `text` (human) or `json` (one object per line).
    pub log_format: LogFormat,
    /// A tracing filter (`info`, `pingme_gateway=debug,info`); `RUST_LOG` wins if set.
    pub log_level: String,
    /// OpenTelemetry: where spans are exported over OTLP/HTTP (protobuf),
    /// e.g. `http://127.0.0.1:4318` (`/v1/traces` is appended); empty:
    /// export disabled (no exporter, no extra cost). Env
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute of exported spans.
    pub otlp_service_name: String,
    /// Client listeners other than the HTTP API, and the metrics port.
    pub listeners: ListenersConfig,
    /// What one HTTP connection may hold and for how long (API and ops ports).
    pub http: HttpConfig,
    /// The ops port's access rules (admin token, accepted `Host` names).
    pub ops: OpsConfig,
    /// Connection shards: 0 means one per core.
    pub shards: usize,
    /// Limits of one client session.
    pub session: SessionConfig,
    /// Tokens, passwords and login throttling.
    pub auth: AuthConfig,
    /// Where messages and accounts are kept.
    pub storage: StorageConfig,
    /// The SQL database (used by the `mysql` storage backend).
    pub database: DatabaseConfig,
    /// Redis (presence in cluster mode).
    pub redis: RedisConfig,
    /// Kafka (cluster mode).
    pub kafka: KafkaConfig,
    /// The background task settings (fanout, persistence, push, retry).
    pub task: TaskConfig,
    /// Offline push notifications.
    pub push: PushConfig,
}

/// The process and the HTTP API listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Host the HTTP API (and WebSocket at `/v1/ws`) listens on. Env `APP_HOST`.
    pub host: String,
    /// Port of the HTTP API. Env `APP_PORT`.
    pub port: u16,
    /// `development` or `production`. Env `APP_ENV`. Production refuses to
    /// start without `auth.jwt_secret`.
    pub env: AppEnv,
    /// This gateway's id in a cluster (names its downstream topic). Env
    /// `APP_GATEWAY_ID` (one image, one configuration file, an id per node).
    pub gateway_id: String,
    /// What this node runs in a cluster: `all` (the default), `gateway`
    /// (listeners, HTTP API, its downstream consumer) or `worker` (the
    /// persistence, task, push and dead-letter consumers). Env `APP_ROLE`,
    /// or `pingme serve --role`. Other than `all` only with `kafka.brokers`.
    pub role: NodeRole,
}

/// A cluster node's part (see [`AppConfig::role`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Gateway and worker.
    #[default]
    All,
    /// Connections only.
    Gateway,
    /// The pipeline's consumers only.
    Worker,
}

impl NodeRole {
    /// Parses `all`, `gateway` or `worker`.
    pub fn parse(value: &str) -> Option<NodeRole> {
        match value.trim() {
            "all" => Some(NodeRole::All),
            "gateway" => Some(NodeRole::Gateway),
            "worker" => Some(NodeRole::Worker),
            _ => None,
        }
    }

    /// The router's view of it.
    pub fn router(self) -> pingme_router::Role {
        match self {
            NodeRole::All => pingme_router::Role::All,
            NodeRole::Gateway => pingme_router::Role::Gateway,
            NodeRole::Worker => pingme_router::Role::Worker,
        }
    }
}

/// The mode the process runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppEnv {
    /// Lenient: a missing JWT secret is generated (tokens die with the process).
    Development,
    /// Strict: every secret must be given.
    Production,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Listener addresses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenersConfig {
    /// Plain TCP binary protocol.
    pub tcp: SocketAddr,
    /// TCP + TLS binary protocol.
    pub tls: SocketAddr,
    /// QUIC (UDP) binary protocol.
    pub quic: SocketAddr,
    /// Prometheus `/metrics` and `/health`.
    pub metrics: SocketAddr,
    /// PEM certificate chain for TLS and QUIC; empty: a self-signed
    /// certificate is generated (development only).
    pub tls_cert: String,
    /// PEM private key for `tls_cert`.
    pub tls_key: String,
}

/// Limits of HTTP connections, on the API port and on the ops port (each
/// port counts its own connections).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// A request's headers must arrive within this time; it also closes
    /// idle keep-alive connections and connections that send nothing.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this time (else 408
    /// `REQUEST_TIMEOUT` and the connection is closed).
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// Open connections per port, WebSockets included; beyond, new ones get
    /// 503 `OVERLOADED` and are closed.
    pub max_connections: usize,
    /// Open connections per client IP and port, WebSockets included.
    pub max_connections_per_ip: usize,
}

/// Access to the ops port (`/metrics`, `/health`, `/admin/...`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Bearer token the `/admin` routes require (at least 16 bytes). Empty:
    /// the admin routes are disabled (403). Env `PINGME_ADMIN_TOKEN`.
    pub admin_token: String,
    /// `Host` names the ops port answers besides `localhost` and IP
    /// addresses (a foreign name means DNS rebinding: 403).
    pub allowed_hosts: Vec<String>,
}

/// Limits of one client session.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Largest client frame in bytes (length prefix excluded).
    pub max_frame_size: usize,
    /// A connection must authenticate within this time.
    #[serde(deserialize_with = "duration")]
    pub auth_timeout: Duration,
    /// A connection with no frame for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// The heartbeat interval suggested to clients.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Sustained messages per second one session may send.
    pub messages_per_second: u32,
    /// Bytes queued to a slow reader before it is disconnected (the
    /// connection's outbound budget). A fetch page is at most a quarter of
    /// it, so it must hold four pages of one maximum-size message
    /// (at least 264 KiB with the 64 KiB body limit).
    pub max_queued_bytes: usize,
    /// QUIC handshakes in progress per shard above which clients that have
    /// not proven their address are sent a Retry first; 0 sends every new
    /// client one (a public gateway under a forged-source flood).
    pub quic_retry_above: usize,
    /// QUIC handshakes in progress per shard above which new ones are
    /// refused (bounds their memory).
    pub max_quic_handshakes: usize,
}

/// How many fetch pages fit a connection's outbound budget: the SDK keeps
/// two fetches in flight, the other half is for live traffic.
pub const PAGES_PER_OUTBOUND_BUDGET: usize = 4;

/// Tokens, passwords and login throttling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret for JWTs. Env `JWT_SECRET`. Empty: production refuses
    /// to start; development generates one and warns.
    pub jwt_secret: String,
    /// Lifetime of an access token.
    #[serde(deserialize_with = "duration")]
    pub access_token_ttl: Duration,
    /// Lifetime of a refresh token.
    #[serde(deserialize_with = "duration")]
    pub refresh_token_ttl: Duration,
    /// Failed logins allowed per username within `login_failure_window`.
    pub max_login_failures_per_user: u32,
    /// Failed logins allowed per client IP within `login_failure_window`.
    pub max_login_failures_per_ip: u32,
    /// The window the failure counts above apply to.
    #[serde(deserialize_with = "duration")]
    pub login_failure_window: Duration,
    /// argon2id memory cost of new password hashes, KiB (8..=1048576).
    /// Lower it only for load tests that register many users.
    pub password_hash_memory_kib: u32,
    /// argon2id passes of new password hashes (1..=16).
    pub password_hash_iterations: u32,
    /// Password hashes (registrations) and verifications (logins) running
    /// at once; each holds `password_hash_memory_kib` of memory while it
    /// runs. 0: one per core.
    pub password_hash_concurrency: usize,
    /// How long a registration or login waits for a hashing slot before it
    /// is answered `AUTH_BUSY` (503).
    #[serde(deserialize_with = "duration")]
    pub password_hash_queue_timeout: Duration,
    /// Registrations allowed per client IP within `registration_window`
    /// (beyond: `RATE_LIMITED`, 429). Raise it for load tests that
    /// register many users from one address.
    pub max_registrations_per_ip: u32,
    /// The window `max_registrations_per_ip` applies to.
    #[serde(deserialize_with = "duration")]
    pub registration_window: Duration,
}

/// The store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `embedded` (single node), `mysql` or `scylla`.
    pub backend: StorageBackend,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// When the embedded store acknowledges a write: `sync` (fsynced, the
    /// only safe choice) or `unsafe_no_sync_for_benchmarks` (survives a
    /// process crash, not a power loss).
    pub durability: StorageDurability,
    /// Embedded store: the shortest time from the start of one
    /// group-commit round (one fsync for every append it holds) to the
    /// start of the next. Appends arriving within it wait for the rest of
    /// it and share the next round: fewer fsyncs and wake-ups per message
    /// under load, at most this much more latency. `0s`: a round starts
    /// as soon as the previous one is synced. At most 100 ms.
    #[serde(deserialize_with = "duration")]
    pub group_commit_interval: Duration,
    /// ScyllaDB contact points (`host:port`), for the `scylla` backend.
    /// Env `SCYLLA_URI` (comma-separated).
    pub scylla_nodes: Vec<String>,
    /// The ScyllaDB keyspace (`[a-z0-9_]`, at most 48), created if missing.
    pub scylla_keyspace: String,
    /// Replicas per partition when the keyspace is created.
    pub scylla_replication_factor: u32,
    /// `mysql` and `scylla`: how long `pingme serve` keeps trying to reach
    /// the store at start (attempts 0.5 s apart, doubling to 5 s, each
    /// failure logged) before it exits with code 69; `0s`: one attempt.
    /// A refused login or a database the login may not create is a
    /// configuration error: no retry, exit code 64.
    #[serde(deserialize_with = "duration")]
    pub startup_timeout: Duration,
}

/// Which store implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// In-process, crash-safe, under `data_dir`.
    Embedded,
    /// MySQL / MariaDB through the `database` section.
    Mysql,
    /// ScyllaDB through `scylla_nodes`.
    Scylla,
}

/// When the embedded store acknowledges a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageDurability {
    /// After fsync.
    Sync,
    /// After the write reaches the OS; benchmarks only.
    UnsafeNoSyncForBenchmarks,
}

/// The SQL database.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Env `DB_HOST`.
    pub host: String,
    /// Env `DB_PORT`.
    pub port: u16,
    /// Env `DB_USERNAME`.
    pub username: String,
    /// Env `DB_PASSWORD`.
    pub password: String,
    /// Database name (`[A-Za-z0-9_]`, at most 64), created if missing.
    /// Env `DB_NAME`.
    pub name: String,
    /// Most connections open at once (at least 2: the append writer holds
    /// one per commit round, reads and account writes share the rest).
    pub pool_size: u32,
    /// How long a new connection may take to be established, and a call
    /// may wait for a free pooled connection, before it fails (the client
    /// sees `STORAGE_UNAVAILABLE`).
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
}

/// Redis: the presence directory of a cluster (who is connected on which
/// gateway, leases, last seen).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Whether presence lives in Redis (cluster) rather than in this
    /// process (single node). `REDIS_HOST` or `REDIS_PORT` in the
    /// environment turn it on: a variable naming a Redis means "use it".
    pub enabled: bool,
    /// Env `REDIS_HOST`.
    pub host: String,
    /// Env `REDIS_PORT`.
    pub port: u16,
    /// Prefix of every key pingme writes (several deployments can share a
    /// server).
    pub key_prefix: String,
    /// How long a gateway's registrations outlive its last lease renewal:
    /// a gateway that dies without a word has its users offline, and
    /// nothing routed to it, within this time. Renewed every third of it.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    /// Bound of one connection attempt and of one request to Redis.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

/// Kafka.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list; empty: single-node mode with the
    /// in-process bus. Env `KAFKA_BROKERS`.
    pub brokers: String,
    /// Prefix of each gateway's downstream topic (`{prefix}{gateway_id}`).
    pub downstream_topic_prefix: String,
    /// Topic of push notifications.
    pub push_topic: String,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Partitions of the persistence and task topics (at most this many
    /// conversation or fanout workers work in parallel across the
    /// cluster). Every node must agree: a topic that exists with another
    /// count is refused at start.
    pub partitions: u32,
    /// Partitions of the push topic.
    pub push_partitions: u32,
    /// Partitions of each gateway's downstream topic.
    pub downstream_partitions: u32,
    /// Producer `linger.ms`: the wait for a fuller batch (latency figures
    /// in docs/benchmarks.md, "Kafka bus latency").
    pub linger_ms: u32,
    /// Consumer `fetch.wait.max.ms`: how long the broker may hold an empty
    /// fetch.
    pub fetch_wait_max_ms: u32,
    /// Consumer `session.timeout.ms`: a silent node's partitions move to
    /// the others after this long.
    #[serde(deserialize_with = "duration")]
    pub session_timeout: Duration,
    /// Consumer `heartbeat.interval.ms` (at most a third of the session
    /// timeout).
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// How long start-up waits for the brokers before the process exits
    /// with 69 (EX_UNAVAILABLE).
    #[serde(deserialize_with = "duration")]
    pub startup_timeout: Duration,
    /// Workers report the downstream topics of gateways whose lease ended
    /// longer ago than this (log and `pingme_kafka_stale_downstream_topics`);
    /// nothing is deleted.
    #[serde(deserialize_with = "duration")]
    pub stale_downstream_after: Duration,
    /// How long a stopping gateway waits for the answers to the sends it
    /// took (their worker may be in a rebalance); senders of the ones
    /// still unanswered then retry on another gateway (idempotent).
    #[serde(deserialize_with = "duration")]
    pub shutdown_answers_wait: Duration,
    /// Each consumer commits its offsets at most this often (0s: after
    /// every batch); a crash re-delivers up to this much more work, which
    /// the stages take idempotently.
    #[serde(deserialize_with = "duration")]
    pub commit_interval: Duration,
}

/// The background task settings, named as in the im-task seed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// Topic of large-group fanout tasks.
    pub task_topic: String,
    /// Topic the persistence consumers read.
    pub persistence_topic: String,
    /// Consumer group of the fanout task consumers.
    pub consumer_group: String,
    /// Consumer group of the persistence consumers.
    pub persistence_group: String,
    /// Groups with more members than this fan out through the task topic.
    pub large_group_threshold: u64,
    /// Members read per page when fanning out.
    pub fanout_batch_size: usize,
    /// Whether offline members get push notifications.
    pub push_notification_enabled: bool,
    /// Delivery attempts per message before it is given up.
    pub message_retry_attempts: u32,
    /// Attempts of a failing task before it goes to the dead-letter queue.
    pub retry_max_attempts: u32,
    /// First retry delay.
    #[serde(deserialize_with = "duration")]
    pub retry_initial_backoff: Duration,
    /// Largest retry delay.
    #[serde(deserialize_with = "duration")]
    pub retry_max_backoff: Duration,
    /// Each retry delay is the previous one times this.
    pub retry_multiplier: f64,
    /// Whether exhausted work goes to the dead-letter queue (else it is dropped and logged).
    pub enable_dlq: bool,
}

/// Offline push notifications.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Webhook receiving push notifications as JSON; empty: push disabled.
    /// An `https://` webhook's certificate is checked against Mozilla's
    /// roots.
    pub webhook_url: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            app: AppConfig::default(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: String::new(),
            otlp_service_name: "pingme".into(),
            listeners: ListenersConfig::default(),
            http: HttpConfig::default(),
            ops: OpsConfig::default(),
            shards: 0,
            session: SessionConfig::default(),
            auth: AuthConfig::default(),
            storage: StorageConfig::default(),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            kafka: KafkaConfig::default(),
            task: TaskConfig::default(),
            push: PushConfig::default(),
        }
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            env: AppEnv::Development,
            gateway_id: "gw-1".into(),
            role: NodeRole::All,
        }
    }
}

impl Default for ListenersConfig {
    fn default() -> Self {
        ListenersConfig {
            tcp: ([127, 0, 0, 1], 7000).into(),
            tls: ([127, 0, 0, 1], 7443).into(),
            quic: ([127, 0, 0, 1], 7443).into(),
            metrics: ([127, 0, 0, 1], 9093).into(),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        let limits = crate::http::server::HttpLimits::default();
        HttpConfig {
            header_read_timeout: limits.header_read_timeout,
            body_read_timeout: limits.body_read_timeout,
            max_connections: limits.max_connections,
            max_connections_per_ip: limits.max_connections_per_ip,
        }
    }
}

impl Default for SessionConfig {
    /// The gateway's own session defaults.
    fn default() -> Self {
        let limits = crate::SessionLimits::default();
        SessionConfig {
            max_frame_size: limits.max_frame_size,
            auth_timeout: limits.auth_timeout,
            idle_timeout: limits.idle_timeout,
            heartbeat_interval: limits.heartbeat_interval,
            messages_per_second: limits.messages_per_second,
            max_queued_bytes: limits.max_queued_bytes,
            quic_retry_above: limits.quic_handshakes_before_retry,
            max_quic_handshakes: limits.max_quic_handshakes,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: String::new(),
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            max_login_failures_per_user: 5,
            max_login_failures_per_ip: 50,
            login_failure_window: Duration::from_secs(60),
            password_hash_memory_kib: crate::auth::password::DEFAULT_MEMORY_KIB,
            password_hash_iterations: crate::auth::password::DEFAULT_ITERATIONS,
            password_hash_concurrency: 0,
            password_hash_queue_timeout: Duration::from_secs(3),
            max_registrations_per_ip: 20,
            registration_window: Duration::from_secs(3600),
        }
    }
}

impl Default for StorageConfig {
    /// The ScyllaDB store's own defaults for its settings.
    fn default() -> Self {
        let scylla = pingme_storage::scylla::ScyllaConfig::default();
        StorageConfig {
            backend: StorageBackend::Embedded,
            data_dir: PathBuf::from("./data"),
            durability: StorageDurability::Sync,
            group_commit_interval: pingme_storage::embedded::DEFAULT_GROUP_COMMIT_INTERVAL,
            scylla_nodes: Vec::new(),
            scylla_keyspace: scylla.keyspace,
            scylla_replication_factor: scylla.replication_factor,
            startup_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for DatabaseConfig {
    /// The MySQL store's own defaults.
    fn default() -> Self {
        let mysql = pingme_storage::mysql::MysqlConfig::default();
        DatabaseConfig {
            host: mysql.host,
            port: mysql.port,
            username: mysql.username,
            password: mysql.password,
            name: mysql.database,
            pool_size: mysql.pool_size,
            connect_timeout: mysql.connect_timeout,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        let directory = pingme_router::RedisDirectorySettings::default();
        RedisConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 6379,
            key_prefix: directory.key_prefix,
            lease: directory.lease,
            timeout: directory.timeout,
        }
    }
}

impl Default for KafkaConfig {
    /// The bus's own defaults (topic layout and client settings).
    fn default() -> Self {
        let topics = pingme_router::BusTopics::default();
        let kafka = pingme_router::KafkaSettings::new("");
        KafkaConfig {
            brokers: String::new(),
            downstream_topic_prefix: "downstream-topic-".into(),
            push_topic: "im-push".into(),
            dlq_topic: "im-dlq".into(),
            partitions: topics.persistence_partitions,
            push_partitions: topics.push_partitions,
            downstream_partitions: topics.downstream_partitions,
            linger_ms: kafka.linger_ms,
            fetch_wait_max_ms: kafka.fetch_wait_max_ms,
            session_timeout: Duration::from_millis(u64::from(kafka.session_timeout_ms)),
            heartbeat_interval: Duration::from_millis(u64::from(kafka.heartbeat_interval_ms)),
            startup_timeout: Duration::from_secs(60),
            stale_downstream_after: Duration::from_secs(24 * 3600),
            shutdown_answers_wait: pingme_router::RouterConfig::default().answers_wait,
            commit_interval: kafka.commit_interval,
        }
    }
}

impl Default for TaskConfig {
    /// The seed's names, and the router's own defaults for what it runs.
    fn default() -> Self {
        let router = pingme_router::RouterConfig::default();
        TaskConfig {
            task_topic: "im-task".into(),
            persistence_topic: "im-persistence".into(),
            consumer_group: "im-task-group".into(),
            persistence_group: "im-persistence-group".into(),
            large_group_threshold: router.large_group_threshold,
            fanout_batch_size: router.fanout_batch_size,
            // On, but push only runs with `push.webhook_url` set (the
            // router's own default has no webhook, so it says off).
            push_notification_enabled: true,
            message_retry_attempts: router.message_retry_attempts,
            retry_max_attempts: 3,
            retry_initial_backoff: router.retry_initial_backoff,
            retry_max_backoff: router.retry_max_backoff,
            retry_multiplier: router.retry_multiplier,
            enable_dlq: router.enable_dlq,
        }
    }
}

impl Config {
    /// Reads `path` (or starts from the defaults when `None`), applies the
    /// process environment, validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with_role(path, None)
    }

    /// [`Config::load`] with the command line's `--role`, which wins over
    /// the file and `APP_ROLE` (and is validated with them).
    pub fn load_with_role(
        path: Option<&Path>,
        role: Option<NodeRole>,
    ) -> Result<Config, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let mut config = Config::read(path, env)?;
        if let Some(role) = role {
            config.app.role = role;
        }
        config.validate()?;
        Ok(config)
    }

    /// [`Config::load`] with the environment given as a lookup, so tests
    /// can fake it without touching the process environment.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let config = Config::read(path, env)?;
        config.validate()?;
        Ok(config)
    }

    /// The file (or the defaults) with the environment applied, not yet
    /// validated.
    fn read(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::parse_yaml(&text)?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        Ok(config)
    }

    /// Parses YAML text (no environment, no validation). An empty document
    /// is the defaults.
    pub fn parse_yaml(text: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Applies the seed's environment overrides.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parsed<T: std::str::FromStr>(
            var: &'static str,
            field: &'static str,
            value: &str,
        ) -> Result<T, ConfigError>
        where
            T::Err: fmt::Display,
        {
            value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                field,
                reason: format!("{value:?}: {e}"),
            })
        }
        if let Some(v) = env("APP_HOST") {
            self.app.host = v;
        }
        if let Some(v) = env("APP_PORT") {
            self.app.port = parsed("APP_PORT", "app.port", &v)?;
        }
        if let Some(v) = env("APP_ENV") {
            self.app.env = match v.trim() {
                "development" | "dev" => AppEnv::Development,
                "production" | "prod" => AppEnv::Production,
                other => {
                    return Err(ConfigError::Env {
                        var: "APP_ENV",
                        field: "app.env",
                        reason: format!("{other:?}: expected development or production"),
                    });
                }
            };
        }
        if let Some(v) = env("APP_GATEWAY_ID") {
            self.app.gateway_id = v.trim().to_string();
        }
        if let Some(v) = env("DB_HOST") {
            self.database.host = v;
        }
        if let Some(v) = env("DB_PORT") {
            self.database.port = parsed("DB_PORT", "database.port", &v)?;
        }
        if let Some(v) = env("DB_USERNAME") {
            self.database.username = v;
        }
        if let Some(v) = env("DB_PASSWORD") {
            self.database.password = v;
        }
        if let Some(v) = env("DB_NAME") {
            self.database.name = v;
        }
        if let Some(v) = env("SCYLLA_URI") {
            self.storage.scylla_nodes = v
                .split(',')
                .map(|node| node.trim().to_string())
                .filter(|node| !node.is_empty())
                .collect();
        }
        if let Some(v) = env("REDIS_HOST") {
            self.redis.host = v.trim().to_string();
            self.redis.enabled = true;
        }
        if let Some(v) = env("REDIS_PORT") {
            self.redis.port = parsed("REDIS_PORT", "redis.port", &v)?;
            self.redis.enabled = true;
        }
        if let Some(v) = env("KAFKA_BROKERS") {
            self.kafka.brokers = v.trim().to_string();
        }
        if let Some(v) = env("APP_ROLE") {
            self.app.role = NodeRole::parse(&v).ok_or_else(|| ConfigError::Invalid {
                field: "app.role",
                reason: format!("APP_ROLE={v:?}: must be all, gateway or worker"),
            })?;
        }
        if let Some(v) = env("JWT_SECRET") {
            self.auth.jwt_secret = v;
        }
        if let Some(v) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            self.otlp_endpoint = v.trim().to_string();
        }
        if let Some(v) = env("PINGME_ADMIN_TOKEN") {
            self.ops.admin_token = v;
        }
        Ok(())
    }

    /// Checks ranges and cross-field rules; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, field: &'static str, reason: &str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    field,
                    reason: reason.to_string(),
                })
            }
        }
        check(
            !self.app.host.trim().is_empty(),
            "app.host",
            "must not be empty",
        )?;
        check(
            !self.app.gateway_id.is_empty()
                && self
                    .app
                    .gateway_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'),
            "app.gateway_id",
            "must be non-empty [A-Za-z0-9._-]",
        )?;
        check(
            self.otlp_endpoint.is_empty() || is_http_url(&self.otlp_endpoint),
            "otlp_endpoint",
            "must be empty (disabled) or an http:// or https:// URL with a host",
        )?;
        check(
            !self.otlp_service_name.trim().is_empty(),
            "otlp_service_name",
            "must not be empty",
        )?;
        check(
            self.shards <= 1024,
            "shards",
            "must be at most 1024 (0 = one per core)",
        )?;
        let h = &self.http;
        check(
            !h.header_read_timeout.is_zero(),
            "http.header_read_timeout",
            "must be positive",
        )?;
        check(
            !h.body_read_timeout.is_zero(),
            "http.body_read_timeout",
            "must be positive",
        )?;
        check(
            h.max_connections > 0,
            "http.max_connections",
            "must be positive",
        )?;
        check(
            (1..=h.max_connections).contains(&h.max_connections_per_ip),
            "http.max_connections_per_ip",
            "must be between 1 and http.max_connections",
        )?;
        check(
            self.ops.admin_token.is_empty() || self.ops.admin_token.len() >= 16,
            "ops.admin_token",
            "must be empty (admin routes disabled) or at least 16 bytes",
        )?;
        check(
            self.ops
                .allowed_hosts
                .iter()
                .all(|h| !h.is_empty() && !h.contains(char::is_whitespace) && !h.contains('/')),
            "ops.allowed_hosts",
            "must be host names (optionally host:port)",
        )?;
        let s = &self.session;
        check(
            (1024..=pingme_protocol::MAX_DOWNSTREAM_FRAME_SIZE).contains(&s.max_frame_size),
            "session.max_frame_size",
            "must be between 1 KiB and 4 MiB",
        )?;
        check(
            !s.auth_timeout.is_zero(),
            "session.auth_timeout",
            "must be positive",
        )?;
        check(
            !s.heartbeat_interval.is_zero(),
            "session.heartbeat_interval",
            "must be positive",
        )?;
        check(
            s.idle_timeout > s.heartbeat_interval,
            "session.idle_timeout",
            "must be longer than session.heartbeat_interval",
        )?;
        check(
            s.messages_per_second > 0,
            "session.messages_per_second",
            "must be positive",
        )?;
        check(
            s.max_queued_bytes >= s.max_frame_size,
            "session.max_queued_bytes",
            "must be at least session.max_frame_size",
        )?;
        check(
            s.max_queued_bytes
                >= PAGES_PER_OUTBOUND_BUDGET
                    * pingme_router::single_message_page_bytes(self.router().max_body_bytes),
            "session.max_queued_bytes",
            "must hold four fetch pages of one maximum-size message (at least 270336 bytes)",
        )?;
        check(
            s.max_quic_handshakes > 0,
            "session.max_quic_handshakes",
            "must be positive (0 would refuse every QUIC client)",
        )?;
        let a = &self.auth;
        check(
            self.app.env == AppEnv::Development || !a.jwt_secret.is_empty(),
            "auth.jwt_secret",
            "is required in production (set JWT_SECRET)",
        )?;
        check(
            a.jwt_secret.is_empty() || a.jwt_secret.len() >= 16,
            "auth.jwt_secret",
            "must be at least 16 bytes",
        )?;
        let l = &self.listeners;
        check(
            l.tls_cert.is_empty() == l.tls_key.is_empty(),
            "listeners.tls_key",
            "listeners.tls_cert and listeners.tls_key must be set together",
        )?;
        check(
            self.app.env == AppEnv::Development || !l.tls_cert.is_empty(),
            "listeners.tls_cert",
            "is required in production (with listeners.tls_key); the self-signed \
             certificate is for development only",
        )?;
        check(
            a.access_token_ttl >= Duration::from_secs(1),
            "auth.access_token_ttl",
            "must be at least 1s",
        )?;
        check(
            a.refresh_token_ttl >= a.access_token_ttl,
            "auth.refresh_token_ttl",
            "must be at least auth.access_token_ttl",
        )?;
        check(
            a.max_login_failures_per_user > 0,
            "auth.max_login_failures_per_user",
            "must be positive",
        )?;
        check(
            a.max_login_failures_per_ip > 0,
            "auth.max_login_failures_per_ip",
            "must be positive",
        )?;
        check(
            !a.login_failure_window.is_zero(),
            "auth.login_failure_window",
            "must be positive",
        )?;
        check(
            (8..=1024 * 1024).contains(&a.password_hash_memory_kib),
            "auth.password_hash_memory_kib",
            "must be between 8 and 1048576",
        )?;
        check(
            (1..=16).contains(&a.password_hash_iterations),
            "auth.password_hash_iterations",
            "must be between 1 and 16",
        )?;
        check(
            a.password_hash_concurrency <= 1024,
            "auth.password_hash_concurrency",
            "must be at most 1024 (0 = one per core)",
        )?;
        check(
            !a.password_hash_queue_timeout.is_zero(),
            "auth.password_hash_queue_timeout",
            "must be positive",
        )?;
        check(
            a.max_registrations_per_ip > 0,
            "auth.max_registrations_per_ip",
            "must be positive",
        )?;
        check(
            !a.registration_window.is_zero(),
            "auth.registration_window",
            "must be positive",
        )?;
        check(
            !self.storage.data_dir.as_os_str().is_empty(),
            "storage.data_dir",
            "must not be empty",
        )?;
        check(
            self.storage.backend != StorageBackend::Scylla || !self.storage.scylla_nodes.is_empty(),
            "storage.scylla_nodes",
            "must list at least one node for the scylla backend (or set SCYLLA_URI)",
        )?;
        self.validate_stores()?;
        let t = &self.task;
        check(
            t.large_group_threshold > 0,
            "task.large_group_threshold",
            "must be positive",
        )?;
        check(
            (1..=pingme_storage::MAX_PAGE).contains(&t.fanout_batch_size),
            "task.fanout_batch_size",
            "must be between 1 and 1000",
        )?;
        check(
            t.message_retry_attempts > 0,
            "task.message_retry_attempts",
            "must be positive",
        )?;
        check(
            t.retry_max_attempts > 0,
            "task.retry_max_attempts",
            "must be positive",
        )?;
        check(
            !t.retry_initial_backoff.is_zero(),
            "task.retry_initial_backoff",
            "must be positive",
        )?;
        check(
            t.retry_max_backoff >= t.retry_initial_backoff,
            "task.retry_max_backoff",
            "must be at least task.retry_initial_backoff",
        )?;
        check(
            t.retry_multiplier.is_finite() && t.retry_multiplier >= 1.0,
            "task.retry_multiplier",
            "must be a number >= 1.0",
        )?;
        let r = &self.redis;
        let default_redis = RedisConfig::default();
        check(
            r.enabled || (r.host == default_redis.host && r.port == default_redis.port),
            "redis.host",
            "is set but redis.enabled is false, so it would be ignored: set redis.enabled: true \
             to keep presence in Redis, or leave redis.host and redis.port at their defaults",
        )?;
        check(
            !r.enabled || !r.host.trim().is_empty(),
            "redis.host",
            "must not be empty",
        )?;
        check(!r.enabled || r.port > 0, "redis.port", "must be positive")?;
        check(
            !r.key_prefix.is_empty() && !r.key_prefix.contains(char::is_whitespace),
            "redis.key_prefix",
            "must be non-empty, without spaces",
        )?;
        check(
            (Duration::from_secs(3)..=Duration::from_secs(3600)).contains(&r.lease),
            "redis.lease",
            "must be between 3s and 1h",
        )?;
        check(
            !r.timeout.is_zero() && r.timeout * 3 <= r.lease,
            "redis.timeout",
            "must be positive and at most a third of redis.lease (a renewal must fail before the next is due)",
        )?;
        let url = &self.push.webhook_url;
        check(
            url.is_empty() || url.starts_with("http://") || url.starts_with("https://"),
            "push.webhook_url",
            "must be empty or an http(s) URL",
        )?;
        self.validate_cluster()
    }

    /// The cluster rules: brokers make a cluster node, which needs the
    /// shared directory and a shared store; a role other than `all` needs
    /// brokers.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        let kafka = &self.kafka;
        if kafka.brokers.is_empty() {
            if self.app.role != NodeRole::All {
                return invalid(
                    "app.role",
                    "gateway and worker are cluster roles: set kafka.brokers (KAFKA_BROKERS) too",
                );
            }
            return Ok(());
        }
        if kafka.brokers.split(',').any(|broker| {
            let broker = broker.trim();
            broker.is_empty() || !broker.contains(':')
        }) {
            return invalid(
                "kafka.brokers",
                "must be a comma-separated list of host:port",
            );
        }
        if !self.redis.enabled {
            return invalid(
                "kafka.brokers",
                "a cluster node needs the Redis directory (redis.enabled, or REDIS_HOST) \
                 to find users on other gateways",
            );
        }
        if self.storage.backend == StorageBackend::Embedded {
            return invalid(
                "storage.backend",
                "a cluster node needs a store every node shares (mysql or scylla): \
                 embedded stores on several nodes would each hold part of the messages",
            );
        }
        for (field, partitions) in [
            ("kafka.partitions", kafka.partitions),
            ("kafka.push_partitions", kafka.push_partitions),
            ("kafka.downstream_partitions", kafka.downstream_partitions),
        ] {
            if !(1..=1024).contains(&partitions) {
                return invalid(field, "must be between 1 and 1024");
            }
        }
        if kafka.session_timeout < Duration::from_secs(1)
            || kafka.heartbeat_interval.is_zero()
            || kafka.heartbeat_interval * 3 > kafka.session_timeout
        {
            return invalid(
                "kafka.heartbeat_interval",
                "must be positive and at most a third of kafka.session_timeout (at least 1s)",
            );
        }
        if kafka.startup_timeout.is_zero() {
            return invalid("kafka.startup_timeout", "must be positive");
        }
        if kafka.stale_downstream_after < Duration::from_secs(1) {
            return invalid("kafka.stale_downstream_after", "must be at least 1s");
        }
        Ok(())
    }

    /// The Kafka bus's settings, when this process is a cluster node.
    pub fn kafka(&self) -> Option<pingme_router::KafkaSettings> {
        let kafka = &self.kafka;
        (!kafka.brokers.is_empty()).then(|| {
            let mut settings = pingme_router::KafkaSettings::new(kafka.brokers.clone());
            settings.linger_ms = kafka.linger_ms;
            settings.fetch_wait_max_ms = kafka.fetch_wait_max_ms;
            settings.session_timeout_ms =
                u32::try_from(kafka.session_timeout.as_millis()).unwrap_or(u32::MAX);
            settings.heartbeat_interval_ms =
                u32::try_from(kafka.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
            settings.commit_interval = kafka.commit_interval;
            settings
        })
    }

    /// The store settings: the `database` section must name a usable
    /// database when `storage.backend` is `mysql`, and is refused (naming
    /// the field) when another backend would silently ignore it; the
    /// ScyllaDB settings likewise for `scylla`.
    fn validate_stores(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        let storage = &self.storage;
        if storage.startup_timeout > Duration::from_secs(3600) {
            return invalid("storage.startup_timeout", "must be at most 1h");
        }
        if storage.group_commit_interval > Duration::from_millis(100) {
            return invalid("storage.group_commit_interval", "must be at most 100ms");
        }
        let (db, default_db) = (&self.database, DatabaseConfig::default());
        if storage.backend != StorageBackend::Mysql {
            let changed = [
                ("database.host", db.host != default_db.host),
                ("database.port", db.port != default_db.port),
                ("database.username", db.username != default_db.username),
                ("database.password", db.password != default_db.password),
                ("database.name", db.name != default_db.name),
                ("database.pool_size", db.pool_size != default_db.pool_size),
                (
                    "database.connect_timeout",
                    db.connect_timeout != default_db.connect_timeout,
                ),
            ];
            if let Some((field, _)) = changed.into_iter().find(|(_, changed)| *changed) {
                return invalid(
                    field,
                    "is used only by storage.backend: mysql; set the backend or leave \
                     the database section (and the DB_* variables) at their defaults",
                );
            }
        } else {
            if db.host.trim().is_empty() {
                return invalid("database.host", "must not be empty (DB_HOST)");
            }
            if db.port == 0 {
                return invalid("database.port", "must not be 0 (DB_PORT)");
            }
            if db.username.is_empty() {
                return invalid("database.username", "must not be empty (DB_USERNAME)");
            }
            if !pingme_storage::mysql::is_valid_database_name(&db.name) {
                return invalid(
                    "database.name",
                    "must be 1-64 of [A-Za-z0-9_] (DB_NAME): it is spliced into CREATE DATABASE",
                );
            }
            if !(2..=1000).contains(&db.pool_size) {
                return invalid("database.pool_size", "must be between 2 and 1000");
            }
            if db.connect_timeout < Duration::from_millis(100)
                || db.connect_timeout > Duration::from_secs(300)
            {
                return invalid("database.connect_timeout", "must be between 100ms and 5m");
            }
        }
        if storage.backend == StorageBackend::Scylla {
            if !pingme_storage::scylla::is_valid_keyspace(&storage.scylla_keyspace) {
                return invalid("storage.scylla_keyspace", "must be 1-48 of [a-z0-9_]");
            }
            if !(1..=15).contains(&storage.scylla_replication_factor) {
                return invalid(
                    "storage.scylla_replication_factor",
                    "must be between 1 and 15",
                );
            }
        }
        Ok(())
    }

    /// The MySQL store's settings (the `database` section).
    pub fn mysql(&self) -> pingme_storage::mysql::MysqlConfig {
        let db = &self.database;
        pingme_storage::mysql::MysqlConfig {
            host: db.host.clone(),
            port: db.port,
            username: db.username.clone(),
            password: db.password.clone(),
            database: db.name.clone(),
            pool_size: db.pool_size,
            connect_timeout: db.connect_timeout,
        }
    }

    /// The ScyllaDB store's settings (the `storage.scylla_*` fields, the
    /// store's own request timeout).
    pub fn scylla(&self) -> pingme_storage::scylla::ScyllaConfig {
        pingme_storage::scylla::ScyllaConfig {
            nodes: self.storage.scylla_nodes.clone(),
            keyspace: self.storage.scylla_keyspace.clone(),
            replication_factor: self.storage.scylla_replication_factor,
            ..pingme_storage::scylla::ScyllaConfig::default()
        }
    }

    /// Number of connection shards to run: `shards`, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// `host:port` of the HTTP API, for binding.
    pub fn http_bind(&self) -> String {
        if self.app.host.contains(':') && !self.app.host.starts_with('[') {
            format!("[{}]:{}", self.app.host, self.app.port)
        } else {
            format!("{}:{}", self.app.host, self.app.port)
        }
    }

    /// The HTTP connection limits of the API and ops ports.
    pub fn http_limits(&self) -> crate::http::server::HttpLimits {
        crate::http::server::HttpLimits {
            header_read_timeout: self.http.header_read_timeout,
            body_read_timeout: self.http.body_read_timeout,
            max_connections: self.http.max_connections,
            max_connections_per_ip: self.http.max_connections_per_ip,
        }
    }

    /// True in production mode.
    pub fn is_production(&self) -> bool {
        self.app.env == AppEnv::Production
    }
}

/// Parses a duration written as `<number><unit>` with unit `ms`, `s`, `m`,
/// `h` or `d` (`100ms`, `10s`, `30d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit (ms, s, m, h, d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not <number><unit>"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    // A visitor (not `String::deserialize` then parse) so the error is
    // raised while the deserializer still knows the field's path.
    struct DurationText;
    impl serde::de::Visitor<'_> for DurationText {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 100ms, 10s, 5m, 1h or 30d")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            parse_duration(text).map_err(E::custom)
        }
    }
    deserializer.deserialize_str(DurationText)
}

impl Config {
    /// The connection side's settings (listeners, shards, session limits).
    pub fn gateway(&self) -> crate::GatewayConfig {
        let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
        crate::GatewayConfig {
            listeners: crate::ListenerConfig {
                tcp: Some(self.listeners.tcp),
                tls: Some(self.listeners.tls),
                quic: Some(self.listeners.quic),
            },
            shards: Some(self.shard_count()),
            tls_cert: path(&self.listeners.tls_cert),
            tls_key: path(&self.listeners.tls_key),
            dev_mode: !self.is_production(),
            limits: crate::SessionLimits {
                max_frame_size: self.session.max_frame_size,
                auth_timeout: self.session.auth_timeout,
                idle_timeout: self.session.idle_timeout,
                heartbeat_interval: self.session.heartbeat_interval,
                messages_per_second: self.session.messages_per_second,
                // A client may catch up after a reconnect: one second's worth
                // of burst on top of the sustained rate.
                burst: self.session.messages_per_second,
                max_queued_bytes: self.session.max_queued_bytes,
                max_body_bytes: self.router().max_body_bytes,
                quic_handshakes_before_retry: self.session.quic_retry_above,
                max_quic_handshakes: self.session.max_quic_handshakes,
                ..crate::SessionLimits::default()
            },
            ..crate::GatewayConfig::default()
        }
    }

    /// The Redis directory's settings, when `redis.enabled`.
    pub fn redis_directory(&self) -> Option<pingme_router::RedisDirectorySettings> {
        let r = &self.redis;
        r.enabled.then(|| {
            let host = if r.host.contains(':') && !r.host.starts_with('[') {
                format!("[{}]", r.host)
            } else {
                r.host.clone()
            };
            pingme_router::RedisDirectorySettings {
                url: format!("redis://{host}:{}", r.port),
                key_prefix: r.key_prefix.clone(),
                lease: r.lease,
                timeout: r.timeout,
            }
        })
    }

    /// The message pipeline's settings (the seed's task and retry settings).
    pub fn router(&self) -> pingme_router::RouterConfig {
        let task = &self.task;
        pingme_router::RouterConfig {
            gateway_id: self.app.gateway_id.clone(),
            role: self.app.role.router(),
            large_group_threshold: task.large_group_threshold,
            fanout_batch_size: task.fanout_batch_size,
            push_notification_enabled: task.push_notification_enabled
                && !self.push.webhook_url.is_empty(),
            push_webhook_url: (!self.push.webhook_url.is_empty())
                .then(|| self.push.webhook_url.clone()),
            message_retry_attempts: task.message_retry_attempts,
            retry_initial_backoff: task.retry_initial_backoff,
            retry_max_backoff: task.retry_max_backoff,
            retry_multiplier: task.retry_multiplier,
            enable_dlq: task.enable_dlq,
            topics: pingme_router::BusTopics {
                persistence_topic: task.persistence_topic.clone(),
                persistence_group: task.persistence_group.clone(),
                task_topic: task.task_topic.clone(),
                consumer_group: task.consumer_group.clone(),
                // The groups are named after their topics (the seed's
                // defaults: im-push-group, im-dlq-group), so clusters with
                // other topic names never share a group.
                push_group: format!("{}-group", self.kafka.push_topic),
                dlq_group: format!("{}-group", self.kafka.dlq_topic),
                push_topic: self.kafka.push_topic.clone(),
                dlq_topic: self.kafka.dlq_topic.clone(),
                downstream_topic_prefix: self.kafka.downstream_topic_prefix.clone(),
                persistence_partitions: self.kafka.partitions,
                task_partitions: self.kafka.partitions,
                push_partitions: self.kafka.push_partitions,
                downstream_partitions: self.kafka.downstream_partitions,
                ..pingme_router::BusTopics::default()
            },
            fetch_page_max_bytes: self.session.max_queued_bytes / PAGES_PER_OUTBOUND_BUDGET,
            answers_wait: self.kafka.shutdown_answers_wait,
            ..pingme_router::RouterConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        for bad in [
            "",
            "10",
            "ms",
            "1.5s",
            "-1s",
            "10 parsecs",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_router_gets_the_topic_names_and_groups() {
        let mut config = Config::default();
        config.task.persistence_topic = "p".into();
        config.task.persistence_group = "pg".into();
        config.task.task_topic = "t".into();
        config.task.consumer_group = "tg".into();
        config.kafka.push_topic = "push".into();
        config.kafka.dlq_topic = "dlq".into();
        config.kafka.downstream_topic_prefix = "down-".into();
        let topics = config.router().topics;
        assert_eq!(
            (
                topics.persistence_topic.as_str(),
                topics.persistence_group.as_str(),
                topics.task_topic.as_str(),
                topics.consumer_group.as_str(),
                topics.push_topic.as_str(),
                topics.dlq_topic.as_str(),
                topics.downstream_topic_prefix.as_str(),
            ),
            ("p", "pg", "t", "tg", "push", "dlq", "down-")
        );
        // The seed's names are the defaults on both sides.
        assert_eq!(
            Config::default().router().topics,
            pingme_router::BusTopics::default()
        );
    }
}
