import sqlite3 as stdlib_sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tiermem import EmbeddingMismatchError, StorageError
from tiermem import _migrate as migrate
from tiermem._store import NewMessage, SnapshotEntryRow, SQLiteStore, StateRow, _bits, _raw_connect


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
    ):
        assert table in tables
    assert "snapshot_entry_vectors" not in tables


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


def _old_vector_tables(conn: Any, dims: int) -> None:
    """The vec0 tables the store made beside migrations 1-4 (default chunks of 1,024)."""
    conn.execute("INSERT INTO meta VALUES ('embedding_model', 'm'), ('embedding_dims', ?)", (dims,))
    conn.execute(
        "CREATE VIRTUAL TABLE snapshot_entry_vectors USING vec0(session_key integer partition"
        f" key, embedding float[{dims}] distance_metric=cosine)"
    )
    conn.execute(
        "CREATE VIRTUAL TABLE message_index USING vec0(session_key integer partition key,"
        f" embedding bit[{dims}])"
    )


async def test_a_version_4_database_keeps_its_ids_rows_and_searches(db_path: Path) -> None:
    """Migration 5 rebuilds sessions, messages and snapshots with AUTOINCREMENT ids: the ids
    stay, so the rows pointing at them (FTS, vectors, state, snapshots, summaries) stay valid;
    the snapshot vec0 table goes and the bit index is remade with small chunks."""
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((12, 384)).astype(np.float32)
    conn = _database_at_version(db_path, 4)
    _old_vector_tables(conn, 384)
    # sessions 2 and 5 (ids with gaps, as deletes leave them), six messages each
    for key in (2, 5):
        conn.execute("INSERT INTO sessions VALUES (?, 'ns', ?, 1.0, 2.0)", (key, f"s{key}"))
        conn.execute(
            "INSERT INTO session_state(session_key, message_count, pinned, updated_at)"
            " VALUES (?, 6, ?, 3.0)",
            (key, f"[{key * 10}]"),
        )
        conn.execute(
            "INSERT INTO session_summaries VALUES (?, ?, 4, 6, 1, 5, 3.0)", (key, f"sum {key}")
        )
        for i in range(6):
            rowid, n = key * 10 + i, (key == 5) * 6 + i
            conn.execute(
                "INSERT INTO messages(id, session_key, position, message_id, role, content,"
                " content_hash, created_at, token_count) VALUES (?, ?, ?, ?, 'user', ?, ?, ?, 3)",
                (rowid, key, i, f"m{i}", f"giraffe {n} of session {key}", f"h{n}", float(i)),
            )
            conn.execute(
                "INSERT INTO message_embeddings VALUES (?, ?)", (rowid, vectors[n].tobytes())
            )
            conn.execute(
                "INSERT INTO message_index(rowid, session_key, embedding)"
                " VALUES (?, ?, vec_bit(?))",
                (rowid, key, _bits(vectors[n])),
            )
        conn.execute(
            "INSERT INTO kv_snapshots VALUES (?, ?, 'conversation_limit', 'incremental', 2, 9,"
            " 3.0)",
            (key + 100, key),
        )
        for rowid in (key * 10, key * 10 + 3):
            cursor = conn.execute(
                "INSERT INTO kv_snapshot_entries(snapshot_id, message_rowid, importance,"
                " entry_type, kv_bytes) VALUES (?, ?, 0.5, 'user', 4)",
                (key + 100, rowid),
            )
            conn.execute(
                "INSERT INTO snapshot_entry_vectors(rowid, session_key, embedding)"
                " VALUES (?, ?, ?)",
                (cursor.lastrowid, key, vectors[rowid % 10 + (key == 5) * 6].tobytes()),
            )
    conn.close()

    store = await SQLiteStore.open(db_path, "m", 384)
    try:
        assert await store.session_key("ns", "s5") == 5
        hits = await store.lexical_search(["giraffe"], 5, 10)
        assert sorted(rowid for rowid, _ in hits) == list(range(50, 56))
        assert [r.content for r in await store.messages_by_rowid([53])] == [
            "giraffe 9 of session 5"
        ]
        query = vectors[9] + 0.05
        nearest = await store.vector_search(query, 5, 1)
        assert [rowid for rowid, _ in nearest] == [53]
        snapshot_hits = await store.snapshot_vector_search(query, 5, 5)
        assert [rowid for rowid, _ in snapshot_hits] == [53, 50]
        assert snapshot_hits[0][1] == pytest.approx(
            1 - vectors[9] @ query / np.linalg.norm(vectors[9]) / np.linalg.norm(query), abs=1e-5
        )
        found = await store.snapshot_entries(5, 105)
        assert found is not None and [e.message_rowid for e in found[1]] == [50, 53]
        assert (await store.load_state(5)).pinned == [50]
        summary = await store.summary(5)
        assert summary is not None and summary.text == "sum 5"
        assert await store.counts() == {
            "sessions": 2,
            "messages": 12,
            "messages_fts": 12,
            "message_embeddings": 12,
            "message_index": 12,
            "kv_snapshots": 2,
            "kv_snapshot_entries": 4,
            "session_summaries": 2,
            "session_state": 2,
        }

        # foreign keys still cascade from the rebuilt tables
        await store.delete_session(5)
        assert await store.lexical_search(["giraffe"], 5, 10) == []
        assert len(await store.lexical_search(["giraffe"], 2, 10)) == 6
        assert (await store.counts())["message_index"] == 6
        # and ids go on from the largest ever given, the deleted newest one's included
        assert await store.create_session("ns", "new") == 6
        new = NewMessage(6, "m6", "user", "a new giraffe", "h", None, 9.0, 3)
        assert await store.append_messages(2, [new], None, StateRow()) == [56]
    finally:
        await store.close()
    # the pages of the dropped vec0 table (1.5 MB for each session with a snapshot) left
    # the file: it was compacted after the migrations
    assert _file_size(db_path) < 500_000
    conn = _raw_connect(str(db_path), 1000)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "snapshot_entry_vectors" not in tables
        assert (
            "chunk_size=256"
            in conn.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'message_index'"
            ).fetchone()[0]
        )
    finally:
        conn.close()


