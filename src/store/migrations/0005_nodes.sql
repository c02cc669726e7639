-- The nodes sharing this database, each with the time it last renewed its lease. A run
-- whose node's lease ran out is ended by another node.
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
