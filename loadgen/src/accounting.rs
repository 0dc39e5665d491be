//! Delivery accounting: every acknowledged send is expected at each of its
//! recipients exactly once and, per conversation, in seq order. Whatever
//! falls short is lost; a seq seen twice is duplicated; a seq below one
//! already seen is out of order.

use std::collections::{HashMap, HashSet};

/// One recipient's view of one conversation.
#[derive(Debug, Default)]
struct Stream {
    highest: u64,
    seen: HashSet<u64>,
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
    streams: HashMap<(u64, String), Stream>,
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
        let stream = self
            .streams
            .entry((recipient, conversation_id.to_string()))
            .or_default();
        if !stream.seen.insert(seq) {
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
    fn the_same_seq_in_different_conversations_or_recipients_is_no_duplicate() {
        let mut ledger = Accounting::default();
        assert_eq!(ledger.deliver(1, "g:1", 1), Delivery::New);
        assert_eq!(ledger.deliver(1, "g:2", 1), Delivery::New);
        assert_eq!(ledger.deliver(2, "g:1", 1), Delivery::New);
        assert_eq!(ledger.counts().duplicated, 0);
    }
}
