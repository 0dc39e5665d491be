//! Operations: `/health` follows the readiness flag, `/version` reports the
//! build, `/metrics` shows counters moving and process memory, and the real
//! `pingme serve` binary starts, serves (the API and the embedded chat
//! page), keeps data across a restart and stops cleanly on SIGTERM; its
//! configuration refusals, the ops port's guards, and its HTTP listener
//! running out of file descriptors and recovering.

mod api_support;
mod binary;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_support::start;
use pingme_gateway::ops::{self, Readiness};
use pingme_testkit::free_port;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn health_follows_readiness_and_version_reports_the_build() {
    let api = start().await;
    let health = api.get("/health", None).await;
    assert_eq!((health.status, &health.body["status"]), (200, &json!("ok")));
    api.readiness.set(false);
    assert_eq!(api.get("/health", None).await.status, 503);

    let version = api.get("/version", None).await;
    assert_eq!(version.status, 200);
    assert_eq!(version.body["version"], env!("CARGO_PKG_VERSION"));
    let commit = version.body["git_commit"].as_str().unwrap();
    assert!(commit == "unknown" || commit.len() == 40, "{commit}");
    let built = version.body["build_time"].as_str().unwrap();
    assert!(built.len() == 20 && built.ends_with('Z'), "{built}");
}

