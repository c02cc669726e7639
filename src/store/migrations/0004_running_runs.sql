-- Only running runs are looked up by status (a node closing its leftovers at start). An
-- index of every run's status took two entries per run, one when it started and one when
-- it ended. A partial index holds the runs in progress only: a few pages, always hot.
-- (Statements are split at semicolons: none in these comments.)
DROP INDEX IF EXISTS runs_by_status;
CREATE INDEX IF NOT EXISTS runs_running ON runs (node_id) WHERE status = 'running';
