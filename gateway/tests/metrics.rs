//! The connection side's metrics, read back through a Prometheus recorder
//! (its own test binary: the recorder is process-global).

mod common;

use common::{Harness, Kind, limits};

#[tokio::test]
async fn sessions_frames_and_disconnect_reasons_are_counted() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("first recorder");

    let harness = Harness::start(limits(), 1).await;
    let mut client = harness.connect(Kind::Tcp).await;
    client.login(1, "d").await;
    client.ping().await;
    let text = handle.render();
    assert!(
        text.contains(r#"pingme_gateway_connections{transport="tcp",shard="0"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"pingme_gateway_frames_in_total{transport="tcp"} 1"#),
        "{text}"
    );

    drop(client);
    harness
        .dispatch
        .wait_for("the disconnect", |seen| seen.disconnected.len() == 1)
        .await;
    let text = handle.render();
    assert!(
        text.contains(r#"pingme_gateway_connections{transport="tcp",shard="0"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"pingme_gateway_disconnects_total{transport="tcp",reason="peer_closed"} 1"#
        ),
        "{text}"
    );
    // AuthOk and Pong went out.
    assert!(
        text.contains(r#"pingme_gateway_frames_out_total{transport="tcp"} 2"#),
        "{text}"
    );
}
