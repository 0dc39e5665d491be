//! The ScyllaDB schema and every statement the store prepares, as text, so
//! tests can check them without a server; and the bucketing arithmetic of
//! message partitions.
//!
//! Partitions stay bounded by construction: a timeline partition is
//! `(conversation_id, bucket)` with `bucket = seq / BUCKET_SEQS`, so none
//! holds more than [`BUCKET_SEQS`] messages (a few MB), and a page
//! `after < seq <= until` reads the buckets computed from the seqs alone.
//! Keys are deterministic (ids, conversation keys from `codec.rs`, seqs), so
//! a repeated write lands on the same row. Lightweight transactions (LWT)
//! are used only where two writers can race: the seq fence (`INSERT ...
//! IF NOT EXISTS` on `(conversation, bucket, seq)`), the idempotency claim,
//! id counters, usernames, token generations and watermarks.

use std::ops::RangeInclusive;

use crate::Seq;

/// Messages per timeline partition.
pub const BUCKET_SEQS: u64 = 10_000;

/// The bucket (partition) of a seq.
pub fn bucket_of(seq: Seq) -> i64 {
    (seq / BUCKET_SEQS) as i64
}

/// The buckets that hold `after < seq <= until`, in order (`until >= after
/// + 1`).
pub fn buckets(after: Seq, until: Seq) -> RangeInclusive<i64> {
    bucket_of(after.saturating_add(1))..=bucket_of(until)
}

/// `CREATE KEYSPACE` for `keyspace` (validated by the caller: `[a-z0-9_]`).
/// Tablets are disabled: ScyllaDB refuses LWT in tablet keyspaces.
pub fn create_keyspace(keyspace: &str, replication_factor: u32) -> String {
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', 'replication_factor': {replication_factor}}} \
         AND tablets = {{'enabled': false}}"
    )
}

/// The tables, created at start (`IF NOT EXISTS`, in the session's keyspace).
pub const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS id_counters (name text PRIMARY KEY, next bigint)",
    "CREATE TABLE IF NOT EXISTS users (id bigint PRIMARY KEY, username text, \
     password_hash text, created_ms bigint)",
    "CREATE TABLE IF NOT EXISTS usernames (username text PRIMARY KEY, id bigint)",
    "CREATE TABLE IF NOT EXISTS devices (user_id bigint, device_id text, \
     token_generation bigint, last_login_ms bigint, PRIMARY KEY (user_id, device_id))",
    "CREATE TABLE IF NOT EXISTS groups (id bigint PRIMARY KEY, name text, owner_id bigint, \
     created_ms bigint)",
    "CREATE TABLE IF NOT EXISTS group_member_counts (id bigint PRIMARY KEY, \
     member_count counter)",
    "CREATE TABLE IF NOT EXISTS members (group_id bigint, user_id bigint, role tinyint, \
     PRIMARY KEY (group_id, user_id))",
    "CREATE TABLE IF NOT EXISTS user_conversations (user_id bigint, conversation_id blob, \
     PRIMARY KEY (user_id, conversation_id))",
    "CREATE TABLE IF NOT EXISTS conversations (conversation_id blob PRIMARY KEY, \
     latest_seq bigint)",
    "CREATE TABLE IF NOT EXISTS messages (conversation_id blob, bucket bigint, seq bigint, \
     msg_id text, sender_id bigint, sender_device text, client_msg_id text, \
     content_type int, body blob, server_time_ms bigint, \
     PRIMARY KEY ((conversation_id, bucket), seq)) WITH CLUSTERING ORDER BY (seq ASC)",
    "CREATE TABLE IF NOT EXISTS idempotency (sender_id bigint, client_msg_id text, \
     conversation_id blob, seq bigint, trying_seq bigint, claimed_ms bigint, \
     PRIMARY KEY ((sender_id, client_msg_id)))",
    "CREATE TABLE IF NOT EXISTS delivered (user_id bigint, device_id text, \
     conversation_id blob, seq bigint, PRIMARY KEY ((user_id, device_id), conversation_id))",
    "CREATE TABLE IF NOT EXISTS read_marks (user_id bigint, conversation_id blob, seq bigint, \
     PRIMARY KEY (user_id, conversation_id))",
    "CREATE TABLE IF NOT EXISTS dead_letters (part int, id bigint, kind text, payload blob, \
     code int, error text, attempts int, created_ms bigint, PRIMARY KEY (part, id))",
];

