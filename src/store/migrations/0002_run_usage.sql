-- Token counts a run's model reported (NULL for the builtin agent and unfinished runs).
ALTER TABLE runs ADD COLUMN prompt_tokens BIGINT;
ALTER TABLE runs ADD COLUMN completion_tokens BIGINT;
