//! Delivery accounting: every acknowledged send is expected at each of its
//! recipients exactly once and, per conversation, in seq order. Whatever
//! falls short is lost; a seq pushed twice is duplicated; a seq pushed
//! below one already seen is out of order; one send (the sender's counter
//! in the body) arriving under two seqs was stored twice.
//!
//! A connection that dropped fetches what it missed after it reconnects:
//! those arrivals are recovered, never out of order (the fetch fills the
//! gap behind the pushes that came meanwhile), and a push of a seq the
//! fetch already brought, or a fetched seq already pushed, is the expected
//! overlap of the two paths, not a duplicate. A send retried with its
//! client_msg_id is answered from the idempotency record and fanned out
//! again (at-least-once delivery, docs/router.md): a second push of it is
//! a redelivery the client drops by seq, not a duplicate.
//!
//! Each connection keeps its own ledger (no lock on the receive path); the
//! run absorbs them all at the end. Only the sends retried are shared:
//! senders note them, and recipients ask when a push repeats.

use std::collections::HashSet;
use std::sync::Mutex;

use rustc_hash::{FxHashMap, FxHashSet};

/// One recipient's view of one conversation. Seqs arrive mostly in order,
/// so what was seen is kept as a contiguous range plus the few seqs outside
/// it: memory stays flat over a long run instead of one entry per message.
#[derive(Debug)]
struct Stream {
    /// The first seq seen; seqs below it (late arrivals) go to `below`.
    base: u64,
    /// Every seq in `base..=floor` was seen.
    floor: u64,
    highest: u64,
    /// Seen seqs above `floor + 1` (a gap before them).
    above: FxHashSet<u64>,
    /// Seen seqs below `base`.
    below: FxHashSet<u64>,
}

impl Stream {
    fn starting_at(seq: u64) -> Self {
        Self {
            base: seq,
            floor: seq,
            highest: seq,
            above: FxHashSet::default(),
            below: FxHashSet::default(),
        }
    }

    /// Records `seq`; false if it was seen before.
    fn insert(&mut self, seq: u64) -> bool {
        if seq < self.base {
            return self.below.insert(seq);
        }
        if seq <= self.floor {
            return false;
        }
        if seq != self.floor + 1 {
            return self.above.insert(seq);
        }
        self.floor = seq;
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        true
    }
}

/// The verdict on one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// First time, in order.
    New,
    /// First time, but below a seq this recipient already got.
    OutOfOrder,
    /// Seen before.
    Duplicate,
    /// Fetched after a reconnect, not seen before.
    Recovered,
    /// Seen before through the other path (push and fetch).
    Overlap,
    /// Pushed again after its sender retried the send.
    Redelivered,
    /// A new seq for a send already seen under another seq.
    StoredTwice,
}

/// What one recipient holds of one conversation.
#[derive(Debug)]
struct Held {
    seqs: Stream,
    /// Seqs that came through a fetch and were not pushed (yet): a later
    /// push of one is an overlap.
    fetched: FxHashSet<u64>,
    /// Sender -> the counters of its sends seen (kept like seqs).
    counters: FxHashMap<u64, Stream>,
}

impl Held {
    fn starting_at(seq: u64) -> Self {
        Held {
            seqs: Stream::starting_at(seq),
            fetched: FxHashSet::default(),
            counters: FxHashMap::default(),
        }
    }
}

/// Counts for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryCounts {
    /// Deliveries the acknowledged sends call for.
    pub expected: u64,
    /// Distinct deliveries (by seq) that arrived, pushed or recovered.
    pub delivered: u64,
    /// Expected but never arrived.
    pub lost: u64,
    /// Pushed more than once.
    pub duplicated: u64,
    /// Pushed after a higher seq of the same conversation.
    pub out_of_order: u64,
    /// One send that arrived under two different seqs (stored twice).
    #[serde(default)]
    pub stored_twice: u64,
    /// Of `delivered`, the ones fetched after a reconnect.
    #[serde(default)]
    pub recovered: u64,
    /// Seqs that came both pushed and fetched (expected after a
    /// reconnect, not an error).
    #[serde(default)]
    pub overlaps: u64,
    /// Seqs pushed again after their sender retried the send (expected,
    /// not an error).
    #[serde(default)]
    pub redelivered: u64,
}

impl DeliveryCounts {
    /// Whether anything went wrong.
    pub fn has_errors(&self) -> bool {
        self.lost > 0 || self.duplicated > 0 || self.out_of_order > 0 || self.stored_twice > 0
    }

    /// Sum of two processes' counts.
    pub fn merge(&mut self, other: &DeliveryCounts) {
        self.expected += other.expected;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.stored_twice += other.stored_twice;
        self.recovered += other.recovered;
        self.overlaps += other.overlaps;
        self.redelivered += other.redelivered;
    }
}

