//! Delivery accounting: every acknowledged send is expected at each of its
//! recipients exactly once and, per conversation, in seq order. Whatever
//! falls short is lost; a seq seen twice is duplicated; a seq below one
//! already seen is out of order.

use std::collections::{HashMap, HashSet};

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
    above: HashSet<u64>,
    /// Seen seqs below `base`.
    below: HashSet<u64>,
}

impl Stream {
    fn starting_at(seq: u64) -> Self {
        Self {
            base: seq,
            floor: seq,
            highest: seq,
            above: HashSet::new(),
            below: HashSet::new(),
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
}

/// Counts for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryCounts {
    /// Deliveries the acknowledged sends call for.
    pub expected: u64,
    /// Distinct deliveries that arrived.
    pub delivered: u64,
    /// Expected but never arrived.
    pub lost: u64,
    /// Arrived more than once.
    pub duplicated: u64,
    /// Arrived after a higher seq of the same conversation.
    pub out_of_order: u64,
}

impl DeliveryCounts {
    /// Whether anything went wrong.
    pub fn has_errors(&self) -> bool {
        self.lost > 0 || self.duplicated > 0 || self.out_of_order > 0
    }

    /// Sum of two processes' counts.
    pub fn merge(&mut self, other: &DeliveryCounts) {
        self.expected += other.expected;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
    }
}

/// The ledger of one run.
#[derive(Debug, Default)]
pub struct Accounting {
    expected: u64,
    /// recipient -> conversation -> what it got.
    streams: HashMap<u64, HashMap<String, Stream>>,
    delivered: u64,
    duplicated: u64,
    out_of_order: u64,
}

impl Accounting {
    /// An acknowledged send that `recipients` connections must receive.
    pub fn expect(&mut self, recipients: u64) {
        self.expected += recipients;
    }

    /// A delivery of `seq` in `conversation_id` to connection `recipient`.
    pub fn deliver(&mut self, recipient: u64, conversation_id: &str, seq: u64) -> Delivery {
        let conversations = self.streams.entry(recipient).or_default();
        let Some(stream) = conversations.get_mut(conversation_id) else {
            conversations.insert(conversation_id.to_string(), Stream::starting_at(seq));
            self.delivered += 1;
            return Delivery::New;
        };
        if !stream.insert(seq) {
            self.duplicated += 1;
            return Delivery::Duplicate;
        }
        self.delivered += 1;
        if seq < stream.highest {
            self.out_of_order += 1;
            return Delivery::OutOfOrder;
        }
        stream.highest = seq;
        Delivery::New
    }

    /// The counts so far; `lost` is what is still missing.
    pub fn counts(&self) -> DeliveryCounts {
        DeliveryCounts {
            expected: self.expected,
            delivered: self.delivered,
            lost: self.expected.saturating_sub(self.delivered),
            duplicated: self.duplicated,
            out_of_order: self.out_of_order,
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
            }
        );
        assert!(counts.has_errors());
        let mut clean = Accounting::default();
        clean.expect(1);
        clean.deliver(1, "dm:1:2", 1);
        assert!(!clean.counts().has_errors());
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
        let stream = &ledger.streams[&1]["g:1"];
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
}
