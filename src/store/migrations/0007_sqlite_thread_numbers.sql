-- SQLite only (0008 is PostgreSQL's). Every thread gets a number, the key its events
-- and messages are filed under from 0009 on. Existing threads take their rowid; a new
-- one takes the next after the highest (the insert says so: SQLite has no identity).
ALTER TABLE threads ADD COLUMN num INTEGER;
UPDATE threads SET num = rowid
