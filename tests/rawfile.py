"""What a tiermem file holds, read by the tests' own read-only SQLite connection (with
sqlite-vec loaded for the vector index): counts and integrity checks that must not go
through the library they check."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pysqlite3.dbapi2 as sqlite3
import sqlite_vec


@contextlib.contextmanager
def reading(path: Path | str) -> Iterator[Any]:
    """A read-only connection to the file at `path`, closed on exit."""
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=30)
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        yield conn
    finally:
        conn.close()


def counts(path: Path | str) -> dict[str, int]:
    """Rows of each table, the full-text index's own rows (`messages_fts_docsize`, one per
    indexed message; a COUNT of `messages_fts` reads its content table, `messages`) and the
    vector index's."""
    tables = {
        "sessions": "sessions",
        "messages": "messages",
        "fts_rows": "messages_fts_docsize",
        "message_embeddings": "message_embeddings",
        "message_index": "message_index",
        "kv_snapshots": "kv_snapshots",
        "kv_snapshot_entries": "kv_snapshot_entries",
        "session_summaries": "session_summaries",
    }
    with reading(path) as conn:
        return {
            name: int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for name, table in tables.items()
        }


def half_snapshots(path: Path | str) -> list[int]:
    """Snapshots whose entries are not all there (the count they declare differs)."""
    with reading(path) as conn:
        rows = conn.execute(
            "SELECT s.id FROM kv_snapshots s WHERE s.entry_count != "
            "(SELECT COUNT(*) FROM kv_snapshot_entries e WHERE e.snapshot_id = s.id)"
        ).fetchall()
    return [int(r[0]) for r in rows]


def assert_whole(path: Path | str, *, embedded: bool = True) -> dict[str, int]:
    """SQLite's integrity check passes, every message is indexed for full-text search once
    (and, if `embedded`, has one vector, in the table and in the index), and no snapshot
    is half written. Returns the counts."""
    with reading(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    n = counts(path)
    assert n["fts_rows"] == n["messages"], n
    if embedded:
        assert n["message_embeddings"] == n["message_index"] == n["messages"], n
    else:
        assert n["message_embeddings"] == n["message_index"], n
    assert half_snapshots(path) == []
    return n


@contextlib.contextmanager
def full_disk(path: Path | str, room: int = 0) -> Iterator[None]:
    """While inside, no file of this process may grow past the largest of the database's
    files as they are now, plus `room` bytes (RLIMIT_FSIZE), as on a full disk or a spent
    quota: SQLite's write that needs more fails (EFBIG: SQLite says "disk I/O error")."""
    # the signal the kernel sends on EFBIG is ignored by Python, or the process would die
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    files = [f"{path}{suffix}" for suffix in ("", "-wal")]
    limit = max(os.path.getsize(f) for f in files if os.path.exists(f)) + room
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