// Id counters (users, groups, dead letters): ascending, never reused.
pub const READ_COUNTER: &str = "SELECT next FROM id_counters WHERE name = ?";
pub const START_COUNTER: &str = "INSERT INTO id_counters (name, next) VALUES (?, ?) IF NOT EXISTS";
pub const ADVANCE_COUNTER: &str = "UPDATE id_counters SET next = ? WHERE name = ? IF next = ?";

// Users and devices.
pub const CLAIM_USERNAME: &str = "INSERT INTO usernames (username, id) VALUES (?, ?) IF NOT EXISTS";
pub const INSERT_USER: &str =
    "INSERT INTO users (id, username, password_hash, created_ms) VALUES (?, ?, ?, ?)";
pub const USER_BY_ID: &str =
    "SELECT id, username, password_hash, created_ms FROM users WHERE id = ?";
pub const USER_ID_BY_NAME: &str = "SELECT id FROM usernames WHERE username = ?";
pub const CREATE_DEVICE: &str = "INSERT INTO devices (user_id, device_id, token_generation, \
     last_login_ms) VALUES (?, ?, 0, ?) IF NOT EXISTS";
pub const TOUCH_DEVICE: &str =
    "UPDATE devices SET last_login_ms = ? WHERE user_id = ? AND device_id = ?";
pub const DEVICE: &str = "SELECT user_id, device_id, token_generation, last_login_ms \
     FROM devices WHERE user_id = ? AND device_id = ?";
pub const BUMP_GENERATION: &str = "UPDATE devices SET token_generation = ? \
     WHERE user_id = ? AND device_id = ? IF token_generation = ?";

// Groups and members.
pub const INSERT_GROUP: &str =
    "INSERT INTO groups (id, name, owner_id, created_ms) VALUES (?, ?, ?, ?)";
pub const GROUP: &str = "SELECT id, name, owner_id, created_ms FROM groups WHERE id = ?";
pub const MEMBER_COUNT: &str = "SELECT member_count FROM group_member_counts WHERE id = ?";
pub const ADD_MEMBER_COUNT: &str =
    "UPDATE group_member_counts SET member_count = member_count + ? WHERE id = ?";
pub const INSERT_MEMBER: &str =
    "INSERT INTO members (group_id, user_id, role) VALUES (?, ?, ?) IF NOT EXISTS";
pub const REMOVE_MEMBER: &str = "DELETE FROM members WHERE group_id = ? AND user_id = ? IF EXISTS";
pub const MEMBER_ROLE: &str = "SELECT role FROM members WHERE group_id = ? AND user_id = ?";
pub const MEMBERS_PAGE: &str =
    "SELECT user_id, role FROM members WHERE group_id = ? AND user_id > ? LIMIT ?";
pub const INDEX_CONVERSATION: &str =
    "INSERT INTO user_conversations (user_id, conversation_id) VALUES (?, ?)";
pub const UNINDEX_CONVERSATION: &str =
    "DELETE FROM user_conversations WHERE user_id = ? AND conversation_id = ?";
pub const USER_CONVERSATIONS: &str = "SELECT conversation_id FROM user_conversations \
     WHERE user_id = ? AND conversation_id > ? LIMIT ?";

// Messages: the idempotency claim, the seq fence, the counter.
pub const CLAIM_KEY: &str = "INSERT INTO idempotency (sender_id, client_msg_id, conversation_id, \
     seq, trying_seq, claimed_ms) VALUES (?, ?, ?, 0, 0, ?) IF NOT EXISTS";
pub const READ_KEY: &str = "SELECT conversation_id, seq, trying_seq, claimed_ms FROM idempotency \
     WHERE sender_id = ? AND client_msg_id = ?";
pub const TAKE_OVER_KEY: &str = "UPDATE idempotency SET claimed_ms = ? \
     WHERE sender_id = ? AND client_msg_id = ? IF seq = 0 AND claimed_ms = ?";
pub const TRYING_SEQ: &str =
    "UPDATE idempotency SET trying_seq = ? WHERE sender_id = ? AND client_msg_id = ?";
