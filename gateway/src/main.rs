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
    /// Operator tools for accounts, straight against the configured store.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Prints version, git commit and build time.
    Version,
    /// Lists every metric the server exports on its ops port: name, kind
    /// (counter, gauge, histogram) and help, one a line.
    Metrics,
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Creates accounts in bulk from a file of already-hashed passwords
    /// (JSON lines `{"username": ..., "password_hash": "$argon2id$..."}`),
    /// checked whole before anything is stored, then stored in batches.
    /// With --tokens, each account also gets DEVICE and an access token
    /// (the configured secret and auth.access_token_ttl), written as
    /// `user_id token` lines to an owner-only file.
    Import {
        /// YAML configuration file (the store and auth sections count).
        #[arg(long, env = "APP_CONF")]
        config: Option<PathBuf>,
        /// The accounts (`-` for standard input).
        file: PathBuf,
        /// Write one access token per account here (needs --device).
        #[arg(long, requires = "device")]
        tokens: Option<PathBuf>,
        /// The device each account gets, for --tokens.
        #[arg(long, requires = "tokens")]
        device: Option<String>,
        /// Accounts per store call (one transaction on MySQL).
        #[arg(long, default_value_t = pingme_gateway::provision::DEFAULT_BATCH)]
        batch: usize,
    },
    /// Hashes the password on standard input (one line) at the configured
    /// cost and prints its PHC string, for import files.
    HashPassword {
        /// YAML configuration file (auth.password_hash_* count).
        #[arg(long, env = "APP_CONF")]
        config: Option<PathBuf>,
    },
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
        Command::Users { command } => users(command),
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
            let (mut config, runtime) = match start(config.as_deref(), role) {
                Ok(started) => started,
                Err(code) => return code,
            };
            if let Some(dir) = data_dir {
                config.storage.data_dir = dir;
            }
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

/// What `serve` and the `users` tools share before they run: the config
/// loaded and checked, new files private, the TLS provider (the store's
/// client may speak TLS too, database.tls), and the runtime.
fn start(
    config_path: Option<&std::path::Path>,
    role: Option<NodeRole>,
) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = Config::load_with_role(config_path, role).map_err(|e| {
        eprintln!("pingme: invalid configuration: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })?;
    pingme_gateway::serve::restrict_new_file_modes();
    if let Err(e) = rustls::crypto::ring::default_provider().install_default() {
        eprintln!("pingme: a TLS crypto provider was already installed: {e:?}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("pingme: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })?;
    Ok((config, runtime))
}

/// `pingme users ...`: loads the config, then runs the tool on a runtime.
fn users(command: UsersCommand) -> ExitCode {
    let config_path = match &command {
        UsersCommand::Import { config, .. } | UsersCommand::HashPassword { config } => {
            config.clone()
        }
    };
    let (config, runtime) = match start(config_path.as_deref(), None) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async move {
        match command {
            UsersCommand::Import {
                file,
                tokens,
                device,
                batch,
                ..
            } => import_users(&config, &file, tokens.as_deref(), device.as_deref(), batch).await,
            UsersCommand::HashPassword { .. } => hash_password(&config).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pingme: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn import_users(
    config: &Config,
    file: &std::path::Path,
    tokens: Option<&std::path::Path>,
    device: Option<&str>,
    batch: usize,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use pingme_gateway::provision;

    let started = std::time::Instant::now();
    let accounts = if file == std::path::Path::new("-") {
        provision::read_accounts(std::io::stdin().lock())?
    } else {
        let opened =
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        provision::read_accounts(std::io::BufReader::new(opened))?
    };
    let count = accounts.len();
    eprintln!(
        "{count} accounts read and checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let opened = pingme_gateway::serve::open_stores(config, &shutdown).await?;
    let users = opened.stores.users.clone();
    let stored = std::time::Instant::now();
    let result = match (tokens, device) {
        (Some(path), Some(device)) => {
            let auth = provision::authenticator(&config.auth, users.clone())?;
            let mut out = std::io::BufWriter::new(provision::create_tokens_file(path)?);
            provision::import(
                users,
                accounts,
                batch,
                Some(provision::TokenOutput {
                    device,
                    auth: &auth,
                    out: &mut out,
                }),
            )
            .await
        }
        _ => provision::import(users, accounts, batch, None).await,
    };
    opened.close().await;
    let summary = result?;
    eprintln!(
        "imported {} accounts ({} tokens) in {:.1} s: {:.0} accounts/s",
        summary.imported,
        summary.tokens,
        stored.elapsed().as_secs_f64(),
        provision::rate(summary.imported, stored)
    );
    Ok(())
}

async fn hash_password(config: &Config) -> anyhow::Result<()> {
    use pingme_gateway::auth::password::{self, HashLimits, PasswordHasher};

    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    let len = password.chars().count();
    if !(password::MIN_PASSWORD_LEN..=password::MAX_PASSWORD_LEN).contains(&len) {
        anyhow::bail!(
            "the password must be {} to {} characters",
            password::MIN_PASSWORD_LEN,
            password::MAX_PASSWORD_LEN
        );
    }
    let hasher = PasswordHasher::new(
        config.auth.password_hash_memory_kib,
        config.auth.password_hash_iterations,
        HashLimits::new(1, std::time::Duration::from_secs(60)),
    )?;
    println!("{}", hasher.hash(password).await?);
    Ok(())
}
