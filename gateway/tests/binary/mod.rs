//! The `pingme` binary as the tests start it: with none of the configuration
//! environment of the shell that runs the tests (CI exports `KAFKA_BROKERS`
//! for the Kafka tests, a developer may have `DB_*` or `REDIS_HOST` set), so
//! a spawned server reads only what its test gives it.

use std::process::Command;

/// Environment variables `pingme serve` reads its configuration from.
pub const CONFIG_ENV: &[&str] = &[
    "APP_CONF",
    "APP_HOST",
    "APP_PORT",
    "APP_ENV",
    "APP_GATEWAY_ID",
    "DB_HOST",
    "DB_PORT",
    "DB_USERNAME",
    "DB_PASSWORD",
    "DB_NAME",
    "SCYLLA_URI",
    "REDIS_HOST",
    "REDIS_PORT",
    "KAFKA_BROKERS",
    "JWT_SECRET",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "PINGME_ADMIN_TOKEN",
];

/// The `pingme` binary, none of [`CONFIG_ENV`] inherited.
pub fn pingme() -> Command {
    without_config_env(Command::new(env!("CARGO_BIN_EXE_pingme")))
}

/// `command` (e.g. a wrapper such as `prlimit` that runs `pingme`) with none
/// of [`CONFIG_ENV`] inherited.
// Each test crate that includes this module uses what it needs.
#[allow(dead_code)]
pub fn without_config_env(mut command: Command) -> Command {
    for var in CONFIG_ENV {
        command.env_remove(var);
    }
    command
}
