"""Snapshots, tier 2: `kv_snapshots` (one row per clear that kept a snapshot: session,
reason, strategy, entry count, bytes, when; ids AUTOINCREMENT, never reused) and
`kv_snapshot_entries` (its entries: message, importance, entry type, bytes). An entry's
vector is its message's, in `message_embeddings`; a session's delete cascades to both.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._connection import Database
from ._rows import SnapshotContents, SnapshotEntryRow, SnapshotRow, StateRow
from ._state import claim, write_state
from ._vectors import ids_json


class SnapshotQueries(Database):
    async def save_clear(
        self,
        key: int,
        state: StateRow,
        snapshot: tuple[str, str, Sequence[SnapshotEntryRow]] | None,
    ) -> int | None:
        """A clear: the snapshot (reason, strategy, entries), if any, and the new state,
        atomically; the snapshot's id. Snapshot search reads the entries' vectors in
        `message_embeddings`, so none are stored here."""
        snapshot_id = None
        now = self._clock()
        async with self._transaction() as db:
            await claim(db, key, state.version)
            if snapshot is not None:
                reason, strategy, entries = snapshot
                cursor = await db.execute(
                    "INSERT INTO kv_snapshots(session_key, reason, strategy, entry_count,"
                    " size_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (key, reason, strategy, len(entries), sum(e.kv_bytes for e in entries), now),
                )
                snapshot_id = int(cursor.lastrowid or 0)
                await db.executemany(
                    "INSERT INTO kv_snapshot_entries(snapshot_id, message_rowid, importance,"
                    " entry_type, kv_bytes) VALUES (?, ?, ?, ?, ?)",
                    [
                        (snapshot_id, e.message_rowid, e.importance, e.entry_type, e.kv_bytes)
                        for e in entries
                    ],
                )
                state.last_snapshot_id = snapshot_id
            await write_state(db, key, state, now)
        return snapshot_id

    async def snapshots(self, key: int) -> list[SnapshotRow]:
        """The session's snapshots, newest first."""
        rows = await self._read_all(
            "SELECT id, reason, entry_count, size_bytes, created_at, strategy FROM kv_snapshots "
            "WHERE session_key = ? ORDER BY id DESC",
            (key,),
        )
        return [SnapshotRow(int(r[0]), r[1], int(r[2]), int(r[3]), float(r[4]), r[5]) for r in rows]

    async def snapshot_entries(self, key: int, snapshot_id: int) -> SnapshotContents | None:
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
        return SnapshotContents(float(owner[0]), [SnapshotEntryRow(*r) for r in rows])

    async def snapshot_message_rowids(self, key: int) -> list[int]:
        rows = await self._read_all(
            "SELECT DISTINCT e.message_rowid FROM kv_snapshot_entries e "
            "JOIN kv_snapshots s ON s.id = e.snapshot_id WHERE s.session_key = ?",
            (key,),
        )
        return [int(r[0]) for r in rows]

    async def prune_snapshots(self, max_per_session: int) -> int:
        """Keep each session's newest `max_per_session` snapshots; returns how many went."""
        async with self._transaction() as db:
            async with db.execute(
                "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY session_key "
                "ORDER BY id DESC) AS n FROM kv_snapshots) WHERE n > ?",
                (max_per_session,),
            ) as cursor:
                doomed = [int(r[0]) for r in await cursor.fetchall()]
            if doomed:
                await db.execute(
                    "DELETE FROM kv_snapshots WHERE id IN (SELECT value FROM json_each(?))",
                    (ids_json(doomed),),
                )
        return len(doomed)
