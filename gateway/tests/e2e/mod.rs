//! End-to-end harness: starts a real `pingme serve` process on free ports
//! with its own data directory (or its own MySQL database), and drives it
//! over real sockets with a
//! minimal client written directly on the protocol codec (deliberately not
//! the SDK, so these tests judge the server alone).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
#[path = "../binary/mod.rs"]
pub mod binary;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use pingme_protocol::v1::{
    self, ContentType, FetchMessages, Hello, SendAck, SyncRequest, client_frame, server_frame,
};
use pingme_protocol::{ClientCodec, ClientFrame, ErrorCode, ServerFrame};
use pingme_storage::mysql::MysqlConfig;
use pingme_testkit::free_port;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// How long any single wait may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// The id of the direct conversation of users `a` and `b`.
pub fn dm(a: u64, b: u64) -> String {
    format!("dm:{}:{}", a.min(b), a.max(b))
}

/// A running `pingme serve` child process.
pub struct Server {
    child: Child,
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: SocketAddr,
    pub metrics: SocketAddr,
    config_path: PathBuf,
}

impl Server {
    /// Starts a server keeping its data in `data_dir`, and waits until
    /// `/health` says it is ready.
    pub async fn start(data_dir: &Path) -> Server {
        Server::start_with(data_dir, "").await
    }

    /// [`Server::start`] with `extra` (whole top-level YAML lines, e.g.
    /// `otlp_endpoint: ...\n`) appended to the test configuration.
    pub async fn start_with(data_dir: &Path, extra: &str) -> Server {
        Server::start_configured(
            data_dir,
            &Sections {
                extra,
                ..Sections::default()
            },
        )
        .await
    }

    /// [`Server::start_with`] with `http_lines` (indented lines, e.g.
    /// `  body_read_timeout: 600s\n`) added to the `http` section.
    pub async fn start_with_http(data_dir: &Path, http_lines: &str, extra: &str) -> Server {
        Server::start_configured(
            data_dir,
            &Sections {
                http: http_lines,
                extra,
                ..Sections::default()
            },
        )
        .await
    }

    /// A cluster node: `role` (`all`, `gateway` or `worker`) on the MySQL
    /// backend, with `cluster` (top-level lines: the `redis`, `kafka` and
    /// `task` sections) added. Ready when its ops port's `/health` says so
    /// (a worker has no HTTP API). The node's id is `data_dir`'s name.
    pub async fn start_node(
        data_dir: &Path,
        role: &str,
        mysql: &MysqlConfig,
        cluster: &str,
    ) -> Server {
        let extra = database_yaml(mysql) + cluster;
        // Every node has an id of its own: the name of its folder.
        let id = data_dir.file_name().unwrap().to_string_lossy();
        Server::start_configured(
            data_dir,
            &Sections {
                app: &format!("  role: {role}\n  gateway_id: {id}\n"),
                storage: "  backend: mysql\n",
                extra: &extra,
                ..Sections::default()
            },
        )
        .await
    }

    /// A server on the MySQL backend (`storage.backend: mysql`, the
    /// `database` section naming `mysql`'s server and database); `data_dir`
    /// only holds its configuration file.
    pub async fn start_on_mysql(data_dir: &Path, mysql: &MysqlConfig) -> Server {
        Server::start_configured(
            data_dir,
            &Sections {
                storage: "  backend: mysql\n",
                extra: &database_yaml(mysql),
                ..Sections::default()
            },
        )
        .await
    }

    /// The test configuration with `sections` added.
    async fn start_configured(data_dir: &Path, sections: &Sections<'_>) -> Server {
        // Free ports are picked by binding port 0 and letting go, which can
        // race with a parallel test; a server that could not bind exits, and
        // is started again on other ports.
        for _ in 0..3 {
            let (http, tcp, tls, metrics) = (free_port(), free_port(), free_port(), free_port());
            let config_path = data_dir.with_extension("yaml");
            let yaml = config_yaml(data_dir, sections, http, tcp, tls, metrics);
            std::fs::write(&config_path, yaml).unwrap();
            let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
            let mut server = Server {
                child: spawn(&config_path),
                data_dir: data_dir.to_path_buf(),
                http: addr(http),
                tcp: addr(tcp),
                tls: addr(tls),
                metrics: addr(metrics),
                config_path,
            };
            if server.wait_ready().await {
                return server;
            }
        }
        panic!("pingme serve did not start in three tries");
    }

