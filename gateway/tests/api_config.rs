//! Configuration: the example file is exactly the defaults, files and
//! environment overrides land in the right fields, and every invalid value
//! is refused with an error naming its field (the binary exits with 64).

mod binary;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use pingme_gateway::config::{AppEnv, Config, ConfigError, LogFormat, StorageBackend};

fn example_path() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/pingme.example.yaml"
    ))
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn fake_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

/// The error message of a YAML document (after validation).
fn error_of(yaml: &str) -> String {
    let err = Config::parse_yaml(yaml)
        .and_then(|c| c.validate().map(|_| c))
        .expect_err("must be refused");
    err.to_string()
}

#[test]
fn the_example_file_parses_to_exactly_the_defaults() {
    let config = Config::load_with_env(Some(example_path()), no_env).unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn the_example_file_lists_every_section() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let sections: Vec<&str> = doc
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        sections,
        [
            "app",
            "log_format",
            "log_level",
            "otlp_endpoint",
            "otlp_service_name",
            "listeners",
            "http",
            "ops",
            "shards",
            "session",
            "auth",
            "storage",
            "database",
            "redis",
            "kafka",
            "task",
            "push"
        ]
    );
    // Every field of a section is spelled out: removing any one of them
    // still parses (all optional), and the file names the seeds' settings.
    for name in [
        "task_topic",
        "persistence_topic",
        "consumer_group",
        "persistence_group",
        "large_group_threshold",
        "fanout_batch_size",
        "push_notification_enabled",
        "message_retry_attempts",
        "retry_max_attempts",
        "retry_initial_backoff",
        "retry_max_backoff",
        "retry_multiplier",
        "enable_dlq",
        "max_frame_size",
        "auth_timeout",
        "idle_timeout",
        "heartbeat_interval",
        "messages_per_second",
        "max_queued_bytes",
        "quic_retry_above",
        "max_quic_handshakes",
        "webhook_url",
        "data_dir",
    ] {
        assert!(
            text.contains(&format!("  {name}: ")),
            "{name} missing from the example"
        );
    }
}

/// Every field the schema knows appears in the example: for each section,
/// the parser's own list of accepted fields (from its unknown-field error)
/// equals the keys the example spells out.
#[test]
fn the_example_file_spells_out_every_field() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let keys = |value: &serde_yaml_ng::Value| -> Vec<String> {
        value
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    let accepted = |yaml: &str| -> Vec<String> {
        let message = Config::parse_yaml(yaml).unwrap_err().to_string();
        // "... unknown field `x`, expected `a` or `b`" / "expected one of `a`, `b`, ..."
        let list = message
            .split(", expected ")
            .nth(1)
            .unwrap_or_else(|| panic!("{message}"));
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(accepted("no_such_field: 1\n"), keys(&doc), "top level");
    for (section, value) in doc.as_mapping().unwrap() {
        if value.is_mapping() {
            let section = section.as_str().unwrap();
            assert_eq!(
                accepted(&format!("{section}:\n  no_such_field: 1\n")),
                keys(value),
                "section {section}"
            );
        }
    }
}

/// A fetch page is a quarter of the connection's outbound budget, and a
/// page of one maximum-size message fits that quarter at the smallest
/// accepted budget.
#[test]
fn fetch_pages_fit_the_outbound_budget() {
    let c = Config::default();
    let router = c.router();
    assert_eq!(router.fetch_page_max_bytes, c.session.max_queued_bytes / 4);
    let smallest = 4 * pingme_router::single_message_page_bytes(router.max_body_bytes);
    let config =
        Config::parse_yaml(&format!("session:\n  max_queued_bytes: {smallest}\n")).unwrap();
    config.validate().unwrap();
    assert!(
        config.router().fetch_page_max_bytes
            >= pingme_router::single_message_page_bytes(router.max_body_bytes)
    );
}

#[test]
fn the_seed_defaults_hold() {
    let c = Config::default();
    assert_eq!(c.task.retry_max_attempts, 3);
    assert_eq!(c.task.retry_initial_backoff, Duration::from_millis(100));
    assert_eq!(c.task.retry_max_backoff, Duration::from_secs(10));
    assert_eq!(c.task.retry_multiplier, 2.0);
    assert!(c.task.enable_dlq);
    assert_eq!(c.session.max_frame_size, 64 * 1024);
    assert_eq!(c.listeners.tcp.to_string(), "127.0.0.1:7000");
    assert_eq!(c.listeners.tls.to_string(), "127.0.0.1:7443");
    assert_eq!(c.listeners.quic.to_string(), "127.0.0.1:7443");
    assert_eq!(c.listeners.metrics.to_string(), "127.0.0.1:9093");
    assert_eq!(c.http_bind(), "127.0.0.1:8080");
    assert_eq!(c.storage.backend, StorageBackend::Embedded);
    assert_eq!(c.storage.data_dir, Path::new("./data"));
    assert!(c.push.webhook_url.is_empty());
    assert!(c.shard_count() >= 1);
}

#[test]
fn a_file_sets_fields_and_keeps_defaults_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pingme.yaml");
    std::fs::write(
        &path,
        "app:\n  port: 9999\n  env: production\nlog_format: json\nlisteners:\n  tls_cert: /etc/pingme/cert.pem\n  tls_key: /etc/pingme/key.pem\nauth:\n  jwt_secret: 0123456789abcdef0123\n  access_token_ttl: 5m\ntask:\n  retry_initial_backoff: 250ms\n  fanout_batch_size: 200\nshards: 3\n",
    )
    .unwrap();
    let c = Config::load_with_env(Some(&path), no_env).unwrap();
    assert_eq!(c.app.port, 9999);
    assert_eq!(c.app.env, AppEnv::Production);
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.auth.access_token_ttl, Duration::from_secs(300));
    assert_eq!(c.task.retry_initial_backoff, Duration::from_millis(250));
    assert_eq!(c.task.fanout_batch_size, 200);
    assert_eq!(c.shard_count(), 3);
    assert_eq!(c.app.host, "127.0.0.1", "untouched fields keep defaults");
    assert_eq!(c.session, Config::default().session);
}

