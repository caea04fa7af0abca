import sqlite3 as stdlib_sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tiermem import EmbeddingMismatchError, StorageError, migrate
from tiermem.store import NewMessage, SQLiteStore, StateRow, _raw_connect

pytestmark = pytest.mark.anyio


async def test_blank_database_is_migrated_and_recorded(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path, "m", 8)
    await store.close()
    conn = stdlib_sqlite3.connect(db_path)
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert versions == [m.version for m in migrate.available()]
    for table in (
        "sessions",
        "messages",
        "messages_fts",
        "kv_snapshots",
        "kv_snapshot_entries",
        "session_summaries",
        "session_state",
        "message_embeddings",
        "message_index",
        "snapshot_entry_vectors",
    ):
        assert table in tables


async def test_reopen_applies_nothing_twice(db_path: Path) -> None:
    await (await SQLiteStore.open(db_path, "m", 8)).close()
    store = await SQLiteStore.open(db_path, "m", 8)
    key = await store.create_session("ns", "s")
    assert await store.session_key("ns", "s") == key
    await store.close()
    conn = stdlib_sqlite3.connect(db_path)
    assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(
        migrate.available()
    )
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_other_embedding_dimension_is_refused(db_path: Path) -> None:
    await (await SQLiteStore.open(db_path, "model-a", 8)).close()
    with pytest.raises(EmbeddingMismatchError, match="model-a"):
        await SQLiteStore.open(db_path, "model-b", 16)


async def test_corrupt_file_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StorageError):
        await SQLiteStore.open(path, "m", 8)
    assert path.read_bytes().startswith(b"this is not")  # nothing overwritten


async def test_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="folder"):
        await SQLiteStore.open(tmp_path / "no" / "such.db", "m", 8)


def _database_at_version(db_path: Path, version: int) -> Any:
    """A database file as an older tiermem left it: migrations up to `version` applied."""
    conn = _raw_connect(str(db_path), 1000)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at REAL NOT NULL)"
    )
    for migration in migrate.available()[:version]:
        for statement in migrate._statements(migration.sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, 0)", (migration.version, migration.name)
        )
    return conn


async def test_a_version_1_database_is_migrated_and_its_messages_stay_searchable(
    db_path: Path,
) -> None:
    """A file written before the FTS index carried the session key (migration 3)."""
    conn = _database_at_version(db_path, 1)
    for key in (1, 2):
        conn.execute("INSERT INTO sessions VALUES (?, 'ns', ?, 0, 0)", (key, f"s{key}"))
        conn.execute(
            "INSERT INTO messages(session_key, position, message_id, role, content,"
            " content_hash, created_at, token_count) VALUES (?, 0, 'm', 'user', ?, 'h', 0, 3)",
            (key, f"the zebra sanctuary of session {key}"),
        )
    conn.commit()
    conn.close()

    store = await SQLiteStore.open(db_path, "m", 8)
    try:
        hits = await store.lexical_search(["zebra"], 2, 10)
        rows = await store.messages_by_rowid([rowid for rowid, _ in hits])
        assert [r.content for r in rows] == ["the zebra sanctuary of session 2"]
        assert await store.lexical_search(["zebra"], 3, 10) == []
    finally:
        await store.close()


async def test_float_vectors_of_a_version_3_database_move_to_the_bit_index(
    db_path: Path,
) -> None:
    """Before migration 4, message vectors lived in a float vec0 table; they are moved into
    `message_embeddings` and indexed by sign bits, and search exactly as before."""
    vectors = np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32)
    conn = _database_at_version(db_path, 3)
    conn.execute(
        "CREATE VIRTUAL TABLE message_vectors USING vec0(session_key integer partition key,"
        " embedding float[8] distance_metric=cosine)"
    )
    conn.execute("INSERT INTO meta VALUES ('embedding_model', 'm'), ('embedding_dims', '8')")
    conn.execute("INSERT INTO sessions VALUES (1, 'ns', 's', 0, 0)")
    for i, vector in enumerate(vectors):
        conn.execute(
            "INSERT INTO messages(id, session_key, position, message_id, role, content,"
            " content_hash, created_at, token_count) VALUES (?, 1, ?, ?, 'user', 'x', ?, 0, 1)",
            (i + 1, i, f"m{i}", f"h{i}"),
        )
        conn.execute(
            "INSERT INTO message_vectors(rowid, session_key, embedding) VALUES (?, 1, ?)",
            (i + 1, vector.tobytes()),
        )
    conn.close()

    store = await SQLiteStore.open(db_path, "m", 8)
    try:
        counts = await store.counts()
        assert counts["message_embeddings"] == counts["message_index"] == 40
        query = vectors[7] + 0.1
        exact = 1 - (vectors @ query) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
        nearest = await store.vector_search(query, 1, 5)
        assert [rowid for rowid, _ in nearest] == [int(i) + 1 for i in np.argsort(exact)[:5]]
        assert [d for _, d in nearest] == pytest.approx(sorted(exact)[:5], abs=1e-5)
    finally:
        await store.close()
    conn = stdlib_sqlite3.connect(db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "message_vectors" not in tables


async def test_a_word_in_most_messages_does_not_crowd_out_a_rare_one(db_path: Path) -> None:
    """Its bm25 weight is nil, so leaving it out changes no ranking, only the cost."""
    store = await SQLiteStore.open(db_path, "m", 8)
    try:
        key = await store.create_session("ns", "s")
        contents = [f"hello there number {i}" for i in range(9)] + ["hello zebra"]
        await store.append_messages(
            key,
            [
                NewMessage(i, f"m{i}", "user", c, f"h{i}", None, float(i), 3)
                for i, c in enumerate(contents)
            ],
            None,
            StateRow(),
        )
        both = await store.lexical_search(["hello", "zebra"], key, 20)
        rows = await store.messages_by_rowid([rowid for rowid, _ in both])
        assert [r.content for r in rows] == ["hello zebra"]
        assert len(await store.lexical_search(["hello"], key, 20)) == 10
    finally:
        await store.close()