    /// Starts the same server again (same ports, same data) after a kill.
    pub async fn restart(&mut self) {
        self.child = spawn(&self.config_path);
        assert!(
            self.wait_ready().await,
            "pingme serve exited early after a restart"
        );
    }

    /// True once `/health` (on the ops port, which every role serves)
    /// answers 200 while our child still runs; false if the child exited
    /// first (a port was taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://{}/health", self.metrics);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                eprintln!("pingme serve exited during start-up with {status}");
                return false;
            }
            if let Ok(response) = reqwest::get(&url).await
                && response.status().is_success()
            {
                // Still ours: a child that lost a port race exits at once.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return self.child.try_wait().unwrap().is_none();
            }
            assert!(
                Instant::now() < deadline,
                "pingme serve not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown path runs, whatever was not durable is lost.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_term();
        self.child.wait().unwrap()
    }

    /// Sends SIGTERM without waiting: the shutdown begins.
    pub fn signal_term(&self) {
        self.signal("-TERM");
    }

    /// SIGSTOP: the process is frozen (it answers nothing) until
    /// [`Server::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        // kill(1) rather than libc::kill: the workspace denies unsafe code.
        let sent = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// What the server's ops port serves at `/metrics` now.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn http(&self) -> Http {
        Http {
            base: format!("http://{}", self.http),
            client: reqwest::Client::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pingme serve` with none of the configuration environment inherited.
pub fn serve_command() -> Command {
    let mut command = binary::pingme();
    command.arg("serve");
    command
}

fn spawn(config: &Path) -> Child {
    serve_command()
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("PINGME_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn pingme serve")
}

/// The server's configuration for one test: every listener on its own port,
/// a fixed JWT secret, limits generous enough for bursts, and cheap password
/// hashing (the large-group test registers ten thousand users, all from
/// 127.0.0.1, so the per-address limits are lifted).
fn config_yaml(
    data_dir: &Path,
    sections: &Sections<'_>,
    http: u16,
    tcp: u16,
    tls: u16,
    metrics: u16,
) -> String {
    let Sections {
        app,
        http: http_lines,
        storage,
        extra,
    } = sections;
    format!(
        "app:\n  host: 127.0.0.1\n  port: {http}\n  env: development\n{app}\
         listeners:\n  tcp: 127.0.0.1:{tcp}\n  tls: 127.0.0.1:{tls}\n  quic: 127.0.0.1:{tls}\n  metrics: 127.0.0.1:{metrics}\n\
         shards: 2\n\
         session:\n  messages_per_second: 100000\n\
         auth:\n  jwt_secret: e2e-secret-e2e-secret-e2e-secret\n  password_hash_memory_kib: 64\n  password_hash_iterations: 1\n  max_registrations_per_ip: 1000000\n  max_login_failures_per_ip: 1000000\n\
         http:\n  max_connections: 100000\n  max_connections_per_ip: 100000\n{http_lines}\
         storage:\n  data_dir: {}\n{storage}{extra}",
        data_dir.display()
    )
}

/// What a test adds to the configuration: indented lines of the `app`,
/// `http` and `storage` sections, and whole top-level lines (`extra`).
#[derive(Debug, Default)]
pub struct Sections<'a> {
    pub app: &'a str,
    pub http: &'a str,
    pub storage: &'a str,
    pub extra: &'a str,
}

/// The `database` section naming `mysql` (strings as JSON, which YAML reads).
pub fn database_yaml(mysql: &MysqlConfig) -> String {
    format!(
        "database:\n  host: {}\n  port: {}\n  username: {}\n  password: {}\n  name: {}\n  pool_size: 4\n",
        json!(mysql.host),
        mysql.port,
        json!(mysql.username),
        json!(mysql.password),
        json!(mysql.database),
    )
}

/// The HTTP API.
pub struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Registers `username` and logs `device` in; returns (user id, access token).
    pub async fn user(&self, username: &str, device: &str) -> (u64, String) {
        let (status, body) = self
            .post(
                "/v1/auth/register",
                None,
                json!({"username": username, "password": "correct horse battery"}),
            )
            .await;
        assert!(
            status == 201 || status == 409,
            "register {username}: {status} {body}"
        );
        self.login(username, device).await
    }

    pub async fn login(&self, username: &str, device: &str) -> (u64, String) {
        let (status, body) = self
            .post(
                "/v1/auth/login",
                None,
                json!({"username": username, "password": "correct horse battery", "device_id": device}),
            )
            .await;
        assert_eq!(status, 200, "login {username}: {body}");
        (
            body["user_id"].as_u64().unwrap(),
            body["token"].as_str().unwrap().to_string(),
        )
    }

    /// Creates a group; returns its conversation id (`g:{id}`).
    pub async fn group(&self, token: &str, name: &str, members: &[u64]) -> String {
        let (status, body) = self
            .post(
                "/v1/groups",
                Some(token),
                json!({"name": name, "members": members}),
            )
            .await;
        assert!(
            status == 200 || status == 201,
            "create group: {status} {body}"
        );
        format!("g:{}", body["group_id"].as_u64().unwrap())
    }
}

/// One device's connection, speaking the protocol by hand.
pub struct Conn {
    framed: Framed<TcpStream, ClientCodec>,
    next_request: u64,
    /// Server pushes that arrived while waiting for a reply.
    pub events: VecDeque<ServerFrame>,
    /// How long a reply or a delivery may take ([`WAIT`] unless changed).
    pub wait: Duration,
}

impl Conn {
    /// Connects, says hello and authenticates.
    pub async fn connect(addr: SocketAddr, token: &str) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut conn = Conn {
            framed: Framed::new(stream, ClientCodec::default()),
            next_request: 1,
            events: VecDeque::new(),
            wait: WAIT,
        };
        let hello = conn
            .request(client_frame::Body::Hello(Hello {
                max_version: 1,
                min_version: 1,
                client_name: "e2e".into(),
            }))
            .await;
        assert!(
            matches!(hello.body, Some(server_frame::Body::HelloAck(_))),
            "{hello:?}"
        );
        let auth = conn
            .request(client_frame::Body::Authenticate(v1::Authenticate {
                token: token.into(),
            }))
            .await;
        assert!(
            matches!(auth.body, Some(server_frame::Body::AuthOk(_))),
            "{auth:?}"
        );
        conn
    }

    /// Sends a request and returns the frame answering it.
    pub async fn request(&mut self, body: client_frame::Body) -> ServerFrame {
        self.try_request(body)
            .await
            .expect("connection closed while waiting for a reply")
    }

    /// Like [`Conn::request`], but `None` when the connection breaks (the
    /// server was killed) instead of failing the test.
    pub async fn try_request(&mut self, body: client_frame::Body) -> Option<ServerFrame> {
        let request_id = self.next_request;
        self.next_request += 1;
        self.framed
            .send(ClientFrame {
                request_id,
                body: Some(body),
            })
            .await
            .ok()?;
        loop {
            let frame = match tokio::time::timeout(self.wait, self.framed.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(_) => return None,
                Err(_) => panic!("no reply within {:?}", self.wait),
            };
            if frame.request_id == request_id {
                return Some(frame);
            }
            self.events.push_back(frame);
        }
    }

    /// Writes a frame without waiting for an answer.
    pub async fn push(&mut self, body: client_frame::Body) {
        self.framed
            .send(ClientFrame {
                request_id: 0,
                body: Some(body),
            })
            .await
            .unwrap();
    }

    /// Sends a text message without waiting for its answer; returns the
    /// request id the answer will carry.
    pub async fn send_unanswered(
        &mut self,
        conversation: &str,
        client_msg_id: &str,
        text: &str,
    ) -> u64 {
        let request_id = self.next_request;
        self.next_request += 1;
        self.framed
            .send(ClientFrame {
                request_id,
                body: Some(client_frame::Body::Send(v1::SendMessage {
                    client_msg_id: client_msg_id.into(),
                    conversation_id: conversation.into(),
                    content_type: ContentType::Text as i32,
                    body: Bytes::copy_from_slice(text.as_bytes()),
                })),
            })
            .await
            .unwrap();
        request_id
    }

    /// Sends a text message; returns the ack or the error code.
    pub async fn send(
        &mut self,
        conversation: &str,
        client_msg_id: &str,
        text: &str,
    ) -> Result<SendAck, ErrorCode> {
        self.try_send(conversation, client_msg_id, text)
            .await
            .expect("connection closed while waiting for an ack")
    }

    /// Like [`Conn::send`], but `None` when the connection breaks.
    pub async fn try_send(
        &mut self,
        conversation: &str,
        client_msg_id: &str,
        text: &str,
    ) -> Option<Result<SendAck, ErrorCode>> {
        let reply = self
            .try_request(client_frame::Body::Send(v1::SendMessage {
                client_msg_id: client_msg_id.into(),
                conversation_id: conversation.into(),
                content_type: ContentType::Text as i32,
                body: Bytes::copy_from_slice(text.as_bytes()),
            }))
            .await?;
        Some(match reply.body {
            Some(server_frame::Body::SendAck(ack)) => Ok(ack),
            Some(server_frame::Body::Error(error)) => {
                Err(ErrorCode::from_code(error.code).expect("known code"))
            }
            other => panic!("unexpected reply to send: {other:?}"),
        })
    }

    /// The next server push (queued or from the socket), or `None` if the
    /// connection stays quiet for `quiet`.
    pub async fn event(&mut self, quiet: Duration) -> Option<ServerFrame> {
        if let Some(frame) = self.events.pop_front() {
            return Some(frame);
        }
        match tokio::time::timeout(quiet, self.framed.next()).await {
            Ok(Some(frame)) => Some(frame.unwrap()),
            _ => None,
        }
    }

    /// The next delivered message, skipping other pushes.
    pub async fn deliver(&mut self) -> v1::Message {
        let deadline = Instant::now() + self.wait;
        loop {
            if let Some(frame) = self.events.pop_front() {
                if let Some(server_frame::Body::Deliver(d)) = frame.body {
                    return d.message.unwrap();
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.framed.next()).await {
                Ok(Some(Ok(ServerFrame {
                    body: Some(server_frame::Body::Deliver(d)),
                    ..
                }))) => return d.message.unwrap(),
                Ok(Some(Ok(ServerFrame {
                    body: Some(server_frame::Body::Error(e)),
                    ..
                }))) if e.fatal => {
                    panic!("connection closed by the server: {e:?}")
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => panic!("connection failed while waiting for a delivery: {e}"),
                Ok(None) => panic!("connection closed while waiting for a delivery"),
                Err(_) => panic!("no delivery within {:?}", self.wait),
            }
        }
    }

    /// The whole stored timeline of `conversation`, by fetch pages from seq
    /// 0 (not by sync: what was delivered before still counts).
    pub async fn history(&mut self, conversation: &str) -> Vec<v1::Message> {
        let mut messages = Vec::new();
        let mut after = 0;
        loop {
            let reply = self
                .request(client_frame::Body::Fetch(FetchMessages {
                    conversation_id: conversation.into(),
                    after_seq: after,
                    until_seq: 0,
                    limit: 0,
                }))
                .await;
            let Some(server_frame::Body::Page(page)) = reply.body else {
                panic!("fetch {conversation}: {reply:?}")
            };
            after = page.messages.last().map_or(after, |m| m.seq);
            messages.extend(page.messages);
            if !page.has_more {
                return messages;
            }
        }
    }

    /// Everything this device has not acknowledged yet, by sync and fetch
    /// pages; acknowledges what it got.
    pub async fn sync(&mut self) -> Vec<v1::Message> {
        let mut messages = Vec::new();
        let mut after_conversation = String::new();
        loop {
            let reply = self
                .request(client_frame::Body::Sync(SyncRequest {
                    after_conversation_id: after_conversation.clone(),
                    limit: 0,
                }))
                .await;
            let Some(server_frame::Body::Sync(sync)) = reply.body else {
                panic!("sync: {reply:?}")
            };
            for state in &sync.conversations {
                let mut after = state.delivered_seq;
                loop {
                    let reply = self
                        .request(client_frame::Body::Fetch(FetchMessages {
                            conversation_id: state.conversation_id.clone(),
                            after_seq: after,
                            until_seq: 0,
                            limit: 0,
                        }))
                        .await;
                    let Some(server_frame::Body::Page(page)) = reply.body else {
                        panic!("fetch: {reply:?}")
                    };
                    if let Some(last) = page.messages.last() {
                        after = last.seq;
                    }
                    messages.extend(page.messages);
                    if !page.has_more {
                        break;
                    }
                }
                self.push(client_frame::Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id: state.conversation_id.clone(),
                    seq: after,
                }))
                .await;
            }
            if !sync.has_more {
                return messages;
            }
            after_conversation = sync.next_after_conversation_id;
        }
    }
}
