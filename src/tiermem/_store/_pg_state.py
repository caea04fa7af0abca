"""The PostgreSQL store's sessions, state, summaries and snapshots: `sessions`,
`session_state` (SQLite's columns, plus the session's bm25 figures that `_pg_search.py`
keeps), `session_summaries`, `kv_snapshots` and `kv_snapshot_entries`. The same queries as
`_state.py` and `_snapshots.py`, in PostgreSQL's dialect; a version claim locks the
session's state row until the transaction ends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ._pg_base import PostgresDatabase, escape, unescape
from ._protocol import StaleSession
from ._rows import (
    SessionRow,
    SessionVersion,
    SnapshotContents,
    SnapshotEntryRow,
    SnapshotRow,
    StateRow,
    SummaryRow,
)
from ._vectors import ids_json


async def claim(conn: Any, key: int, version: int) -> None:
    """Inside a write transaction: lock the session's state row (a replica writing the same
    session waits for this transaction) and refuse with `StaleSession` unless it is still
    at `version`."""
    found = await conn.fetchval(
        "SELECT version FROM session_state WHERE session_key = $1 FOR UPDATE", key
    )
    if found is None or int(found) != version:
        raise StaleSession(f"session {key} changed since it was read")


async def write_state(conn: Any, key: int, state: StateRow, now: float) -> None:
    """Write `state` (claimed at `state.version`) and move its version on."""
    await conn.execute(
        "UPDATE session_state SET conversation_count = $1, clear_count = $2,"
        " message_count = $3, cleared_through = $4, pinned = $5, entry_stats = $6,"
        " prefix_digest = $7, last_cleared_at = $8, last_snapshot_id = $9, updated_at = $10,"
        " version = version + 1 WHERE session_key = $11 AND version = $12",
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
    )
    await conn.execute("UPDATE sessions SET last_activity = $1 WHERE id = $2", now, key)
    state.version += 1


class PostgresSessionQueries(PostgresDatabase):
    # -- sessions --------------------------------------------------------------------------

    async def session_key(self, namespace: str, session_id: str) -> int | None:
        row = await self._read_one(
            "SELECT id FROM sessions WHERE namespace = $1 AND session_id = $2",
            namespace,
            session_id,
        )
        return int(row[0]) if row else None

    async def create_session(self, namespace: str, session_id: str) -> int:
        now = self._clock()
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO sessions(namespace, session_id, created_at, last_activity)"
                " VALUES ($1, $2, $3, $3) ON CONFLICT (namespace, session_id) DO NOTHING",
                namespace,
                session_id,
                now,
            )
            found = await conn.fetchval(
                "SELECT id FROM sessions WHERE namespace = $1 AND session_id = $2",
                namespace,
                session_id,
            )
            if found is None:  # another replica deleted it in between
                raise StaleSession(f"session {session_id!r} was deleted while it was made")
            key = int(found)
            await conn.execute(
                "INSERT INTO session_state(session_key, updated_at) VALUES ($1, $2)"
                " ON CONFLICT (session_key) DO NOTHING",
                key,
                now,
            )
        return key

    async def list_sessions(self) -> list[SessionRow]:
        rows = await self._read_all(
            "SELECT s.namespace, s.session_id, COALESCE(st.message_count, 0), "
            "(SELECT COALESCE(SUM(CASE WHEN m.escaped THEN octet_length(regexp_replace("
            "m.content, '\\\\(.)', '\\1', 'g')) ELSE octet_length(m.content) END), 0) "
            "FROM messages m "
            "WHERE m.session_key = s.id), s.last_activity "
            "FROM sessions s LEFT JOIN session_state st ON st.session_key = s.id "
            "ORDER BY s.last_activity DESC, s.id DESC"
        )
        return [SessionRow(r[0], r[1], int(r[2]), int(r[3]), float(r[4])) for r in rows]

    async def delete_if_unused(self, key: int) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "DELETE FROM sessions WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM messages "
                "WHERE session_key = $1) AND (SELECT version FROM session_state "
                "WHERE session_key = $1) = 0",
                key,
            )

    async def delete_session(self, key: int) -> None:
        """Remove the session and everything derived from it (cascades). PostgreSQL keeps
        a deleted row's bytes in the table's pages until they are reused (and in its WAL
        until recycled): the README says what that means for secure delete here."""
        async with self._transaction() as conn:
            # the state row first, as every write of the session takes it (then the
            # session's row): the same order, so a delete and a write never deadlock
            await conn.execute("SELECT 1 FROM session_state WHERE session_key = $1 FOR UPDATE", key)
            await conn.execute("DELETE FROM sessions WHERE id = $1", key)

    # -- state -----------------------------------------------------------------------------

    async def load_state(self, key: int) -> StateRow:
        row = await self._read_one(
            "SELECT conversation_count, clear_count, message_count, cleared_through, pinned, "
            "entry_stats, prefix_digest, last_cleared_at, last_snapshot_id, version "
            "FROM session_state WHERE session_key = $1",
            key,
        )
        if row is None:
            return StateRow(pinned=[], entry_stats={})
        return StateRow(
            conversation_count=int(row[0]),
            clear_count=int(row[1]),
            message_count=int(row[2]),
            cleared_through=int(row[3]),
            pinned=[int(i) for i in json.loads(row[4])],
            entry_stats=json.loads(row[5]),
            prefix_digest=row[6],
            last_cleared_at=row[7],
            last_snapshot_id=None if row[8] is None else int(row[8]),
            version=int(row[9]),
        )

    async def save_state(self, key: int, state: StateRow) -> None:
        async with self._transaction() as conn:
            await claim(conn, key, state.version)
            await write_state(conn, key, state, self._clock())

    async def save_entry_stats(self, key: int, version: int, stats: dict[str, list[float]]) -> bool:
        async with self._transaction() as conn:
            status = await conn.execute(
                "UPDATE session_state SET entry_stats = $1 WHERE session_key = $2 AND version = $3",
                json.dumps(stats),
                key,
                version,
            )
        return bool(status != "UPDATE 0")

    async def session_version(self, key: int) -> SessionVersion | None:
        row = await self._read_one(
            "SELECT st.version, COALESCE(su.covered_through, -1) FROM session_state st "
            "LEFT JOIN session_summaries su ON su.session_key = st.session_key "
            "WHERE st.session_key = $1",
            key,
        )
        return SessionVersion(int(row[0]), int(row[1])) if row else None

    # -- summaries -------------------------------------------------------------------------

    async def summary(self, key: int) -> SummaryRow | None:
        row = await self._read_one(
            "SELECT text, token_count, message_count, clear_count, covered_through, updated_at,"
            " escaped FROM session_summaries WHERE session_key = $1",
            key,
        )
        if row is None:
            return None
        text = unescape(row[0], row[6])
        return SummaryRow(text, int(row[1]), int(row[2]), int(row[3]), int(row[4]), row[5])

    async def save_summary(self, key: int, summary: SummaryRow) -> bool:
        text, escaped = escape(summary.text)
        async with self._transaction() as conn:
            # the session row locked: a delete waits, or went first and nothing is written
            if await conn.fetchval("SELECT 1 FROM sessions WHERE id = $1 FOR SHARE", key) is None:
                return False
            status = await conn.execute(
                "INSERT INTO session_summaries AS old (session_key, text, escaped, token_count,"
                " message_count, clear_count, covered_through, updated_at)"
                " VALUES ($1, $2, $8, $3, $4, $5, $6, $7)"
                " ON CONFLICT (session_key) DO UPDATE SET text = excluded.text,"
                " escaped = excluded.escaped,"
                " token_count = excluded.token_count, message_count = excluded.message_count,"
                " clear_count = excluded.clear_count, covered_through = excluded.covered_through,"
                " updated_at = excluded.updated_at"
                " WHERE excluded.covered_through > old.covered_through",
                key,
                text,
                summary.token_count,
                summary.message_count,
                summary.clear_count,
                summary.covered_through,
                summary.updated_at,
                escaped,
            )
        return bool(status != "INSERT 0 0")

    # -- snapshots -------------------------------------------------------------------------

    async def save_clear(
        self,
        key: int,
        state: StateRow,
        snapshot: tuple[str, str, Sequence[SnapshotEntryRow]] | None,
    ) -> int | None:
        snapshot_id = None
        now = self._clock()
        async with self._transaction() as conn:
            await claim(conn, key, state.version)
            if snapshot is not None:
                reason, strategy, entries = snapshot
                snapshot_id = int(
                    await conn.fetchval(
                        "INSERT INTO kv_snapshots(session_key, reason, strategy, entry_count,"
                        " size_bytes, created_at) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                        key,
                        reason,
                        strategy,
                        len(entries),
                        sum(e.kv_bytes for e in entries),
                        now,
                    )
                )
                await conn.executemany(
                    "INSERT INTO kv_snapshot_entries(snapshot_id, message_rowid, importance,"
                    " entry_type, kv_bytes) VALUES ($1, $2, $3, $4, $5)",
                    [
                        (snapshot_id, e.message_rowid, e.importance, e.entry_type, e.kv_bytes)
                        for e in entries
                    ],
                )
                state.last_snapshot_id = snapshot_id
            await write_state(conn, key, state, now)
        return snapshot_id

    async def snapshots(self, key: int) -> list[SnapshotRow]:
        rows = await self._read_all(
            "SELECT id, reason, entry_count, size_bytes, created_at, strategy FROM kv_snapshots "
            "WHERE session_key = $1 ORDER BY id DESC",
            key,
        )
        return [SnapshotRow(int(r[0]), r[1], int(r[2]), int(r[3]), float(r[4]), r[5]) for r in rows]

    async def snapshot_entries(self, key: int, snapshot_id: int) -> SnapshotContents | None:
        owner = await self._read_one(
            "SELECT created_at FROM kv_snapshots WHERE id = $1 AND session_key = $2",
            snapshot_id,
            key,
        )
        if owner is None:
            return None
        rows = await self._read_all(
            "SELECT message_rowid, importance, entry_type, kv_bytes FROM kv_snapshot_entries "
            "WHERE snapshot_id = $1 ORDER BY id",
            snapshot_id,
        )
        entries = [SnapshotEntryRow(int(r[0]), r[1], r[2], int(r[3])) for r in rows]
        return SnapshotContents(float(owner[0]), entries)

    async def snapshot_message_rowids(self, key: int) -> list[int]:
        rows = await self._read_all(
            "SELECT DISTINCT e.message_rowid FROM kv_snapshot_entries e "
            "JOIN kv_snapshots s ON s.id = e.snapshot_id WHERE s.session_key = $1",
            key,
        )
        return [int(r[0]) for r in rows]

    async def prune_snapshots(self, max_per_session: int) -> int:
        async with self._transaction() as conn:
            status = await conn.execute(
                "DELETE FROM kv_snapshots WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER()"
                " OVER (PARTITION BY session_key ORDER BY id DESC) AS n FROM kv_snapshots) r"
                " WHERE n > $1)",
                max_per_session,
            )
        return int(status.split()[-1])
