"""Public data types: the messages a host hands in and the results it gets back."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from ._errors import InvalidInputError

ROLES = frozenset({"system", "user", "assistant", "tool"})


DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. `id` is the caller's own id; it comes back in every hit."""

    role: str
    content: str
    id: str | None = None
    metadata: Mapping[str, Any] | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or self.role not in ROLES:
            raise InvalidInputError(
                f"unknown role {self.role!r}; expected one of {', '.join(sorted(ROLES))}"
            )
        if not isinstance(self.content, str):
            raise InvalidInputError(f"content must be str, not {type(self.content).__name__}")
        if self.id is not None and (not isinstance(self.id, str) or not self.id):
            raise InvalidInputError("id must be a non-empty string or None")
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise InvalidInputError(
                f"metadata must be a mapping or None, not {type(self.metadata).__name__}"
            )
        if self.created_at is not None and not isinstance(self.created_at, datetime):
            raise InvalidInputError(
                f"created_at must be a datetime or None, not {type(self.created_at).__name__}"
            )


def timestamp_to_datetime(seconds: float) -> datetime:
    """A stored POSIX time as an aware UTC datetime, clamped to what datetime can hold
    (a float near year 9999 or year 1 may round past either end)."""
    low, high = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    if not math.isfinite(seconds) or seconds <= low.timestamp():
        return high if seconds == math.inf else low
    if seconds >= high.timestamp():
        return high
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError):
        return high if seconds > 0 else low


class ClearReason(enum.StrEnum):
    """Why an active cache was cleared."""

    CONVERSATION_LIMIT = "ConversationLimit"
    MEMORY_THRESHOLD = "MemoryThreshold"
    CONTEXT_OVERFLOW = "ContextOverflow"
    ENTRY_LIMIT = "EntryLimit"
    SESSION_BUDGET = "SessionBudget"
    MANUAL = "Manual"
    ERROR_RECOVERY = "ErrorRecovery"


class EvictionReason(enum.StrEnum):
    """Why a session left memory (flushed first: it comes back on its next call)."""

    MEMORY_BUDGET = "MemoryBudget"
    SESSION_LIMIT = "SessionLimit"
    IDLE = "Idle"


class Tier(enum.IntEnum):
    """Where a hit came from: the active cache, the snapshots, or the whole history."""

    ACTIVE_CACHE = 1
    SNAPSHOTS = 2
    HISTORY = 3


class OperationType(enum.StrEnum):
    CLEAR = "Clear"
    RETRIEVE = "Retrieve"
    SNAPSHOT = "Snapshot"
    RESTORE = "Restore"


@dataclass(frozen=True, slots=True)
class PreservedEntry:
    """An active-cache entry kept through a clear."""

    message_id: str
    role: str
    text: str
    importance: float
    entry_type: str


@dataclass(frozen=True, slots=True)
class ActiveEntry:
    """An entry of a session's active cache: what the host's model currently sees."""

    message_id: str
    role: str
    text: str
    token_count: int
    kv_bytes: int
    entry_type: str
    access_count: int


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """The cumulative summary of a session: everything up to the last clear."""

    text: str
    clear_count: int
    token_count: int
    message_count: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class CacheClearResult:
    entries_to_keep: list[PreservedEntry]
    entries_cleared: int
    bridge_message: str
    snapshot_id: int | None
    preserved_keywords: list[str]
    clear_reason: ClearReason
    summary: SessionSummary | None = None
    summary_error: str | None = None
    # the summary is being written in the background (summary_mode="background")
    summary_pending: bool = False


@dataclass(frozen=True, slots=True)
class RetrievedEntry:
    """One hit. `similarity_score` is in [0, 1], higher is better, comparable across tiers."""

    text: str
    similarity_score: float
    source_tier: Tier
    message_ids: list[str]
    matched_keywords: list[str]
    role: str
    created_at: datetime

    @property
    def relevance(self) -> float:
        """The fused relevance score in [0, 1] (lexical, vector and cues; the contract
        names it `similarity_score`)."""
        return self.similarity_score


