//! The ops port's `/metrics` of a real `pingme serve` after real traffic,
//! held to `pingme metrics`: every series the server exports belongs to a
//! listed metric of the same kind (the deployment checks trust that list for
//! the dashboard and the alert rules), latencies are real histograms, and
//! readiness is a series.

mod e2e;

use std::collections::BTreeMap;
use std::process::Command;

use e2e::{Conn, Server};

/// `pingme metrics`: name -> kind.
fn listed_metrics() -> BTreeMap<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_pingme"))
        .arg("metrics")
        .output()
        .expect("run pingme metrics");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert!(words.next().is_some(), "no help text: {line}");
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// The `# TYPE` lines of a Prometheus text exposition: family -> kind.
fn exported_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_series_is_a_listed_metric() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let http = server.http();
    let (alice, alice_token) = http.user("alice", "phone").await;
    let (bob, bob_token) = http.user("bob", "phone").await;
    let mut a = Conn::connect(server.tcp, &alice_token).await;
    let mut b = Conn::connect(server.tcp, &bob_token).await;
    let conversation = format!("dm:{}:{}", alice.min(bob), alice.max(bob));
    a.send(&conversation, "m1", "hello").await.unwrap();
    // The same client_msg_id again: answered from the idempotency record.
    a.send(&conversation, "m1", "hello").await.unwrap();
    b.deliver().await;
    drop(b);

    let scrape = server.metrics_text().await;
    let exported = exported_families(&scrape);
    let listed = listed_metrics();

    for (name, kind) in &exported {
        assert_eq!(
            listed.get(name),
            Some(kind),
            "/metrics exports {name} ({kind}), `pingme metrics` lists {:?}",
            listed.get(name)
        );
    }
    // What this traffic touched, so the loop above had work to do: the
    // API, the connections, the router and the process.
    for name in [
        "pingme_http_requests_total",
        "pingme_gateway_connections",
        "pingme_router_messages_accepted_total",
        "pingme_router_messages_duplicates_total",
        "pingme_router_messages_delivered_total",
        "pingme_router_store_append_seconds",
        "pingme_process_resident_memory_bytes",
        "pingme_ready",
    ] {
        assert!(
            exported.contains_key(name),
            "{name} not exported:\n{scrape}"
        );
    }
    // Latencies are histograms with buckets (percentiles across nodes), and
    // the router's metrics carry their help text.
    assert_eq!(exported["pingme_router_store_append_seconds"], "histogram");
    assert!(
        scrape.contains("pingme_router_store_append_seconds_bucket{le=\"0.001\"}"),
        "{scrape}"
    );
    assert!(
        scrape.contains("# HELP pingme_router_messages_accepted_total "),
        "{scrape}"
    );
    assert!(scrape.contains("\npingme_ready 1\n"), "{scrape}");
    // Both sends (the stored one and the duplicate) were timed from their
    // acceptance to their worker and to their ack.
    for histogram in [
        "pingme_router_send_wait_seconds",
        "pingme_router_send_ack_seconds",
    ] {
        assert_eq!(exported[histogram], "histogram");
        assert!(
            scrape.contains(&format!("\n{histogram}_count 2\n")),
            "{histogram}:\n{scrape}"
        );
    }
}
