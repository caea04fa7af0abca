-- migrate: rebuilds tables
-- Ids are never reused: `sessions`, `messages` and `kv_snapshots` become AUTOINCREMENT, so
-- deleting the newest row no longer hands its id to the next one (where a deleted
-- session's late work, or another process's stale copy, would then alias new rows).
-- SQLite cannot add AUTOINCREMENT in place: each table is rebuilt by its documented
-- procedure (create new_X, copy, drop X, rename new_X to X; the runner turns foreign keys
-- off around it and checks them before the commit). Ids are copied as they are, so every
-- row pointing at one stays valid: state, summaries, snapshot entries, message embeddings,
-- the vec0 bit index (rowid = message id) and `messages_fts` (content_rowid = id), whose
-- triggers and the messages' indexes go with the old table and are made again below.

CREATE TABLE new_sessions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace     TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    created_at    REAL NOT NULL,
    last_activity REAL NOT NULL,
    UNIQUE (namespace, session_id)
);
INSERT INTO new_sessions(id, namespace, session_id, created_at, last_activity)
SELECT id, namespace, session_id, created_at, last_activity FROM sessions;
DROP TABLE sessions;
ALTER TABLE new_sessions RENAME TO sessions;

CREATE TABLE new_messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    session_key     INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    message_id      TEXT NOT NULL,
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    content_hash    TEXT NOT NULL,
    metadata        TEXT,
    created_at      REAL NOT NULL,
    token_count     INTEGER NOT NULL,
    retrieval_count INTEGER NOT NULL DEFAULT 0,
    UNIQUE (session_key, position),
    UNIQUE (session_key, message_id)
);
INSERT INTO new_messages(id, session_key, position, message_id, role, content, content_hash,
                         metadata, created_at, token_count, retrieval_count)
SELECT id, session_key, position, message_id, role, content, content_hash,
       metadata, created_at, token_count, retrieval_count FROM messages;
DROP TABLE messages;
ALTER TABLE new_messages RENAME TO messages;

CREATE INDEX messages_session_time ON messages(session_key, created_at);
CREATE INDEX messages_content_hash ON messages(content_hash);

CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content, session_key)
    VALUES (new.id, new.content, new.session_key);
END;

CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content, session_key)
    VALUES ('delete', old.id, old.content, old.session_key);
END;

CREATE TRIGGER messages_fts_update AFTER UPDATE OF content, session_key ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content, session_key)
    VALUES ('delete', old.id, old.content, old.session_key);
    INSERT INTO messages_fts(rowid, content, session_key)
    VALUES (new.id, new.content, new.session_key);
END;

CREATE TABLE new_kv_snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    session_key INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    reason      TEXT NOT NULL,
    strategy    TEXT NOT NULL,
    entry_count INTEGER NOT NULL,
    size_bytes  INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
INSERT INTO new_kv_snapshots(id, session_key, reason, strategy, entry_count, size_bytes,
                             created_at)
SELECT id, session_key, reason, strategy, entry_count, size_bytes, created_at FROM kv_snapshots;
DROP TABLE kv_snapshots;
ALTER TABLE new_kv_snapshots RENAME TO kv_snapshots;

CREATE INDEX kv_snapshots_session ON kv_snapshots(session_key, id);
