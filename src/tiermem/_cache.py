"""The active cache: what the host's model currently sees of one session, in memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _text as text


@dataclass(slots=True)
class CacheEntry:
    """One message in a session's active cache, with what scoring needs."""

    rowid: int
    message_id: str
    position: int
    role: str
    content: str
    created_at: float
    token_count: int
    kv_bytes: int
    entry_type: str
    vector: np.ndarray[Any, Any] | None = None
    access_count: int = 0
    engagement: float = 0.0
    importance: float = 0.0


def entry_type(role: str, content: str) -> str:
    """system_prompt, code, or the role: decided by rules, never by iteration order."""
    if role == "system":
        return "system_prompt"
    if text.looks_like_code(content):
        return "code"
    return role


class Totals:
    """KV bytes and entries of every active cache counted in it: what the budget reads on
    every turn, kept as running sums (not summed over every session each time)."""

    def __init__(self) -> None:
        self.kv_bytes = 0
        self.entries = 0


class ActiveCache:
    """A session's entries in position order, with running totals (read on every turn)."""

    def __init__(self) -> None:
        self._entries: list[CacheEntry] = []
        self.kv_bytes = 0
        self.token_count = 0
        self._totals: Totals | None = None

    def count_in(self, totals: Totals | None) -> None:
        """Count this cache in `totals` (None: in none) from now on."""
        if self._totals is not None:
            self._totals.kv_bytes -= self.kv_bytes
            self._totals.entries -= len(self._entries)
        self._totals = totals
        if totals is not None:
            totals.kv_bytes += self.kv_bytes
            totals.entries += len(self._entries)

    @property
    def entries(self) -> list[CacheEntry]:
        return self._entries

    def rowids(self) -> list[int]:
        return [e.rowid for e in self._entries]

    def by_rowid(self) -> dict[int, CacheEntry]:
        return {e.rowid: e for e in self._entries}

    def add(self, new: list[CacheEntry]) -> None:
        known = {e.rowid for e in self._entries}
        self.replace(self._entries + [e for e in new if e.rowid not in known])

    def replace(self, entries: list[CacheEntry]) -> None:
        totals, before = self._totals, (self.kv_bytes, len(self._entries))
        self._entries = sorted(entries, key=lambda e: e.position)
        self.kv_bytes = sum(e.kv_bytes for e in self._entries)
        self.token_count = sum(e.token_count for e in self._entries)
        if totals is not None:
            totals.kv_bytes += self.kv_bytes - before[0]
            totals.entries += len(self._entries) - before[1]
