//! The client over WebSocket: each binary message carries exactly one frame,
//! length prefix included. A minimal server (tokio-tungstenite) answers the
//! handshake and acknowledges sends.

use futures::{SinkExt, StreamExt};
use pingme_client::v1::{AuthOk, ContentType, HelloAck, SendAck, client_frame, server_frame};
use pingme_client::{Client, ClientConfig, Endpoint, Event};
use pingme_protocol::{
    ClientFrame, DEFAULT_MAX_FRAME_SIZE, ServerFrame, decode_message, encode_frame, split_frame,
};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

fn answer(frame: ClientFrame) -> Option<ServerFrame> {
    let body = match frame.body? {
        client_frame::Body::Hello(_) => server_frame::Body::HelloAck(HelloAck {
            version: 1,
            max_frame_size: 65536,
            heartbeat_interval_ms: 60_000,
            idle_timeout_ms: 180_000,
            ..Default::default()
        }),
        client_frame::Body::Authenticate(_) => server_frame::Body::AuthOk(AuthOk {
            user_id: 42,
            device_id: "web".into(),
            server_time_ms: 0,
        }),
        client_frame::Body::Send(send) => server_frame::Body::SendAck(SendAck {
            client_msg_id: send.client_msg_id,
            msg_id: "m1".into(),
            conversation_id: send.conversation_id,
            seq: 1,
            server_time_ms: 0,
        }),
        client_frame::Body::Sync(_) => server_frame::Body::Sync(Default::default()),
        _ => return None,
    };
    Some(ServerFrame {
        request_id: frame.request_id,
        body: Some(body),
    })
}

#[tokio::test]
async fn send_and_ack_over_websocket() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(socket).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            let Message::Binary(data) = message else {
                continue;
            };
            let mut buf = bytes::BytesMut::from(&data[..]);
            let payload = split_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE)
                .unwrap()
                .unwrap();
            assert!(buf.is_empty(), "one frame per message");
            let frame: ClientFrame = decode_message(payload).unwrap();
            if let Some(reply) = answer(frame) {
                ws.send(Message::Binary(encode_frame(&reply)))
                    .await
                    .unwrap();
            }
        }
    });
    let endpoint = Endpoint::parse(&format!("ws://{addr}/v1/ws")).unwrap();
    let (client, mut events) = Client::connect(ClientConfig::new(endpoint, "t"))
        .await
        .unwrap();
    assert_eq!(client.user_id(), 42);
    assert!(matches!(events.recv().await, Some(Event::Connected { .. })));
    let ack = client
        .send("g:1", ContentType::Text, "over ws")
        .await
        .unwrap();
    assert_eq!((ack.seq, ack.msg_id.as_str()), (1, "m1"));
    assert_eq!(events.recv().await, Some(Event::Synced));
}
