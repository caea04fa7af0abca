-- The full-text index also indexes each message's session key, so a search is one FTS5
-- query restricted to the session (`session_key : "12" AND content : (...)`): posting lists
-- are intersected inside FTS5 instead of the index being probed once per message row.

DROP TRIGGER messages_fts_insert;
DROP TRIGGER messages_fts_delete;
DROP TRIGGER messages_fts_update;
DROP TABLE messages_fts;

CREATE VIRTUAL TABLE messages_fts USING fts5(
    content,
    session_key,
    content = 'messages',
    content_rowid = 'id',
    tokenize = 'porter unicode61 remove_diacritics 2'
);

INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');

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
