//! Per-conversation delivery watermarks: which seqs this device already
//! holds, so duplicates (same conversation + seq, from a retried push or an
//! overlapping sync page) are dropped and gaps are noticed.
//!
//! A conversation's watermark is the highest seq held *without gaps*; seqs
//! above it that arrived early are remembered until the gap closes.

use std::collections::{BTreeSet, HashMap};

/// What happened to one incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New: hand it to the application.
    New {
        /// The first missing seq range `(after, until]` if this message
        /// left a gap behind it, to be fetched.
        gap: Option<(u64, u64)>,
    },
    /// Already held: drop it.
    Duplicate,
}

#[derive(Debug, Default, Clone)]
struct Conversation {
    /// Highest seq held with every seq below it.
    contiguous: u64,
    /// Seqs above `contiguous` already held.
    ahead: BTreeSet<u64>,
}

/// The watermarks of every conversation this device has seen.
#[derive(Debug, Default, Clone)]
pub struct Watermarks {
    conversations: HashMap<String, Conversation>,
}

impl Watermarks {
    /// Watermarks restored from what the application persisted.
    pub fn from_saved(saved: impl IntoIterator<Item = (String, u64)>) -> Watermarks {
        Watermarks {
            conversations: saved
                .into_iter()
                .map(|(id, seq)| {
                    (
                        id,
                        Conversation {
                            contiguous: seq,
                            ahead: BTreeSet::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Records a message. The first message of a conversation this device
    /// never saw sets the baseline (older history is the application's to
    /// fetch), unless the server reported a delivered position first
    /// ([`Watermarks::raise`]).
    pub fn arrive(&mut self, conversation_id: &str, seq: u64) -> Arrival {
        let conversation = self
            .conversations
            .entry(conversation_id.to_string())
            .or_insert_with(|| Conversation {
                contiguous: seq.saturating_sub(1),
                ahead: BTreeSet::new(),
            });
        if seq <= conversation.contiguous || !conversation.ahead.insert(seq) {
            return Arrival::Duplicate;
        }
        let gap = (seq > conversation.contiguous + 1).then(|| {
            // The missing range right above the watermark, up to the first
            // seq held beyond it.
            let until = conversation
                .ahead
                .iter()
                .next()
                .copied()
                .unwrap_or(seq)
                .saturating_sub(1);
            (conversation.contiguous, until)
        });
        while conversation.ahead.remove(&(conversation.contiguous + 1)) {
            conversation.contiguous += 1;
        }
        Arrival::New { gap }
    }

    /// Moves a conversation's watermark up to `seq` without messages (the
    /// server says this device already has them); never moves it down.
    pub fn raise(&mut self, conversation_id: &str, seq: u64) {
        let conversation = self
            .conversations
            .entry(conversation_id.to_string())
            .or_default();
        if seq > conversation.contiguous {
            conversation.contiguous = seq;
            conversation.ahead = conversation.ahead.split_off(&(seq + 1));
            while conversation.ahead.remove(&(conversation.contiguous + 1)) {
                conversation.contiguous += 1;
            }
        }
    }

    /// The watermark of a conversation (0 if never seen).
    pub fn get(&self, conversation_id: &str) -> u64 {
        self.conversations
            .get(conversation_id)
            .map_or(0, |c| c.contiguous)
    }

    /// Whether this conversation was seen at all.
    pub fn knows(&self, conversation_id: &str) -> bool {
        self.conversations.contains_key(conversation_id)
    }

    /// The first missing range of a conversation, if it has one.
    pub fn first_gap(&self, conversation_id: &str) -> Option<(u64, u64)> {
        let conversation = self.conversations.get(conversation_id)?;
        let first_ahead = *conversation.ahead.iter().next()?;
        Some((conversation.contiguous, first_ahead - 1))
    }

    /// Every watermark, for the application to persist.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut all: Vec<_> = self
            .conversations
            .iter()
            .map(|(id, c)| (id.clone(), c.contiguous))
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_dropped_and_gaps_reported() {
        let mut marks = Watermarks::from_saved([("g:1".to_string(), 0)]);
        assert_eq!(marks.arrive("g:1", 1), Arrival::New { gap: None });
        assert_eq!(marks.arrive("g:1", 1), Arrival::Duplicate);
        assert_eq!(marks.arrive("g:1", 4), Arrival::New { gap: Some((1, 3)) });
        assert_eq!(marks.arrive("g:1", 4), Arrival::Duplicate);
        assert_eq!(marks.get("g:1"), 1);
        assert_eq!(marks.first_gap("g:1"), Some((1, 3)));
        assert_eq!(marks.arrive("g:1", 3), Arrival::New { gap: Some((1, 2)) });
        assert_eq!(marks.arrive("g:1", 2), Arrival::New { gap: None });
        assert_eq!(marks.get("g:1"), 4);
        assert_eq!(marks.first_gap("g:1"), None);
    }

    #[test]
    fn an_unknown_conversation_starts_at_its_first_message() {
        let mut marks = Watermarks::default();
        assert_eq!(marks.arrive("dm:1:2", 57), Arrival::New { gap: None });
        assert_eq!(marks.get("dm:1:2"), 57);
        assert_eq!(marks.arrive("dm:1:2", 12), Arrival::Duplicate);
    }

    #[test]
    fn raising_skips_held_history_and_absorbs_early_seqs() {
        let mut marks = Watermarks::from_saved([("g:1".to_string(), 2)]);
        marks.arrive("g:1", 6);
        marks.raise("g:1", 5);
        assert_eq!(marks.get("g:1"), 6);
        marks.raise("g:1", 3);
        assert_eq!(marks.get("g:1"), 6, "never moves down");
        assert_eq!(marks.snapshot(), vec![("g:1".to_string(), 6)]);
    }
}
