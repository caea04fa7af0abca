"""Connections to one SQLite file: opening and preparing it, transactions, reads, and the
mapping of `sqlite3.Error` to `StorageError`. No table of its own: `schema_migrations`
(the runner's) and `meta` (the embedding model and dimension, checked here before any
migration runs) are what it reads on the way in.

Writes go through one connection, one transaction at a time (`BEGIN IMMEDIATE`); reads use
two more (a search's text and vector reads side by side), so searches run beside writes. A
cancelled write rolls back, shielded. sqlite-vec is loaded on `pysqlite3` connections
(this Python lacks `enable_load_extension`) handed to aiosqlite.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite
import anyio
import pysqlite3.dbapi2 as sqlite3
import sqlite_vec

from .._errors import EmbeddingMismatchError, StorageError
from . import _migrate as migrate
from ._steps import Parameters

Row = tuple[Any, ...]
log = logging.getLogger("tiermem._store")


def raw_connect(path: str, busy_timeout_ms: int, read_only: bool = False, wal: bool = True) -> Any:
    """A blocking connection with sqlite-vec loaded and the pragmas every one needs."""
    if read_only:  # SQLite refuses every write on it, whoever the process runs as
        uri = f"file:{urllib.request.pathname2url(os.path.abspath(path))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if wal and not read_only:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # deleted rows and freed pages are overwritten with zeros, not left in the file
        conn.execute("PRAGMA secure_delete = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def prepare(
    path: str, busy_timeout_ms: int, read_only: bool, check: bool, params: Parameters
) -> None:
    """Blocking: check the file is a SQLite database (and sound, if `check`), that its
    vectors come from `params`' embedding model, and migrate it; a read-only one must need
    no migration."""
    # WAL only once the file is known to be tiermem's: the mode is written in the file
    conn = raw_connect(path, busy_timeout_ms, read_only, wal=False)
    try:
        verdict = conn.execute("PRAGMA quick_check" if check else "PRAGMA schema_version")
        result = verdict.fetchone()[0]
        if check and result != "ok":
            raise StorageError(f"database {path} is damaged: {result}")
        if read_only:
            if migrate.pending(conn):
                raise StorageError(
                    f"database {path} is read-only and needs migrating by this tiermem: "
                    "open it once with write access"
                )
            _check_embedding_model(conn, path, params)
            return
        migrate.check_ours(conn)
        _check_embedding_model(conn, path, params)
        conn.execute("PRAGMA journal_mode = WAL")
        if migrate.apply(conn, params=params):
            _compact_if_mostly_free(conn, path)
    finally:
        conn.close()


def _check_embedding_model(conn: Any, path: str, params: Parameters) -> None:
    """Refuse to open a file whose vectors another embedding model made: searching them
    with this model's queries would silently return noise."""
    if 1 not in migrate.recorded(conn):  # blank: `meta` is made by the first migration
        return
    check_embedding_meta(dict(conn.execute("SELECT key, value FROM meta").fetchall()), path, params)


def check_embedding_meta(known: dict[str, str], path: str, params: Parameters) -> None:
    """Refuse a database whose `meta` names another embedding model or dimension."""
    model, dims = params.embedding_model, params.dimensions
    known_model, known_dims = known.get("embedding_model"), known.get("embedding_dims")
    if known_dims is not None and int(known_dims) != dims:
        raise EmbeddingMismatchError(
            f"database {path} holds {known_dims}-dimensional vectors from "
            f"{known_model!r}; the configured embedding model {model!r} gives {dims}"
        )
    if known_model is not None and known_model != model:
        raise EmbeddingMismatchError(
            f"database {path} holds vectors from {known_model!r}, not from the "
            f"configured embedding model {model!r}: searching them with another model's "
            "queries would silently return noise"
        )


def _compact_if_mostly_free(conn: Any, path: str) -> None:
    """VACUUM once a migration has left most of the file free (migration 7 drops a vec0
    table that held 1.5 MB a session): the pages would otherwise stay in the file. Only a
    saving, so a failure (another process busy on the file, no room for the copy) is not
    one of the open."""
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    if free * 2 > conn.execute("PRAGMA page_count").fetchone()[0]:
        try:
            conn.execute("VACUUM")
        except sqlite3.Error as exc:
            log.warning("%s: not compacted after its migration (%s)", path, exc)


async def connect(path: str, busy_timeout_ms: int, read_only: bool) -> list[aiosqlite.Connection]:
    """The three connections of a store (writer, reader, vector reader), all or none."""
    opened: list[aiosqlite.Connection] = []
    try:
        for _ in range(3):
            conn = aiosqlite.Connection(lambda: raw_connect(path, busy_timeout_ms, read_only), 64)
            opened.append(conn)
            await conn
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            for conn in opened:
                await conn.close()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        raise
    return opened


class Database:
    """The connections to one file, and the only paths to them: `_transaction` for
    writes, `_read_all` for reads. The store's query classes build on it."""

    def __init__(
        self,
        path: str,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        vector_reader: aiosqlite.Connection,
        *,
        dimensions: int,
        read_only: bool,
        clock: Callable[[], float],
    ):
        self.path = path
        self.dimensions = dimensions
        self.read_only = read_only
        self._writer = writer
        self._reader = reader
        # the vector reads of a search run beside its text reads, on their own connection
        self._vector_reader = vector_reader
        self._write_lock = anyio.Lock()
        # stamps every row's time: the manager's clock, so ages are measured on one clock
        self._clock = clock

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._vector_reader.close()
            await self._reader.close()
            await self._writer.close()

    def abandon(self) -> None:
        """Stop the connections' threads without waiting (a store never closed, being
        collected): their threads would otherwise keep the process from exiting."""
        for conn in (self._vector_reader, self._reader, self._writer):
            with contextlib.suppress(Exception):
                conn.stop()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; rolled back (shielded from cancellation) on any error."""
        if self.read_only:
            raise StorageError(f"database {self.path} is open read-only: nothing can change")
        async with self._write_lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
            except BaseException as exc:
                # cancelled while the BEGIN ran in the connection's thread: it may have
                # begun; the rollback, queued behind it, ends it
                await self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"cannot start a write on {self.path}: {exc}") from exc
                raise
            try:
                yield self._writer
                with anyio.CancelScope(shield=True):
                    await self._writer.commit()
            except BaseException as exc:
                await self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"write to {self.path} failed: {exc}") from exc
                raise

    async def _rollback(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error):
            await self._writer.rollback()

    async def _read_all(
        self, sql: str, params: Sequence[Any] = (), conn: aiosqlite.Connection | None = None
    ) -> list[Row]:
        # one call into the connection's thread runs the statement to its end: statements
        # of concurrent tasks interleaved on one connection would keep its read
        # transaction open, and its snapshot stale, for as long as they overlap
        try:
            return [tuple(r) for r in await (conn or self._reader).execute_fetchall(sql, params)]
        except sqlite3.Error as exc:
            raise StorageError(f"read from {self.path} failed: {exc}") from exc

    async def _read_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self._read_all(sql, params)
        return rows[0] if rows else None

    async def _truncate_wal(self) -> None:
        """Checkpoint the whole WAL into the file and truncate it. It waits (busy timeout)
        for readers still on old frames; another process's long read can outlast that, and
        then the old frames stay until a later checkpoint."""
        async with self._write_lock:
            try:
                async with self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                    row = await cursor.fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"checkpoint of {self.path} failed: {exc}") from exc
        if row is not None and row[0]:
            log.warning(
                "%s: the WAL could not be emptied after a delete (a reader held it); "
                "the deleted text stays in it until the next checkpoint",
                self.path,
            )
