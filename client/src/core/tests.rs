//! Deterministic tests of the core: a scripted server answers frame by
//! frame and virtual time moves only when a test says so, so reconnects,
//! heartbeats, retries and sync paging are checked exactly, with no socket,
//! no task and no sleep.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingme_protocol::v1::{
    self, AuthOk, ContentType, ConversationState, Deliver, FetchMessages, GoAway, GoAwayReason,
    HelloAck, MessagePage, Pong, SendAck, SendMessage, SyncResponse, client_frame, server_frame,
};
use pingme_protocol::{ClientFrame, ErrorCode, ServerFrame};

use super::*;

const MS: Duration = Duration::from_millis(1);

/// A core, the virtual clock, and what came out of it so far.
struct Harness {
    core: ClientCore,
    now: Instant,
    transmits: Vec<Transmit>,
    events: Vec<Event>,
    answers: Vec<(RequestId, Result<Answer, ClientError>)>,
}

fn config(seed: u64) -> CoreConfig {
    CoreConfig {
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            max_attempts: None,
        },
        rng_seed: seed,
        retry_first_connect: true,
        default_heartbeat: Duration::from_secs(1),
        // Most tests look at each ack as it is made; the delay has its own.
        ack_delay: Duration::ZERO,
        ..CoreConfig::new("good-token")
    }
}

/// [`config`] with acks held back for 100 ms, as by default.
fn delayed_acks(seed: u64) -> CoreConfig {
    CoreConfig {
        ack_delay: 100 * MS,
        ..config(seed)
    }
}

fn deliver(conversation_id: &str, seq: u64) -> ServerFrame {
    frame(
        0,
        server_frame::Body::Deliver(Deliver {
            message: Some(message(conversation_id, seq)),
        }),
    )
}

/// The (conversation, seq) of each `DeliveryAck` among `frames`.
fn delivery_acks(frames: &[(u64, client_frame::Body)]) -> Vec<(String, u64)> {
    frames
        .iter()
        .filter_map(|(_, b)| match b {
            client_frame::Body::DeliveryAck(a) => Some((a.conversation_id.clone(), a.seq)),
            _ => None,
        })
        .collect()
}

fn frame(request_id: u64, body: server_frame::Body) -> ServerFrame {
    ServerFrame {
        request_id,
        body: Some(body),
    }
}

fn message(conversation_id: &str, seq: u64) -> v1::Message {
    v1::Message {
        conversation_id: conversation_id.into(),
        seq,
        msg_id: format!("m-{seq}"),
        sender_id: 2,
        content_type: ContentType::Text as i32,
        body: Bytes::from(format!("body {seq}")),
        ..Default::default()
    }
}

fn send(client_msg_id: &str) -> Command {
    Command::Send(SendMessage {
        client_msg_id: client_msg_id.into(),
        conversation_id: "g:1".into(),
        content_type: ContentType::Text as i32,
        body: Bytes::from_static(b"hi"),
    })
}

fn ack(client_msg_id: &str, seq: u64) -> server_frame::Body {
    server_frame::Body::SendAck(SendAck {
        client_msg_id: client_msg_id.into(),
        conversation_id: "g:1".into(),
        seq,
        ..Default::default()
    })
}

fn error(code: ErrorCode, fatal: bool) -> server_frame::Body {
    server_frame::Body::Error(v1::Error {
        code: code.code(),
        message: "no".into(),
        client_msg_id: String::new(),
        fatal,
    })
}

impl Harness {
    fn new(config: CoreConfig) -> Harness {
        let now = Instant::now();
        let mut harness = Harness {
            core: ClientCore::new(config, now),
            now,
            transmits: Vec::new(),
            events: Vec::new(),
            answers: Vec::new(),
        };
        harness.drain();
        harness
    }

    /// Takes every output the core has queued.
    fn drain(&mut self) {
        while let Some(transmit) = self.core.poll_transmit() {
            self.transmits.push(transmit);
        }
        while let Some(event) = self.core.poll_event() {
            match event {
                CoreEvent::App(event) => self.events.push(event),
                CoreEvent::Answer { request, result } => self.answers.push((request, result)),
            }
        }
    }

    /// The transmits since the last call.
    fn wire(&mut self) -> Vec<Transmit> {
        std::mem::take(&mut self.transmits)
    }

