//! `pingme serve` with the Redis directory (`redis.enabled`): `/health` is
//! not ready, naming Redis, while Redis does not answer (a closed port),
//! and the server keeps serving; with a reachable Redis (`REDIS_URL`, e.g.
//! `redis://127.0.0.1:6379`) it is ready and holds this gateway's lease
//! there. Without `REDIS_URL` the second test skips with a note, except
//! under `CI=true`, where it fails.

use std::time::{Duration, Instant};

use pingme_gateway::config::Config;
use pingme_gateway::serve;
use pingme_testkit::free_port;
use tokio_util::sync::CancellationToken;

/// A one-shard server on free ports with the Redis directory at
/// `host:port` under `key_prefix`; its API base URL and its stop token.
fn start(
    data: &std::path::Path,
    host: &str,
    port: u16,
    key_prefix: &str,
) -> (String, CancellationToken) {
    let mut config = Config::default();
    let api_port = free_port();
    config.app.port = api_port;
    config.shards = 1;
    config.storage.data_dir = data.to_path_buf();
    for listener in [
        &mut config.listeners.tcp,
        &mut config.listeners.tls,
        &mut config.listeners.quic,
        &mut config.listeners.metrics,
    ] {
        *listener = "127.0.0.1:0".parse().unwrap();
    }
    config.redis.enabled = true;
    config.redis.host = host.to_string();
    config.redis.port = port;
    config.redis.key_prefix = key_prefix.to_string();
    config.redis.timeout = Duration::from_millis(500);
    config.validate().unwrap();
    let stop = CancellationToken::new();
    let server = serve::run_until(config, stop.clone());
    tokio::spawn(async move {
        if let Err(error) = server.await {
            panic!("the server failed: {error:#}");
        }
    });
    (format!("http://127.0.0.1:{api_port}"), stop)
}

/// Polls `path` until `wanted` holds for its status and JSON body.
async fn wait_for(
    client: &reqwest::Client,
    url: &str,
    wanted: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Ok(response) = client.get(url).send().await {
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            if wanted(status, &body) {
                return (status, body);
            }
            last = Some((status, body));
        }
        assert!(
            Instant::now() < deadline,
            "{url} never as wanted; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_unreachable_health_is_not_ready_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let (api, stop) = start(
        dir.path(),
        "127.0.0.1",
        free_port(),
        "pingme-test-redis:down:",
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // Up (the API answers) ...
    wait_for(&client, &format!("{api}/version"), |status, _| {
        status == 200
    })
    .await;
    // ... but not ready, and saying why. The check runs again and again
    // (with back-off); the answer stays the same.
    for _ in 0..3 {
        let (status, body) = wait_for(&client, &format!("{api}/health"), |_, _| true).await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            serde_json::json!({"status": "unavailable", "unavailable": ["redis"]})
        );
    }
    // Accounts do not need Redis: the server serves.
    let registered = client
        .post(format!("{api}/v1/auth/register"))
        .json(&serde_json::json!({"username": "redisless", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success(), "{registered:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_reachable_health_is_ready_and_the_gateway_holds_a_lease() {
    let url = match std::env::var("REDIS_URL") {
        Ok(url) => url,
        Err(_) if std::env::var("CI").is_ok_and(|ci| ci == "true" || ci == "1") => {
            panic!("CI is set but REDIS_URL is not: the Redis directory tests must run in CI")
        }
        Err(_) => {
            eprintln!("skipped: set REDIS_URL=redis://127.0.0.1:6379 to run the Redis health test");
            return;
        }
    };
    let info = redis::Client::open(url.as_str()).expect("REDIS_URL");
    let (host, port) = match info.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
        other => panic!("REDIS_URL must name a TCP server, not {other:?}"),
    };
    let prefix = format!(
        "pingme-test-redis:{}:",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let dir = tempfile::tempdir().unwrap();
    let (api, stop) = start(dir.path(), &host, port, &prefix);
    let client = reqwest::Client::new();
    let (_, body) = wait_for(&client, &format!("{api}/health"), |status, _| status == 200).await;
    assert_eq!(body, serde_json::json!({"status": "ok"}));
    // The router renews this gateway's lease from the start.
    let mut redis = info.get_connection().unwrap();
    let lease_key = format!("{prefix}gw:gw-1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(&lease_key)
            .query(&mut redis)
            .unwrap();
        if fields.iter().any(|f| f == "next") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lease for gw-1 under {lease_key}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _: () = redis::cmd("DEL").arg(&lease_key).query(&mut redis).unwrap();
}
