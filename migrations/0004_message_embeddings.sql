-- Message vectors as plain float32 blobs keyed by message: exact distances for a handful of
-- messages are a primary-key read each (a vec0 point lookup reads through its chunk). The
-- store keeps beside them a vec0 index of their sign bits, partitioned by session, for
-- the nearest-neighbour pass (migration 10); the float vec0 table it replaces is moved
-- into this one by migration 9.

CREATE TABLE message_embeddings (
    message_rowid INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    embedding     BLOB NOT NULL
);