#[test]
fn environment_overrides_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pingme.yaml");
    std::fs::write(
        &path,
        "app:\n  port: 9999\ndatabase:\n  name: fromfile\nlisteners:\n  tls_cert: c.pem\n  tls_key: k.pem\n",
    )
    .unwrap();
    // Parsed and overridden without validation: brokers without a store
    // every node shares would be refused (see
    // `a_cluster_node_needs_a_shared_directory_and_store`).
    let mut c = Config::parse_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(c.database.name, "fromfile");
    let env = fake_env(&[
        ("APP_HOST", "0.0.0.0"),
        ("APP_PORT", "8181"),
        ("APP_ENV", "production"),
        ("APP_GATEWAY_ID", "gw-7"),
        ("DB_HOST", "db.internal"),
        ("DB_PORT", "3307"),
        ("DB_USERNAME", "pingme"),
        ("DB_PASSWORD", "s3cret"),
        ("DB_NAME", "im"),
        ("REDIS_HOST", "redis.internal"),
        ("REDIS_PORT", "6380"),
        ("KAFKA_BROKERS", "k1:9092,k2:9092"),
        ("JWT_SECRET", "a-very-long-test-secret"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
    ]);
    c.apply_env(env).unwrap();
    assert_eq!(c.app.host, "0.0.0.0");
    assert_eq!(c.app.port, 8181);
    assert_eq!(c.http_bind(), "0.0.0.0:8181");
    assert_eq!(c.app.env, AppEnv::Production);
    assert_eq!(c.app.gateway_id, "gw-7");
    assert_eq!(c.router().gateway_id, "gw-7");
    assert_eq!(c.database.host, "db.internal");
    assert_eq!(c.database.port, 3307);
    assert_eq!(c.database.username, "pingme");
    assert_eq!(c.database.password, "s3cret");
    assert_eq!(c.database.name, "im");
    assert_eq!(c.redis.host, "redis.internal");
    assert_eq!(c.redis.port, 6380);
    assert!(
        c.redis.enabled,
        "a variable naming a Redis turns the directory on"
    );
    assert_eq!(
        c.redis_directory().unwrap().url,
        "redis://redis.internal:6380"
    );
    assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
    assert_eq!(c.auth.jwt_secret, "a-very-long-test-secret");
    assert_eq!(c.otlp_endpoint, "http://collector:4318");
}