async def test_ids_of_deleted_rows_are_never_handed_out_again(db_path: Path) -> None:
    """Deleting the newest session (its messages and snapshot with it) does not give the
    next session, message or snapshot its id: late work for the deleted one cannot alias."""

    def messages(n: int) -> list[NewMessage]:
        return [
            NewMessage(i, f"m{i}", "user", f"text {i}", f"h{i}", None, 0.0, 2) for i in range(n)
        ]

    store = await SQLiteStore.open(db_path, "m", 8)
    try:
        kept = await store.create_session("ns", "kept")
        await store.append_messages(kept, messages(2), None, await store.load_state(kept))
        gone = await store.create_session("ns", "gone")
        gone_rowids = await store.append_messages(
            gone, messages(3), None, await store.load_state(gone)
        )
        snapshot = (
            "conversation_limit",
            "incremental",
            [SnapshotEntryRow(gone_rowids[0], 1, "user", 1)],
        )
        gone_snapshot = await store.save_clear(gone, await store.load_state(gone), snapshot, {})
        await store.delete_session(gone)

        again = await store.create_session("ns", "gone")
        assert again > gone
        new_rowids = await store.append_messages(
            kept, messages(4)[2:], None, await store.load_state(kept)
        )
        assert min(new_rowids) > max(gone_rowids)
        snapshot = (
            "conversation_limit",
            "incremental",
            [SnapshotEntryRow(new_rowids[0], 1, "user", 1)],
        )
        new_snapshot = await store.save_clear(kept, await store.load_state(kept), snapshot, {})
        assert gone_snapshot is not None and new_snapshot is not None
        assert new_snapshot > gone_snapshot
    finally:
        await store.close()
    # and not after a reopen either (the counters are in the file)
    store = await SQLiteStore.open(db_path, "m", 8)
    try:
        await store.delete_session(again)
        assert await store.create_session("ns", "third") > again
    finally:
        await store.close()


async def test_200_small_sessions_with_snapshots_take_megabytes_not_hundreds(
    db_path: Path,
) -> None:
    """Storage follows what sessions hold: 200 sessions of 10 messages (384-dimensional
    vectors), each with a snapshot, took 333 MB when every session with a snapshot
    preallocated a 1,024-vector vec0 chunk (1.5 MB) and every session a 57 KB bit-index
    chunk; they take 8 MB now, 3 MB of it the float vectors themselves."""
    dims = 384
    rng = np.random.default_rng(12)
    store = await SQLiteStore.open(db_path, "m", dims)
    try:
        for s in range(200):
            key = await store.create_session("ns", f"s{s}")
            vectors = rng.standard_normal((10, dims)).astype(np.float32)
            rowids = await store.append_messages(
                key,
                [
                    NewMessage(i, f"m{i}", "user", f"message {i} of {s}", f"{s}-{i}", None, i, 5)
                    for i in range(10)
                ],
                vectors,
                await store.load_state(key),
            )
            entries = [SnapshotEntryRow(rowid, 0.5, "user", 100) for rowid in rowids[:5]]
            await store.save_clear(
                key,
                await store.load_state(key),
                ("conversation_limit", "incremental", entries),
                dict(zip(rowids, vectors, strict=True)),
            )
        hits = await store.snapshot_vector_search(vectors[3], key, 2)
        assert hits[0] == (rowids[3], pytest.approx(0.0, abs=1e-6))
    finally:
        await store.close()
    assert _file_size(db_path) < 12_000_000


def _file_size(db_path: Path) -> int:
    """Bytes of the database file and its WAL."""
    wal = Path(f"{db_path}-wal")
    return db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_a_table_rebuild_that_orphans_rows_is_rolled_back(db_path: Path) -> None:
    """A migration marked as rebuilding tables runs with foreign keys off (a DROP would
    cascade otherwise) and is checked before its commit: one that leaves rows pointing at
    nothing is refused whole, and foreign keys are on again after it."""
    conn = _database_at_version(db_path, len(migrate.available()))
    try:
        conn.execute("INSERT INTO sessions VALUES (1, 'ns', 's', 0, 0)")
        conn.execute(
            "INSERT INTO messages(session_key, position, message_id, role, content,"
            " content_hash, created_at, token_count) VALUES (1, 0, 'm', 'user', 'hi', 'h', 0, 1)"
        )
        losing = migrate.Migration(
            99,
            "drop_sessions",
            "-- migrate: rebuilds tables\n"
            "CREATE TABLE new_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT);\n"
            "DROP TABLE sessions;\n"
            "ALTER TABLE new_sessions RENAME TO sessions;\n",
        )
        with pytest.raises(StorageError, match="pointing at missing"):
            migrate.apply(conn, [losing])
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("SELECT namespace FROM sessions").fetchall() == [("ns",)]
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
        assert conn.execute("SELECT 1 FROM schema_migrations WHERE version = 99").fetchone() is None

        keeping = migrate.Migration(
            99,
            "rebuild_sessions",
            "-- migrate: rebuilds tables\n"
            "CREATE TABLE new_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT);\n"
            "INSERT INTO new_sessions SELECT id, namespace FROM sessions;\n"
            "DROP TABLE sessions;\n"
            "ALTER TABLE new_sessions RENAME TO sessions;\n",
        )
        assert migrate.apply(conn, [keeping]) == [99]
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1  # no cascade
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        conn.close()
