"""The clear policy, as pure functions: when a session's active cache must be cleared,
what a clear keeps, what it snapshots, what the session's state becomes, and what is shed
when even that does not fit the window or the budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import _budgets as budgets
from ._budgets import Excess, SessionBudget
from ._cache import ActiveCache, CacheEntry
from ._config import (
    AdaptiveSnapshots,
    FullSnapshots,
    IncrementalSnapshots,
    KVCacheConfig,
    NoSnapshots,
)
from ._store import SnapshotEntryRow, StateRow
from ._types import ClearReason


@dataclass(frozen=True, slots=True)
class Decision:
    """Why the cache must be cleared now (None: it need not), and the budget it broke."""

    reason: ClearReason | None
    excess: Excess | None = None


def decide(
    config: KVCacheConfig,
    cache: ActiveCache,
    conversation_count: int,
    max_cache_bytes: int,
    window_tokens: int | None,
) -> Decision:
    """The seed's rules in order: the turn count, the KV memory threshold, then the
    context window, then the session's own byte and entry budgets."""
    if not config.enabled:
        return Decision(None)
    if conversation_count >= config.clear_after_conversations:
        return Decision(ClearReason.CONVERSATION_LIMIT)
    if cache.kv_bytes / max_cache_bytes >= config.memory_threshold_percent:
        return Decision(ClearReason.MEMORY_THRESHOLD)
    if window_tokens is not None and cache.token_count > window_tokens:
        return Decision(ClearReason.CONTEXT_OVERFLOW)
    over = SessionBudget.of(config).excess(cache)
    if over is None:
        return Decision(None)
    reason = (
        ClearReason.ENTRY_LIMIT if over.scope == "session_entries" else ClearReason.SESSION_BUDGET
    )
    return Decision(reason, over)


def preserved(config: KVCacheConfig, entries: Sequence[CacheEntry]) -> list[CacheEntry]:
    """What a clear keeps: important entries, and system prompts and code if configured.
    (The entries' importance is scored just before.)"""
    return [
        e
        for e in entries
        if e.importance >= config.min_importance_to_preserve
        or (config.preserve_system_prompts and e.entry_type == "system_prompt")
        or (config.preserve_code_entries and e.entry_type == "code")
    ]


@dataclass(frozen=True, slots=True)
class SnapshotPlan:
    reason: str
    strategy: str
    entries: list[SnapshotEntryRow]


def snapshot_plan(
    config: KVCacheConfig, reason: ClearReason, keep: Sequence[CacheEntry]
) -> SnapshotPlan | None:
    """The snapshot a clear writes, per the strategy; None for none. Incremental snapshots
    are taken at turn-limit clears only."""
    strategy = config.snapshot_strategy
    if isinstance(strategy, IncrementalSnapshots):
        chosen = list(keep) if reason == ClearReason.CONVERSATION_LIMIT else []
    elif isinstance(strategy, FullSnapshots):
        chosen = list(keep)
    elif isinstance(strategy, AdaptiveSnapshots):
        chosen = [e for e in keep if e.importance >= strategy.min_importance_threshold]
    else:
        chosen = []
    if not chosen:
        return None
    rows = [SnapshotEntryRow(e.rowid, e.importance, e.entry_type, e.kv_bytes) for e in chosen]
    return SnapshotPlan(reason.value, strategy.kind, rows)


def max_snapshots(config: KVCacheConfig) -> int | None:
    """How many snapshots maintenance keeps per session (None: the strategy takes none)."""
    strategy = config.snapshot_strategy
    return None if isinstance(strategy, NoSnapshots) else strategy.max_snapshots


def cleared_state(
    state: StateRow,
    keep: Sequence[CacheEntry],
    through: int,
    now: float,
    stats: dict[str, list[float]],
) -> StateRow:
    """The session's state after a clear through message position `through` keeping
    `keep` (a copy: the session's own changes once it is written)."""
    new = state.copy()
    new.clear_count += 1
    new.conversation_count = 0
    new.cleared_through = through
    new.pinned = [e.rowid for e in keep]
    new.last_cleared_at = now
    new.entry_stats = stats
    return new


def shed(
    config: KVCacheConfig,
    entries: Sequence[CacheEntry],
    window_tokens: int | None,
    budget: bool,
) -> list[CacheEntry]:
    """The oldest entries (system prompts last) to drop until the cache fits the context
    window, and the session's budget if `budget`."""
    limits = SessionBudget.of(config)
    return budgets.shed(
        entries,
        max_tokens=window_tokens,
        max_bytes=limits.max_bytes if budget else None,
        max_entries=limits.max_entries if budget else None,
    )


def shed_state(
    state: StateRow,
    dropped: Sequence[CacheEntry],
    keep: Sequence[CacheEntry],
    stats: dict[str, list[float]],
) -> StateRow:
    """The state once `dropped` left the active cache: it names the cache as "after
    cleared_through, plus pinned rows"."""
    new = state.copy()
    new.cleared_through = max([new.cleared_through, *(e.position for e in dropped)])
    new.pinned = [e.rowid for e in keep if e.position <= new.cleared_through]
    new.entry_stats = stats
    return new
