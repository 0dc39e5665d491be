//! A small scriptable pingme server for the client tests: speaks the real
//! framing (`ServerCodec`) over real TCP on 127.0.0.1, keeps conversations
//! in memory with dense seqs and idempotent sends, answers sync and fetch
//! with configurable page sizes, and has knobs to misbehave (drop a
//! connection before acking, send `GoAway`, push duplicates).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pingme_client::v1::{
    self, AuthOk, ConversationState, Deliver, GoAway, HelloAck, MessagePage, SendAck, SyncResponse,
    client_frame, server_frame,
};
use pingme_client::{ErrorCode, Event, Events};
use pingme_protocol::{ClientFrame, ServerCodec, ServerFrame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// The user every accepted token belongs to.
pub const USER: u64 = 7;

#[derive(Default)]
pub struct State {
    /// Messages per conversation, seq = index + 1.
    pub conversations: BTreeMap<String, Vec<v1::Message>>,
    /// Acks by client_msg_id: a retried send gets the same ack.
    pub acks: HashMap<String, SendAck>,
    /// Every client_msg_id received, retries included.
    pub sends_seen: Vec<String>,
    /// Connections that completed authentication.
    pub connections: usize,
    /// This device's delivered watermark per conversation.
    pub delivered: HashMap<String, u64>,
    /// Store the next N sends but drop the connection instead of acking.
    pub drop_before_ack: usize,
    /// GoAway frames to send right after authentication, one per connection.
    pub go_away_after_auth: VecDeque<GoAway>,
    /// Conversations per SyncResponse page.
    pub sync_page: usize,
    /// Messages per MessagePage.
    pub fetch_page: usize,
    /// SyncRequests and FetchMessages received.
    pub syncs_seen: usize,
    pub fetches_seen: Vec<(String, u64, u64)>,
    /// The live connection's push channel.
    push: Option<mpsc::UnboundedSender<Option<ServerFrame>>>,
}

#[derive(Clone)]
pub struct FakeServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
}

