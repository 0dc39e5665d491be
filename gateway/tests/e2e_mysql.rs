//! `pingme serve` on the MySQL backend (`storage.backend: mysql`), end to
//! end over real sockets: register, chat in a direct conversation and a
//! group, SIGKILL the server, start it again, and the accounts and the whole
//! history are still there with their seqs; a second server on the same
//! database serves the same history. Each test gets a database of its own
//! (`pingme_t_<random>`, dropped at the end) on the server `MYSQL_URL`
//! names; without the variable these tests skip outside CI and fail under
//! `CI=true`. The start-up failures (a refused login, an unreachable
//! server) are checked too; the unreachable one needs no server.

mod e2e;

use std::net::TcpListener;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e::{Conn, Server, database_yaml, dm};
use pingme_storage::mysql::{MysqlConfig, TestDatabase, server_from_env};

/// The whole timeline of `conversation` as (seq, sender, body).
async fn history(conn: &mut Conn, conversation: &str) -> Vec<(u64, u64, String)> {
    conn.history(conversation)
        .await
        .into_iter()
        .map(|m| {
            (
                m.seq,
                m.sender_id,
                String::from_utf8_lossy(&m.body).into_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_history_survives_a_restart_on_mysql() {
    let Some(server) = server_from_env("the MySQL end-to-end tests") else {
        return;
    };
    let database = TestDatabase::new(server);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_on_mysql(&dir.path().join("a"), &database.config).await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "laptop").await;
    let (carol, _) = http.user("carol", "tablet").await;
    let group = http.group(&alice_token, "team", &[bob, carol]).await;
    let direct = dm(alice, bob);

    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;
    for (i, text) in ["hi bob", "lunch?"].iter().enumerate() {
        let ack = a.send(&direct, &format!("dm-{i}"), text).await.unwrap();
        assert_eq!(ack.seq, i as u64 + 1);
        assert_eq!(b.deliver().await.body, text.as_bytes());
    }
    let ack = b.send(&direct, "dm-reply", "yes").await.unwrap();
    assert_eq!(ack.seq, 3);
    for i in 1..=3u64 {
        let ack = a
            .send(&group, &format!("g-{i}"), &format!("team {i}"))
            .await
            .unwrap();
        assert_eq!(ack.seq, i);
    }
    // A retry of an acknowledged send is answered with the first seq.
    assert_eq!(a.send(&group, "g-2", "team 2").await.unwrap().seq, 2);
    let direct_before = history(&mut a, &direct).await;
    let group_before = history(&mut a, &group).await;
    assert_eq!(
        direct_before,
        [
            (1, alice, "hi bob".to_string()),
            (2, alice, "lunch?".to_string()),
            (3, bob, "yes".to_string()),
        ]
    );
    assert_eq!(group_before.len(), 3);
    drop((a, b));

    // No shutdown path at all: what was acknowledged is in MySQL.
    server.kill();
    server.restart().await;
    let http = server.http();
    // Accounts survived: the same passwords log in, the ids are the same.
    let (alice_again, alice_token) = http.login("alice", "phone").await;
    let (bob_again, bob_token) = http.login("bob", "laptop").await;
    assert_eq!((alice_again, bob_again), (alice, bob));
    let mut b = Conn::connect(server.tcp, &bob_token).await;
    assert_eq!(history(&mut b, &direct).await, direct_before);
    assert_eq!(history(&mut b, &group).await, group_before);
    // Seqs go on from where they were; idempotency keys were kept.
    assert_eq!(
        b.send(&group, "after-restart", "back").await.unwrap().seq,
        4
    );
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    assert_eq!(a.send(&group, "g-1", "team 1").await.unwrap().seq, 1);

    // A second server with nothing of its own (another folder) on the same
    // database: the history is the database's, not a local copy.
    let other = Server::start_on_mysql(&dir.path().join("b"), &database.config).await;
    let (_, carol_token) = other.http().login("carol", "tablet").await;
    let mut c = Conn::connect(other.tcp, &carol_token).await;
    let group_now = history(&mut c, &group).await;
    assert_eq!(group_now[..3], group_before[..]);
    assert_eq!(group_now[3], (4, bob, "back".to_string()));
}

/// Runs `pingme serve` with `yaml` until it exits (it must, within a
/// minute) and returns the status and what it wrote to stderr.
fn serve_until_exit(dir: &Path, yaml: &str) -> (ExitStatus, String) {
    let path = dir.join("pingme.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = e2e::serve_command()
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pingme serve did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Every listener on a port of its own choosing: should the store be
/// reached after all, the server would start rather than collide.
const ANY_PORTS: &str = "app:\n  port: 0\n\
    listeners:\n  tcp: 127.0.0.1:0\n  tls: 127.0.0.1:0\n  quic: 127.0.0.1:0\n  metrics: 127.0.0.1:0\n";

#[test]
fn an_unreachable_database_exits_69_after_the_startup_timeout() {
    // A port nobody listens on: bound, then let go.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mysql = MysqlConfig {
        port,
        ..MysqlConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{ANY_PORTS}storage:\n  backend: mysql\n  startup_timeout: 1s\n{}",
        database_yaml(&mysql)
    );
    let (status, stderr) = serve_until_exit(dir.path(), &yaml);
    assert_eq!(status.code(), Some(69), "stderr: {stderr}");
    assert!(
        stderr.contains("mysql store was unreachable")
            && stderr.contains("storage.startup_timeout")
            && stderr.contains(&format!("127.0.0.1:{port}")),
        "stderr: {stderr}"
    );
    // Each failed attempt was logged before the last.
    assert!(stderr.contains("retrying"), "stderr: {stderr}");
}

#[test]
fn a_refused_login_exits_64_at_once_naming_the_settings() {
    let Some(server) = server_from_env("the MySQL end-to-end tests") else {
        return;
    };
    let database = TestDatabase::new(server);
    let mysql = MysqlConfig {
        password: "not-the-password".into(),
        ..database.config.clone()
    };
    let dir = tempfile::tempdir().unwrap();
    // A long window: the exit must come from the refusal, not the timeout.
    let yaml = format!(
        "{ANY_PORTS}storage:\n  backend: mysql\n  startup_timeout: 1h\n{}",
        database_yaml(&mysql)
    );
    let (status, stderr) = serve_until_exit(dir.path(), &yaml);
    assert_eq!(status.code(), Some(64), "stderr: {stderr}");
    assert!(
        stderr.contains("refused") && stderr.contains("database.password"),
        "stderr: {stderr}"
    );
}
