"""Sessions and what they carry besides messages: `sessions` (namespace, session id,
created, last activity; ids AUTOINCREMENT, never reused), `session_state` (what rebuilds an
active cache, with a `version` that moves on with every write of it) and
`session_summaries` (one cumulative summary per session).

Deletes overwrite what they remove (`PRAGMA secure_delete`, FTS5's secure-delete), and a
session's delete ends with a WAL checkpoint that truncates the log, so its text is in
neither file afterwards.
"""

from __future__ import annotations

import json

import aiosqlite

from ._connection import Database
from ._protocol import StaleSession
from ._rows import SessionRow, SessionVersion, StateRow, SummaryRow
from ._vectors import ids_json


async def claim(db: aiosqlite.Connection, key: int, version: int) -> None:
    """Inside a write transaction (which holds the database's write lock): refuse with
    `StaleSession` unless the session is still there at `version`."""
    async with db.execute(
        "SELECT version FROM session_state WHERE session_key = ?", (key,)
    ) as cursor:
        row = await cursor.fetchone()
    if row is None or int(row[0]) != version:
        raise StaleSession(f"session {key} changed since it was read")


async def write_state(db: aiosqlite.Connection, key: int, state: StateRow, now: float) -> None:
    """Write `state` (claimed at `state.version`) and move its version on."""
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
            ids_json(state.pinned or []),
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


class SessionQueries(Database):
    # -- sessions --------------------------------------------------------------------------

    async def session_key(self, namespace: str, session_id: str) -> int | None:
        row = await self._read_one(
            "SELECT id FROM sessions WHERE namespace = ? AND session_id = ?",
            (namespace, session_id),
        )
        return int(row[0]) if row else None

    async def create_session(self, namespace: str, session_id: str) -> int:
        now = self._clock()
        async with self._transaction() as db:
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

    async def list_sessions(self) -> list[SessionRow]:
        """Every session with its message count and bytes of message text, the most
        recently active first."""
        rows = await self._read_all(
            "SELECT s.namespace, s.session_id, COALESCE(st.message_count, 0), "
            "(SELECT COALESCE(SUM(length(CAST(m.content AS BLOB))), 0) FROM messages m "
            "WHERE m.session_key = s.id), s.last_activity "
            "FROM sessions s LEFT JOIN session_state st ON st.session_key = s.id "
            "ORDER BY s.last_activity DESC, s.id DESC"
        )
        return [SessionRow(r[0], r[1], int(r[2]), int(r[3]), float(r[4])) for r in rows]

    async def delete_if_unused(self, key: int) -> None:
        """Remove a session that was created but never written (a first call that failed)."""
        async with self._transaction() as db:
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
        async with self._transaction() as db:
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

    # -- state -----------------------------------------------------------------------------

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

    async def save_state(self, key: int, state: StateRow) -> None:
        """Write the session's state if it is still at `state.version` (else `StaleSession`);
        `state.version` moves on."""
        async with self._transaction() as db:
            await claim(db, key, state.version)
            await write_state(db, key, state, self._clock())

    async def save_entry_stats(self, key: int, version: int, stats: dict[str, list[float]]) -> bool:
        """The active entries' access counts and engagement, soft figures that do not move the
        version; written only over the same version (a stale copy's are dropped)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE session_state SET entry_stats = ? WHERE session_key = ? AND version = ?",
                (json.dumps(stats), key, version),
            )
            return bool(cursor.rowcount)

    async def session_version(self, key: int) -> SessionVersion | None:
        """The state's version and the summary's reach, or None once deleted: what a
        process checks its copy of the session against before using it."""
        row = await self._read_one(
            "SELECT st.version, COALESCE(su.covered_through, -1) FROM session_state st "
            "LEFT JOIN session_summaries su ON su.session_key = st.session_key "
            "WHERE st.session_key = ?",
            (key,),
        )
        return SessionVersion(int(row[0]), int(row[1])) if row else None

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
        async with self._transaction() as db:
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