impl FakeServer {
    pub async fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            sync_page: 100,
            fetch_page: 200,
            ..State::default()
        }));
        let server = FakeServer { addr, state };
        let accepting = server.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let connection = accepting.clone();
                tokio::spawn(async move { connection.serve(socket).await });
            }
        });
        server
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Stores a message as if another member sent it; returns it.
    pub fn store(&self, conversation_id: &str, sender_id: u64, body: &str) -> v1::Message {
        self.with(|s| {
            let messages = s.conversations.entry(conversation_id.into()).or_default();
            let message = v1::Message {
                conversation_id: conversation_id.into(),
                seq: messages.len() as u64 + 1,
                msg_id: format!("m-{conversation_id}-{}", messages.len() + 1),
                sender_id,
                sender_device: "other".into(),
                client_msg_id: format!("c-{}", messages.len() + 1),
                content_type: v1::ContentType::Text as i32,
                body: body.to_string().into(),
                server_time_ms: 1,
            };
            messages.push(message.clone());
            message
        })
    }

    /// Pushes a frame on the live connection.
    pub fn push(&self, frame: ServerFrame) {
        let sent = self.with(|s| {
            s.push
                .as_ref()
                .expect("a live connection")
                .send(Some(frame))
                .is_ok()
        });
        assert!(sent, "the connection is gone");
    }

    pub fn deliver(&self, message: v1::Message) {
        self.push(ServerFrame {
            request_id: 0,
            body: Some(server_frame::Body::Deliver(Deliver {
                message: Some(message),
            })),
        });
    }

    /// Drops the live connection without a word.
    pub fn kick(&self) {
        let sent = self.with(|s| {
            s.push
                .as_ref()
                .expect("a live connection")
                .send(None)
                .is_ok()
        });
        assert!(sent, "the connection is gone");
    }

    async fn serve(self, socket: TcpStream) {
        let mut framed = Framed::new(socket, ServerCodec::default());
        // Hello
        let Some(Ok(_hello)) = framed.next().await else {
            return;
        };
        let ack = HelloAck {
            version: 1,
            max_frame_size: 65536,
            heartbeat_interval_ms: 60_000,
            idle_timeout_ms: 180_000,
            ..Default::default()
        };
        if framed
            .send(reply(1, server_frame::Body::HelloAck(ack)))
            .await
            .is_err()
        {
            return;
        }
        // Authenticate
        let Some(Ok(auth)) = framed.next().await else {
            return;
        };
        let Some(client_frame::Body::Authenticate(auth_body)) = auth.body else {
            return;
        };
        if auth_body.token == "bad" {
            let _ = framed
                .send(ServerFrame::fatal(ErrorCode::TokenInvalid, "bad token"))
                .await;
            return;
        }
        let ok = AuthOk {
            user_id: USER,
            device_id: "d1".into(),
            server_time_ms: 1,
        };
        if framed
            .send(reply(auth.request_id, server_frame::Body::AuthOk(ok)))
            .await
            .is_err()
        {
            return;
        }
        let (push, mut pushed) = mpsc::unbounded_channel();
        let go_away = self.with(|s| {
            s.connections += 1;
            s.push = Some(push);
            s.go_away_after_auth.pop_front()
        });
        if let Some(go_away) = go_away {
            let _ = framed
                .send(reply(0, server_frame::Body::GoAway(go_away)))
                .await;
            return;
        }
        loop {
            tokio::select! {
                frame = framed.next() => {
                    let Some(Ok(frame)) = frame else { return };
                    match self.answer(frame) {
                        Answer::Reply(out) => {
                            if framed.send(out).await.is_err() { return; }
                        }
                        Answer::Nothing => {}
                        Answer::Hangup => return,
                    }
                }
                out = pushed.recv() => match out {
                    Some(Some(frame)) => { if framed.send(frame).await.is_err() { return; } }
                    _ => return,
                },
            }
        }
    }

    fn answer(&self, frame: ClientFrame) -> Answer {
        use client_frame::Body;
        let id = frame.request_id;
        let mut s = self.state.lock().unwrap();
        match frame.body {
            Some(Body::Ping(ping)) => Answer::Reply(reply(
                id,
                server_frame::Body::Pong(v1::Pong {
                    client_time_ms: ping.client_time_ms,
                    server_time_ms: 1,
                }),
            )),
            Some(Body::Send(send)) => {
                s.sends_seen.push(send.client_msg_id.clone());
                if send.conversation_id.starts_with("g:forbidden") {
                    let mut error = ServerFrame::error(id, ErrorCode::Forbidden, "not a member");
                    if let Some(server_frame::Body::Error(e)) = error.body.as_mut() {
                        e.client_msg_id = send.client_msg_id;
                    }
                    return Answer::Reply(error);
                }
                let ack = match s.acks.get(&send.client_msg_id) {
                    Some(ack) => ack.clone(),
                    None => {
                        let messages = s
                            .conversations
                            .entry(send.conversation_id.clone())
                            .or_default();
                        let seq = messages.len() as u64 + 1;
                        messages.push(v1::Message {
                            conversation_id: send.conversation_id.clone(),
                            seq,
                            msg_id: format!("m{seq}"),
                            sender_id: USER,
                            sender_device: "d1".into(),
                            client_msg_id: send.client_msg_id.clone(),
                            content_type: send.content_type,
                            body: send.body,
                            server_time_ms: 1,
                        });
                        let ack = SendAck {
                            client_msg_id: send.client_msg_id.clone(),
                            msg_id: format!("m{seq}"),
                            conversation_id: send.conversation_id,
                            seq,
                            server_time_ms: 1,
                        };
                        s.acks.insert(send.client_msg_id, ack.clone());
                        ack
                    }
                };
                if s.drop_before_ack > 0 {
                    s.drop_before_ack -= 1;
                    return Answer::Hangup;
                }
                Answer::Reply(reply(id, server_frame::Body::SendAck(ack)))
            }
            Some(Body::DeliveryAck(ack)) => {
                let seq = s.delivered.entry(ack.conversation_id).or_default();
                *seq = (*seq).max(ack.seq);
                Answer::Nothing
            }
            Some(Body::Sync(sync)) => {
                s.syncs_seen += 1;
                let mut behind: Vec<ConversationState> = s
                    .conversations
                    .iter()
                    .filter(|(id, _)| id.as_str() > sync.after_conversation_id.as_str())
                    .map(|(id, messages)| ConversationState {
                        conversation_id: id.clone(),
                        latest_seq: messages.len() as u64,
                        delivered_seq: s.delivered.get(id).copied().unwrap_or(0),
                        read_seq: 0,
                    })
                    .filter(|c| c.latest_seq > c.delivered_seq)
                    .collect();
                let has_more = behind.len() > s.sync_page;
                behind.truncate(s.sync_page);
                let next = behind
                    .last()
                    .map(|c| c.conversation_id.clone())
                    .unwrap_or_default();
                Answer::Reply(reply(
                    id,
                    server_frame::Body::Sync(SyncResponse {
                        conversations: behind,
                        has_more,
                        next_after_conversation_id: next,
                    }),
                ))
            }
            Some(Body::Fetch(fetch)) => {
                s.fetches_seen.push((
                    fetch.conversation_id.clone(),
                    fetch.after_seq,
                    fetch.until_seq,
                ));
                let all = s
                    .conversations
                    .get(&fetch.conversation_id)
                    .cloned()
                    .unwrap_or_default();
                let until = if fetch.until_seq == 0 {
                    all.len() as u64
                } else {
                    fetch.until_seq
                };
                let limit = (fetch.limit as usize).clamp(1, s.fetch_page);
                let wanted: Vec<v1::Message> = all
                    .into_iter()
                    .filter(|m| m.seq > fetch.after_seq && m.seq <= until)
                    .collect();
                let has_more = wanted.len() > limit;
                Answer::Reply(reply(
                    id,
                    server_frame::Body::Page(MessagePage {
                        conversation_id: fetch.conversation_id,
                        messages: wanted.into_iter().take(limit).collect(),
                        has_more,
                    }),
                ))
            }
            _ => Answer::Nothing,
        }
    }
}

enum Answer {
    Reply(ServerFrame),
    Nothing,
    Hangup,
}

fn reply(request_id: u64, body: server_frame::Body) -> ServerFrame {
    ServerFrame {
        request_id,
        body: Some(body),
    }
}

/// The next event, or a panic after a generous bound (a hung test is a
/// failed test, not a timing assertion).
pub async fn next_event(events: &mut Events) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event within 10 s")
        .expect("the client is still running")
}

/// Collects events up to and including the first that matches `stop`.
pub async fn events_until(events: &mut Events, stop: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(events).await;
        let done = stop(&event);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// Waits until `check` holds on the server state.
pub async fn eventually(server: &FakeServer, check: impl Fn(&State) -> bool) {
    for _ in 0..500 {
        if server.with(|s| check(s)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server state never reached the expected condition");
}

pub fn messages(events: &[Event]) -> Vec<(String, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.conversation_id.clone(), m.seq)),
            _ => None,
        })
        .collect()
}
