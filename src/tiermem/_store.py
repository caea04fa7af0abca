"""SQLite storage: one file, WAL, sqlite-vec loaded on a pysqlite3 connection under aiosqlite.

Tables (see migrations/): `sessions` (namespace, session id), `messages` (every message ever
stored, tier 3) with `messages_fts` (FTS5, kept in sync by triggers), `session_state`
(what rebuilds an active cache), `kv_snapshots` and `kv_snapshot_entries` (tier 2),
`session_summaries` (one cumulative summary per session), `meta`. Vectors: every message's
float32 vector in `message_embeddings` (exact distances, read by primary key; snapshot search
ranks the snapshot entries' messages by them), and `message_index`, a vec0 table of the sign
bits of each message vector partitioned by session (a Hamming pass over 48 bytes a message,
never another session's, picks candidates that the float vectors then rank exactly); its
dimension follows the embedding model recorded in `meta`.

Ids (sessions, messages, snapshots) are AUTOINCREMENT, never reused. Deletes overwrite what
they remove (`PRAGMA secure_delete`, FTS5's secure-delete), and a session's delete ends with a
WAL checkpoint that truncates the log, so its text is in neither file afterwards.

Writes go through one connection, one transaction at a time (`BEGIN IMMEDIATE`); reads use
two more (a search's text and vector reads side by side), so searches run beside writes. A
cancelled write rolls back, shielded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import anyio.to_thread
import numpy as np
import pysqlite3.dbapi2 as sqlite3
import sqlite_vec

from . import _migrate as migrate
from . import _text as text
from ._errors import EmbeddingMismatchError, StorageError

Row = tuple[Any, ...]
log = logging.getLogger("tiermem._store")

# the bit index proposes this many candidates per nearest neighbour wanted (see vector_search)
KNN_OVERSAMPLE = 4
# vectors per vec0 chunk of the bit index. A session holds at least one whole chunk, 56 B a
# vector (bits and rowid): 14 KB at 256, where vec0's default of 1,024 made it 57 KB, more
# than a small session's messages take. Smaller chunks cost KNN time on big sessions (a pass
# merges its top k per chunk): k=200 at 100k messages took 17 ms at 1,024, 31 ms at 256
INDEX_CHUNK_SIZE = 256
VEC0_MAX_K = 4096
MESSAGE_COLUMNS = "id, position, message_id, role, content, created_at, token_count, metadata"


@dataclass(frozen=True, slots=True)
class MessageRow:
    rowid: int
    position: int
    message_id: str
    role: str
    content: str
    created_at: float
    token_count: int
    metadata: str | None

    @classmethod
    def of(cls, row: Row) -> MessageRow:
        return cls(*row)


@dataclass(frozen=True, slots=True)
class MessageKey:
    """What identifies a stored message when matching what a client sends against it."""

    position: int
    message_id: str
    content_hash: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    position: int
    message_id: str
    role: str
    content: str
    content_hash: str
    metadata: str | None
    created_at: float
    token_count: int


class StaleSession(StorageError):
    """The session changed in the database (another process wrote it, or deleted it) since
    this copy was read: the caller reloads it and tries again, never overwrites."""


@dataclass(slots=True)
class StateRow:
    """A session's persistent state; `version` moves on with every write of it."""

    conversation_count: int = 0
    clear_count: int = 0
    message_count: int = 0
    cleared_through: int = -1
    pinned: list[int] | None = None
    entry_stats: dict[str, list[float]] | None = None
    prefix_digest: str = ""
    last_cleared_at: float | None = None
    last_snapshot_id: int | None = None
    version: int = 0

    def copy(self) -> StateRow:
        """A copy to change: the session's own state changes only once a write committed."""
        return dataclasses.replace(
            self,
            pinned=list(self.pinned or []),
            entry_stats=dict(self.entry_stats or {}),
        )


@dataclass(frozen=True, slots=True)
class SummaryRow:
    text: str
    token_count: int
    message_count: int
    clear_count: int
    covered_through: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class SnapshotEntryRow:
    message_rowid: int
    importance: float
    entry_type: str
    kv_bytes: int


