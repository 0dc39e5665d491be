//! Catching up, inside the core: the sync after every (re)connect
//! (`SyncRequest` pages, then `FetchMessages` pages from the watermarks),
//! gap fetches when a live push skips seqs, dedup by (conversation, seq),
//! and cumulative `DeliveryAck`s, held back for a moment so one frame
//! acknowledges a burst. [`Held`] is what this device holds and
//! outlives connections; [`Catchup`] is one connection's requests in flight
//! and starts over on the next.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use pingme_protocol::v1::{
    self, DeliveryAck, FetchMessages, SyncRequest, SyncResponse, client_frame, server_frame,
};

use super::{Event, Outbox};
use crate::watermark::{Arrival, Watermarks};

/// Messages per `FetchMessages` page the core asks for (the server caps).
pub(super) const FETCH_LIMIT: u32 = 200;
/// `FetchMessages` requests in flight at once. The server keeps each page
/// under a quarter of the connection's outbound budget, so two pages and
/// the live traffic fit and a prompt reader is never cut off as a slow
/// consumer (docs/protocol.md, "Paging").
pub(super) const MAX_FETCHES_IN_FLIGHT: usize = 2;

/// What this device holds, across connections, and what of it the server
/// has not been told yet.
#[derive(Debug)]
pub(super) struct Held {
    /// Which seqs are held per conversation.
    pub(super) marks: Watermarks,
    /// Highest seq acknowledged to the server per conversation.
    acked: HashMap<String, u64>,
    /// How long a moved watermark may wait for others before it is acked
    /// ([`super::CoreConfig::ack_delay`]).
    ack_delay: Duration,
    /// Conversations whose watermark moved past what was acked.
    unacked: BTreeSet<String>,
    /// When the first of `unacked` is due.
    ack_due: Option<Instant>,
}

impl Held {
    pub(super) fn new(marks: Watermarks, ack_delay: Duration) -> Held {
        Held {
            marks,
            acked: HashMap::new(),
            ack_delay,
            unacked: BTreeSet::new(),
            ack_due: None,
        }
    }

    /// When the acks held back are due, if any are.
    pub(super) fn ack_due(&self) -> Option<Instant> {
        self.ack_due
    }

    /// Sends every ack held back: one cumulative `DeliveryAck` per
    /// conversation whose watermark moved. Only called while a connection
    /// is up; what a lost connection never sent waits for the next one.
    pub(super) fn flush_acks(&mut self, out: &mut Outbox) {
        self.ack_due = None;
        for conversation_id in std::mem::take(&mut self.unacked) {
            let watermark = self.marks.get(&conversation_id);
            let acked = self.acked.entry(conversation_id.clone()).or_default();
            if watermark > *acked {
                *acked = watermark;
                out.frame(
                    0,
                    client_frame::Body::DeliveryAck(DeliveryAck {
                        conversation_id,
                        seq: watermark,
                    }),
                );
            }
        }
    }

    /// The conversation's watermark may have moved: its ack goes out after
    /// the ack delay, with every other one that moved meanwhile (a burst
    /// of a busy group costs one uplink frame, not one per read), or at
    /// once with no delay.
    fn moved(&mut self, out: &mut Outbox, conversation_id: String) {
        let watermark = self.marks.get(&conversation_id);
        if watermark <= self.acked.get(&conversation_id).copied().unwrap_or(0) {
            return;
        }
        self.unacked.insert(conversation_id);
        if self.ack_delay.is_zero() {
            self.flush_acks(out);
        } else if self.ack_due.is_none() {
            self.ack_due = Some(out.now + self.ack_delay);
        }
    }
}

/// A request the core made for itself.
#[derive(Debug)]
enum Internal {
    Sync,
    Fetch {
        conversation_id: String,
        until_seq: u64,
    },
}

/// One connection's sync and gap fetches.
#[derive(Debug, Default)]
pub(super) struct Catchup {
    /// The core's own requests in flight, by request id.
    internal: HashMap<u64, Internal>,
    /// Conversations with a fetch in flight or waiting for a slot.
    fetching: HashSet<String>,
    /// Fetches sent and not answered yet.
    fetches_in_flight: usize,
    /// Fetches waiting for one of the [`MAX_FETCHES_IN_FLIGHT`] slots.
    waiting: VecDeque<FetchMessages>,
    /// The `SyncRequest` pages are all answered.
    pages_done: bool,
    /// `Event::Synced` was emitted.
    synced: bool,
}

impl Catchup {
    /// Starts the sync of a fresh connection.
    pub(super) fn start(out: &mut Outbox) -> Catchup {
        let mut catchup = Catchup::default();
        catchup.sync_page(out, String::new());
        catchup
    }

    /// Whether `request_id` is one of this connection's own requests.
    pub(super) fn owns(&self, request_id: u64) -> bool {
        self.internal.contains_key(&request_id)
    }

