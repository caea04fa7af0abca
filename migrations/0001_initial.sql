-- Sessions, their messages (with full-text index), per-session state, snapshots and
-- cumulative summaries. Vector tables depend on the embedding model's dimension: the store
-- made them when it opened, until migration 10 (a Python step) took that over.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE sessions (
    id            INTEGER PRIMARY KEY,
    namespace     TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    created_at    REAL NOT NULL,
    last_activity REAL NOT NULL,
    UNIQUE (namespace, session_id)
);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
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

CREATE VIRTUAL TABLE messages_fts USING fts5(
    content,
    content = 'messages',
    content_rowid = 'id',
    tokenize = 'porter unicode61 remove_diacritics 2'
);

CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;

CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;

CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;

-- What rebuilds a session's active cache after a restart or an eviction: the active cache
-- is every message after `cleared_through` plus the `pinned` message rows (preserved or
-- restored entries); `entry_stats` keeps their access counts and engagement.
CREATE TABLE session_state (
    session_key        INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    conversation_count INTEGER NOT NULL DEFAULT 0,
    clear_count        INTEGER NOT NULL DEFAULT 0,
    message_count      INTEGER NOT NULL DEFAULT 0,
    cleared_through    INTEGER NOT NULL DEFAULT -1,
    pinned             TEXT NOT NULL DEFAULT '[]',
    entry_stats        TEXT NOT NULL DEFAULT '{}',
    prefix_digest      TEXT NOT NULL DEFAULT '',
    last_cleared_at    REAL,
    last_snapshot_id   INTEGER,
    updated_at         REAL NOT NULL
);

CREATE TABLE kv_snapshots (
    id          INTEGER PRIMARY KEY,
    session_key INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    reason      TEXT NOT NULL,
    strategy    TEXT NOT NULL,
    entry_count INTEGER NOT NULL,
    size_bytes  INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX kv_snapshots_session ON kv_snapshots(session_key, id);

CREATE TABLE kv_snapshot_entries (
    id            INTEGER PRIMARY KEY,
    snapshot_id   INTEGER NOT NULL REFERENCES kv_snapshots(id) ON DELETE CASCADE,
    message_rowid INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    importance    REAL NOT NULL,
    entry_type    TEXT NOT NULL,
    kv_bytes      INTEGER NOT NULL
);
CREATE INDEX kv_snapshot_entries_snapshot ON kv_snapshot_entries(snapshot_id);
CREATE INDEX kv_snapshot_entries_message ON kv_snapshot_entries(message_rowid);

CREATE TABLE session_summaries (
    session_key     INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    text            TEXT NOT NULL,
    token_count     INTEGER NOT NULL,
    message_count   INTEGER NOT NULL,
    clear_count     INTEGER NOT NULL,
    covered_through INTEGER NOT NULL,
    updated_at      REAL NOT NULL
);
