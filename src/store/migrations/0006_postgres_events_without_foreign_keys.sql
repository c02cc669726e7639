-- PostgreSQL only. Events, messages and runs are written by one statement that hands
-- out their seq from the thread's row: it creates that row or holds its lock, and a
-- missing or deleted thread leaves a null seq (or thread id) that fails the statement.
-- The foreign keys checked it again, row by row: 60 % of a batch's time (bench/PROFILE.md).
-- A purge deletes a thread's rows itself. SQLite keeps its keys (checked in-process).
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_thread_id_fkey;
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_thread_id_fkey;
ALTER TABLE runs DROP CONSTRAINT IF EXISTS runs_thread_id_fkey
