"""`Store`: every coroutine the rest of tiermem calls on its storage, and nothing else.

A store keeps sessions (`sessions`, `session_state`), their messages with full-text and
vector indexes (`messages`, `message_embeddings` and the backend's indexes), snapshots
(`kv_snapshots`, `kv_snapshot_entries`) and one cumulative summary per session
(`session_summaries`). `SQLiteStore` and `PostgresStore` implement it, and pass the same
tests (tests/test_store.py takes the store as a parametrised fixture).

Contract: every write is one transaction, whole or not at all (cancellation included); a
write of a session's state is refused with `StaleSession` unless the stored version is the
one read; ids (sessions, messages, snapshots) are never reused; rows are stamped with the
clock the store was opened with; failures are `StorageError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import numpy as np

from .._errors import StorageError
from ._rows import (
    MessageKey,
    MessageRow,
    NewMessage,
    SearchHit,
    SessionRow,
    SessionVersion,
    SnapshotContents,
    SnapshotEntryRow,
    SnapshotRow,
    StateRow,
    SummaryRow,
    TermCounts,
)


class StaleSession(StorageError):
    """The session changed in the database (another process wrote it, or deleted it) since
    this copy was read: the caller reloads it and tries again, never overwrites."""


class Store(Protocol):
    """Where tiermem keeps everything; sessions are addressed by their integer key."""

    @property
    def path(self) -> str:
        """Where the data lives (for messages, and the file sizes a status reports)."""
        ...

    @property
    def dimensions(self) -> int:
        """The dimension of the stored vectors (the embedding model's)."""
        ...

    async def close(self) -> None: ...

    def abandon(self) -> None:
        """Release what an unclosed store holds, without waiting (at garbage collection)."""
        ...

    async def size_bytes(self) -> int:
        """The bytes the database takes (files, or the tables' relations)."""
        ...

    # -- sessions and their state ----------------------------------------------------------

    def hold(self, namespace: str, session_id: str) -> AbstractAsyncContextManager[None]:
        """Hold the session against other processes for one call, so their calls on it take
        turns instead of retrying on a stale copy. Correctness does not rest on it (every
        write claims the session's version); SQLite's writes already take turns on the file."""
        ...

    async def session_key(self, namespace: str, session_id: str) -> int | None: ...

    async def create_session(self, namespace: str, session_id: str) -> int:
        """The session's key, creating it (with an empty state) if new."""
        ...

    async def list_sessions(self) -> list[SessionRow]:
        """Every session, the most recently active first."""
        ...

    async def load_state(self, key: int) -> StateRow: ...

    async def save_state(self, key: int, state: StateRow) -> None:
        """Write the state if it is still at `state.version` (else `StaleSession`);
        `state.version` moves on."""
        ...

    async def save_entry_stats(self, key: int, version: int, stats: dict[str, list[float]]) -> bool:
        """Soft figures that do not move the version, written only over `version`."""
        ...

    async def session_version(self, key: int) -> SessionVersion | None:
        """None once the session is deleted."""
        ...

    async def delete_if_unused(self, key: int) -> None:
        """Remove a session that was created but never written."""
        ...

    async def delete_session(self, key: int) -> None:
        """Remove the session and everything derived from it, and its bytes."""
        ...

    # -- messages --------------------------------------------------------------------------

    async def existing_ids(self, key: int, message_ids: Sequence[str]) -> dict[str, str]:
        """Of `message_ids`, those stored in the session, with their content hash."""
        ...

    async def message_keys(
        self,
        key: int,
        limit: int | None = None,
        newest_first: bool = False,
        like: tuple[Sequence[str], Sequence[str]] | None = None,
    ) -> list[MessageKey]: ...

    async def append_messages(
        self,
        key: int,
        messages: Sequence[NewMessage],
        vectors: np.ndarray[Any, Any] | None,
        state: StateRow,
    ) -> list[int]:
        """Messages, their vectors and the session's state, in one transaction (claimed at
        `state.version`, as `save_state`); their ids, in order."""
        ...

    async def messages_by_rowid(self, rowids: Sequence[int]) -> list[MessageRow]: ...

    async def messages_between(
        self, key: int, after: int, through: int = 2**62
    ) -> list[MessageRow]: ...

    async def messages_at(self, key: int, positions: Iterable[int]) -> list[MessageRow]: ...

    async def rowids_between_times(
        self, key: int, start: float, end: float, limit: int
    ) -> list[int]: ...

    async def latest_openings(self, key: int, count: int, chars: int) -> list[tuple[str, str]]:
        """The role and first `chars` characters of the session's latest `count` messages."""
        ...

    async def latest_time(self, key: int) -> float | None: ...

    async def message_vectors(self, rowids: Sequence[int]) -> dict[int, np.ndarray[Any, Any]]: ...

    async def vectors_by_hash(self, hashes: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        """Stored vectors of messages with these content hashes, in any session."""
        ...

    # -- search ----------------------------------------------------------------------------

    async def lexical_search(self, terms: Sequence[str], key: int, limit: int) -> list[SearchHit]:
        """The session's best matches for any of `terms` (plain words, never syntax)."""
        ...

    async def term_counts(self, terms: Sequence[str], key: int, latest: int) -> TermCounts:
        """How many of the session's `latest` messages hold each term, and how many those
        are (fewer in a shorter session)."""
        ...

    async def vector_search(self, query: np.ndarray[Any, Any], key: int, k: int) -> list[SearchHit]:
        """The session's k nearest messages by cosine distance, nearest first."""
        ...

    async def snapshot_vector_search(
        self, query: np.ndarray[Any, Any], key: int, k: int
    ) -> list[SearchHit]:
        """The session's k nearest snapshot entries' messages, nearest first."""
        ...

    async def distances(
        self, query: np.ndarray[Any, Any], rowids: Sequence[int]
    ) -> dict[int, float]: ...

    # -- snapshots -------------------------------------------------------------------------

    async def save_clear(
        self,
        key: int,
        state: StateRow,
        snapshot: tuple[str, str, Sequence[SnapshotEntryRow]] | None,
    ) -> int | None:
        """A clear: the snapshot (reason, strategy, entries), if any, and the new state, in
        one transaction; the snapshot's id."""
        ...

    async def snapshots(self, key: int) -> list[SnapshotRow]:
        """Newest first."""
        ...

    async def snapshot_entries(self, key: int, snapshot_id: int) -> SnapshotContents | None:
        """None if the session has no such snapshot."""
        ...

    async def snapshot_message_rowids(self, key: int) -> list[int]: ...

    async def prune_snapshots(self, max_per_session: int) -> int:
        """Keep each session's newest `max_per_session` snapshots; how many went."""
        ...

    # -- summaries -------------------------------------------------------------------------

    async def summary(self, key: int) -> SummaryRow | None: ...

    async def save_summary(self, key: int, summary: SummaryRow) -> bool:
        """Store it if the session exists and it covers more than the stored one."""
        ...

    # -- introspection ---------------------------------------------------------------------

    async def counts(self, tables: Sequence[str] = ...) -> dict[str, int]:
        """Row counts by table name; every backend counts `sessions`, `messages`,
        `kv_snapshots` and `session_summaries`."""
        ...
