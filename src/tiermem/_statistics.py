"""Operation statistics: running totals and a bounded history of the last operations."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

from ._types import CacheOperation, CacheStatisticsExport, OperationType

HISTORY_LIMIT = 100


class CacheStatistics:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total_clears = 0
        self.total_retrievals = 0
        self.entries_preserved = 0
        self.entries_cleared = 0
        self.entries_retrieved = 0
        self.last_operation: datetime | None = None
        self.history: deque[CacheOperation] = deque(maxlen=HISTORY_LIMIT)

    def _record(self, kind: OperationType, entries: int, session_id: str, details: str) -> None:
        now = datetime.now(UTC)
        self.last_operation = now
        self.history.append(CacheOperation(kind, now, entries, session_id, details))

    def record_clear(self, total: int, preserved: int, reason: str, session_id: str) -> None:
        self.total_clears += 1
        self.entries_preserved += preserved
        self.entries_cleared += total - preserved
        self._record(OperationType.CLEAR, total, session_id, reason)

    def record_retrieval(
        self, count: int, tiers: list[int], keywords: int, session_id: str
    ) -> None:
        self.total_retrievals += 1
        self.entries_retrieved += count
        self._record(
            OperationType.RETRIEVE, count, session_id, f"tiers {tiers}, {keywords} keywords"
        )

    def record_snapshot(self, snapshot_id: int, count: int, session_id: str) -> None:
        self._record(OperationType.SNAPSHOT, count, session_id, f"snapshot {snapshot_id}")

    def record_restore(self, snapshot_id: int, count: int, session_id: str) -> None:
        self._record(OperationType.RESTORE, count, session_id, f"from snapshot {snapshot_id}")

    def export(self, active_sessions: int) -> CacheStatisticsExport:
        return CacheStatisticsExport(
            total_clears=self.total_clears,
            total_retrievals=self.total_retrievals,
            entries_preserved=self.entries_preserved,
            entries_cleared=self.entries_cleared,
            entries_retrieved=self.entries_retrieved,
            active_sessions=active_sessions,
            last_operation=self.last_operation,
            operation_history_count=len(self.history),
            operation_history=list(self.history),
        )
