"""Messages: `messages` (every message ever stored, tier 3: position and client id
unique in the session, content with its hash, metadata, creation time, tokens; ids
AUTOINCREMENT, never reused), `messages_fts` (FTS5 over content and session key, kept in
sync by triggers) and their vectors (see `_vectors.py`), written with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._connection import Database, Row
from ._rows import MessageKey, MessageRow, NewMessage, StateRow
from ._state import claim, write_state
from ._vectors import ids_json, insert_vector

MESSAGE_COLUMNS = "id, position, message_id, role, content, created_at, token_count, metadata"


class MessageQueries(Database):
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
        async with self._transaction() as db:
            await claim(db, key, state.version)
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
                    await insert_vector(db, rowid, key, vectors[i])
            await write_state(db, key, state, self._clock())
        return rowids

    async def messages_by_rowid(self, rowids: Sequence[int]) -> list[MessageRow]:
        if not rowids:
            return []
        rows = await self._read_all(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id IN "
            "(SELECT value FROM json_each(?)) ORDER BY position",
            (ids_json(rowids),),
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
            (key, ids_json(wanted)),
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

    async def latest_openings(self, key: int, count: int, chars: int) -> list[tuple[str, str]]:
        """The role and first `chars` characters of the session's latest `count` messages."""
        rows = await self._read_all(
            "SELECT role, substr(content, 1, ?) FROM messages WHERE session_key = ? "
            "ORDER BY position DESC LIMIT ?",
            (chars, key, count),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

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
            (ids_json(rowids),),
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
