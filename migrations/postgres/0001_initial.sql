-- tiermem on PostgreSQL: the tables of the SQLite store (see migrations/0001-0010), in one
-- step. Ids are identity columns (a sequence never hands a value out twice). `{dimensions}`
-- is the embedding model's dimension, given by the opener (recorded in `meta`).

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE sessions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace     text NOT NULL,
    session_id    text NOT NULL,
    created_at    double precision NOT NULL,
    last_activity double precision NOT NULL,
    UNIQUE (namespace, session_id)
);
CREATE INDEX sessions_by_activity ON sessions (last_activity DESC);

-- What rebuilds a session's active cache (as in SQLite), plus what the lexical search's
-- bm25 needs of the session: how many messages are indexed and their total length.
CREATE TABLE session_state (
    session_key        bigint PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    conversation_count bigint NOT NULL DEFAULT 0,
    clear_count        bigint NOT NULL DEFAULT 0,
    message_count      bigint NOT NULL DEFAULT 0,
    cleared_through    bigint NOT NULL DEFAULT -1,
    pinned             text NOT NULL DEFAULT '[]',
    entry_stats        text NOT NULL DEFAULT '{}',
    prefix_digest      text NOT NULL DEFAULT '',
    last_cleared_at    double precision,
    last_snapshot_id   bigint,
    updated_at         double precision NOT NULL,
    version            bigint NOT NULL DEFAULT 0,
    indexed_messages   bigint NOT NULL DEFAULT 0,
    indexed_length     bigint NOT NULL DEFAULT 0,
    indexed_vectors    bigint NOT NULL DEFAULT 0
);

-- `content` holds a text with NUL characters (PostgreSQL's text cannot) escaped, and then
-- `escaped` is true. `lexemes` is the full-text index of the text's opening (stemmed, no
-- stop words, accents folded by the store), `lexical_length` its word count (for bm25).
CREATE TABLE messages (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_key    bigint NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position       bigint NOT NULL,
    message_id     text NOT NULL,
    role           text NOT NULL,
    content        text NOT NULL,
    escaped        boolean NOT NULL DEFAULT false,
    content_hash   text NOT NULL,
    metadata       text,
    created_at     double precision NOT NULL,
    token_count    bigint NOT NULL,
    lexemes        tsvector NOT NULL,
    lexical_length integer NOT NULL,
    UNIQUE (session_key, position),
    UNIQUE (session_key, message_id)
);
CREATE INDEX messages_lexemes ON messages USING gin (lexemes);
CREATE INDEX messages_by_hash ON messages (content_hash);
CREATE INDEX messages_by_time ON messages (session_key, created_at);

-- Porter-like stemming with no stop words, as SQLite's FTS5 `porter unicode61`.
CREATE TEXT SEARCH DICTIONARY tiermem_stem (TEMPLATE = snowball, Language = english);
CREATE TEXT SEARCH CONFIGURATION tiermem (COPY = english);
ALTER TEXT SEARCH CONFIGURATION tiermem
    ALTER MAPPING REPLACE english_stem WITH tiermem_stem;

-- any of several tsqueries: the lexical search's query is one per term
CREATE AGGREGATE tiermem_any (tsquery) (SFUNC = tsquery_or, STYPE = tsquery);

-- Each message's vector. A session's first 20,000 are ranked exactly through the session
-- (`message_embeddings_exact`); those past them (`indexed`) go into the HNSW index, on the
-- vectors cast to the model's dimension (one index per dimension, pgvector's way), which
-- a search filters by session (see _pg_search.py). Small sessions cost the index nothing.
CREATE TABLE message_embeddings (
    message_rowid bigint PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    session_key   bigint NOT NULL,
    embedding     vector NOT NULL,
    indexed       boolean NOT NULL DEFAULT false
);
CREATE INDEX message_embeddings_exact ON message_embeddings (session_key) WHERE NOT indexed;
CREATE INDEX message_embeddings_indexed ON message_embeddings (session_key) WHERE indexed;
CREATE INDEX message_embeddings_hnsw_{dimensions} ON message_embeddings
    USING hnsw ((embedding::vector({dimensions})) vector_cosine_ops) WHERE indexed;

CREATE TABLE kv_snapshots (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_key bigint NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    reason      text NOT NULL,
    strategy    text NOT NULL,
    entry_count bigint NOT NULL,
    size_bytes  bigint NOT NULL,
    created_at  double precision NOT NULL
);
CREATE INDEX kv_snapshots_by_session ON kv_snapshots (session_key, id);

CREATE TABLE kv_snapshot_entries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot_id   bigint NOT NULL REFERENCES kv_snapshots(id) ON DELETE CASCADE,
    message_rowid bigint NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    importance    double precision NOT NULL,
    entry_type    text NOT NULL,
    kv_bytes      bigint NOT NULL
);
CREATE INDEX kv_snapshot_entries_by_snapshot ON kv_snapshot_entries (snapshot_id);
CREATE INDEX kv_snapshot_entries_by_message ON kv_snapshot_entries (message_rowid);

-- `text` escaped as a message's `content` where it holds NUL (`escaped`)
CREATE TABLE session_summaries (
    session_key     bigint PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    text            text NOT NULL,
    escaped         boolean NOT NULL DEFAULT false,
    token_count     bigint NOT NULL,
    message_count   bigint NOT NULL,
    clear_count     bigint NOT NULL,
    covered_through bigint NOT NULL,
    updated_at      double precision NOT NULL
);
