"""Copying a whole database from one store to another (`tiermem migrate-store`): from one
SQLite file to PostgreSQL when a backend scales out, or back. Everything goes through the
`Store` protocol, session by session: messages with their vectors, snapshots, the summary
and the state, their times kept (the target is opened with a `SettableClock`), the ids the
state and snapshots point at mapped to the target's own. Then the row counts of both must
agree."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from . import _text as text
from ._errors import StorageError
from ._store import MessageRow, NewMessage, SessionRow, SnapshotEntryRow, Store

BATCH = 500
# what both stores count, and must agree on after a copy
COMPARED = (
    "sessions",
    "messages",
    "message_embeddings",
    "kv_snapshots",
    "kv_snapshot_entries",
    "session_summaries",
)


class SettableClock:
    """The target store's clock: set to each copied row's own time before it is written."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def copy_store(
    source: Store,
    target: Store,
    clock: SettableClock,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Copy every session of `source` into the empty `target` (opened with `clock`); the
    counts copied, checked against the target's. Raises `StorageError` if the target holds
    sessions already or the counts disagree."""
    if (await target.counts(("sessions",)))["sessions"]:
        raise StorageError(f"{target.path} already holds sessions: copy into an empty database")
    # in the source's order of creation, so the copies' ids keep it
    keyed = [
        (await source.session_key(info.namespace, info.session_id), info)
        for info in await source.list_sessions()
    ]
    sessions = sorted((key, info) for key, info in keyed if key is not None)  # not deleted
    for done, (key, info) in enumerate(sessions, 1):
        await _copy_session(source, target, clock, key, info)
        if progress is not None:
            progress(f"{info.namespace}/{info.session_id}", done)
    expected = await source.counts(COMPARED)
    copied = await target.counts(COMPARED)
    if copied != expected:
        raise StorageError(f"the copy does not match its source: {copied} != {expected}")
    return copied


async def _copy_session(
    source: Store, target: Store, clock: SettableClock, key: int, info: SessionRow
) -> None:
    state = await source.load_state(key)
    rows = await source.messages_between(key, -1)
    clock.now = min([r.created_at for r in rows], default=info.last_activity)
    new_key = await target.create_session(info.namespace, info.session_id)
    working = await target.load_state(new_key)
    rowids: dict[int, int] = {}
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        vectors = await source.message_vectors([r.rowid for r in batch])
        # in position order (ids grow with positions), a run with vectors or without at once
        for has_vectors, run in itertools.groupby(batch, key=lambda r: r.rowid in vectors):
            part = list(run)
            clock.now = part[-1].created_at
            matrix = np.stack([vectors[r.rowid] for r in part]) if has_vectors else None
            ids = await target.append_messages(new_key, [_new(r) for r in part], matrix, working)
            rowids.update(zip((r.rowid for r in part), ids, strict=True))
    snapshot_ids: dict[int, int] = {}
    for snapshot in sorted(await source.snapshots(key), key=lambda s: s.id):
        contents = await source.snapshot_entries(key, snapshot.id)
        if contents is None:
            continue
        entries = [
            SnapshotEntryRow(rowids[e.message_rowid], e.importance, e.entry_type, e.kv_bytes)
            for e in contents.entries
        ]
        clock.now = snapshot.created_at
        made = await target.save_clear(
            new_key, working, (snapshot.reason, snapshot.strategy, entries)
        )
        assert made is not None
        snapshot_ids[snapshot.id] = made
    summary = await source.summary(key)
    if summary is not None:
        await target.save_summary(new_key, summary)
    stats = state.entry_stats or {}
    final = dataclasses.replace(
        state,
        pinned=[rowids[i] for i in state.pinned or [] if i in rowids],
        entry_stats={str(rowids[int(k)]): v for k, v in stats.items() if int(k) in rowids},
        last_snapshot_id=snapshot_ids.get(state.last_snapshot_id or -1),
        version=working.version,
    )
    clock.now = info.last_activity
    await target.save_state(new_key, final)


def _new(row: MessageRow) -> NewMessage:
    return NewMessage(
        row.position,
        row.message_id,
        row.role,
        row.content,
        text.content_hash(row.role, row.content),
        row.metadata,
        row.created_at,
        row.token_count,
    )