/// The value of the first sample line starting with `series`, or 0.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_show_counters_moving_and_process_memory() {
    let api = start().await;
    let readiness = Readiness::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(ops::serve_ops(
        listener,
        ops::ops_router(readiness.clone()),
        Default::default(),
        shutdown.clone(),
    ));

    assert_eq!(
        api.client
            .get(format!("{ops_base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    readiness.set(true);
    assert_eq!(
        api.client
            .get(format!("{ops_base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let scrape = || async {
        api.client
            .get(format!("{ops_base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let registrations = r#"pingme_registrations_total{result="ok"}"#;
    let requests = r#"pingme_http_requests_total{route="/v1/auth/register",status="201"}"#;
    let logins = r#"pingme_logins_total{result="bad_credentials"}"#;
    let before = scrape().await;
    api.register("metered").await;
    api.post(
        "/v1/auth/login",
        None,
        json!({"username": "metered", "password": "wrong-password", "device_id": "d"}),
    )
    .await
    .assert_error(401, 10006);
    let after = scrape().await;
    assert_eq!(
        sample(&after, registrations),
        sample(&before, registrations) + 1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, requests),
        sample(&before, requests) + 1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, logins),
        sample(&before, logins) + 1.0,
        "{after}"
    );
    assert!(after.contains("# HELP pingme_registrations_total"));
    assert!(
        sample(&after, "pingme_process_resident_memory_bytes") > 1_000_000.0,
        "{after}"
    );
    shutdown.cancel();
}

struct Server {
    child: Child,
    api: String,
    ops: String,
}

impl Server {
    fn start(data_dir: &std::path::Path, config: &std::path::Path, api_port: u16) -> Server {
        let child = binary::pingme()
            .args(["serve", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .env("APP_PORT", api_port.to_string())
            .env("JWT_SECRET", "binary-test-secret-0123456789")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let text = std::fs::read_to_string(config).unwrap();
        let ops_port = text.trim().rsplit(':').next().unwrap().to_string();
        Server {
            child,
            api: format!("http://127.0.0.1:{api_port}"),
            ops: format!("http://127.0.0.1:{ops_port}"),
        }
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.api)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and returns the exit code and stderr.
    fn terminate(mut self) -> (Option<i32>, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let stderr = self.child.stderr.take().unwrap();
        let lines: Vec<String> = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect();
        let code = self.child.wait().unwrap().code();
        (code, lines.join("\n"))
    }
}

#[tokio::test]
async fn the_binary_serves_keeps_data_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("pingme.yaml");
    std::fs::write(
        &config,
        format!(
            "log_format: json\nlisteners:\n  metrics: 127.0.0.1:{}\n",
            free_port()
        ),
    )
    .unwrap();
    let client = reqwest::Client::new();

    let server = Server::start(&data, &config, free_port());
    server.wait_ready(&client).await;
    // The chat page is embedded: served at `/` with no files on disk.
    let page = client.get(format!("{}/", server.api)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.unwrap().contains("/app.js"));
    let ops_health = client
        .get(format!("{}/health", server.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(ops_health.status(), 200);
    let metrics = client
        .get(format!("{}/metrics", server.ops))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pingme_process_resident_memory_bytes"),
        "{metrics}"
    );
    let registered = client
        .post(format!("{}/v1/auth/register", server.api))
        .json(&json!({"username": "durable", "password": "password-durable"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let (code, stderr) = server.terminate();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    // JSON logs, one object per line.
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with('{') && l.contains("pingme ready")),
        "stderr: {stderr}"
    );

    // The store's directory and every file in it are the owner's alone.
    assert_private_tree(&data);

    // Same data directory: the account survived the restart.
    let server = Server::start(&data, &config, free_port());
    server.wait_ready(&client).await;
    let login = client
        .post(format!("{}/v1/auth/login", server.api))
        .json(&json!({"username": "durable", "password": "password-durable", "device_id": "d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let (code, stderr) = server.terminate();
    assert_eq!(code, Some(0), "stderr: {stderr}");
}

/// Asserts `dir` is 0700 and everything under it is closed to group and
/// others (directories 0700, files 0600).
fn assert_private_tree(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    let mut files = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                pending.push(path);
            } else if kind.is_file() {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
                files += 1;
            }
        }
    }
    assert!(
        files > 0,
        "the store wrote no files under {}",
        dir.display()
    );
}

#[test]
fn pingme_version_prints_the_build() {
    let out = binary::pingme().arg("version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("pingme {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}

#[tokio::test]
async fn production_without_a_secret_refuses_to_start() {
    let out = binary::pingme()
        .arg("serve")
        .env("APP_ENV", "production")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_secret"));
}

/// Production without a TLS certificate is a configuration error: exit 64
/// (EX_USAGE, like every invalid setting), before anything is created.
#[tokio::test]
async fn production_without_a_certificate_exits_64_before_creating_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-created");
    let out = binary::pingme()
        .args(["serve", "--data-dir"])
        .arg(&data)
        .env("APP_ENV", "production")
        .env("JWT_SECRET", "binary-test-secret-0123456789")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("listeners.tls_cert"), "stderr: {stderr}");
    assert!(
        !data.exists(),
        "the data dir was created before the refusal"
    );
}

/// One request to the ops port with a chosen `Host` (and optional admin
/// token and content type): status and error code (0 when none).
async fn ops_request(
    client: &reqwest::Client,
    server: &Server,
    method: reqwest::Method,
    path: &str,
    host: &str,
    token: Option<&str>,
    content_type: Option<&str>,
) -> (u16, u64) {
    let mut request = client
        .request(method, format!("{}{path}", server.ops))
        .header("host", host);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type).body("{}");
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (status, body["code"].as_u64().unwrap_or(0))
}

const ADMIN_TOKEN: &str = "ops-admin-token-0123456789";

/// The ops port answers only names of this machine, its admin routes only
/// with the admin token, and state-changing requests only as JSON.
#[tokio::test]
async fn the_ops_port_checks_host_admin_token_and_content_type() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pingme.yaml");
    let ops_port = free_port();
    std::fs::write(
        &config,
        format!(
            "ops:\n  admin_token: {ADMIN_TOKEN}\n  allowed_hosts: [ops.internal]\n\
             listeners:\n  metrics: 127.0.0.1:{ops_port}\n"
        ),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let server = Server::start(&dir.path().join("data"), &config, free_port());
    server.wait_ready(&client).await;
    let local = format!("127.0.0.1:{ops_port}");
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // Host: a foreign name is refused (DNS rebinding), ours are served.
    for foreign in ["evil.example", &format!("evil.example:{ops_port}")] {
        for path in ["/metrics", "/health", "/admin/dead-letters"] {
            let answer = ops_request(
                &client,
                &server,
                get.clone(),
                path,
                foreign,
                Some(ADMIN_TOKEN),
                None,
            )
            .await;
            assert_eq!(answer, (403, 10009), "{path} for Host {foreign}");
        }
    }
    for ours in [local.as_str(), "localhost", "ops.internal:9093"] {
        let (status, _) =
            ops_request(&client, &server, get.clone(), "/health", ours, None, None).await;
        assert_eq!(status, 200, "Host {ours}");
    }

    // The admin token.
    let list = "/admin/dead-letters";
    assert_eq!(
        ops_request(&client, &server, get.clone(), list, &local, None, None).await,
        (401, 10001)
    );
    assert_eq!(
        ops_request(
            &client,
            &server,
            get.clone(),
            list,
            &local,
            Some("a-wrong-admin-token-0000"),
            None
        )
        .await,
        (401, 10002)
    );
    assert_eq!(
        ops_request(
            &client,
            &server,
            get.clone(),
            list,
            &local,
            Some(ADMIN_TOKEN),
            None
        )
        .await,
        (200, 0)
    );

    // POST: JSON only, whatever the token.
    let replay = "/admin/dead-letters/1/replay";
    for not_json in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        assert_eq!(
            ops_request(
                &client,
                &server,
                post.clone(),
                replay,
                &local,
                Some(ADMIN_TOKEN),
                not_json
            )
            .await,
            (415, 20012),
            "{not_json:?}"
        );
    }
    // JSON with the token reaches the replay (there is no dead letter 1).
    let (status, code) = ops_request(
        &client,
        &server,
        post.clone(),
        replay,
        &local,
        Some(ADMIN_TOKEN),
        Some("application/json"),
    )
    .await;
    assert!(
        ![401, 403, 405, 415].contains(&status) && code != 0,
        "{status} {code}"
    );
    // JSON without the token still needs it.
    assert_eq!(
        ops_request(
            &client,
            &server,
            post.clone(),
            replay,
            &local,
            None,
            Some("application/json")
        )
        .await,
        (401, 10001)
    );
    // A wrong method gets the JSON error body.
    assert_eq!(
        ops_request(
            &client,
            &server,
            reqwest::Method::DELETE,
            "/health",
            &local,
            None,
            Some("application/json")
        )
        .await,
        (405, 20010)
    );
    let (code, stderr) = server.terminate();
    assert_eq!(code, Some(0), "stderr: {stderr}");
}

/// Without `ops.admin_token` the admin routes are disabled for everyone.
#[tokio::test]
async fn admin_routes_are_disabled_without_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pingme.yaml");
    std::fs::write(
        &config,
        format!("listeners:\n  metrics: 127.0.0.1:{}\n", free_port()),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let server = Server::start(&dir.path().join("data"), &config, free_port());
    server.wait_ready(&client).await;
    let host = server.ops.trim_start_matches("http://").to_string();
    for token in [None, Some(ADMIN_TOKEN), Some("")] {
        assert_eq!(
            ops_request(
                &client,
                &server,
                reqwest::Method::GET,
                "/admin/dead-letters",
                &host,
                token,
                None
            )
            .await,
            (403, 10009)
        );
    }
    let (code, stderr) = server.terminate();
    assert_eq!(code, Some(0), "stderr: {stderr}");
}

/// Polls `url` until it answers 200 (bounded: only a dead server takes a
/// minute).
async fn wait_healthy(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never answered 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Out of file descriptors (the child's RLIMIT_NOFILE lowered with
/// `prlimit`, then exhausted with idle connections): the HTTP accept loop
/// logs the failure, keeps going, and serves again once descriptors are
/// free, with a handful of log lines rather than one per failed accept.
#[tokio::test]
async fn the_http_listener_serves_again_after_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pingme.yaml");
    std::fs::write(
        &config,
        format!(
            "shards: 1\nlisteners:\n  metrics: 127.0.0.1:{}\n",
            free_port()
        ),
    )
    .unwrap();
    let api_port = free_port();
    let mut child = binary::without_config_env(Command::new("prlimit"))
        .arg("--nofile=128:128")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_pingme"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("APP_PORT", api_port.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs the server");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let health = format!("http://127.0.0.1:{api_port}/health");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    wait_healthy(&client, &health).await;

    // More idle connections than the server has descriptors left.
    let hogs: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap())
        .collect();
    let mut seen = Vec::new();
    let out_of_files = loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("accept failed") => break line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no accept failure logged; stderr:\n{}", seen.join("\n")),
        }
    };
    assert!(out_of_files.contains("os error 24"), "{out_of_files}");

    drop(hogs);
    wait_healthy(&client, &health).await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    reader.join().unwrap();
    let failures_logged = 1 + lines
        .try_iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        failures_logged <= 12,
        "{failures_logged} accept-failure lines: not rate-limited"
    );
}