    /// The frame bodies (with request ids) since the last call; panics on a
    /// connect or disconnect in between.
    fn frames(&mut self) -> Vec<(u64, client_frame::Body)> {
        self.wire()
            .into_iter()
            .map(|t| match t {
                Transmit::Frame(ClientFrame {
                    request_id,
                    body: Some(body),
                }) => (request_id, body),
                other => panic!("expected a frame, got {other:?}"),
            })
            .collect()
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn receive(&mut self, frame: ServerFrame) {
        self.core.handle_frame(self.now, frame);
        self.drain();
    }

    fn command(&mut self, command: Command) -> Option<RequestId> {
        let id = self.core.handle_command(self.now, command);
        self.drain();
        id
    }

    fn lose(&mut self) {
        self.core
            .handle_connection_lost(self.now, ClientError::ConnectionClosed);
        self.drain();
    }

    /// Moves the clock by `by`, firing the timer on the way if it falls due.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(at) = self.core.poll_timeout().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            self.core.handle_timeout(self.now);
            self.drain();
        }
        self.now = until;
    }

    /// Moves the clock to the core's next timeout and fires it.
    fn fire(&mut self) -> Duration {
        let at = self.core.poll_timeout().expect("a timer is set");
        let waited = at.saturating_duration_since(self.now);
        self.now = at;
        self.core.handle_timeout(self.now);
        self.drain();
        waited
    }

    /// Plays the server's side of a handshake the core just asked for
    /// (its `Connect` must be the last transmit); returns the frames sent
    /// after `AuthOk`.
    fn accept_connection(&mut self) -> Vec<(u64, client_frame::Body)> {
        let wire = self.wire();
        assert!(
            matches!(wire.last(), Some(Transmit::Connect { .. })),
            "a connect was asked for: {wire:?}"
        );
        self.core.handle_connected(self.now);
        self.drain();
        // Hello and Authenticate go out together, before any answer.
        let opening = self.frames();
        assert!(
            matches!(&opening[..], [(1, client_frame::Body::Hello(_)), (2, client_frame::Body::Authenticate(a))] if a.token == "good-token"),
            "{opening:?}"
        );
        self.receive(frame(
            1,
            server_frame::Body::HelloAck(HelloAck {
                version: 1,
                heartbeat_interval_ms: 1000,
                ..Default::default()
            }),
        ));
        let after_hello_ack = self.frames();
        assert!(after_hello_ack.is_empty(), "{after_hello_ack:?}");
        self.receive(frame(
            2,
            server_frame::Body::AuthOk(AuthOk {
                user_id: 7,
                device_id: "phone".into(),
                ..Default::default()
            }),
        ));
        self.frames()
    }

    /// A connected core whose (empty) first sync is done.
    fn synced(config: CoreConfig) -> Harness {
        let mut harness = Harness::new(config);
        let after_auth = harness.accept_connection();
        let sync = sync_request(&after_auth);
        harness.receive(frame(sync, empty_sync()));
        assert_eq!(
            harness.take_events(),
            vec![
                Event::Connected {
                    user_id: 7,
                    device_id: "phone".into(),
                    reconnected: false
                },
                Event::Synced
            ]
        );
        harness
    }
}

fn empty_sync() -> server_frame::Body {
    server_frame::Body::Sync(SyncResponse::default())
}

/// The request id of the one `SyncRequest` among `frames`.
fn sync_request(frames: &[(u64, client_frame::Body)]) -> u64 {
    let syncs: Vec<u64> = frames
        .iter()
        .filter(|(_, b)| matches!(b, client_frame::Body::Sync(_)))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(syncs.len(), 1, "{frames:?}");
    syncs[0]
}

