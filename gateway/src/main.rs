//! The `pingme` binary: parses the command line, loads the configuration
//! (exit code 64 when it is invalid, or when the store refuses it) and
//! hands over to [`pingme_gateway::serve::run`] (exit code 69 when the
//! store stays unreachable for `storage.startup_timeout`, or the Kafka
//! brokers for `kafka.startup_timeout`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pingme_gateway::config::{Config, EXIT_CONFIG, NodeRole};
use pingme_gateway::serve::{BrokersUnreachable, EXIT_STORE_UNREACHABLE, StoreStartError};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// pingme: an instant-messaging backend.
#[derive(Parser)]
#[command(name = "pingme", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server (single node with the embedded store unless configured otherwise).
    Serve {
        /// YAML configuration file; without one, the defaults (plus environment overrides).
        #[arg(long, env = "APP_CONF")]
        config: Option<PathBuf>,
        /// Directory of the embedded store (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// What this cluster node runs: all, gateway or worker (overrides
        /// app.role; needs kafka.brokers unless all).
        #[arg(long, value_parser = ["all", "gateway", "worker"])]
        role: Option<String>,
    },
    /// Prints version, git commit and build time.
    Version,
    /// Lists every metric the server exports on its ops port: name, kind
    /// (counter, gauge, histogram) and help, one a line.
    Metrics,
}

fn main() -> ExitCode {
    pingme_gateway::allocator::tune();
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            let v = pingme_gateway::ops::version_info();
            println!(
                "pingme {} (commit {}, built {})",
                v.version, v.git_commit, v.build_time
            );
            ExitCode::SUCCESS
        }
        Command::Metrics => {
            for metric in pingme_gateway::exported_metrics::list() {
                println!("{} {} {}", metric.name, metric.kind.as_str(), metric.help);
            }
            ExitCode::SUCCESS
        }
        Command::Serve {
            config,
            data_dir,
            role,
        } => {
            let role = role.as_deref().and_then(NodeRole::parse);
            let mut config = match Config::load_with_role(config.as_deref(), role) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("pingme: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            };
            if let Some(dir) = data_dir {
                config.storage.data_dir = dir;
            }
            pingme_gateway::serve::restrict_new_file_modes();
            if let Err(e) = rustls::crypto::ring::default_provider().install_default() {
                eprintln!("pingme: a TLS crypto provider was already installed: {e:?}");
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("pingme: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(pingme_gateway::serve::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pingme: {e:#}");
                    if e.downcast_ref::<BrokersUnreachable>().is_some() {
                        return ExitCode::from(EXIT_STORE_UNREACHABLE as u8);
                    }
                    match e.downcast_ref::<StoreStartError>() {
                        Some(StoreStartError::Refused { .. }) => ExitCode::from(EXIT_CONFIG as u8),
                        Some(StoreStartError::Unreachable { .. }) => {
                            ExitCode::from(EXIT_STORE_UNREACHABLE as u8)
                        }
                        _ => ExitCode::FAILURE,
                    }
                }
            }
        }
    }
}
