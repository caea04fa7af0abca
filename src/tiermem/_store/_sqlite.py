"""`SQLiteStore`: the `Store` in one SQLite file (WAL), sqlite-vec loaded on pysqlite3
connections under aiosqlite. Its tables, each described by the module that queries it:
`sessions`, `session_state`, `session_summaries` (`_state.py`); `messages`,
`messages_fts` (`_messages.py`); `message_embeddings`, `message_index` (`_vectors.py`);
`kv_snapshots`, `kv_snapshot_entries` (`_snapshots.py`); `meta` (the embedding model and
dimension) and `schema_migrations` (`_connection.py`, `_migrate.py`). Every one of them
comes from a recorded migration (migrations/).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import pysqlite3.dbapi2 as sqlite3

from .._errors import StorageError
from . import _connection as connection
from ._search import SearchQueries
from ._snapshots import SnapshotQueries
from ._state import SessionQueries
from ._steps import Parameters

COUNTED_TABLES = (
    "sessions",
    "messages",
    "messages_fts",
    "message_embeddings",
    "message_index",
    "kv_snapshots",
    "kv_snapshot_entries",
    "session_summaries",
    "session_state",
)


class SQLiteStore(SessionQueries, SearchQueries, SnapshotQueries):
    """The tiermem database in one SQLite file. Every method is a coroutine; none blocks
    the event loop. Open with `await SQLiteStore.open(path, model, dimensions)`."""

    @classmethod
    async def open(
        cls,
        path: str | Path,
        embedding_model: str,
        dimensions: int,
        busy_timeout_ms: int = 10_000,
        *,
        read_only: bool = False,
        check: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> SQLiteStore:
        """Open (creating and migrating) the database and check the embedding model.

        A file this process may not write is opened read-only (as is any with
        `read_only`): reads work, every write is a `StorageError`. `check` runs SQLite's
        `quick_check` first (a read of the whole file). `clock` stamps the rows' times
        (the manager passes its own, so the ages it reports are on one clock)."""
        target = str(path)
        if "\x00" in target:
            raise StorageError("cannot open a database whose path holds a NUL character")
        parent = Path(target).parent
        if target == ":memory:" or not parent.is_dir():
            raise StorageError(
                f"cannot open database {target!r}: give a file in an existing folder"
            )
        exists = await anyio.Path(target).exists()
        read_only = read_only or (exists and not os.access(target, os.W_OK))
        if read_only and not exists:
            raise StorageError(f"cannot open database {target} read-only: there is no such file")
        params = Parameters(embedding_model, dimensions)
        try:
            await anyio.to_thread.run_sync(
                connection.prepare, target, busy_timeout_ms, read_only, check, params
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {target}: {exc}") from exc
        writer, reader, vector_reader = await connection.connect(target, busy_timeout_ms, read_only)
        return cls(
            target,
            writer,
            reader,
            vector_reader,
            dimensions=dimensions,
            read_only=read_only,
            clock=clock,
        )

    @asynccontextmanager
    async def hold(self, namespace: str, session_id: str) -> AsyncIterator[None]:
        """Nothing to take: writes to the file take turns (`BEGIN IMMEDIATE`), and each
        claims the session's version."""
        yield

    # -- introspection (tests, status) -----------------------------------------------------

    async def size_bytes(self) -> int:
        """The bytes of the file and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            file = anyio.Path(self.path + suffix)
            if await file.exists():
                total += (await file.stat()).st_size
        return total

    async def counts(self, tables: Sequence[str] = COUNTED_TABLES) -> dict[str, int]:
        """Row counts of `tables` (default: the main ones, vector tables included)."""
        out = {}
        for table in tables:
            if table not in COUNTED_TABLES:
                raise ValueError(f"not a tiermem table: {table!r}")
            row = await self._read_one(f"SELECT COUNT(*) FROM {table}")
            out[table] = int(row[0]) if row else 0
        return out
