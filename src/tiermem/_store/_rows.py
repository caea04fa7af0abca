"""The rows a store reads and writes, one type per shape, so callers read fields by name.

They mirror the tables (see migrations/): `messages` (`MessageRow`, `MessageKey`,
`NewMessage`), `session_state` (`StateRow`), `session_summaries` (`SummaryRow`),
`kv_snapshots` (`SnapshotRow`, `SnapshotContents`) and `kv_snapshot_entries`
(`SnapshotEntryRow`), `sessions` (`SessionRow`, `SessionVersion`); `SearchHit` is a search's
scored message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A stored message; `rowid` is its database id, never reused."""

    rowid: int
    position: int
    message_id: str
    role: str
    content: str
    created_at: float
    token_count: int
    metadata: str | None

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> MessageRow:
        return cls(*row)


@dataclass(frozen=True, slots=True)
class MessageKey:
    """What identifies a stored message when matching what a client sends against it."""

    position: int
    message_id: str
    content_hash: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store (its id comes from the store)."""

    position: int
    message_id: str
    role: str
    content: str
    content_hash: str
    metadata: str | None
    created_at: float
    token_count: int


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
    """A session's cumulative summary, covering its messages through `covered_through`."""

    text: str
    token_count: int
    message_count: int
    clear_count: int
    covered_through: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class SnapshotEntryRow:
    """One entry of a snapshot: a message and what the cache knew of it."""

    message_rowid: int
    importance: float
    entry_type: str
    kv_bytes: int


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """A snapshot as listed: when it was taken, why, how much it holds, and the strategy
    that took it."""

    id: int
    reason: str
    entry_count: int
    size_bytes: int
    created_at: float
    strategy: str = ""


@dataclass(frozen=True, slots=True)
class SnapshotContents:
    """A snapshot's entries, and when it was taken (for its age on restore)."""

    created_at: float
    entries: list[SnapshotEntryRow]


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A session as listed: its size and when it was last written."""

    namespace: str
    session_id: str
    message_count: int
    text_bytes: int
    last_activity: float


@dataclass(frozen=True, slots=True)
class SessionVersion:
    """What a process checks its copy of a session against before using it: the state's
    version, and how far the stored summary reaches (-1: no summary)."""

    version: int
    summary_covered_through: int


class TermCounts(NamedTuple):
    """How many messages were counted, and how many of them hold each term."""

    messages: int
    counts: list[int]


class SearchHit(NamedTuple):
    """A message found by a search and its score: bm25 for a lexical search (higher is
    better), cosine distance for a vector one (lower is better). A pair, so it mixes with
    the (rowid, distance) items of `Store.distances`."""

    rowid: int
    score: float
