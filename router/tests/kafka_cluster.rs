//! Two routers (`gw-a`, `gw-b`) over Kafka (`KafkaBus`, the broker in
//! `KAFKA_BROKERS`: Tansu in CI), sharing one store and a
//! [`SharedDirectory`] of who is connected where: users on different gateways chat 1:1, every record
//! between the stages crossing the broker (the persistence topic, the
//! other gateway's downstream topic for the delivery, the sender's own
//! for its ack). Topics and groups carry a suffix unique to the run.
#![cfg(feature = "kafka")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pingme_router::port::{Dispatch, Outbox, SessionInfo};
use pingme_router::{BusTopics, KafkaBus, ManualClock, Router, RouterConfig, SharedDirectory};
use pingme_storage::{Stores, UserStore};

fn config(suffix: &str) -> RouterConfig {
    let name = |base: &str| format!("{base}-{suffix}");
    RouterConfig {
        workers: 1,
        fanout_workers: 1,
        push_workers: 1,
        topics: BusTopics {
            persistence_topic: name("im-persistence"),
            persistence_group: name("im-persistence-group"),
            persistence_partitions: 2,
            task_topic: name("im-task"),
            consumer_group: name("im-task-group"),
            task_partitions: 1,
            push_topic: name("im-push"),
            push_group: name("im-push-group"),
            push_partitions: 1,
            dlq_topic: name("im-dlq"),
            dlq_group: name("im-dlq-group"),
            dlq_partitions: 1,
            downstream_topic_prefix: format!("downstream-{suffix}-"),
            downstream_partitions: 1,
        },
        ..RouterConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_two_gateways_chat_one_to_one_over_kafka() {
    let Some(settings) = kafka_from_env() else {
        return;
    };
    let config = config(&unique_suffix());
    let (_dir, store) = open_store();
    let directory = Arc::new(SharedDirectory::new(
        Duration::from_secs(60),
        Arc::new(ManualClock::new(1_700_000_000_000)),
    ));
    let mut gateways = Vec::new();
    for name in ["gw-a", "gw-b"] {
        let outbox = Arc::new(RecordingOutbox::default());
        let bus = Arc::new(KafkaBus::new(settings.clone()).unwrap());
        let router = Router::start_with(
            Stores::all_from(store.clone()),
            outbox.clone() as Arc<dyn Outbox>,
            RouterConfig {
                gateway_id: name.to_string(),
                ..config.clone()
            },
            bus,
            directory.clone(),
        )
        .unwrap();
        gateways.push((outbox, router));
    }
    let [(outbox_a, router_a), (outbox_b, router_b)] = &gateways[..] else {
        unreachable!()
    };
    let alice = store
        .create_user("alice", "$argon2id$x", 1)
        .await
        .unwrap()
        .id;
    let bob = store.create_user("bob", "$argon2id$x", 1).await.unwrap().id;
    let online = |outbox: &RecordingOutbox, router: &Router, user, conn_id| -> SessionInfo {
        let session = offline_session(user, "phone", conn_id);
        outbox.connect(user, session.conn);
        router.connected(&session);
        session
    };
    let on_a = online(outbox_a, router_a, alice, 1);
    let on_b = online(outbox_b, router_b, bob, 2);
    registered(&*directory, alice, "gw-a").await;
    registered(&*directory, bob, "gw-b").await;
    let direct = dm(alice, bob);

    // alice (gw-a) -> bob (gw-b): acked on gw-a, delivered on gw-b.
    router_a.frame(&on_a, 1, send_body(&direct, "a-1", 1, b"hi bob"));
    let answer = eventually(|| {
        outbox_a
            .frames(on_a.conn)
            .into_iter()
            .find(|frame| frame.request_id == 1)
    })
    .await;
    assert_eq!(ack(&answer).seq, 1);
    let got = eventually(|| delivered(&outbox_b.frames(on_b.conn)).into_iter().next()).await;
    assert_eq!((got.seq, &got.body[..]), (1, &b"hi bob"[..]));

    // bob (gw-b) -> alice (gw-a): the next seq of the conversation.
    router_b.frame(&on_b, 1, send_body(&direct, "b-1", 1, b"hi alice"));
    let got = eventually(|| delivered(&outbox_a.frames(on_a.conn)).into_iter().next()).await;
    assert_eq!((got.seq, &got.body[..]), (2, &b"hi alice"[..]));

    for (_, router) in &gateways {
        router.shutdown().await;
    }
}