pub const SETTLE_KEY: &str =
    "UPDATE idempotency SET seq = ? WHERE sender_id = ? AND client_msg_id = ?";
pub const INSERT_MESSAGE: &str = "INSERT INTO messages (conversation_id, bucket, seq, msg_id, \
     sender_id, sender_device, client_msg_id, content_type, body, server_time_ms) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS";
pub const MESSAGE_COLUMNS: &str = "seq, msg_id, sender_id, sender_device, client_msg_id, \
     content_type, body, server_time_ms";
pub const MESSAGE: &str = "SELECT seq, msg_id, sender_id, sender_device, client_msg_id, \
     content_type, body, server_time_ms FROM messages \
     WHERE conversation_id = ? AND bucket = ? AND seq = ?";
pub const MESSAGES_PAGE: &str = "SELECT seq, msg_id, sender_id, sender_device, client_msg_id, \
     content_type, body, server_time_ms FROM messages \
     WHERE conversation_id = ? AND bucket = ? AND seq > ? AND seq <= ? LIMIT ?";
pub const LATEST_SEQ: &str = "SELECT latest_seq FROM conversations WHERE conversation_id = ?";
pub const START_LATEST: &str =
    "INSERT INTO conversations (conversation_id, latest_seq) VALUES (?, ?) IF NOT EXISTS";
pub const RAISE_LATEST: &str =
    "UPDATE conversations SET latest_seq = ? WHERE conversation_id = ? IF latest_seq < ?";

// Watermarks: raised, never lowered.
pub const DELIVERED: &str =
    "SELECT seq FROM delivered WHERE user_id = ? AND device_id = ? AND conversation_id = ?";
pub const START_DELIVERED: &str = "INSERT INTO delivered (user_id, device_id, conversation_id, \
     seq) VALUES (?, ?, ?, ?) IF NOT EXISTS";
pub const RAISE_DELIVERED: &str = "UPDATE delivered SET seq = ? \
     WHERE user_id = ? AND device_id = ? AND conversation_id = ? IF seq < ?";
pub const READ_MARK: &str = "SELECT seq FROM read_marks WHERE user_id = ? AND conversation_id = ?";
pub const START_READ_MARK: &str =
    "INSERT INTO read_marks (user_id, conversation_id, seq) VALUES (?, ?, ?) IF NOT EXISTS";
pub const RAISE_READ_MARK: &str =
    "UPDATE read_marks SET seq = ? WHERE user_id = ? AND conversation_id = ? IF seq < ?";

// Dead letters: one partition (they are few, and read in id order).
pub const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters (part, id, kind, payload, code, \
     error, attempts, created_ms) VALUES (0, ?, ?, ?, ?, ?, ?, ?)";
pub const DEAD_LETTERS: &str = "SELECT id, kind, payload, code, error, attempts, created_ms \
     FROM dead_letters WHERE part = 0 AND id > ? LIMIT ?";
pub const REMOVE_DEAD_LETTER: &str = "DELETE FROM dead_letters WHERE part = 0 AND id = ? IF EXISTS";
pub const COUNT_DEAD_LETTERS: &str = "SELECT COUNT(*) FROM dead_letters WHERE part = 0";

/// Every statement prepared at start, for the tests that check them.
pub const PREPARED: &[&str] = &[
    READ_COUNTER,
    START_COUNTER,
    ADVANCE_COUNTER,
    CLAIM_USERNAME,
    INSERT_USER,
    USER_BY_ID,
    USER_ID_BY_NAME,
    CREATE_DEVICE,
    TOUCH_DEVICE,
    DEVICE,
    BUMP_GENERATION,
    INSERT_GROUP,
    GROUP,
    MEMBER_COUNT,
    ADD_MEMBER_COUNT,
    INSERT_MEMBER,
    REMOVE_MEMBER,
    MEMBER_ROLE,
    MEMBERS_PAGE,
    INDEX_CONVERSATION,
    UNINDEX_CONVERSATION,
    USER_CONVERSATIONS,
    CLAIM_KEY,
    READ_KEY,
    TAKE_OVER_KEY,
    TRYING_SEQ,
    SETTLE_KEY,
    INSERT_MESSAGE,
    MESSAGE,
    MESSAGES_PAGE,
    LATEST_SEQ,
    START_LATEST,
    RAISE_LATEST,
    DELIVERED,
    START_DELIVERED,
    RAISE_DELIVERED,
    READ_MARK,
    START_READ_MARK,
    RAISE_READ_MARK,
    INSERT_DEAD_LETTER,
    DEAD_LETTERS,
    REMOVE_DEAD_LETTER,
    COUNT_DEAD_LETTERS,
];

