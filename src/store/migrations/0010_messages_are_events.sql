-- A chat message is the event that carries it: the user's `user_message` echo or the
-- agent's `final_report`. The `messages` table held the same text a second time, in a
-- row and two index entries per message, which cost a fifth of a chat's page writes
-- (bench/PROFILE.md, 31). The event now keeps the message's id, and the thread row its
-- count of messages (every write to a thread updates that row already). Ids and counts
-- are carried over. Every node must run this version before it writes again.
ALTER TABLE events ADD COLUMN message_id TEXT;
ALTER TABLE threads ADD COLUMN message_count BIGINT NOT NULL DEFAULT 0;
UPDATE events SET message_id = (
    SELECT m.id FROM messages m WHERE m.thread_num = events.thread_num AND m.seq = events.seq
) WHERE type IN ('user_message', 'final_report');
UPDATE threads SET message_count = (SELECT COUNT(*) FROM messages m WHERE m.thread_num = threads.num)
    WHERE num IN (SELECT thread_num FROM messages);
DROP TABLE messages