@dataclass(frozen=True, slots=True)
class RetrievalResult:
    entries: list[RetrievedEntry]
    bridge_message: str | None
    tiers_searched: list[int]
    search_duration_ms: float
    keywords_used: list[str]

    @property
    def average_relevance(self) -> float:
        return self.average_similarity

    @property
    def average_similarity(self) -> float:
        if not self.entries:
            return 0.0
        return sum(e.similarity_score for e in self.entries) / len(self.entries)


@dataclass(frozen=True, slots=True)
class SessionCacheState:
    session_id: str
    namespace: str
    conversation_count: int
    clear_count: int
    entry_count: int
    cache_size_bytes: int
    token_count: int
    message_count: int
    last_cleared_at: datetime | None
    last_snapshot_id: int | None
    last_activity: datetime


@dataclass(frozen=True, slots=True)
class CacheProcessingResult:
    should_clear_cache: bool
    clear_result: CacheClearResult | None
    should_retrieve: bool
    retrieval_result: RetrievalResult | None
    bridge_messages: list[str]
    updated_session_state: SessionCacheState
    stored_message_ids: list[str] = field(default_factory=list)
    # entries that left the active cache to keep it within the context window
    # (context_overflow="sliding_window"); they stay in the history (tier 3)
    slid_out_message_ids: list[str] = field(default_factory=list)
    # the turn was stored (and cleared, if due) but its retrieval failed: why
    retrieval_error: str | None = None

    @property
    def cleared(self) -> bool:
        """The cache was cleared in this turn (the contract's `should_clear_cache`)."""
        return self.should_clear_cache

    @property
    def retrieved(self) -> bool:
        """Hits were retrieved in this turn (the contract's `should_retrieve`)."""
        return self.should_retrieve


@dataclass(frozen=True, slots=True)
class RestoreResult:
    snapshot_id: int
    entries_restored: int
    bridge_message: str
    age_minutes: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    snapshot_id: int
    reason: str
    entry_count: int
    size_bytes: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A stored session: how much it holds and when it was last active."""

    namespace: str
    session_id: str
    message_count: int
    text_bytes: int
    last_activity: datetime


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as stored: the caller's id, its position in the session and its text."""

    id: str
    position: int
    role: str
    content: str
    created_at: datetime
    metadata: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class MaintenanceResult:
    sessions_cleaned: int
    snapshots_pruned: int
    errors: list[str]
    duration_ms: float


@dataclass(frozen=True, slots=True)
class CacheOperation:
    operation_type: OperationType
    timestamp: datetime
    entries_affected: int
    session_id: str
    details: str


@dataclass(frozen=True, slots=True)
class CacheStatisticsExport:
    total_clears: int
    total_retrievals: int
    entries_preserved: int
    entries_cleared: int
    entries_retrieved: int
    active_sessions: int
    last_operation: datetime | None
    operation_history_count: int
    operation_history: list[CacheOperation]


@dataclass(slots=True)
class KVStateStats:
    """What the tiers hold and did. States and bytes in RAM and on disk; per call,
    whether a state was found (hit: all of it reused; partial: a prefix; miss), states
    rejected as invalid, tokens reused and prefilled; states set back from RAM
    (`restores`) and read back from disk (`disk_restores`); states that left RAM
    (`evictions`), were written to disk (`spills`), and left the disk tier
    (`disk_evictions`)."""

    states: int = 0
    bytes: int = 0
    disk_states: int = 0
    disk_bytes: int = 0
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    rejected: int = 0
    tokens_reused: int = 0
    tokens_prefilled: int = 0
    restores: int = 0
    disk_restores: int = 0
    evictions: int = 0
    spills: int = 0
    disk_evictions: int = 0

    def add(self, other: KVStateStats) -> KVStateStats:
        """Both counts together (one manager, several chat models)."""
        return KVStateStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


@dataclass(frozen=True, slots=True)
class ManagerStatus:
    """Memory, budget and eviction figures of a running manager."""

    estimated_bytes: int
    budget_bytes: int | None
    peak_bytes: int
    session_count: int
    total_entries: int
    evictions_by_reason: dict[str, int]
    hits: int
    misses: int
    rss_bytes: int
    models: dict[str, Any]
    # the kept KV states of the chat models attached to the manager (`attach_chat`)
    kv_states: KVStateStats | None = None
