-- A deleted message leaves no trace in the full-text index: FTS5's secure-delete mode
-- (SQLite 3.42+, a setting kept in the index's config table) removes its terms from the
-- index pages at once instead of recording a delete marker beside them. The rest of the
-- file is covered by `PRAGMA secure_delete`, set on every connection (see store.py).

INSERT INTO messages_fts(messages_fts, rank) VALUES ('secure-delete', 1);