def _raw_connect(path: str, busy_timeout_ms: int, read_only: bool = False, wal: bool = True) -> Any:
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


def _prepare(path: str, busy_timeout_ms: int, read_only: bool, check: bool) -> None:
    """Blocking: check the file is a SQLite database (and sound, if `check`) and migrate
    it; a read-only one must need no migration."""
    # WAL only once the file is known to be tiermem's: the mode is written in the file
    conn = _raw_connect(path, busy_timeout_ms, read_only, wal=False)
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
            return
        migrate.check_ours(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        if migrate.apply(conn):
            _compact_if_mostly_free(conn, path)
    finally:
        conn.close()


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


def _blob(vector: np.ndarray[Any, Any]) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _bits(vector: np.ndarray[Any, Any]) -> bytes:
    """The vector's sign bits, the key of the Hamming index (padded to whole bytes)."""
    return np.packbits(np.asarray(vector) > 0).tobytes()


def _cosine_distances(query: np.ndarray[Any, Any], rows: Sequence[Row]) -> dict[int, float]:
    """(rowid, float32 blob) rows -> cosine distance from `query` to each."""
    if not rows:
        return {}
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    norms = np.linalg.norm(matrix, axis=1) * (float(np.linalg.norm(query)) or 1.0)
    similarity = (matrix @ np.asarray(query, dtype=np.float32)) / np.where(norms > 0, norms, 1.0)
    return {int(r[0]): float(1.0 - s) for r, s in zip(rows, similarity, strict=True)}


def _in_session(key: int) -> str:
    """The FTS5 filter on the session key column (an integer, so nothing to escape)."""
    return f'session_key : "{int(key)}"'


def _ids_json(ids: Iterable[int]) -> str:
    return json.dumps([int(i) for i in ids])


_INDEX_INSERT = "INSERT INTO message_index(rowid, session_key, embedding) VALUES (?, ?, vec_bit(?))"


async def _insert_vector(
    db: aiosqlite.Connection, rowid: int, key: int, vector: np.ndarray[Any, Any]
) -> None:
    await db.execute(
        "INSERT INTO message_embeddings(message_rowid, embedding) VALUES (?, ?)",
        (rowid, _blob(vector)),
    )
    await db.execute(_INDEX_INSERT, (rowid, key, _bits(vector)))


async def _index_embeddings(db: aiosqlite.Connection) -> None:
    """Fill a new bit index from the stored float vectors, a page at a time."""
    after = 0
    while True:
        async with db.execute(
            "SELECT e.message_rowid, m.session_key, e.embedding FROM message_embeddings e "
            "JOIN messages m ON m.id = e.message_rowid WHERE e.message_rowid > ? "
            "ORDER BY e.message_rowid LIMIT 10000",
            (after,),
        ) as cursor:
            rows = list(await cursor.fetchall())
        if not rows:
            return
        await db.executemany(
            _INDEX_INSERT,
            [(r[0], r[1], _bits(np.frombuffer(r[2], dtype=np.float32))) for r in rows],
        )
        after = rows[-1][0]


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


class SQLiteStore:
    """The tiermem database. Every method is a coroutine; none blocks the event loop."""

    def __init__(
        self,
        path: str,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        vector_reader: aiosqlite.Connection,
    ):
        self.path = path
        self._writer = writer
        self._reader = reader
        # the vector reads of a search run beside its text reads, on their own connection
        self._vector_reader = vector_reader
        self._write_lock = anyio.Lock()
        self.dimensions = 0
        self.read_only = False

    # -- lifecycle -------------------------------------------------------------------------

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
    ) -> SQLiteStore:
        """Open (creating and migrating) the database and check the embedding model.

        A file this process may not write is opened read-only (as is any with
        `read_only`): reads work, every write is a `StorageError`. `check` runs SQLite's
        `quick_check` first (a read of the whole file)."""
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
        try:
            await anyio.to_thread.run_sync(_prepare, target, busy_timeout_ms, read_only, check)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {target}: {exc}") from exc
        opened: list[aiosqlite.Connection] = []
        try:
            for _ in range(3):
                conn = aiosqlite.Connection(
                    lambda: _raw_connect(target, busy_timeout_ms, read_only), 64
                )
                opened.append(conn)
                await conn
            store = cls(target, *opened)
            store.read_only = read_only
            await store._ensure_vectors(embedding_model, dimensions)
            return store
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                for conn in opened:
                    await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open database {target}: {exc}") from exc
            raise

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._vector_reader.close()
            await self._reader.close()
            await self._writer.close()

    async def _ensure_vectors(self, model: str, dims: int) -> None:
        rows: dict[str, str] = dict(
            await self._read_all("SELECT key, value FROM meta", conn=self._writer)
        )
        known_model, known_dims = rows.get("embedding_model"), rows.get("embedding_dims")
        if known_dims is not None and int(known_dims) != dims:
            raise EmbeddingMismatchError(
                f"database {self.path} holds {known_dims}-dimensional vectors from "
                f"{known_model!r}; the configured embedding model {model!r} gives {dims}"
            )
        if known_model is not None and known_model != model:
            raise EmbeddingMismatchError(
                f"database {self.path} holds vectors from {known_model!r}, not from the "
                f"configured embedding model {model!r}: searching them with another model's "
                "queries would silently return noise"
            )
        bits = -(-dims // 8) * 8
        if self.read_only:
            if known_model is None or not await self._read_all(
                "SELECT 1 FROM sqlite_master WHERE name = 'message_index'", conn=self._writer
            ):
                raise StorageError(f"database {self.path} is read-only and was never written")
            self.dimensions = dims
            return
        async with self.transaction() as db:
            async with db.execute(
                "SELECT name FROM sqlite_master WHERE name IN ('message_vectors', 'message_index')"
            ) as cursor:
                tables = {r[0] for r in await cursor.fetchall()}
            if "message_vectors" in tables:
                # the float vec0 table of databases made before migration 0004
                await db.execute(
                    "INSERT OR IGNORE INTO message_embeddings(message_rowid, embedding) "
                    "SELECT v.rowid, v.embedding FROM message_vectors v "
                    "JOIN messages m ON m.id = v.rowid"
                )
                await db.execute("DROP TABLE message_vectors")
            if "message_index" not in tables:
                await db.execute(
                    "CREATE VIRTUAL TABLE message_index USING vec0("
                    f"session_key integer partition key, embedding bit[{bits}], "
                    f"chunk_size={INDEX_CHUNK_SIZE})"
                )
                await _index_embeddings(db)
            await db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('embedding_model', ?), "
                "('embedding_dims', ?)",
                (model, str(dims)),
            )
        self.dimensions = dims

    # -- plumbing --------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
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

    # -- sessions --------------------------------------------------------------------------

    async def session_key(self, namespace: str, session_id: str) -> int | None:
        row = await self._read_one(
            "SELECT id FROM sessions WHERE namespace = ? AND session_id = ?",
            (namespace, session_id),
        )
        return int(row[0]) if row else None

    async def create_session(self, namespace: str, session_id: str) -> int:
        now = time.time()
        async with self.transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO sessions(namespace, session_id, created_at, last_activity)"
                " VALUES (?, ?, ?, ?)",
                (namespace, session_id, now, now),
            )
            async with db.execute(
                "SELECT id FROM sessions WHERE namespace = ? AND session_id = ?",
                (namespace, session_id),
            ) as cursor:
                row = await cursor.fetchone()
            assert row is not None
            key = int(row[0])
            await db.execute(
                "INSERT OR IGNORE INTO session_state(session_key, updated_at) VALUES (?, ?)",
                (key, now),
            )
        return key

    async def list_sessions(self) -> list[tuple[str, str, int, int, float]]:
        """(namespace, session id, message count, bytes of message text, last activity) for
        every session, the most recently active first."""
        rows = await self._read_all(
            "SELECT s.namespace, s.session_id, COALESCE(st.message_count, 0), "
            "(SELECT COALESCE(SUM(length(CAST(m.content AS BLOB))), 0) FROM messages m "
            "WHERE m.session_key = s.id), s.last_activity "
            "FROM sessions s LEFT JOIN session_state st ON st.session_key = s.id "
            "ORDER BY s.last_activity DESC"
        )
        return [(r[0], r[1], int(r[2]), int(r[3]), float(r[4])) for r in rows]

    async def load_state(self, key: int) -> StateRow:
        row = await self._read_one(
            "SELECT conversation_count, clear_count, message_count, cleared_through, pinned, "
            "entry_stats, prefix_digest, last_cleared_at, last_snapshot_id, version "
            "FROM session_state WHERE session_key = ?",
            (key,),
        )
        if row is None:
            return StateRow(pinned=[], entry_stats={})
        return StateRow(
            conversation_count=row[0],
            clear_count=row[1],
            message_count=row[2],
            cleared_through=row[3],
            pinned=[int(i) for i in json.loads(row[4])],
            entry_stats=json.loads(row[5]),
            prefix_digest=row[6],
            last_cleared_at=row[7],
            last_snapshot_id=row[8],
            version=row[9],
        )

    @staticmethod
    async def _claim(db: aiosqlite.Connection, key: int, version: int) -> None:
        """Inside a write transaction (which holds the database's write lock): refuse with
        `StaleSession` unless the session is still there at `version`."""
        async with db.execute(
            "SELECT version FROM session_state WHERE session_key = ?", (key,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None or int(row[0]) != version:
            raise StaleSession(f"session {key} changed since it was read")

    @staticmethod
    async def _write_state(db: aiosqlite.Connection, key: int, state: StateRow) -> None:
        """Write `state` (claimed at `state.version`) and move its version on."""
        now = time.time()
        await db.execute(
            "UPDATE session_state SET conversation_count = ?, clear_count = ?, message_count = ?,"
            " cleared_through = ?, pinned = ?, entry_stats = ?, prefix_digest = ?,"
            " last_cleared_at = ?, last_snapshot_id = ?, updated_at = ?, version = version + 1"
            " WHERE session_key = ? AND version = ?",
            (
                state.conversation_count,
                state.clear_count,
                state.message_count,
                state.cleared_through,
                _ids_json(state.pinned or []),
                json.dumps(state.entry_stats or {}),
                state.prefix_digest,
                state.last_cleared_at,
                state.last_snapshot_id,
                now,
                key,
                state.version,
            ),
        )
        await db.execute("UPDATE sessions SET last_activity = ? WHERE id = ?", (now, key))
        state.version += 1

    async def save_state(self, key: int, state: StateRow) -> None:
        """Write the session's state if it is still at `state.version` (else `StaleSession`);
        `state.version` moves on."""
        async with self.transaction() as db:
            await self._claim(db, key, state.version)
            await self._write_state(db, key, state)

    async def save_entry_stats(self, key: int, version: int, stats: dict[str, list[float]]) -> bool:
        """The active entries' access counts and engagement, soft figures that do not move the
        version; written only over the same version (a stale copy's are dropped)."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE session_state SET entry_stats = ? WHERE session_key = ? AND version = ?",
                (json.dumps(stats), key, version),
            )
            return bool(cursor.rowcount)

    async def session_version(self, key: int) -> tuple[int, int] | None:
        """(state version, the summary's covered_through or -1), or None once deleted: what
        a process checks its copy of the session against before using it."""
        row = await self._read_one(
            "SELECT st.version, COALESCE(su.covered_through, -1) FROM session_state st "
            "LEFT JOIN session_summaries su ON su.session_key = st.session_key "
            "WHERE st.session_key = ?",
            (key,),
        )
        return (int(row[0]), int(row[1])) if row else None

    async def delete_if_unused(self, key: int) -> None:
        """Remove a session that was created but never written (a first call that failed)."""
        async with self.transaction() as db:
            await db.execute(
                "DELETE FROM sessions WHERE id = ? AND NOT EXISTS (SELECT 1 FROM messages "
                "WHERE session_key = ?) AND (SELECT version FROM session_state "
                "WHERE session_key = ?) = 0",
                (key, key, key),
            )

    async def delete_session(self, key: int) -> None:
        """Remove the session and everything derived from it, vectors included, and its
        bytes: the deleted rows are zeroed in the pages written (secure delete), and the
        checkpoint that follows moves those pages into the file and empties the WAL, whose
        older frames still hold the text."""
        async with self.transaction() as db:
            # vec0 (0.1.9) zeroes a deleted vector in its chunk and drops emptied chunks
            await db.execute(
                "DELETE FROM message_index WHERE rowid IN "
                "(SELECT id FROM messages WHERE session_key = ?)",
                (key,),
            )
            # cascades: messages (and their FTS rows through the trigger, their embeddings),
            # state, snapshots, snapshot entries, summaries
            await db.execute("DELETE FROM sessions WHERE id = ?", (key,))
        await self._truncate_wal()

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

    # -- messages --------------------------------------------------------------------------

    async def existing_ids(self, key: int, message_ids: Sequence[str]) -> dict[str, str]:
        """Of `message_ids`, those already stored in the session, with their content hash."""
        if not message_ids:
            return {}
        rows = await self._read_all(
            "SELECT message_id, content_hash FROM messages WHERE session_key = ? AND "
            "message_id IN (SELECT value FROM json_each(?))",
            (key, json.dumps(list(message_ids))),
        )
        return {r[0]: r[1] for r in rows}

    async def message_keys(
        self,
        key: int,
        limit: int | None = None,
        newest_first: bool = False,
        like: tuple[Sequence[str], Sequence[str]] | None = None,
    ) -> list[MessageKey]:
        """The session's message keys in position order: the first `limit` (the last, if
        `newest_first`), or all; only those with one of the content hashes or ids in `like`
        (hashes, ids) where given. Lets a caller read the ends, or the matches, not all."""
        where = "session_key = ?"
        params: list[Any] = [key]
        if like is not None:
            where += (
                " AND (content_hash IN (SELECT value FROM json_each(?))"
                " OR message_id IN (SELECT value FROM json_each(?)))"
            )
            params += [json.dumps(list(like[0])), json.dumps(list(like[1]))]
        rows = await self._read_all(
            f"SELECT position, message_id, content_hash FROM messages WHERE {where}"
            f" ORDER BY position {'DESC' if newest_first else 'ASC'} LIMIT ?",
            (*params, -1 if limit is None else limit),
        )
        keys = [MessageKey(int(r[0]), r[1], r[2]) for r in rows]
        return keys[::-1] if newest_first else keys

    async def append_messages(
        self,
        key: int,
        messages: Sequence[NewMessage],
        vectors: np.ndarray[Any, Any] | None,
        state: StateRow,
    ) -> list[int]:
        """Store messages, their FTS rows and vectors, and the session's state: one transaction."""
        rowids: list[int] = []
        async with self.transaction() as db:
            await self._claim(db, key, state.version)
            for i, m in enumerate(messages):
                cursor = await db.execute(
                    "INSERT INTO messages(session_key, position, message_id, role, content,"
                    " content_hash, metadata, created_at, token_count)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        m.position,
                        m.message_id,
                        m.role,
                        m.content,
                        m.content_hash,
                        m.metadata,
                        m.created_at,
                        m.token_count,
                    ),
                )
                rowid = int(cursor.lastrowid or 0)
                rowids.append(rowid)
                if vectors is not None:
                    await _insert_vector(db, rowid, key, vectors[i])
            await self._write_state(db, key, state)
        return rowids

    async def messages_by_rowid(self, rowids: Sequence[int]) -> list[MessageRow]:
        if not rowids:
            return []
        rows = await self._read_all(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id IN "
            "(SELECT value FROM json_each(?)) ORDER BY position",
            (_ids_json(rowids),),
        )
        return [MessageRow.of(r) for r in rows]

    async def messages_between(
        self, key: int, after: int, through: int = 2**62
    ) -> list[MessageRow]:
        """The session's messages with position in (after, through], in order."""
        rows = await self._read_all(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_key = ? AND position > ? "
            "AND position <= ? ORDER BY position",
            (key, after, through),
        )
        return [MessageRow.of(r) for r in rows]

    async def messages_at(self, key: int, positions: Iterable[int]) -> list[MessageRow]:
        """The session's messages at the given positions (those that exist)."""
        wanted = sorted({p for p in positions if p >= 0})
        if not wanted:
            return []
        rows = await self._read_all(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_key = ? AND position IN "
            "(SELECT value FROM json_each(?))",
            (key, _ids_json(wanted)),
        )
        return [MessageRow.of(r) for r in rows]

    async def rowids_between_times(
        self, key: int, start: float, end: float, limit: int
    ) -> list[int]:
        """The session's message rowids created in [start, end), newest first, at most `limit`."""
        rows = await self._read_all(
            "SELECT id FROM messages WHERE session_key = ? AND created_at >= ? AND created_at < ?"
            " ORDER BY created_at DESC LIMIT ?",
            (key, start, end, limit),
        )
        return [int(r[0]) for r in rows]

    async def latest_time(self, key: int) -> float | None:
        """When the session's newest message was created."""
        row = await self._read_one(
            "SELECT MAX(created_at) FROM messages WHERE session_key = ?", (key,)
        )
        return float(row[0]) if row and row[0] is not None else None

    async def message_vectors(self, rowids: Sequence[int]) -> dict[int, np.ndarray[Any, Any]]:
        rows = await self._embedding_rows(rowids)
        return {int(r[0]): np.frombuffer(r[1], dtype=np.float32) for r in rows}

    async def _embedding_rows(self, rowids: Sequence[int]) -> list[Row]:
        """(message rowid, float32 blob) of the given messages that have a vector."""
        if not rowids:
            return []
        return await self._read_all(
            "SELECT message_rowid, embedding FROM message_embeddings WHERE message_rowid IN "
            "(SELECT value FROM json_each(?))",
            (_ids_json(rowids),),
        )

    async def vectors_by_hash(self, hashes: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        """Stored vectors of messages with these content hashes (any session): a text is
        embedded once per database, since every vector in it comes from one model."""
        if not hashes:
            return {}
        rows = await self._read_all(
            "SELECT m.content_hash, v.embedding FROM messages m "
            "JOIN message_embeddings v ON v.message_rowid = m.id "
            "WHERE m.content_hash IN (SELECT value FROM json_each(?)) GROUP BY m.content_hash",
            (json.dumps(sorted(set(hashes))),),
        )
        return {r[0]: np.frombuffer(r[1], dtype=np.float32) for r in rows}

    # -- search ----------------------------------------------------------------------------

    async def lexical_search(
        self, terms: Sequence[str], key: int, limit: int
    ) -> list[tuple[int, float]]:
        """(message rowid, bm25 score; higher is better) of the session's best `limit` matches
        for any of `terms` (each quoted, so nothing in them is FTS5 syntax).

        The query is restricted to the session inside FTS5, so other sessions' rows are never
        scored. A term in more than half of the session's messages is left out while rarer
        ones remain: it barely tells the session's messages apart (where it is that common
        everywhere, bm25 gives it no weight at all), yet it would make nearly every message
        a match to be scored, the whole cost of the query.
        """
        if len(terms) > 1:
            terms = await self._informative(terms, key)
        query = text.fts_query(terms)
        if not query:
            return []
        rows = await self._read_all(
            "SELECT rowid, -bm25(messages_fts, 1.0, 0.0) AS score FROM messages_fts "
            "WHERE messages_fts MATCH ? ORDER BY score DESC LIMIT ?",
            (f"{_in_session(key)} AND content : ({query})", limit),
        )
        return [(int(r[0]), float(r[1])) for r in rows]

    async def _informative(self, terms: Sequence[str], key: int) -> list[str]:
        """`terms` without those in more than half of the session's messages (all when every
        one is). Counting a term's matches in the session walks posting lists without
        scoring: ~50x cheaper than the search."""
        counts = ", ".join(
            "(SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH ?)" for _ in terms
        )
        row = await self._read_one(
            f"SELECT (SELECT MAX(position) + 1 FROM messages WHERE session_key = ?), {counts}",
            [key, *(f"{_in_session(key)} AND content : {text.fts_query([t])}" for t in terms)],
        )
        if row is None or not row[0]:
            return list(terms)
        # positions count every message ever stored in the session: at least the row count
        kept = [t for t, n in zip(terms, row[1:], strict=True) if n * 2 <= row[0]]
        return kept or list(terms)

    async def vector_search(
        self, query: np.ndarray[Any, Any], key: int, k: int
    ) -> list[tuple[int, float]]:
        """(message rowid, cosine distance) of the session's k nearest messages, nearest first.

        The bit index proposes `KNN_OVERSAMPLE` x k candidates by Hamming distance (a scan of
        48 bytes a message instead of 1.5 KB), which their float vectors then rank exactly.
        """
        rows = await self._read_all(
            "WITH knn AS (SELECT rowid, distance FROM message_index "
            "WHERE embedding MATCH vec_bit(?) AND k = ? AND session_key = ?) "
            "SELECT e.message_rowid, e.embedding FROM knn "
            "JOIN message_embeddings e ON e.message_rowid = knn.rowid",
            (_bits(query), min(VEC0_MAX_K, KNN_OVERSAMPLE * k), key),
            conn=self._vector_reader,
        )
        ranked = sorted(_cosine_distances(query, rows).items(), key=lambda item: item[1])
        return ranked[:k]

    async def snapshot_vector_search(
        self, query: np.ndarray[Any, Any], key: int, k: int
    ) -> list[tuple[int, float]]:
        """(message rowid, cosine distance) of the session's k nearest snapshot entries,
        nearest first: an exact pass over their messages' stored vectors (a session's
        snapshots hold at most a few cache-fulls of entries, so no index is needed)."""
        rows = await self._read_all(
            "SELECT message_rowid, embedding FROM message_embeddings WHERE message_rowid IN "
            "(SELECT e.message_rowid FROM kv_snapshots s "
            "JOIN kv_snapshot_entries e ON e.snapshot_id = s.id WHERE s.session_key = ?)",
            (key,),
            conn=self._vector_reader,
        )
        ranked = sorted(_cosine_distances(query, rows).items(), key=lambda item: item[1])
        return ranked[:k]

    async def distances(
        self, query: np.ndarray[Any, Any], rowids: Sequence[int]
    ) -> dict[int, float]:
        """Cosine distance from `query` to each given message's vector."""
        return _cosine_distances(query, await self._embedding_rows(rowids))

    # -- snapshots -------------------------------------------------------------------------

    async def save_clear(
        self,
        key: int,
        state: StateRow,
        snapshot: tuple[str, str, Sequence[SnapshotEntryRow]] | None,
        vectors: dict[int, np.ndarray[Any, Any]],
    ) -> int | None:
        """A clear: the snapshot (row, entries) and the new state, atomically. `vectors` is
        no longer stored: snapshot search reads the entries' vectors in `message_embeddings`."""
        snapshot_id = None
        async with self.transaction() as db:
            await self._claim(db, key, state.version)
            if snapshot is not None:
                reason, strategy, entries = snapshot
                cursor = await db.execute(
                    "INSERT INTO kv_snapshots(session_key, reason, strategy, entry_count,"
                    " size_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        reason,
                        strategy,
                        len(entries),
                        sum(e.kv_bytes for e in entries),
                        time.time(),
                    ),
                )
                snapshot_id = int(cursor.lastrowid or 0)
                # searched by their messages' vectors in `message_embeddings`
                await db.executemany(
                    "INSERT INTO kv_snapshot_entries(snapshot_id, message_rowid, importance,"
                    " entry_type, kv_bytes) VALUES (?, ?, ?, ?, ?)",
                    [
                        (snapshot_id, e.message_rowid, e.importance, e.entry_type, e.kv_bytes)
                        for e in entries
                    ],
                )
                state.last_snapshot_id = snapshot_id
            await self._write_state(db, key, state)
        return snapshot_id

    async def snapshots(self, key: int) -> list[Row]:
        """(id, reason, entry count, size bytes, created at), newest first."""
        return await self._read_all(
            "SELECT id, reason, entry_count, size_bytes, created_at FROM kv_snapshots "
            "WHERE session_key = ? ORDER BY id DESC",
            (key,),
        )

    async def snapshot_entries(
        self, key: int, snapshot_id: int
    ) -> tuple[float, list[SnapshotEntryRow]] | None:
        """When one of the session's snapshots was taken, and its entries; None if the
        session has no such snapshot."""
        owner = await self._read_one(
            "SELECT created_at FROM kv_snapshots WHERE id = ? AND session_key = ?",
            (snapshot_id, key),
        )
        if owner is None:
            return None
        rows = await self._read_all(
            "SELECT message_rowid, importance, entry_type, kv_bytes FROM kv_snapshot_entries "
            "WHERE snapshot_id = ? ORDER BY id",
            (snapshot_id,),
        )
        return float(owner[0]), [SnapshotEntryRow(*r) for r in rows]

    async def snapshot_message_rowids(self, key: int) -> list[int]:
        rows = await self._read_all(
            "SELECT DISTINCT e.message_rowid FROM kv_snapshot_entries e "
            "JOIN kv_snapshots s ON s.id = e.snapshot_id WHERE s.session_key = ?",
            (key,),
        )
        return [int(r[0]) for r in rows]

    async def prune_snapshots(self, max_per_session: int) -> int:
        """Keep each session's newest `max_per_session` snapshots; returns how many went."""
        async with self.transaction() as db:
            async with db.execute(
                "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY session_key "
                "ORDER BY id DESC) AS n FROM kv_snapshots) WHERE n > ?",
                (max_per_session,),
            ) as cursor:
                doomed = [int(r[0]) for r in await cursor.fetchall()]
            if doomed:
                await db.execute(
                    "DELETE FROM kv_snapshots WHERE id IN (SELECT value FROM json_each(?))",
                    (_ids_json(doomed),),
                )
        return len(doomed)

    # -- summaries -------------------------------------------------------------------------

    async def summary(self, key: int) -> SummaryRow | None:
        row = await self._read_one(
            "SELECT text, token_count, message_count, clear_count, covered_through, updated_at "
            "FROM session_summaries WHERE session_key = ?",
            (key,),
        )
        return SummaryRow(*row) if row else None

    async def save_summary(self, key: int, summary: SummaryRow) -> bool:
        """Store the summary of session `key` if it still exists and the summary covers more
        than the stored one; False otherwise (deleted meanwhile, or another process wrote
        this clear's summary first). Session keys are never reused, so a summary can only
        land in the session it was computed for."""
        async with self.transaction() as db:
            async with db.execute("SELECT 1 FROM sessions WHERE id = ?", (key,)) as cursor:
                if await cursor.fetchone() is None:
                    return False
            cursor = await db.execute(
                "INSERT INTO session_summaries(session_key, text, token_count, message_count,"
                " clear_count, covered_through, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(session_key) DO UPDATE SET text = excluded.text,"
                " token_count = excluded.token_count, message_count = excluded.message_count,"
                " clear_count = excluded.clear_count, covered_through = excluded.covered_through,"
                " updated_at = excluded.updated_at"
                " WHERE excluded.covered_through > session_summaries.covered_through",
                (
                    key,
                    summary.text,
                    summary.token_count,
                    summary.message_count,
                    summary.clear_count,
                    summary.covered_through,
                    summary.updated_at,
                ),
            )
            return bool(cursor.rowcount)

    # -- introspection (tests, status) -----------------------------------------------------

    async def counts(self, tables: Sequence[str] = COUNTED_TABLES) -> dict[str, int]:
        """Row counts of `tables` (default: the main ones, vector tables included)."""
        out = {}
        for table in tables:
            if table not in COUNTED_TABLES:
                raise ValueError(f"not a tiermem table: {table!r}")
            row = await self._read_one(f"SELECT COUNT(*) FROM {table}")
            out[table] = int(row[0]) if row else 0
        return out