/// The container image's file and the compose cluster's file (deploy/) are
/// ones the binary takes, with listeners where the Dockerfile, HAProxy and
/// Prometheus expect them.
#[test]
fn the_deployment_files_load() {
    let deploy = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"));
    for file in ["pingme.yaml", "pingme.cluster.yaml"] {
        let c = Config::load_with_env(Some(&deploy.join(file)), no_env)
            .unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
        assert_eq!(c.http_bind(), "0.0.0.0:8080", "{file}");
        let listeners = [
            c.listeners.tcp,
            c.listeners.tls,
            c.listeners.quic,
            c.listeners.metrics,
        ];
        assert_eq!(
            listeners.map(|a| a.to_string()),
            [
                "0.0.0.0:7000",
                "0.0.0.0:7443",
                "0.0.0.0:7443",
                "0.0.0.0:9093"
            ],
            "{file}"
        );
        assert_eq!(c.log_format, LogFormat::Json, "{file}");
    }
    let image = Config::load_with_env(Some(&deploy.join("pingme.yaml")), no_env).unwrap();
    assert_eq!(image.storage.backend, StorageBackend::Embedded);
    assert_eq!(image.storage.data_dir, Path::new("/var/lib/pingme"));
    let cluster = Config::load_with_env(Some(&deploy.join("pingme.cluster.yaml")), no_env).unwrap();
    assert_eq!(cluster.storage.backend, StorageBackend::Mysql);
    assert!(cluster.redis_directory().is_some(), "presence in Redis");
}

/// Brokers make a cluster node: it needs the Redis directory and a shared
/// store, and only then takes a role other than `all`; each refusal names
/// its field.
#[test]
fn a_cluster_node_needs_a_shared_directory_and_store() {
    let shared = "redis:\n  enabled: true\nstorage:\n  backend: mysql\n";
    for (yaml, field) in [
        ("kafka:\n  brokers: k1:9092\n", "kafka.brokers"),
        (
            "kafka:\n  brokers: k1:9092\nredis:\n  enabled: true\n",
            "storage.backend",
        ),
        ("app:\n  role: worker\n", "app.role"),
        ("app:\n  role: gateway\n", "app.role"),
        (
            &format!("{shared}kafka:\n  brokers: k1:9092,\n"),
            "kafka.brokers",
        ),
        (&format!("{shared}kafka:\n  brokers: k1\n"), "kafka.brokers"),
        (
            &format!("{shared}kafka:\n  brokers: k1:9092\n  partitions: 0\n"),
            "kafka.partitions",
        ),
        (
            &format!(
                "{shared}kafka:\n  brokers: k1:9092\n  session_timeout: 3s\n  heartbeat_interval: 2s\n"
            ),
            "kafka.heartbeat_interval",
        ),
    ] {
        let message = error_of(yaml);
        assert!(
            message.contains(field),
            "error for {yaml:?} must name {field}: {message}"
        );
    }
    let node = Config::parse_yaml(&format!(
        "{shared}app:\n  role: worker\nkafka:\n  brokers: k1:9092,k2:9092\n  partitions: 6\n  linger_ms: 0\n"
    ))
    .unwrap();
    node.validate().unwrap();
    let settings = node.kafka().expect("a cluster node");
    assert_eq!(settings.brokers, "k1:9092,k2:9092");
    assert_eq!(settings.linger_ms, 0);
    let router = node.router();
    assert_eq!(router.role, pingme_router::Role::Worker);
    assert_eq!(router.topics.persistence_partitions, 6);
    assert_eq!(router.topics.task_partitions, 6);
    assert!(
        Config::default().kafka().is_none(),
        "single node by default"
    );
    // From the environment as well.
    let err = Config::load_with_env(None, fake_env(&[("KAFKA_BROKERS", "k1:9092")])).unwrap_err();
    assert!(err.to_string().contains("kafka.brokers"), "{err}");
    let err = Config::load_with_env(None, fake_env(&[("APP_ROLE", "boss")])).unwrap_err();
    assert!(err.to_string().contains("app.role"), "{err}");
}

