"""Memory budgets: which limit is exceeded, and which active-cache entries to shed.

Two kinds of limit. The manager's (`max_bytes_total`, `max_sessions`) is held by sending
least-recently-used sessions out of memory (flushed first, rebuilt on their next call).
A session's own (`max_bytes_per_session`, never above the total; `max_entries_per_session`
and `max_entries_per_session`) is held by clearing its active cache, then, if what a clear
preserves is still too much, by shedding the oldest entries (system prompts last). Shed
entries stay in the history (tier 3), like anything cleared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._cache import ActiveCache, CacheEntry
from ._config import KVCacheConfig
from ._types import EvictionReason

# eviction reasons (the keys of `status().evictions_by_reason`)
MEMORY = EvictionReason.MEMORY_BUDGET
SESSIONS = EvictionReason.SESSION_LIMIT
IDLE = EvictionReason.IDLE


@dataclass(frozen=True, slots=True)
class Excess:
    """A limit found exceeded: its scope, the value and the limit."""

    scope: str  # total_bytes, sessions, session_bytes, session_entries
    value: int
    limit: int

    @property
    def eviction_reason(self) -> str:
        return SESSIONS if self.scope == "sessions" else MEMORY


def manager_excess(config: KVCacheConfig, sessions: int, kv_bytes: int) -> Excess | None:
    """The manager-wide limit exceeded by `sessions` in memory holding `kv_bytes`, if any."""
    if config.max_sessions is not None and sessions > config.max_sessions:
        return Excess("sessions", sessions, config.max_sessions)
    if config.max_bytes_total is not None and kv_bytes > config.max_bytes_total:
        return Excess("total_bytes", kv_bytes, config.max_bytes_total)
    return None


@dataclass(frozen=True, slots=True)
class SessionBudget:
    """What one session's active cache may hold."""

    max_bytes: int | None
    max_entries: int

    @classmethod
    def of(cls, config: KVCacheConfig) -> SessionBudget:
        limits = [b for b in (config.max_bytes_per_session, config.max_bytes_total) if b]
        return cls(
            min(limits) if limits else None,
            config.max_entries_per_session,
        )

    def excess(self, cache: ActiveCache) -> Excess | None:
        if self.max_bytes is not None and cache.kv_bytes > self.max_bytes:
            return Excess("session_bytes", cache.kv_bytes, self.max_bytes)
        if len(cache.entries) > self.max_entries:
            return Excess("session_entries", len(cache.entries), self.max_entries)
        return None


def shed(
    entries: Sequence[CacheEntry],
    *,
    max_tokens: int | None = None,
    max_bytes: int | None = None,
    max_entries: int | None = None,
) -> list[CacheEntry]:
    """The entries to drop, oldest first and system prompts last, so that what is left
    holds at most `max_tokens`, `max_bytes` and `max_entries` (those set)."""
    tokens = sum(e.token_count for e in entries)
    size = sum(e.kv_bytes for e in entries)
    count = len(entries)
    order = sorted(entries, key=lambda e: (e.entry_type == "system_prompt", e.position))
    dropped: list[CacheEntry] = []
    for entry in order:
        if (
            (max_tokens is None or tokens <= max_tokens)
            and (max_bytes is None or size <= max_bytes)
            and (max_entries is None or count <= max_entries)
        ):
            break
        dropped.append(entry)
        tokens -= entry.token_count
        size -= entry.kv_bytes
        count -= 1
    return dropped
