//! A MySQL database of one test's own, for every test that needs a real
//! server (this crate's conformance tests, the gateway's end-to-end tests):
//! where the server is (`MYSQL_URL`), what happens without it (skip outside
//! CI, fail under `CI=true`), and a database named
//! `pingme_t_<random>` that is dropped when the guard goes, also when the
//! test panics. Compiled with the cargo feature `conformance`.

use sqlx::{ConnectOptions, Executor};

use super::{MysqlConfig, MysqlStore};

/// The server `MYSQL_URL` names (`mysql://user[:password]@host[:port]`),
/// or `None` outside CI without it (after a note naming the variable and
/// `what` would have run). Under `CI=true` a missing variable panics: CI
/// must never pass without having run the MySQL tests.
pub fn server_from_env(what: &str) -> Option<MysqlConfig> {
    match std::env::var("MYSQL_URL") {
        Ok(url) => Some(MysqlConfig::from_url(&url).expect("MYSQL_URL")),
        Err(_) if std::env::var("CI").is_ok_and(|ci| ci == "true" || ci == "1") => {
            panic!("CI is set but MYSQL_URL is not: {what} must run in CI")
        }
        Err(_) => {
            eprintln!(
                "skipped: set MYSQL_URL=mysql://pingme:pingme@127.0.0.1:3306 (see .ci/services.sh) to run {what}"
            );
            None
        }
    }
}

/// A database of one test's own on `server`; the user needs the right to
/// create and drop `pingme_t_*` databases (`.ci/services.sh` grants its
/// `pingme` user `pingme_%`).
pub struct TestDatabase {
    /// The server, with this test's database.
    pub config: MysqlConfig,
}

impl TestDatabase {
    /// A fresh name on `server` (created by the first store that connects).
    pub fn new(server: MysqlConfig) -> TestDatabase {
        let name = format!(
            "pingme_t_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        TestDatabase {
            config: MysqlConfig {
                database: name,
                pool_size: 8,
                ..server
            },
        }
    }

    /// A store on this database; panics naming `MYSQL_URL` when the
    /// server cannot be used.
    pub async fn store(&self) -> MysqlStore {
        MysqlStore::connect(&self.config)
            .await
            .unwrap_or_else(|e| panic!("MySQL at {:?} (MYSQL_URL): {e}", self.config))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside async: a thread with its own small runtime.
        let config = self.config.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            runtime.block_on(async {
                let mut conn = config.options().connect().await?;
                conn.execute(format!("DROP DATABASE IF EXISTS `{}`", config.database).as_str())
                    .await?;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.config.database);
        }
    }
}
