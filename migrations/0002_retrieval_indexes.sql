-- Retrieval by time ("what did I say in March?") reads a session's messages by creation
-- time; embedding reuse finds an already embedded text by its content hash.

CREATE INDEX messages_session_time ON messages(session_key, created_at);

CREATE INDEX messages_content_hash ON messages(content_hash);