fn reconnect_delays(events: &[Event]) -> Vec<(u32, Duration)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { attempt, delay, .. } => Some((*attempt, *delay)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_handshake_authenticates_then_syncs() {
    let harness = Harness::synced(config(1));
    assert!(harness.core.is_connected());
    assert_eq!(harness.core.identity(), Some((7, "phone")));
}

/// Loses the connection, fails `failures` attempts, then reconnects;
/// returns the delays the core waited.
fn delays_of_a_bumpy_reconnect(seed: u64, failures: usize) -> Vec<(u32, Duration)> {
    let mut h = Harness::synced(config(seed));
    h.lose();
    assert_eq!(h.wire(), vec![Transmit::Disconnect]);
    for _ in 0..failures {
        h.fire();
        assert_eq!(h.wire(), vec![Transmit::Connect { redirect: None }]);
        h.core
            .handle_connect_failed(h.now, ClientError::ConnectionClosed);
        h.drain();
    }
    let waited = h.fire();
    let after_auth = h.accept_connection();
    let sync = sync_request(&after_auth);
    h.receive(frame(sync, empty_sync()));
    let events = h.take_events();
    let delays = reconnect_delays(&events);
    assert_eq!(delays.last().unwrap().1, waited, "the timer is the delay");
    assert!(events.contains(&Event::Connected {
        user_id: 7,
        device_id: "phone".into(),
        reconnected: true
    }));
    assert_eq!(events.last(), Some(&Event::Synced));
    delays
}

#[test]
fn a_lost_connection_backs_off_with_seeded_jitter_then_reauthenticates_and_syncs() {
    let delays = delays_of_a_bumpy_reconnect(42, 3);
    // Attempt 0 after losing a connection, then one per failed attempt.
    assert_eq!(
        delays.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    // Each delay lies in the upper half of its doubling ceiling.
    for (attempt, delay) in &delays {
        let ceiling = Duration::from_millis(100) * (1 << attempt);
        assert!(
            *delay >= ceiling / 2 && *delay <= ceiling,
            "{attempt}: {delay:?}"
        );
    }
    // The same seed gives the same delays; another seed other ones.
    assert_eq!(delays_of_a_bumpy_reconnect(42, 3), delays);
    assert_ne!(delays_of_a_bumpy_reconnect(43, 3), delays);
}

#[test]
fn unacked_sends_go_out_again_with_the_same_id_after_reconnect() {
    let mut h = Harness::synced(config(1));
    let first = h.command(send("c-1")).unwrap();
    let sent = h.frames();
    assert!(
        matches!(&sent[..], [(id, client_frame::Body::Send(s))] if *id == first.0 && s.client_msg_id == "c-1")
    );
    h.lose();
    // Made while disconnected: queued, nothing on the wire.
    let second = h.command(send("c-2")).unwrap();
    assert_eq!(h.wire(), vec![Transmit::Disconnect]);
    h.fire();
    let after_auth = h.accept_connection();
    // Both sends first, in their original order and ids, then the sync.
    let resent: Vec<(u64, String)> = after_auth
        .iter()
        .filter_map(|(id, b)| match b {
            client_frame::Body::Send(s) => Some((*id, s.client_msg_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        resent,
        vec![(first.0, "c-1".to_string()), (second.0, "c-2".to_string())]
    );
    assert!(matches!(
        after_auth.last(),
        Some((_, client_frame::Body::Sync(_)))
    ));
    h.receive(frame(first.0, ack("c-1", 1)));
    h.receive(frame(second.0, ack("c-2", 2)));
    let seqs: Vec<(RequestId, u64)> = h
        .answers
        .iter()
        .map(|(id, r)| match r {
            Ok(Answer::Sent(ack)) => (*id, ack.seq),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![(first, 1), (second, 2)]);
    assert_eq!(h.core.pending_requests(), 0);
}

#[test]
fn sync_pages_then_fetch_pages_two_at_a_time() {
    let mut h = Harness::new(config(1));
    let after_auth = h.accept_connection();
    let sync = sync_request(&after_auth);
    let state = |id: &str, latest| ConversationState {
        conversation_id: id.into(),
        latest_seq: latest,
        delivered_seq: 0,
        ..Default::default()
    };
    // First page: two conversations, and more to come.
    h.receive(frame(
        sync,
        server_frame::Body::Sync(SyncResponse {
            conversations: vec![state("g:1", 250), state("g:2", 3)],
            has_more: true,
            next_after_conversation_id: "g:2".into(),
        }),
    ));
    let frames = h.frames();
    let fetches: Vec<(u64, FetchMessages)> = frames
        .iter()
        .filter_map(|(id, b)| match b {
            client_frame::Body::Fetch(f) => Some((*id, f.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(fetches.len(), 2);
    assert_eq!(
        (
            fetches[0].1.after_seq,
            fetches[0].1.until_seq,
            fetches[0].1.limit
        ),
        (0, 250, 200)
    );
    let next_sync = frames
        .iter()
        .find_map(|(id, b)| match b {
            client_frame::Body::Sync(s) => Some((*id, s.after_conversation_id.clone())),
            _ => None,
        })
        .expect("the next sync page");
    assert_eq!(next_sync.1, "g:2");
    // Second page: a third conversation waits for a fetch slot.
    h.receive(frame(
        next_sync.0,
        server_frame::Body::Sync(SyncResponse {
            conversations: vec![state("g:3", 1)],
            has_more: false,
            next_after_conversation_id: String::new(),
        }),
    ));
    assert_eq!(h.frames(), vec![], "two fetches are already in flight");
    let page = |conversation: &str, seqs: std::ops::RangeInclusive<u64>, has_more| {
        server_frame::Body::Page(MessagePage {
            messages: seqs.map(|s| message(conversation, s)).collect(),
            has_more,
            ..Default::default()
        })
    };
    // g:1's first page leaves more below its bound: the next page follows
    // from its last seq in the slot the page freed, before g:3.
    h.receive(frame(fetches[0].0, page("g:1", 1..=200, true)));
    let frames = h.frames();
    assert!(
        matches!(
            &frames[..],
            [(_, client_frame::Body::DeliveryAck(a)), (next, client_frame::Body::Fetch(f))]
                if a.seq == 200 && f.after_seq == 200 && f.until_seq == 250 && *next > 0
        ),
        "{frames:?}"
    );
    let g1_next = frames[1].0;
    // g:2 done: the waiting g:3 fetch takes its slot.
    h.receive(frame(fetches[1].0, page("g:2", 1..=3, false)));
    let frames = h.frames();
    let g3 = frames
        .iter()
        .find_map(|(id, b)| match b {
            client_frame::Body::Fetch(f) if f.conversation_id == "g:3" => Some(*id),
            _ => None,
        })
        .expect("g:3 fetched once a slot was free");
    h.receive(frame(g1_next, page("g:1", 201..=250, false)));
    assert!(!h.events.contains(&Event::Synced), "g:3 is still missing");
    h.receive(frame(g3, page("g:3", 1..=1, false)));
    let events = h.take_events();
    let count = |c: &str| {
        events
            .iter()
            .filter(|e| matches!(e, Event::Message(m) if m.conversation_id == c))
            .count()
    };
    assert_eq!((count("g:1"), count("g:2"), count("g:3")), (250, 3, 1));
    assert_eq!(events.last(), Some(&Event::Synced));
    assert_eq!(
        h.core.watermarks(),
        vec![("g:1".into(), 250), ("g:2".into(), 3), ("g:3".into(), 1)]
    );
}

#[test]
fn a_skipped_seq_is_fetched_and_duplicates_are_dropped() {
    let mut h = Harness::synced(config(1));
    let deliver = |seq| {
        frame(
            0,
            server_frame::Body::Deliver(Deliver {
                message: Some(message("g:5", seq)),
            }),
        )
    };
    h.receive(deliver(1));
    h.receive(deliver(1));
    h.receive(deliver(4));
    h.receive(deliver(4));
    let frames = h.frames();
    let gap = frames
        .iter()
        .find_map(|(id, b)| match b {
            client_frame::Body::Fetch(f) => Some((*id, f.after_seq, f.until_seq)),
            _ => None,
        })
        .expect("the gap is fetched");
    assert_eq!((gap.1, gap.2), (1, 3));
    let acks: Vec<u64> = frames
        .iter()
        .filter_map(|(_, b)| match b {
            client_frame::Body::DeliveryAck(a) => Some(a.seq),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![1], "only what is held without gaps is acked");
    h.receive(frame(
        gap.0,
        server_frame::Body::Page(MessagePage {
            messages: vec![message("g:5", 2), message("g:5", 3)],
            has_more: false,
            ..Default::default()
        }),
    ));
    let seqs: Vec<u64> = h
        .take_events()
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![1, 4, 2, 3], "each seq once");
    assert!(matches!(
        &h.frames()[..],
        [(0, client_frame::Body::DeliveryAck(a))] if a.seq == 4
    ));
}

#[test]
fn an_idle_connection_pings_and_a_silent_one_is_declared_dead() {
    let mut h = Harness::synced(config(1));
    // Heartbeat 1 s (HelloAck): nothing for a second, then a ping.
    assert_eq!(h.fire(), Duration::from_secs(1));
    assert!(matches!(
        &h.frames()[..],
        [(0, client_frame::Body::Ping(_))]
    ));
    // The pong counts as life; the next ping a second after the last one.
    h.advance(100 * MS);
    h.receive(frame(0, server_frame::Body::Pong(Pong::default())));
    assert_eq!(h.fire(), 900 * MS);
    assert!(matches!(
        &h.frames()[..],
        [(0, client_frame::Body::Ping(_))]
    ));
    // Silence from the server: pings go on, then after three heartbeats
    // without a frame the connection is dead and a reconnect is scheduled.
    h.advance(2100 * MS - MS);
    assert!(h.core.is_connected());
    h.advance(MS);
    assert!(!h.core.is_connected());
    let wire = h.wire();
    assert_eq!(wire.last(), Some(&Transmit::Disconnect));
    let pings = wire
        .iter()
        .filter(|t| matches!(t, Transmit::Frame(f) if matches!(f.body, Some(client_frame::Body::Ping(_)))))
        .count();
    assert_eq!(pings, 2, "one per second of silence");
    assert!(matches!(
        h.take_events()[..],
        [Event::Reconnecting { attempt: 0, ref reason, .. }] if reason.contains("timed out")
    ));
}

#[test]
fn a_connection_busy_both_ways_needs_no_ping() {
    let mut h = Harness::synced(config(1));
    for _ in 0..10 {
        h.advance(500 * MS);
        h.command(Command::Typing(v1::Typing {
            conversation_id: "g:1".into(),
            active: true,
        }));
        h.receive(frame(0, server_frame::Body::Pong(Pong::default())));
    }
    let pings = h
        .frames()
        .iter()
        .filter(|(_, b)| matches!(b, client_frame::Body::Ping(_)))
        .count();
    assert_eq!(pings, 0);
}

#[test]
fn go_away_is_obeyed_after_retry_after_and_at_the_named_gateway() {
    let mut h = Harness::synced(config(1));
    let to: SocketAddr = "10.0.0.2:7000".parse().unwrap();
    h.receive(frame(
        0,
        server_frame::Body::GoAway(GoAway {
            reason: GoAwayReason::Rebalance as i32,
            retry_after_ms: 5000,
            reconnect_to: to.to_string(),
            message: "shedding".into(),
        }),
    ));
    assert_eq!(h.wire(), vec![Transmit::Disconnect]);
    let delays = reconnect_delays(&h.take_events());
    let delay = delays[0].1;
    // At least retry_after, at most retry_after plus its spread.
    assert!(delay >= Duration::from_secs(5), "{delay:?}");
    assert!(
        delay <= Duration::from_millis(5000 + 1250 + 100),
        "{delay:?}"
    );
    h.advance(delay - MS);
    assert_eq!(h.wire(), vec![]);
    h.advance(MS);
    assert_eq!(h.wire(), vec![Transmit::Connect { redirect: Some(to) }]);
}

#[test]
fn a_go_away_answering_the_handshake_is_obeyed_too() {
    let mut h = Harness::synced(config(1));
    h.lose();
    h.fire();
    h.wire();
    h.core.handle_connected(h.now);
    h.receive(frame(
        0,
        server_frame::Body::GoAway(GoAway {
            reason: GoAwayReason::Shutdown as i32,
            retry_after_ms: 3000,
            reconnect_to: String::new(),
            message: "draining".into(),
        }),
    ));
    assert_eq!(h.wire().last(), Some(&Transmit::Disconnect));
    let delays = reconnect_delays(&h.take_events());
    assert_eq!(delays.len(), 2);
    assert!(delays[1].1 >= Duration::from_secs(3), "{delays:?}");
}

#[test]
fn go_away_replaced_stops_for_good() {
    let mut h = Harness::synced(config(1));
    let pending = h.command(send("c-1")).unwrap();
    h.receive(frame(
        0,
        server_frame::Body::GoAway(GoAway {
            reason: GoAwayReason::Replaced as i32,
            message: "signed in elsewhere".into(),
            ..Default::default()
        }),
    ));
    assert!(h.core.is_closed());
    assert!(matches!(
        h.take_events()[..],
        [Event::GoAway(_), Event::Closed { .. }]
    ));
    assert!(matches!(
        &h.answers[..],
        [(id, Err(ClientError::GoAway { reason: GoAwayReason::Replaced, .. }))] if *id == pending
    ));
    assert_eq!(h.core.poll_timeout(), None, "nothing more to do");
    // Later commands are refused at once.
    let late = h.command(send("c-2")).unwrap();
    assert!(matches!(h.answers.last(), Some((id, Err(ClientError::Closed))) if *id == late));
}

#[test]
fn a_refused_send_is_retried_after_a_backoff_with_the_same_id() {
    let mut h = Harness::synced(config(1));
    let id = h.command(send("c-1")).unwrap();
    h.frames();
    h.receive(frame(id.0, error(ErrorCode::Overloaded, false)));
    assert!(h.answers.is_empty(), "OVERLOADED means later, not never");
    let waited = h.fire();
    assert!(waited >= 50 * MS && waited <= 100 * MS, "{waited:?}");
    assert!(matches!(
        &h.frames()[..],
        [(again, client_frame::Body::Send(s))] if *again == id.0 && s.client_msg_id == "c-1"
    ));
    h.receive(frame(id.0, ack("c-1", 1)));
    assert!(matches!(&h.answers[..], [(_, Ok(Answer::Sent(a)))] if a.seq == 1));

    // A refusal that is not about load fails the send at once.
    let id = h.command(send("c-2")).unwrap();
    h.receive(frame(id.0, error(ErrorCode::Forbidden, false)));
    assert!(matches!(
        h.answers.last(),
        Some((_, Err(e))) if e.code() == Some(ErrorCode::Forbidden)
    ));
}

#[test]
fn retries_stop_at_the_request_timeout() {
    let mut h = Harness::synced(CoreConfig {
        request_timeout: Duration::from_millis(500),
        ..config(1)
    });
    let id = h.command(send("c-1")).unwrap();
    let mut refusals = 0;
    while h.answers.is_empty() {
        h.receive(frame(id.0, error(ErrorCode::RateLimited, false)));
        refusals += 1;
        if h.answers.is_empty() {
            h.fire();
        }
    }
    assert!(refusals >= 2, "{refusals}");
    assert!(matches!(
        &h.answers[..],
        [(_, Err(e))] if e.code() == Some(ErrorCode::RateLimited)
    ));
    assert_eq!(h.core.pending_requests(), 0);
}

#[test]
fn a_request_times_out_and_is_not_resent_afterwards() {
    let mut h = Harness::synced(CoreConfig {
        request_timeout: Duration::from_secs(2),
        ..config(1)
    });
    h.lose();
    let id = h.command(send("c-1")).unwrap();
    // Reconnects keep failing for longer than the request may wait.
    let start = h.now;
    while h.now < start + Duration::from_secs(3) {
        h.fire();
        if h.wire().contains(&Transmit::Connect { redirect: None }) {
            h.core
                .handle_connect_failed(h.now, ClientError::ConnectionClosed);
            h.drain();
        }
    }
    assert!(matches!(&h.answers[..], [(a, Err(ClientError::Timeout))] if *a == id));
    while !matches!(h.wire().last(), Some(Transmit::Connect { .. })) {
        h.fire();
    }
    h.transmits.push(Transmit::Connect { redirect: None });
    let after_auth = h.accept_connection();
    assert!(
        !after_auth
            .iter()
            .any(|(_, b)| matches!(b, client_frame::Body::Send(_))),
        "{after_auth:?}"
    );
}

#[test]
fn a_fatal_rate_limit_keeps_the_send_for_the_next_connection() {
    let mut h = Harness::synced(config(1));
    let kept = h.command(send("c-1")).unwrap();
    let failed = h.command(send("c-2")).unwrap();
    h.frames();
    // A fatal error about a request that cannot succeed fails it.
    h.receive(frame(failed.0, error(ErrorCode::FrameTooLarge, true)));
    assert!(matches!(
        &h.answers[..],
        [(id, Err(e))] if *id == failed && e.code() == Some(ErrorCode::FrameTooLarge)
    ));
    assert_eq!(h.wire(), vec![Transmit::Disconnect]);
    h.fire();
    h.accept_connection();
    h.receive(frame(kept.0, error(ErrorCode::RateLimited, true)));
    assert_eq!(h.answers.len(), 1, "a flood is not the send's fault");
    h.fire();
    let after_auth = h.accept_connection();
    assert!(after_auth.iter().any(|(id, b)| *id == kept.0
        && matches!(b, client_frame::Body::Send(s) if s.client_msg_id == "c-1")));
}

#[test]
fn the_first_failure_stops_the_core_unless_told_to_retry() {
    let mut h = Harness::new(CoreConfig {
        retry_first_connect: false,
        ..config(1)
    });
    h.core.handle_connect_failed(
        h.now,
        ClientError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
    );
    h.drain();
    assert!(h.core.is_closed());
    assert!(matches!(h.core.take_error(), Some(ClientError::Io(_))));

    let mut h = Harness::new(config(1));
    h.core
        .handle_connect_failed(h.now, ClientError::ConnectionClosed);
    h.drain();
    assert!(!h.core.is_closed());
    assert_eq!(reconnect_delays(&h.take_events()).len(), 1);
}

#[test]
fn a_rejected_token_and_an_exhausted_budget_stop_the_core() {
    let mut h = Harness::synced(config(1));
    h.lose();
    h.fire();
    h.wire();
    h.core.handle_connected(h.now);
    h.receive(frame(1, error(ErrorCode::TokenExpired, false)));
    assert!(h.core.is_closed());
    assert_eq!(
        h.core.take_error().and_then(|e| e.code()),
        Some(ErrorCode::TokenExpired)
    );

    let mut h = Harness::synced(CoreConfig {
        backoff: Backoff {
            max_attempts: Some(2),
            ..config(1).backoff
        },
        ..config(1)
    });
    h.lose();
    for _ in 0..2 {
        h.fire();
        h.core
            .handle_connect_failed(h.now, ClientError::ConnectionClosed);
        h.drain();
    }
    assert!(h.core.is_closed());
    assert!(
        matches!(h.take_events().last(), Some(Event::Closed { reason }) if reason.contains("gave up"))
    );
}

#[test]
fn a_version_refused_in_hello_ack_fails_the_attempt_despite_the_pipelined_authenticate() {
    let mut h = Harness::synced(config(1));
    h.lose();
    h.fire();
    h.wire();
    h.core.handle_connected(h.now);
    h.drain();
    assert_eq!(h.frames().len(), 2, "Hello and Authenticate");
    h.receive(frame(
        1,
        server_frame::Body::HelloAck(HelloAck {
            version: 99,
            ..Default::default()
        }),
    ));
    assert_eq!(h.wire().first(), Some(&Transmit::Disconnect));
    // The answer to the pipelined Authenticate, still on its way from the
    // dropped connection, does not make the core connected.
    h.receive(frame(
        2,
        server_frame::Body::AuthOk(AuthOk {
            user_id: 7,
            device_id: "phone".into(),
            ..Default::default()
        }),
    ));
    assert!(
        !h.take_events()
            .iter()
            .any(|event| matches!(event, Event::Connected { .. })),
        "connected on a refused version"
    );
}

#[test]
fn a_connect_that_hangs_is_abandoned_at_the_connect_timeout() {
    let mut h = Harness::synced(CoreConfig {
        connect_timeout: Duration::from_secs(5),
        ..config(1)
    });
    h.lose();
    h.fire();
    assert_eq!(
        h.wire(),
        vec![Transmit::Disconnect, Transmit::Connect { redirect: None }]
    );
    // Neither connected nor failed: the core gives up on it itself.
    assert_eq!(h.fire(), Duration::from_secs(5));
    assert_eq!(h.wire(), vec![Transmit::Disconnect]);
    assert!(matches!(
        h.take_events().last(),
        Some(Event::Reconnecting { attempt: 1, .. })
    ));
}

#[test]
fn typing_and_read_markers_are_dropped_between_connections() {
    let mut h = Harness::synced(config(1));
    h.lose();
    h.wire();
    assert_eq!(
        h.command(Command::MarkRead(v1::ReadMarker {
            conversation_id: "g:1".into(),
            seq: 3
        })),
        None
    );
    assert_eq!(h.wire(), vec![]);
    assert!(h.core.poll_timeout().is_some(), "the reconnect timer runs");
}

#[test]
fn own_acknowledged_sends_are_held_and_acknowledged_with_the_rest() {
    let mut h = Harness::synced(config(1));
    // The device follows g:1 (seq 1 from someone else).
    h.receive(frame(
        0,
        server_frame::Body::Deliver(Deliver {
            message: Some(message("g:1", 1)),
        }),
    ));
    h.frames();
    let mine = h.command(send("c-1")).unwrap();
    h.frames();
    h.receive(frame(mine.0, ack("c-1", 2)));
    assert_eq!(h.core.watermark("g:1"), 2, "its own seq is held");
    assert!(
        matches!(&h.frames()[..], [(0, client_frame::Body::DeliveryAck(a))] if a.conversation_id == "g:1" && a.seq == 2),
        "and acknowledged, so the next sync does not list it"
    );
    // Its own message coming back (a fetch, another device's sync) is a
    // duplicate, not a new message.
    h.take_events();
    h.receive(frame(
        0,
        server_frame::Body::Deliver(Deliver {
            message: Some(message("g:1", 2)),
        }),
    ));
    assert!(
        !h.take_events()
            .iter()
            .any(|e| matches!(e, Event::Message(_))),
        "seq 2 is not handed over twice"
    );

    // A send acked past a gap: the gap is fetched, the watermark waits.
    let later = h.command(send("c-2")).unwrap();
    h.frames();
    h.receive(frame(later.0, ack("c-2", 5)));
    let frames = h.frames();
    let gap = frames.iter().find_map(|(_, b)| match b {
        client_frame::Body::Fetch(f) => Some((f.after_seq, f.until_seq)),
        _ => None,
    });
    assert_eq!(gap, Some((2, 4)));
    assert_eq!(h.core.watermark("g:1"), 2);
}

#[test]
fn an_own_send_in_a_conversation_not_yet_followed_marks_nothing() {
    let mut h = Harness::synced(config(1));
    let mine = h.command(send("c-1")).unwrap();
    h.frames();
    // g:1 is new to this device: seq 7 must not become its watermark
    // (seqs 1-6 would be skipped by the next sync and acked unseen).
    h.receive(frame(mine.0, ack("c-1", 7)));
    assert_eq!(h.core.watermark("g:1"), 0);
    assert!(
        !h.frames()
            .iter()
            .any(|(_, b)| matches!(b, client_frame::Body::DeliveryAck(_))),
        "nothing acknowledged"
    );
}

#[test]
fn a_reconnect_asked_for_closes_and_reopens_at_once_keeping_pending_sends() {
    let mut h = Harness::synced(config(5));
    let pending = h.command(send("c-1")).unwrap();
    h.frames();
    h.command(Command::Reconnect);
    // Closed and reopened in the same instant: no backoff wait.
    assert_eq!(
        h.wire(),
        vec![Transmit::Disconnect, Transmit::Connect { redirect: None }]
    );
    assert_eq!(
        reconnect_delays(&h.take_events()),
        vec![(0, Duration::ZERO)]
    );
    // A second ask while the connect is under way changes nothing.
    h.command(Command::Reconnect);
    assert!(h.transmits.is_empty() && h.events.is_empty());
    h.transmits.push(Transmit::Connect { redirect: None });
    let after_auth = h.accept_connection();
    assert!(
        after_auth.iter().any(
            |(id, b)| matches!(b, client_frame::Body::Send(s) if *id == pending.0 && s.client_msg_id == "c-1")
        ),
        "the unacknowledged send goes out again: {after_auth:?}"
    );
    assert!(matches!(
        h.take_events()[..],
        [Event::Connected {
            reconnected: true,
            ..
        }]
    ));

    // Waiting for the next attempt after a loss: the wait is cut short.
    h.lose();
    h.take_events();
    assert_eq!(h.wire(), vec![Transmit::Disconnect]);
    h.command(Command::Reconnect);
    assert_eq!(h.wire(), vec![Transmit::Connect { redirect: None }]);
}

#[test]
fn acks_wait_for_the_delay_and_one_per_conversation_covers_what_came_meanwhile() {
    let mut h = Harness::synced(delayed_acks(1));
    h.receive(deliver("g:1", 1));
    assert_eq!(h.frames(), vec![], "nothing acked at once");
    assert_eq!(h.core.poll_timeout(), Some(h.now + 100 * MS));
    h.advance(60 * MS);
    h.receive(deliver("g:1", 2));
    h.receive(deliver("g:2", 1));
    h.receive(deliver("g:1", 3));
    assert_eq!(h.frames(), vec![]);
    // Due 100 ms after the first arrival, not pushed back by the others.
    assert_eq!(h.fire(), 40 * MS);
    assert_eq!(
        delivery_acks(&h.frames()),
        vec![("g:1".into(), 3), ("g:2".into(), 1)]
    );
    // Nothing more to ack: the next timer is the heartbeat's.
    assert!(h.core.poll_timeout() > Some(h.now + 100 * MS));
    // A duplicate moves no watermark and arms no timer.
    h.receive(deliver("g:1", 3));
    assert_eq!(
        h.fire(),
        1000 * MS,
        "the ping, a heartbeat after the last frame"
    );
    assert!(matches!(
        &h.frames()[..],
        [(0, client_frame::Body::Ping(_))]
    ));
}

#[test]
fn held_acks_ride_with_the_next_frame_and_go_out_before_a_close() {
    let mut h = Harness::synced(delayed_acks(1));
    h.receive(deliver("g:1", 1));
    let sent = h.command(send("c-1")).unwrap();
    let frames = h.frames();
    assert!(
        matches!(&frames[..], [(0, client_frame::Body::DeliveryAck(a)), (id, client_frame::Body::Send(_))] if a.seq == 1 && *id == sent.0),
        "the ack goes out in the same write as the send: {frames:?}"
    );
    // Nothing is left to be due.
    h.advance(100 * MS);
    assert_eq!(h.frames(), vec![]);
    h.receive(deliver("g:2", 5));
    h.command(Command::Close);
    let wire = h.wire();
    assert!(
        matches!(&wire[..], [Transmit::Frame(f), Transmit::Disconnect] if matches!(&f.body, Some(client_frame::Body::DeliveryAck(a)) if a.conversation_id == "g:2" && a.seq == 5)),
        "{wire:?}"
    );
}

#[test]
fn acks_a_lost_connection_never_sent_open_the_next_one() {
    let mut h = Harness::synced(delayed_acks(3));
    h.receive(deliver("g:1", 1));
    h.receive(deliver("g:1", 2));
    h.lose();
    assert_eq!(h.wire(), vec![Transmit::Disconnect]);
    // The wait for the reconnect (at most 100 ms) and the ack's due time
    // pass: nothing goes out without a connection.
    h.advance(200 * MS);
    let after_auth = h.accept_connection();
    assert_eq!(delivery_acks(&after_auth), vec![("g:1".into(), 2)]);
    assert!(
        matches!(
            after_auth.first(),
            Some((0, client_frame::Body::DeliveryAck(_)))
        ),
        "before the sync, so the server's answer already counts it: {after_auth:?}"
    );
    sync_request(&after_auth);
}
