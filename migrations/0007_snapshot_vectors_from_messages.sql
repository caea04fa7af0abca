-- Snapshot search ranks a session's snapshot entries by the float vectors their messages
-- already have in `message_embeddings` (exact cosine over a few dozen rows), so the vec0
-- table that copied them goes: it preallocated 1,024 vectors (1.5 MB at 384 dimensions)
-- for every session with a snapshot.
-- The message bit index is dropped too: the store makes it again with chunks of 256
-- vectors instead of 1,024 (14 KB instead of 57 KB held by every session, however small)
-- and fills it from `message_embeddings` (migration 10 since).

DROP TABLE IF EXISTS snapshot_entry_vectors;

DROP TABLE IF EXISTS message_index;
