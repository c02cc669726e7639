-- The owner's thread list sorts its few rows in the query. An index that held
-- updated_at was rewritten by every write to every thread (each bumps updated_at).
DROP INDEX IF EXISTS threads_by_owner;
CREATE INDEX IF NOT EXISTS threads_of_owner ON threads (owner_id);
