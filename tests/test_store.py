import sqlite3 as stdlib_sqlite3
from pathlib import Path

import pytest

from tiermem import EmbeddingMismatchError, StorageError, migrate
from tiermem.store import SQLiteStore

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
        "message_vectors",
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


async def test_a_version_1_database_is_migrated_and_its_messages_stay_searchable(
    db_path: Path,
) -> None:
    """A file written before the FTS index carried the session key (migration 3)."""
    first = migrate.available()[0]
    conn = stdlib_sqlite3.connect(db_path)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at REAL NOT NULL)"
    )
    for statement in migrate._statements(first.sql):
        conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (first.name,))
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
        hits = await store.lexical_search('"zebra"', 2, 10)
        rows = await store.messages_by_rowid([rowid for rowid, _ in hits])
        assert [r.content for r in rows] == ["the zebra sanctuary of session 2"]
        assert await store.lexical_search('"zebra"', 3, 10) == []
    finally:
        await store.close()