/// How a delivery reached the recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Pushed live (`Deliver`).
    Pushed,
    /// Fetched after a reconnect (`MessagePage`).
    Fetched,
}

/// One delivery of one of this run's messages.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// The receiving connection.
    pub recipient: u64,
    pub conversation_id: &'a str,
    pub seq: u64,
    /// The sending user.
    pub sender: u64,
    /// The sender's counter of that send (the same on every retry).
    pub counter: u64,
    pub path: Path,
}

/// The sends retried in a run, which every ledger consults when a push
/// repeats.
#[derive(Debug, Default)]
pub struct Retries {
    /// (sender, counter) of every send sent more than once.
    retried: Mutex<HashSet<(u64, u64)>>,
    /// Every repeated push is a redelivery (a run that kills a worker).
    accept_all: bool,
}

impl Retries {
    /// Counts every repeated push as a redelivery when `accept_all` (the
    /// router's at-least-once delivery after a worker's partitions move),
    /// else only those after a retry.
    pub fn new(accept_all: bool) -> Self {
        Retries {
            accept_all,
            ..Retries::default()
        }
    }

    /// `sender` sends its send `counter` again (before it goes out, so the
    /// redelivery it may cause is known when it arrives).
    pub fn retrying(&self, sender: u64, counter: u64) {
        self.retried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sender, counter));
    }

    fn excuse(&self, sender: u64, counter: u64) -> bool {
        self.accept_all
            || self
                .retried
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&(sender, counter))
    }
}

/// A ledger: one connection's (what it sent that was acknowledged, what
/// reached it), or a run's once it has absorbed them all.
#[derive(Debug, Default)]
pub struct Accounting {
    /// recipient -> conversation -> what it got.
    streams: FxHashMap<u64, FxHashMap<String, Held>>,
    /// Every count but `lost`, which `counts()` derives from the totals
    /// (a connection's ledger alone cannot tell what is missing).
    tally: DeliveryCounts,
}

impl Accounting {
    /// An acknowledged send that `recipients` connections must receive.
    pub fn expect(&mut self, recipients: u64) {
        self.tally.expected += recipients;
    }

    /// A pushed delivery of `seq` in `conversation_id` to connection
    /// `recipient` (of a send whose counter is unknown: no stored-twice
    /// check).
    #[cfg(test)]
    pub fn deliver(&mut self, recipient: u64, conversation_id: &str, seq: u64) -> Delivery {
        self.arrive(
            Arrival {
                recipient,
                conversation_id,
                seq,
                sender: 0,
                counter: 0,
                path: Path::Pushed,
            },
            &Retries::default(),
        )
    }

    /// One arrival, pushed or fetched.
    pub fn arrive(&mut self, arrival: Arrival<'_>, retries: &Retries) -> Delivery {
        let conversations = self.streams.entry(arrival.recipient).or_default();
        // One lookup on the hot path (a conversation already held).
        let (held, new) = match conversations.get_mut(arrival.conversation_id) {
            Some(held) => {
                let new = held.seqs.insert(arrival.seq);
                (held, new)
            }
            None => (
                conversations
                    .entry(arrival.conversation_id.to_string())
                    .or_insert_with(|| Held::starting_at(arrival.seq)),
                true,
            ),
        };
        if !new {
            // Seen before: a repeat of the same path is a duplicate push
            // (or a refetch of what a fetch brought: harmless); across the
            // paths, the overlap a reconnect brings.
            return match arrival.path {
                Path::Pushed if held.fetched.remove(&arrival.seq) => {
                    self.tally.overlaps += 1;
                    Delivery::Overlap
                }
                Path::Pushed if retries.excuse(arrival.sender, arrival.counter) => {
                    self.tally.redelivered += 1;
                    Delivery::Redelivered
                }
                Path::Pushed => {
                    self.tally.duplicated += 1;
                    Delivery::Duplicate
                }
                Path::Fetched => {
                    self.tally.overlaps += 1;
                    Delivery::Overlap
                }
            };
        }
        self.tally.delivered += 1;
        if arrival.counter != 0 {
            let fresh = match held.counters.get_mut(&arrival.sender) {
                Some(seen) => seen.insert(arrival.counter),
                None => {
                    held.counters
                        .insert(arrival.sender, Stream::starting_at(arrival.counter));
                    true
                }
            };
            if !fresh {
                self.tally.stored_twice += 1;
                return Delivery::StoredTwice;
            }
        }
        match arrival.path {
            Path::Fetched => {
                held.fetched.insert(arrival.seq);
                held.seqs.highest = held.seqs.highest.max(arrival.seq);
                self.tally.recovered += 1;
                Delivery::Recovered
            }
            Path::Pushed if arrival.seq < held.seqs.highest => {
                self.tally.out_of_order += 1;
                Delivery::OutOfOrder
            }
            Path::Pushed => {
                held.seqs.highest = arrival.seq;
                Delivery::New
            }
        }
    }

