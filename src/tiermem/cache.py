"""The active cache: what the host's model currently sees of one session, in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import text


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


@dataclass(slots=True)
class ActiveCache:
    """A session's entries in position order, with running totals."""

    entries: list[CacheEntry] = field(default_factory=list)

    @property
    def kv_bytes(self) -> int:
        return sum(e.kv_bytes for e in self.entries)

    @property
    def token_count(self) -> int:
        return sum(e.token_count for e in self.entries)

    def rowids(self) -> list[int]:
        return [e.rowid for e in self.entries]

    def by_rowid(self) -> dict[int, CacheEntry]:
        return {e.rowid: e for e in self.entries}

    def add(self, new: list[CacheEntry]) -> None:
        known = {e.rowid for e in self.entries}
        self.entries.extend(e for e in new if e.rowid not in known)
        self.entries.sort(key=lambda e: e.position)
