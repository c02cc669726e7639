//! A thread's chat messages, read from the events that carry them (migrations 0010,
//! 0011): the statements that walk a thread's chain of messages, and the message an
//! event row holds.

use serde_json::Value;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Message, Result, StoreError};

/// The messages of thread `$1`, newest first and at most `$2` deep (`depth` 1 is the
/// newest): a walk from the thread row's `last_message` down each message event's
/// `previous_message`, one primary-key lookup per message however many other events
/// lie between them (migration 0011). The statements below select from it, the chain
/// first: `CROSS JOIN` keeps SQLite from reading the thread's every event to match them
/// against the chain (0.23 against 1.6 ms for 50 messages among 10,000 events; a scan
/// for `message_id IS NOT NULL` took 13 ms). PostgreSQL reads it as a plain join.
///
/// Each row also carries the thread's `message_count` as `total`, from the same snapshot.
/// The walk goes no deeper than `$deepest`, and it stops at a link to an event that
/// is not a message (none is written; a damaged chain shortens the history, it does
/// not fail every read of the thread).
macro_rules! message_chain {
    ($deepest:literal) => {
        concat!(
            "WITH RECURSIVE chain (seq, depth, total) AS ( \
             SELECT last_message, 1, message_count FROM threads WHERE id = $1 AND last_message IS NOT NULL \
             UNION ALL \
             SELECT e.previous_message, chain.depth + 1, chain.total FROM chain \
             JOIN events e ON e.thread_num = (SELECT num FROM threads WHERE id = $1) AND e.seq = chain.seq \
             WHERE e.message_id IS NOT NULL AND e.previous_message IS NOT NULL AND chain.depth < ",
            $deepest,
            ") "
        )
    };
}

/// A thread's last `$2` messages, newest first (the run's history), each with the
/// thread's `last_seq` as of the same snapshot (one statement: one snapshot on both
/// backends). SQLite reads `$1`, `$2` as named parameters numbered in order of first
/// appearance, so rusqlite binds them by position. The columns are
/// [`Message::from_event`]'s.
pub(super) const RECENT_MESSAGES: &str = concat!(
    message_chain!("$2"),
    "SELECT e.message_id, e.type, e.payload, e.created_at, e.seq, \
     (SELECT last_seq FROM threads WHERE id = $1) AS through_seq \
     FROM chain CROSS JOIN events e \
     WHERE e.thread_num = (SELECT num FROM threads WHERE id = $1) AND e.seq = chain.seq \
     AND e.message_id IS NOT NULL ORDER BY e.seq DESC"
);

/// A page of thread `$1`'s messages, oldest first: `$3` of them after the first `$2`,
/// with the thread's count as `total`. Counted from the newest that is the messages
/// deeper than `total - $2 - $3` and at most `total - $2` deep, where `total` and the
/// chain come from one snapshot, so a message written meanwhile cannot shift the page.
pub(super) const PAGE_OF_MESSAGES: &str = concat!(
    message_chain!("chain.total - $2"),
    "SELECT e.message_id, e.type, e.payload, e.created_at, e.seq, chain.total AS total \
     FROM chain CROSS JOIN events e \
     WHERE e.thread_num = (SELECT num FROM threads WHERE id = $1) AND e.seq = chain.seq \
     AND e.message_id IS NOT NULL AND chain.depth <= chain.total - $2 AND chain.depth > chain.total - $2 - $3 \
     ORDER BY e.seq"
);

pub(super) fn message_from_row(row: &AnyRow) -> Result<Message> {
    let (kind, payload, at): (String, String, String) =
        (row.try_get("type")?, row.try_get("payload")?, row.try_get("created_at")?);
    Message::from_event(row.try_get("message_id")?, &kind, &payload, &at, row.try_get("seq")?)
}

impl Message {
    /// The message an event carries, from its stored columns: a `user_message` is the
    /// user's (its `content`), a `final_report` the agent's answer (its
    /// `executive_summary`), and its time is the event's.
    pub(super) fn from_event(id: String, kind: &str, payload: &str, at: &str, seq: i64) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Said {
            content: Option<String>,
            executive_summary: Option<String>,
        }
        let corrupt = |why: String| StoreError::Corrupt(format!("message {id} at seq {seq}: {why}"));
        let said: Said = serde_json::from_str(payload).map_err(|e| corrupt(e.to_string()))?;
        let (role, content) = match kind {
            "user_message" => ("user", said.content),
            "final_report" => ("assistant", said.executive_summary),
            other => return Err(corrupt(format!("carried by a {other} event"))),
        };
        let content = content.ok_or_else(|| corrupt(format!("its {kind} event has no text")))?;
        let at = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .map_err(|e| corrupt(format!("time {at:?}: {e}")))?;
        Ok(Self {
            id,
            role: role.to_string(),
            content,
            created_at: (at.unix_timestamp_nanos() / 1_000_000) as i64,
            metadata: Value::Object(Default::default()),
            seq,
        })
    }
}
