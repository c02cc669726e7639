-- A thread's messages as a chain, so that they are found without an index of their own
-- (an index of message events by thread costs what 0010 saved: bench/PROFILE.md, 32).
-- A message event keeps the `seq` of its thread's message before it, and the thread row
-- the `seq` of its last message: a thread's messages are read newest first, one
-- primary-key lookup each, however many other events lie between them.
-- `message_before` is where a write reads the thread's last message as the write found
-- it (the statement that moves `last_message` on returns the value it replaced).
-- Existing messages are linked, and counted again as the chain holds them, through an
-- index made for this migration and dropped.
-- Every node must run this version before it writes again.
ALTER TABLE events ADD COLUMN previous_message BIGINT;
ALTER TABLE threads ADD COLUMN last_message BIGINT;
ALTER TABLE threads ADD COLUMN message_before BIGINT;
CREATE INDEX events_messages_0011 ON events (thread_num, seq) WHERE message_id IS NOT NULL;
UPDATE events SET previous_message = (
    SELECT MAX(p.seq) FROM events p
    WHERE p.thread_num = events.thread_num AND p.seq < events.seq AND p.message_id IS NOT NULL
) WHERE message_id IS NOT NULL;
UPDATE threads SET
    last_message = (SELECT MAX(e.seq) FROM events e WHERE e.thread_num = threads.num AND e.message_id IS NOT NULL),
    message_count = (SELECT COUNT(*) FROM events e WHERE e.thread_num = threads.num AND e.message_id IS NOT NULL)
WHERE message_count > 0;
DROP INDEX events_messages_0011
