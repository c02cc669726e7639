-- Events and messages are filed under their thread's number instead of its id. The
-- indexes a chat writes the most are the tails of every active thread in these two
-- tables: keyed by a 35-character id an entry took ~45 bytes, keyed by an integer ~12,
-- so a leaf holds ~4 times as many and splits ~4 times less often (bench/PROFILE.md).
-- Both tables are rewritten. Rows whose thread is gone (none are written) are dropped.
-- The writers prove each row's thread themselves (it is created or locked by the write
-- that files the row), so neither table has a foreign key, and a purge deletes a
-- thread's rows itself. Every node must run this version before it writes again.
CREATE UNIQUE INDEX threads_num ON threads (num);
CREATE TABLE events_new (
    thread_num BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    run_id TEXT,
    type TEXT NOT NULL,
    agent_name TEXT,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    CONSTRAINT events_by_thread PRIMARY KEY (thread_num, seq)
);
INSERT INTO events_new (thread_num, seq, run_id, type, agent_name, payload, created_at)
    SELECT t.num, e.seq, e.run_id, e.type, e.agent_name, e.payload, e.created_at
    FROM events e JOIN threads t ON t.id = e.thread_id;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
CREATE TABLE messages_new (
    id TEXT NOT NULL,
    thread_num BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    run_id TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    CONSTRAINT message_ids PRIMARY KEY (id)
);
INSERT INTO messages_new (id, thread_num, seq, role, content, run_id, metadata, created_at)
    SELECT m.id, t.num, m.seq, m.role, m.content, m.run_id, m.metadata, m.created_at
    FROM messages m JOIN threads t ON t.id = m.thread_id;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
CREATE INDEX messages_by_thread ON messages (thread_num, seq)