/// How many `?` markers a statement binds.
pub fn bind_markers(statement: &str) -> usize {
    statement.matches('?').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_partitions_and_cover_a_page() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(9_999), 0);
        assert_eq!(bucket_of(10_000), 1);
        assert_eq!(bucket_of(u64::MAX), (u64::MAX / BUCKET_SEQS) as i64);
        assert_eq!(buckets(0, 100), 0..=0);
        assert_eq!(buckets(9_999, 10_000), 1..=1, "after is excluded");
        assert_eq!(buckets(9_998, 10_001), 0..=1);
        assert_eq!(buckets(5, 35_000), 0..=3);
        // A page never needs more buckets than its span allows.
        for (after, until) in [(0u64, 1000u64), (9_500, 10_499), (123_456, 124_455)] {
            let n = buckets(after, until).count() as u64;
            assert!(n <= (until - after).div_ceil(BUCKET_SEQS) + 1);
        }
    }

    #[test]
    fn statements_bind_what_the_store_passes() {
        // (statement, values the store binds): the store's call sites pass
        // tuples of exactly these lengths.
        for (statement, binds) in [
            (CLAIM_KEY, 4),
            (INSERT_MESSAGE, 10),
            (MESSAGES_PAGE, 5),
            (RAISE_LATEST, 3),
            (BUMP_GENERATION, 4),
            (ADVANCE_COUNTER, 3),
            (TAKE_OVER_KEY, 4),
            (RAISE_DELIVERED, 5),
            (INSERT_DEAD_LETTER, 7),
            (MEMBERS_PAGE, 3),
            (USER_CONVERSATIONS, 3),
        ] {
            assert_eq!(bind_markers(statement), binds, "{statement}");
        }
    }

    #[test]
    fn lwt_only_where_writers_race_and_reads_stay_in_a_partition() {
        let conditional: Vec<&str> = PREPARED
            .iter()
            .copied()
            .filter(|s| s.contains(" IF "))
            .collect();
        for statement in &conditional {
            let racing = [
                "id_counters",
                "usernames",
                "devices",
                "members",
                "idempotency",
                "messages",
                "conversations",
                "delivered",
                "read_marks",
                "dead_letters",
            ];
            assert!(racing.iter().any(|t| statement.contains(t)), "{statement}");
        }
        // The seq fence: a seq is taken by exactly one applied insert.
        assert!(INSERT_MESSAGE.ends_with("IF NOT EXISTS"));
        // Plain (non-LWT) upserts on deterministic keys elsewhere.
        for plain in [
            INSERT_USER,
            INSERT_GROUP,
            INDEX_CONVERSATION,
            TRYING_SEQ,
            SETTLE_KEY,
        ] {
            assert!(!plain.contains(" IF "), "{plain}");
        }
        // Every read names its whole partition key: no scans, no ALLOW FILTERING.
        for statement in PREPARED.iter().filter(|s| s.starts_with("SELECT")) {
            assert!(statement.contains(" WHERE "), "{statement}");
            assert!(!statement.contains("ALLOW FILTERING"), "{statement}");
        }
        assert!(MESSAGES_PAGE.contains("conversation_id = ? AND bucket = ?"));
        assert!(MESSAGE.contains(MESSAGE_COLUMNS));
    }

    #[test]
    fn the_schema_buckets_timelines_and_disables_tablets_for_lwt() {
        let messages = TABLES.iter().find(|t| t.contains(" messages ")).unwrap();
        assert!(messages.contains("PRIMARY KEY ((conversation_id, bucket), seq)"));
        let keyspace = create_keyspace("pingme", 3);
        assert!(keyspace.contains("'replication_factor': 3"));
        assert!(keyspace.contains("tablets = {'enabled': false}"));
        assert_eq!(TABLES.len(), 14);
    }
}
