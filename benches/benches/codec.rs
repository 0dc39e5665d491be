//! Micro benchmarks of the wire codec: encoding and decoding frames, and the
//! cost of handing one deliver frame to 10,000 connection queues (the
//! shared-`Bytes` fanout the gateway relies on).

use std::collections::VecDeque;
use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pingme_protocol::v1::{ContentType, Deliver, Message, SendMessage, client_frame, server_frame};
use pingme_protocol::{ClientFrame, ServerFrame, decode_message, encode_frame, split_frame};

/// A deliver frame with a 100-byte body, as in the fanout goal.
fn deliver_frame() -> ServerFrame {
    ServerFrame {
        request_id: 0,
        body: Some(server_frame::Body::Deliver(Deliver {
            message: Some(Message {
                conversation_id: "g:12345".into(),
                seq: 987_654,
                msg_id: "0192f7a4-8c1e-7d3a-9b7e-4f1c2d3e4f50".into(),
                sender_id: 42,
                sender_device: "phone".into(),
                client_msg_id: "c-1".into(),
                content_type: ContentType::Text as i32,
                body: Bytes::from(vec![b'x'; 100]),
                server_time_ms: 1_764_000_000_000,
            }),
        })),
    }
}

fn send_frame() -> ClientFrame {
    ClientFrame {
        request_id: 7,
        body: Some(client_frame::Body::Send(SendMessage {
            client_msg_id: "0192f7a4-8c1e-7d3a-9b7e-4f1c2d3e4f51".into(),
            conversation_id: "dm:1:2".into(),
            content_type: ContentType::Text as i32,
            body: Bytes::from(vec![b'y'; 100]),
        })),
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    let deliver = deliver_frame();
    group.bench_function("encode_deliver_100B", |b| {
        b.iter(|| encode_frame(black_box(&deliver)))
    });

    let wire = encode_frame(&send_frame());
    group.bench_function("split_and_decode_send_100B", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| {
                let payload = split_frame(&mut buf, 64 * 1024).unwrap().unwrap();
                decode_message::<ClientFrame>(payload).unwrap()
            },
            BatchSize::SmallInput,
        )
    });

    // 1,000 frames arriving in one read: the decoder's steady state.
    let mut many = BytesMut::new();
    for _ in 0..1000 {
        many.extend_from_slice(&wire);
    }
    let many = many.freeze();
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decode_1000_sends_from_one_buffer", |b| {
        b.iter_batched(
            || BytesMut::from(&many[..]),
            |mut buf| {
                let mut n = 0;
                while let Some(payload) = split_frame(&mut buf, 64 * 1024).unwrap() {
                    black_box(decode_message::<ClientFrame>(payload).unwrap());
                    n += 1;
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn fanout(c: &mut Criterion) {
    const CONNECTIONS: usize = 10_000;
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    group.bench_function("queue_one_deliver_on_10k_connections", |b| {
        let mut queues: Vec<VecDeque<Bytes>> = (0..CONNECTIONS).map(|_| VecDeque::new()).collect();
        let deliver = deliver_frame();
        b.iter(|| {
            // Encode once, share everywhere: one allocation per fanout.
            let frame = encode_frame(&deliver);
            for queue in queues.iter_mut() {
                queue.push_back(frame.clone());
            }
            for queue in queues.iter_mut() {
                black_box(queue.pop_front());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, codec, fanout);
criterion_main!(benches);
