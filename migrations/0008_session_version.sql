-- Several processes may hold one session in memory: every write of a session's state
-- checks, inside its transaction, that the version it read is still the stored one and
-- moves it on, so a stale process reloads instead of overwriting another's work.

ALTER TABLE session_state ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