/// The `database` section (and `DB_*`) configures the MySQL store; with
/// another backend it would be ignored, so a changed value is refused
/// naming its field and the backend it belongs to.
#[test]
fn the_database_section_configures_the_mysql_backend_only() {
    for (yaml, field) in [
        ("database:\n  host: db.internal\n", "database.host"),
        ("database:\n  port: 3307\n", "database.port"),
        ("database:\n  username: pingme\n", "database.username"),
        ("database:\n  password: s3cret\n", "database.password"),
        ("database:\n  name: im\n", "database.name"),
        ("database:\n  pool_size: 4\n", "database.pool_size"),
        (
            "database:\n  connect_timeout: 1s\n",
            "database.connect_timeout",
        ),
    ] {
        let message = error_of(yaml);
        assert!(
            message.contains(field) && message.contains("storage.backend: mysql"),
            "error for {yaml:?} must name {field}: {message}"
        );
    }
    let err = Config::load_with_env(None, fake_env(&[("DB_HOST", "db.internal")])).unwrap_err();
    assert!(err.to_string().contains("database.host"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mysql.yaml");
    std::fs::write(&path, "storage:\n  backend: mysql\n").unwrap();
    let config = Config::load_with_env(
        Some(&path),
        fake_env(&[
            ("DB_HOST", "db.internal"),
            ("DB_PORT", "3307"),
            ("DB_USERNAME", "app"),
            ("DB_PASSWORD", "s3cret"),
            ("DB_NAME", "im"),
        ]),
    )
    .unwrap();
    let mysql = config.mysql();
    assert_eq!(
        (
            mysql.host.as_str(),
            mysql.port,
            mysql.username.as_str(),
            mysql.password.as_str(),
            mysql.database.as_str(),
        ),
        ("db.internal", 3307, "app", "s3cret", "im")
    );
    // The stated defaults are the store's own.
    let defaults = pingme_storage::mysql::MysqlConfig::default();
    assert_eq!(
        (mysql.pool_size, mysql.connect_timeout),
        (defaults.pool_size, defaults.connect_timeout)
    );
    assert_eq!(
        (mysql.pool_size, mysql.connect_timeout),
        (16, Duration::from_secs(5))
    );

    let config = Config::parse_yaml(
        "storage:\n  backend: mysql\ndatabase:\n  pool_size: 64\n  connect_timeout: 2s\n",
    )
    .unwrap();
    config.validate().unwrap();
    assert_eq!(
        (config.mysql().pool_size, config.mysql().connect_timeout),
        (64, Duration::from_secs(2))
    );
}

/// `SCYLLA_URI` lists the ScyllaDB nodes (comma-separated), as the
/// conformance tests take it.
#[test]
fn scylla_uri_names_the_nodes() {
    let mut config = Config::parse_yaml("storage:\n  backend: scylla\n").unwrap();
    config
        .apply_env(fake_env(&[("SCYLLA_URI", "10.0.0.1:9042, 10.0.0.2:9042")]))
        .unwrap();
    config.validate().unwrap();
    let scylla = config.scylla();
    assert_eq!(scylla.nodes, ["10.0.0.1:9042", "10.0.0.2:9042"]);
    assert_eq!(scylla.keyspace, "pingme");
}

/// `redis.enabled` selects the Redis directory; a Redis address without it
/// would be ignored, so it is refused; the lease and timeout are bounded.
#[test]
fn the_redis_section_selects_the_directory() {
    assert_eq!(
        Config::default().redis_directory(),
        None,
        "single node by default"
    );
    let config = Config::parse_yaml(
        "redis:\n  enabled: true\n  host: ::1\n  port: 6380\n  key_prefix: \"im:\"\n  lease: 45s\n  timeout: 1s\n",
    )
    .unwrap();
    config.validate().unwrap();
    let settings = config.redis_directory().unwrap();
    assert_eq!(settings.url, "redis://[::1]:6380");
    assert_eq!(settings.key_prefix, "im:");
    assert_eq!(settings.lease, Duration::from_secs(45));
    assert_eq!(settings.timeout, Duration::from_secs(1));
    for (yaml, field, reason) in [
        (
            "redis:\n  host: redis.internal\n",
            "redis.host",
            "redis.enabled is false",
        ),
        (
            "redis:\n  port: 6380\n",
            "redis.host",
            "redis.enabled is false",
        ),
        (
            "redis:\n  enabled: true\n  lease: 1s\n",
            "redis.lease",
            "between 3s and 1h",
        ),
        (
            "redis:\n  enabled: true\n  timeout: 20s\n",
            "redis.timeout",
            "a third of redis.lease",
        ),
        (
            "redis:\n  key_prefix: \"\"\n",
            "redis.key_prefix",
            "non-empty",
        ),
    ] {
        let message = error_of(yaml);
        assert!(
            message.contains(field) && message.contains(reason),
            "error for {yaml:?} must name {field}: {message}"
        );
    }
    let from_env = Config::load_with_env(None, fake_env(&[("REDIS_PORT", "6380")])).unwrap();
    assert_eq!(
        from_env.redis_directory().unwrap().url,
        "redis://127.0.0.1:6380"
    );
}

/// The YAML defaults are the components' own defaults: a gateway or router
/// built with `Default` (tests, examples, embedders) behaves like `pingme
/// serve` with an empty config.
#[test]
fn the_yaml_defaults_are_the_components_defaults() {
    let config = Config::default();
    let limits = pingme_gateway::SessionLimits::default();
    assert_eq!(config.session.auth_timeout, limits.auth_timeout);
    assert_eq!(config.session.max_queued_bytes, limits.max_queued_bytes);
    assert_eq!(config.session.max_frame_size, limits.max_frame_size);
    assert_eq!(config.session.idle_timeout, limits.idle_timeout);
    assert_eq!(config.session.heartbeat_interval, limits.heartbeat_interval);
    assert_eq!(
        config.session.messages_per_second,
        limits.messages_per_second
    );
    assert_eq!(
        (
            config.session.quic_retry_above,
            config.session.max_quic_handshakes
        ),
        (
            limits.quic_handshakes_before_retry,
            limits.max_quic_handshakes
        )
    );
    let router = pingme_router::RouterConfig::default();
    assert_eq!(config.task.fanout_batch_size, router.fanout_batch_size);
    assert_eq!(
        config.task.large_group_threshold,
        router.large_group_threshold
    );
    assert_eq!(
        config.task.message_retry_attempts,
        router.message_retry_attempts
    );
    assert_eq!(
        config.task.retry_initial_backoff,
        router.retry_initial_backoff
    );
    assert_eq!(config.task.retry_max_backoff, router.retry_max_backoff);
    assert_eq!(config.task.retry_multiplier, router.retry_multiplier);
    assert_eq!(config.task.enable_dlq, router.enable_dlq);
    // And what the binary hands the components equals their defaults.
    let gateway = config.gateway().limits;
    assert_eq!(
        (gateway.auth_timeout, gateway.max_queued_bytes),
        (limits.auth_timeout, limits.max_queued_bytes)
    );
    assert_eq!(config.router().fanout_batch_size, router.fanout_batch_size);
    // The values the seeds and the example file name.
    assert_eq!(limits.auth_timeout, Duration::from_secs(10));
    assert_eq!(limits.max_queued_bytes, 1024 * 1024);
    assert_eq!(router.fanout_batch_size, 1000);
}

/// Tests that touch the real process environment (setting it, or spawning
/// processes that copy it) hold this lock, so none sees another's variables.
static ENV_LOCK: Mutex<()> = Mutex::new(());

#[test]
#[allow(unsafe_code)]
fn the_process_environment_is_read() {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: every test of this binary that reads or writes the process
    // environment holds ENV_LOCK; the others use a fake lookup.
    // Only this test's variable: the shell that runs the tests may have
    // others set (CI exports KAFKA_BROKERS), put back afterwards.
    let inherited: Vec<_> = binary::CONFIG_ENV
        .iter()
        .filter_map(|var| std::env::var_os(var).map(|value| (*var, value)))
        .collect();
    for (var, _) in &inherited {
        unsafe { std::env::remove_var(var) };
    }
    unsafe { std::env::set_var("APP_PORT", "8282") };
    let result = Config::load(None);
    unsafe { std::env::remove_var("APP_PORT") };
    for (var, value) in &inherited {
        unsafe { std::env::set_var(var, value) };
    }
    assert_eq!(result.unwrap().app.port, 8282);
}

#[test]
fn bad_env_values_name_the_variable_and_the_field() {
    let err = Config::load_with_env(None, fake_env(&[("APP_PORT", "eighty")])).unwrap_err();
    assert!(matches!(
        err,
        ConfigError::Env {
            var: "APP_PORT",
            field: "app.port",
            ..
        }
    ));
    assert!(err.to_string().contains("app.port") && err.to_string().contains("APP_PORT"));
    let err = Config::load_with_env(None, fake_env(&[("APP_ENV", "staging")])).unwrap_err();
    assert!(err.to_string().contains("app.env"), "{err}");
    let err = Config::load_with_env(None, fake_env(&[("REDIS_PORT", "70000")])).unwrap_err();
    assert!(err.to_string().contains("redis.port"), "{err}");
}

#[test]
fn production_without_a_secret_is_refused() {
    let err = Config::load_with_env(None, fake_env(&[("APP_ENV", "production")])).unwrap_err();
    assert!(err.to_string().contains("auth.jwt_secret"), "{err}");
    let with_secret = || {
        fake_env(&[
            ("APP_ENV", "production"),
            ("JWT_SECRET", "0123456789abcdef"),
        ])
    };
    // A secret alone is not enough: production needs a real certificate.
    let err = Config::load_with_env(None, with_secret()).unwrap_err();
    assert!(err.to_string().contains("listeners.tls_cert"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pingme.yaml");
    std::fs::write(&path, "listeners:\n  tls_cert: c.pem\n").unwrap();
    let err = Config::load_with_env(Some(&path), no_env).unwrap_err();
    assert!(err.to_string().contains("listeners.tls_key"), "{err}");
    std::fs::write(&path, "listeners:\n  tls_cert: c.pem\n  tls_key: k.pem\n").unwrap();
    Config::load_with_env(Some(&path), with_secret()).unwrap();
    // Development needs neither.
    Config::load_with_env(None, no_env).unwrap();
}

#[test]
fn invalid_values_name_their_field() {
    let cases = [
        ("app:\n  prot: 1\n", "prot"),
        ("nonsense: 1\n", "nonsense"),
        ("app:\n  port: high\n", "app.port"),
        ("session:\n  max_frame_size: 10\n", "session.max_frame_size"),
        ("session:\n  auth_timeout: 10\n", "session.auth_timeout"),
        ("session:\n  idle_timeout: 5s\n", "session.idle_timeout"),
        // Too small for four pages of one maximum-size message.
        (
            "session:\n  max_queued_bytes: 200000\n",
            "session.max_queued_bytes",
        ),
        (
            "session:\n  messages_per_second: 0\n",
            "session.messages_per_second",
        ),
        (
            "session:\n  max_quic_handshakes: 0\n",
            "session.max_quic_handshakes",
        ),
        ("auth:\n  jwt_secret: short\n", "auth.jwt_secret"),
        ("auth:\n  refresh_token_ttl: 1m\n", "auth.refresh_token_ttl"),
        (
            "auth:\n  max_registrations_per_ip: 0\n",
            "auth.max_registrations_per_ip",
        ),
        (
            "auth:\n  password_hash_queue_timeout: 0s\n",
            "auth.password_hash_queue_timeout",
        ),
        (
            "auth:\n  registration_window: 0s\n",
            "auth.registration_window",
        ),
        (
            "auth:\n  password_hash_concurrency: 5000\n",
            "auth.password_hash_concurrency",
        ),
        ("task:\n  retry_multiplier: 0.5\n", "task.retry_multiplier"),
        (
            "task:\n  retry_max_backoff: 10ms\n",
            "task.retry_max_backoff",
        ),
        ("task:\n  fanout_batch_size: 0\n", "task.fanout_batch_size"),
        (
            "task:\n  retry_initial_backoff: soon\n",
            "task.retry_initial_backoff",
        ),
        ("storage:\n  backend: postgres\n", "storage.backend"),
        ("storage:\n  backend: scylla\n", "storage.scylla_nodes"),
        (
            "storage:\n  backend: scylla\n  scylla_nodes: [db:9042]\n  scylla_keyspace: Bad-Name\n",
            "storage.scylla_keyspace",
        ),
        (
            "storage:\n  backend: scylla\n  scylla_nodes: [db:9042]\n  scylla_replication_factor: 0\n",
            "storage.scylla_replication_factor",
        ),
        (
            "storage:\n  startup_timeout: 2h\n",
            "storage.startup_timeout",
        ),
        (
            "storage:\n  group_commit_interval: 1s\n",
            "storage.group_commit_interval",
        ),
        (
            "storage:\n  backend: mysql\ndatabase:\n  name: \"im; DROP DATABASE x\"\n",
            "database.name",
        ),
        (
            "storage:\n  backend: mysql\ndatabase:\n  pool_size: 1\n",
            "database.pool_size",
        ),
        (
            "storage:\n  backend: mysql\ndatabase:\n  connect_timeout: 0s\n",
            "database.connect_timeout",
        ),
        (
            "storage:\n  backend: mysql\ndatabase:\n  connect_timeout: five\n",
            "database.connect_timeout",
        ),
        (
            "storage:\n  backend: mysql\ndatabase:\n  host: \"\"\n",
            "database.host",
        ),
        (
            "storage:\n  backend: mysql\ndatabase:\n  username: \"\"\n",
            "database.username",
        ),
        (
            "storage:\n  backend: mysql\ndatabase:\n  port: 0\n",
            "database.port",
        ),
        ("listeners:\n  tcp: not-an-address\n", "listeners.tcp"),
        ("log_format: xml\n", "log_format"),
        ("push:\n  webhook_url: ftp://x\n", "push.webhook_url"),
        ("shards: 5000\n", "shards"),
        ("otlp_endpoint: 127.0.0.1:4318\n", "otlp_endpoint"),
        ("otlp_endpoint: grpc://collector:4317\n", "otlp_endpoint"),
        ("otlp_endpoint: \"http://\"\n", "otlp_endpoint"),
        ("otlp_service_name: \"\"\n", "otlp_service_name"),
    ];
    for (yaml, field) in cases {
        let message = error_of(yaml);
        assert!(
            message.contains(field),
            "error for {yaml:?} must name {field}: {message}"
        );
    }
}

#[test]
fn the_binary_exits_64_naming_the_bad_field() {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "session:\n  max_frame_size: 12\n").unwrap();
    let out = binary::pingme()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("session.max_frame_size"),
        "stderr: {stderr}"
    );

    // A bad environment override is refused the same way.
    let out = binary::pingme()
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("APP_PORT", "not-a-port")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("app.port") && stderr.contains("APP_PORT"),
        "stderr: {stderr}"
    );

    // A cluster node without the shared directory is refused, and so is
    // a cluster role without brokers (from the command line).
    let out = binary::pingme()
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("KAFKA_BROKERS", "kafka.internal:9092")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kafka.brokers") && stderr.contains("redis.enabled"),
        "stderr: {stderr}"
    );
    let out = binary::pingme()
        .args(["serve", "--role", "worker", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("app.role"), "stderr: {stderr}");

    // APP_CONF names the file when --config is absent.
    let out = binary::pingme()
        .arg("serve")
        .env("APP_CONF", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// The QUIC handshake limits reach the gateway's shards: an operator under
/// a forged-source flood can make every new client prove its address.
#[test]
fn the_quic_handshake_limits_reach_the_gateway() {
    let config =
        Config::parse_yaml("session:\n  quic_retry_above: 0\n  max_quic_handshakes: 100\n")
            .unwrap();
    let limits = config.gateway().limits;
    assert_eq!(
        (
            limits.quic_handshakes_before_retry,
            limits.max_quic_handshakes
        ),
        (0, 100)
    );
}