    /// The answer to one of [`Catchup::owns`]'s requests.
    pub(super) fn on_answer(
        &mut self,
        request_id: u64,
        body: server_frame::Body,
        held: &mut Held,
        out: &mut Outbox,
    ) {
        let Some(internal) = self.internal.remove(&request_id) else {
            return;
        };
        if matches!(internal, Internal::Fetch { .. }) {
            self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
        }
        match (internal, body) {
            (Internal::Sync, server_frame::Body::Sync(response)) => {
                self.sync_answer(response, held, out);
            }
            (
                Internal::Fetch {
                    conversation_id,
                    until_seq,
                },
                server_frame::Body::Page(page),
            ) => {
                let last = page.messages.last().map(|m| m.seq);
                self.accept(page.messages, held, out);
                match last {
                    Some(last) if page.has_more => {
                        self.fetch(out, conversation_id, last, until_seq);
                    }
                    _ => {
                        self.fetching.remove(&conversation_id);
                        self.fill_gap(held, out, &conversation_id);
                    }
                }
            }
            (
                Internal::Fetch {
                    conversation_id, ..
                },
                other,
            ) => {
                // The fetch failed (e.g. no longer a member): stop fetching
                // this conversation instead of looping.
                tracing::warn!(conversation_id, answer = ?other, "gap fetch failed");
                self.fetching.remove(&conversation_id);
            }
            (Internal::Sync, other) => {
                tracing::warn!(answer = ?other, "sync failed");
                self.pages_done = true;
            }
        }
        while self.fetches_in_flight < MAX_FETCHES_IN_FLIGHT {
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            self.send_fetch(out, request);
        }
        self.maybe_synced(out);
    }

    /// Passes new messages to the application, drops duplicates, fetches
    /// gaps and acknowledges the new watermarks.
    pub(super) fn accept(&mut self, messages: Vec<v1::Message>, held: &mut Held, out: &mut Outbox) {
        let mut touched: Vec<String> = Vec::new();
        for message in messages {
            let arrival = held.marks.arrive(&message.conversation_id, message.seq);
            if let Arrival::New { gap } = arrival {
                let conversation_id = message.conversation_id.clone();
                out.event(Event::Message(message));
                if gap.is_some() {
                    self.fill_gap(held, out, &conversation_id);
                }
                if !touched.contains(&conversation_id) {
                    touched.push(conversation_id);
                }
            }
        }
        for conversation_id in touched {
            held.moved(out, conversation_id);
        }
    }

    /// Counts this device's own acknowledged send as held (it is part of
    /// the timeline: without this the next sync fetches it back), in a
    /// conversation the device already follows; a gap it leaves behind is
    /// fetched. In a conversation with no watermark yet nothing is marked:
    /// the sync that comes learns where this device stands, and a seq
    /// marked first would make it skip the backlog before it.
    pub(super) fn hold_own(
        &mut self,
        conversation_id: &str,
        seq: u64,
        held: &mut Held,
        out: &mut Outbox,
    ) {
        if seq == 0 || !held.marks.knows(conversation_id) {
            return;
        }
        if let Arrival::New { gap } = held.marks.arrive(conversation_id, seq) {
            if gap.is_some() {
                self.fill_gap(held, out, conversation_id);
            }
            held.moved(out, conversation_id.to_string());
        }
    }

    fn sync_page(&mut self, out: &mut Outbox, after: String) {
        let request_id = out.request(client_frame::Body::Sync(SyncRequest {
            after_conversation_id: after,
            limit: 0,
        }));
        self.internal.insert(request_id, Internal::Sync);
    }

    fn sync_answer(&mut self, response: SyncResponse, held: &mut Held, out: &mut Outbox) {
        for state in response.conversations {
            if !held.marks.knows(&state.conversation_id) {
                // A conversation new to this process starts where the
                // server says this device is.
                held.marks
                    .raise(&state.conversation_id, state.delivered_seq);
            }
            let after = held.marks.get(&state.conversation_id);
            if state.latest_seq > after && !self.fetching.contains(&state.conversation_id) {
                self.fetching.insert(state.conversation_id.clone());
                self.fetch(out, state.conversation_id, after, state.latest_seq);
            }
        }
        if response.has_more && !response.next_after_conversation_id.is_empty() {
            self.sync_page(out, response.next_after_conversation_id);
        } else {
            self.pages_done = true;
        }
    }

    /// Emits `Synced` once per connection, when the sync pages and every
    /// fetch they started are done.
    fn maybe_synced(&mut self, out: &mut Outbox) {
        if self.pages_done && self.fetching.is_empty() && !self.synced {
            self.synced = true;
            out.event(Event::Synced);
        }
    }

    fn fetch(&mut self, out: &mut Outbox, conversation_id: String, after_seq: u64, until_seq: u64) {
        let request = FetchMessages {
            conversation_id,
            after_seq,
            until_seq,
            limit: FETCH_LIMIT,
        };
        if self.fetches_in_flight >= MAX_FETCHES_IN_FLIGHT {
            self.waiting.push_back(request);
        } else {
            self.send_fetch(out, request);
        }
    }

    fn send_fetch(&mut self, out: &mut Outbox, request: FetchMessages) {
        let internal = Internal::Fetch {
            conversation_id: request.conversation_id.clone(),
            until_seq: request.until_seq,
        };
        let request_id = out.request(client_frame::Body::Fetch(request));
        self.internal.insert(request_id, internal);
        self.fetches_in_flight += 1;
    }

    /// Fetches the first remaining gap of a conversation, if any and if no
    /// fetch for it is already running.
    fn fill_gap(&mut self, held: &Held, out: &mut Outbox, conversation_id: &str) {
        if self.fetching.contains(conversation_id) {
            return;
        }
        if let Some((after, until)) = held.marks.first_gap(conversation_id) {
            self.fetching.insert(conversation_id.to_string());
            self.fetch(out, conversation_id.to_string(), after, until);
        }
    }
}
