//! OpenTelemetry export: a real `pingme serve` with `otlp_endpoint` set
//! exports its spans over OTLP/HTTP (protobuf) to a fake collector run by
//! the test, and the spans of a message's path carry that message's
//! `msg_id`; a malformed endpoint is refused at start-up naming the field.

mod e2e;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use e2e::{Conn, Server};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

/// Every span the fake collector received, decoded.
type Received = Arc<Mutex<Vec<Span>>>;

/// Starts a fake OTLP/HTTP collector on a free port: `POST /v1/traces`
/// with a protobuf `ExportTraceServiceRequest`, answered with an empty
/// (all accepted) protobuf response. `POST /push` is a push webhook that
/// accepts everything.
async fn collector() -> (String, Received) {
    async fn traces(State(received): State<Received>, body: Bytes) -> axum::http::StatusCode {
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return axum::http::StatusCode::BAD_REQUEST;
        };
        let mut received = received.lock().unwrap();
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                received.extend(scope.spans);
            }
        }
        axum::http::StatusCode::OK
    }
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .route("/push", post(|| async { axum::http::StatusCode::OK }))
        .route(
            "/push-down",
            post(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (endpoint, received)
}

/// The string value of attribute `key` of `span`.
fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_message_path_are_exported_with_its_msg_id() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(
        &dir.path().join("data"),
        &format!(
            "otlp_endpoint: {endpoint}\notlp_service_name: pingme-otlp-test\n\
             push:\n  webhook_url: {endpoint}/push\n"
        ),
    )
    .await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;
    let (carol, _) = http.user("carol", "phone").await;
    let conversation = format!("dm:{}:{}", alice.min(bob), alice.max(bob));

    let ack = a.send(&conversation, "m1", "traced").await.unwrap();
    assert!(!ack.msg_id.is_empty());
    let delivered = b.deliver().await;
    assert_eq!(delivered.msg_id, ack.msg_id);
    // Carol is offline: her message goes the push way too.
    let to_carol = format!("dm:{}:{}", alice.min(carol), alice.max(carol));
    let pushed = a.send(&to_carol, "m2", "pushed").await.unwrap();

    // SIGTERM: the one shutdown path flushes the queued spans before exit
    // (the batch interval is longer than this test waits).
    assert!(server.terminate().success());

    let spans = received.lock().unwrap().clone();
    let stages_of = |msg_id: &str| -> Vec<&str> {
        spans
            .iter()
            .filter(|span| attribute(span, "msg_id") == Some(msg_id))
            .map(|span| span.name.as_str())
            .collect()
    };
    for (msg_id, stages) in [
        (&ack.msg_id, &["append", "deliver"][..]),
        (&pushed.msg_id, &["append", "deliver", "push"][..]),
    ] {
        let seen = stages_of(msg_id);
        for stage in stages {
            assert!(
                seen.contains(stage),
                "no {stage:?} span with msg_id {msg_id} among {} spans received; with it: {seen:?}",
                spans.len()
            );
        }
    }
    let append = spans
        .iter()
        .find(|s| s.name == "append" && attribute(s, "msg_id") == Some(ack.msg_id.as_str()))
        .unwrap();
    assert_eq!(
        attribute(append, "conversation"),
        Some(conversation.as_str())
    );
    // Only the two messages sent are named, and bob (online) got no push.
    assert!(
        spans
            .iter()
            .filter_map(|span| attribute(span, "msg_id"))
            .all(|id| id == ack.msg_id || id == pushed.msg_id),
        "spans name msg_ids other than the ones sent"
    );
    assert!(!stages_of(&ack.msg_id).contains(&"push"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_pages_and_dead_letters_carry_the_msg_id() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    // Every group is large (fanout path), and the push provider is down,
    // so the offline member's push exhausts its retries quickly.
    let mut server = Server::start_with(
        &dir.path().join("data"),
        &format!(
            "otlp_endpoint: {endpoint}\n\
             task:\n  large_group_threshold: 1\n  message_retry_attempts: 2\n  retry_max_attempts: 2\n  \
             retry_initial_backoff: 10ms\n  retry_max_backoff: 20ms\n  enable_dlq: true\n\
             push:\n  webhook_url: {endpoint}/push-down\n\
             ops:\n  admin_token: otlp-test-admin-token\n"
        ),
    )
    .await;
    let http = server.http();
    let (_, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let (carol, _) = http.user("carol", "phone").await;
    let group = http.group(&alice_token, "traced", &[bob, carol]).await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;

    let ack = a.send(&group, "g1", "to the group").await.unwrap();
    assert_eq!(b.deliver().await.msg_id, ack.msg_id);
    // Carol's push fails twice and becomes a dead letter.
    let admin = format!("http://{}/admin/dead-letters", server.metrics);
    let mut letters = serde_json::Value::Null;
    for _ in 0..200 {
        letters = reqwest::Client::new()
            .get(&admin)
            .bearer_auth("otlp-test-admin-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if letters.to_string().contains("push") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(letters.to_string().contains("push"), "{letters}");
    assert!(server.terminate().success());

    let spans = received.lock().unwrap().clone();
    let named: Vec<&str> = spans
        .iter()
        .filter(|span| attribute(span, "msg_id") == Some(ack.msg_id.as_str()))
        .map(|span| span.name.as_str())
        .collect();
    for stage in ["append", "deliver", "fanout_page", "push", "dead_letter"] {
        assert!(
            named.contains(&stage),
            "no {stage:?} span with msg_id {} among {} spans; with it: {named:?}",
            ack.msg_id,
            spans.len()
        );
    }
    let page = spans
        .iter()
        .find(|s| s.name == "fanout_page" && attribute(s, "msg_id") == Some(ack.msg_id.as_str()))
        .unwrap();
    assert_eq!(attribute(page, "conversation"), Some(group.as_str()));
}

#[test]
fn a_malformed_otlp_endpoint_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "otlp_endpoint: collector:4318\n").unwrap();
    let out = e2e::binary::pingme()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("otlp_endpoint"), "stderr: {stderr}");
}