    /// Adds a connection's ledger to this one (recipients are distinct per
    /// connection, so their streams are not merged, only counted).
    pub fn absorb(&mut self, other: &Accounting) {
        self.tally.merge(&other.tally);
    }

    /// The counts so far; `lost` is what is still missing (a send stored
    /// twice counts once towards what arrived).
    pub fn counts(&self) -> DeliveryCounts {
        let tally = self.tally;
        DeliveryCounts {
            lost: tally
                .expected
                .saturating_sub(tally.delivered - tally.stored_twice),
            ..tally
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_duplicated_and_reordered_deliveries_are_counted() {
        let mut ledger = Accounting::default();
        ledger.expect(2); // seq 1 to recipients 10 and 11
        ledger.expect(2); // seq 2
        ledger.expect(2); // seq 3
        assert_eq!(ledger.deliver(10, "g:1", 1), Delivery::New);
        assert_eq!(ledger.deliver(10, "g:1", 3), Delivery::New);
        assert_eq!(ledger.deliver(10, "g:1", 2), Delivery::OutOfOrder);
        assert_eq!(ledger.deliver(10, "g:1", 3), Delivery::Duplicate);
        assert_eq!(ledger.deliver(11, "g:1", 1), Delivery::New);
        assert_eq!(ledger.deliver(11, "g:1", 2), Delivery::New);
        // recipient 11 never gets seq 3.
        let counts = ledger.counts();
        assert_eq!(
            counts,
            DeliveryCounts {
                expected: 6,
                delivered: 5,
                lost: 1,
                duplicated: 1,
                out_of_order: 1,
                ..DeliveryCounts::default()
            }
        );
        assert!(counts.has_errors());
        let mut clean = Accounting::default();
        clean.expect(1);
        clean.deliver(1, "dm:1:2", 1);
        assert!(!clean.counts().has_errors());
    }

    #[test]
    fn a_run_absorbs_its_connections_ledgers_and_counts_loss_from_the_totals() {
        // The sender's ledger expects two deliveries; each recipient's
        // ledger sees what reached it (one lost at the second recipient).
        let mut sender = Accounting::default();
        sender.expect(2);
        sender.expect(2);
        let mut first = Accounting::default();
        first.deliver(10, "g:1", 1);
        first.deliver(10, "g:1", 2);
        let mut second = Accounting::default();
        second.deliver(11, "g:1", 1);
        second.deliver(11, "g:1", 1);
        let mut run = Accounting::default();
        for ledger in [&sender, &first, &second] {
            run.absorb(ledger);
        }
        let counts = run.counts();
        assert_eq!(
            counts,
            DeliveryCounts {
                expected: 4,
                delivered: 3,
                lost: 1,
                duplicated: 1,
                ..DeliveryCounts::default()
            }
        );
    }

    #[test]
    fn gaps_late_arrivals_and_repeats_are_told_apart() {
        use Delivery::{Duplicate, New, OutOfOrder};
        let mut ledger = Accounting::default();
        let arrivals = [
            (10, New),
            (12, New),
            (11, OutOfOrder),
            (13, New),
            (12, Duplicate),
            (9, OutOfOrder),
            (9, Duplicate),
            (10, Duplicate),
        ];
        for (seq, verdict) in arrivals {
            assert_eq!(ledger.deliver(1, "g:1", seq), verdict, "seq {seq}");
        }
        for seq in 14..10_000 {
            assert_eq!(ledger.deliver(1, "g:1", seq), Delivery::New);
        }
        let stream = &ledger.streams[&1]["g:1"].seqs;
        assert!(stream.above.is_empty(), "in-order seqs keep no entries");
        assert_eq!(stream.floor, 9_999);
        assert_eq!(ledger.counts().duplicated, 3);
        assert_eq!(ledger.counts().out_of_order, 2);
    }

    #[test]
    fn the_same_seq_in_different_conversations_or_recipients_is_no_duplicate() {
        let mut ledger = Accounting::default();
        assert_eq!(ledger.deliver(1, "g:1", 1), Delivery::New);
        assert_eq!(ledger.deliver(1, "g:2", 1), Delivery::New);
        assert_eq!(ledger.deliver(2, "g:1", 1), Delivery::New);
        assert_eq!(ledger.counts().duplicated, 0);
    }

    impl Accounting {
        /// An arrival with no send retried.
        fn arrive_now(&mut self, arrival: Arrival<'_>) -> Delivery {
            self.arrive(arrival, &Retries::default())
        }
    }

    fn arrival(seq: u64, counter: u64, path: Path) -> Arrival<'static> {
        Arrival {
            recipient: 7,
            conversation_id: "dm:1:2",
            seq,
            sender: 1,
            counter,
            path,
        }
    }

    #[test]
    fn a_reconnect_recovers_the_gap_without_reorder_or_duplicates() {
        use Delivery::{New, Overlap, Recovered};
        use Path::{Fetched, Pushed};
        let mut ledger = Accounting::default();
        ledger.expect(6);
        // Pushed 1 and 2, then the connection dropped; 3 and 4 went to the
        // dead gateway; after the reconnect 6 is pushed before the fetch
        // answers with 3..=6 (6 both ways), and 5 is pushed late.
        assert_eq!(ledger.arrive_now(arrival(1, 1, Pushed)), New);
        assert_eq!(ledger.arrive_now(arrival(2, 2, Pushed)), New);
        assert_eq!(ledger.arrive_now(arrival(6, 6, Pushed)), New);
        assert_eq!(ledger.arrive_now(arrival(3, 3, Fetched)), Recovered);
        assert_eq!(ledger.arrive_now(arrival(4, 4, Fetched)), Recovered);
        assert_eq!(ledger.arrive_now(arrival(5, 5, Fetched)), Recovered);
        assert_eq!(ledger.arrive_now(arrival(6, 6, Fetched)), Overlap);
        assert_eq!(ledger.arrive_now(arrival(5, 5, Pushed)), Overlap);
        let counts = ledger.counts();
        assert_eq!(
            counts,
            DeliveryCounts {
                expected: 6,
                delivered: 6,
                recovered: 3,
                overlaps: 2,
                ..DeliveryCounts::default()
            }
        );
        assert!(!counts.has_errors());
    }

    #[test]
    fn a_push_repeated_after_its_overlap_is_a_duplicate() {
        use Path::{Fetched, Pushed};
        let mut ledger = Accounting::default();
        ledger.expect(1);
        ledger.arrive_now(arrival(1, 1, Fetched));
        assert_eq!(ledger.arrive_now(arrival(1, 1, Pushed)), Delivery::Overlap);
        assert_eq!(
            ledger.arrive_now(arrival(1, 1, Pushed)),
            Delivery::Duplicate
        );
        assert_eq!(ledger.counts().duplicated, 1);
        assert!(ledger.counts().has_errors());
    }

    #[test]
    fn a_push_repeated_after_the_sender_retried_is_a_redelivery() {
        use Path::Pushed;
        let mut ledger = Accounting::default();
        ledger.expect(2);
        assert_eq!(ledger.arrive_now(arrival(1, 1, Pushed)), Delivery::New);
        assert_eq!(ledger.arrive_now(arrival(2, 2, Pushed)), Delivery::New);
        // Sender 1 retries counter 1 (its ack was lost): the server answers
        // from the idempotency record and pushes seq 1 again.
        let retries = Retries::new(false);
        retries.retrying(1, 1);
        assert_eq!(
            ledger.arrive(arrival(1, 1, Pushed), &retries),
            Delivery::Redelivered
        );
        // Counter 2 was never retried: its second push is a duplicate.
        assert_eq!(
            ledger.arrive(arrival(2, 2, Pushed), &retries),
            Delivery::Duplicate
        );
        let counts = ledger.counts();
        assert_eq!((counts.redelivered, counts.duplicated), (1, 1));
        assert_eq!(counts.lost, 0);
        // A run that kills a worker accepts every repeated push.
        let mut ledger = Accounting::default();
        ledger.expect(1);
        let accept_all = Retries::new(true);
        ledger.arrive(arrival(1, 1, Pushed), &accept_all);
        assert_eq!(
            ledger.arrive(arrival(1, 1, Pushed), &accept_all),
            Delivery::Redelivered
        );
        assert!(!ledger.counts().has_errors());
    }

    #[test]
    fn a_retried_send_stored_under_two_seqs_is_caught_and_a_loss_not_hidden() {
        use Path::{Fetched, Pushed};
        let mut ledger = Accounting::default();
        // Three acknowledged sends (counters 1..=3); counter 2's retry was
        // stored again as seq 3, and counter 3 (seq 4) never arrived.
        ledger.expect(3);
        assert_eq!(ledger.arrive_now(arrival(1, 1, Pushed)), Delivery::New);
        assert_eq!(ledger.arrive_now(arrival(2, 2, Pushed)), Delivery::New);
        assert_eq!(
            ledger.arrive_now(arrival(3, 2, Fetched)),
            Delivery::StoredTwice
        );
        let counts = ledger.counts();
        assert_eq!(counts.stored_twice, 1);
        assert_eq!(counts.delivered, 3);
        assert_eq!(counts.lost, 1, "three seqs arrived, but only two sends");
        assert!(counts.has_errors());
        // Another sender's counters are its own.
        let mut other = arrival(5, 1, Pushed);
        other.sender = 2;
        assert_eq!(ledger.arrive_now(other), Delivery::New);
    }
}
