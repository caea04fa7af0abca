"""Rows and in-memory sessions as the public types a host gets back: one place."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psutil

from . import _text as text
from ._cache import CacheEntry
from ._opening import Parts
from ._retrieval import Candidate
from ._sessions import Session, SessionMemory
from ._store import MessageRow, SessionRow, SnapshotRow, Store, SummaryRow
from ._types import (
    ActiveEntry,
    KVStateStats,
    ManagerStatus,
    PreservedEntry,
    RetrievedEntry,
    SessionCacheState,
    SessionInfo,
    SessionSummary,
    SnapshotInfo,
    StoredMessage,
    Tier,
    timestamp_to_datetime,
)


def state(session: Session) -> SessionCacheState:
    s = session.state
    return SessionCacheState(
        session_id=session.session_id,
        namespace=session.namespace,
        conversation_count=s.conversation_count,
        clear_count=s.clear_count,
        entry_count=len(session.cache.entries),
        cache_size_bytes=session.cache.kv_bytes,
        token_count=session.cache.token_count,
        message_count=s.message_count,
        last_cleared_at=timestamp_to_datetime(s.last_cleared_at) if s.last_cleared_at else None,
        last_snapshot_id=s.last_snapshot_id,
        last_activity=timestamp_to_datetime(session.last_activity),
    )


def summary(row: SummaryRow) -> SessionSummary:
    return SessionSummary(
        text=row.text,
        clear_count=row.clear_count,
        token_count=row.token_count,
        message_count=row.message_count,
        updated_at=timestamp_to_datetime(row.updated_at),
    )


def snapshot(row: SnapshotRow) -> SnapshotInfo:
    created = timestamp_to_datetime(row.created_at)
    return SnapshotInfo(row.id, row.reason, row.entry_count, row.size_bytes, created)


def session_info(row: SessionRow) -> SessionInfo:
    return SessionInfo(
        row.namespace,
        row.session_id,
        row.message_count,
        row.text_bytes,
        timestamp_to_datetime(row.last_activity),
    )


def active_cache(session: Session) -> list[ActiveEntry]:
    return [
        ActiveEntry(
            e.message_id, e.role, e.content, e.token_count, e.kv_bytes, e.entry_type, e.access_count
        )
        for e in session.cache.entries
    ]


def preserved(entries: Sequence[CacheEntry]) -> list[PreservedEntry]:
    return [
        PreservedEntry(e.message_id, e.role, e.content, e.importance, e.entry_type) for e in entries
    ]


def stored_message(row: MessageRow) -> StoredMessage:
    return StoredMessage(
        row.message_id,
        row.position,
        row.role,
        row.content,
        timestamp_to_datetime(row.created_at),
        json.loads(row.metadata) if row.metadata else None,
    )


def hit(candidate: Candidate, keywords: Sequence[str]) -> RetrievedEntry:
    row = candidate.row
    assert row is not None
    return RetrievedEntry(
        text=row.content,
        similarity_score=round(candidate.score, 6),
        source_tier=Tier(candidate.tier),
        message_ids=[r.message_id for r in (row, *candidate.same_text)],
        matched_keywords=text.matched_keywords(row.content, keywords),
        role=row.role,
        created_at=timestamp_to_datetime(row.created_at),
    )


def status(
    parts: Parts,
    memory: SessionMemory,
    summaries_pending: int,
    kv_states: KVStateStats | None = None,
) -> ManagerStatus:
    sessions = memory.sessions
    models: dict[str, Any] = {
        **parts.pool.stats(),
        "embedding": {
            "name": parts.embedder.model_name,
            "dimensions": parts.embedder.dimensions,
            "loaded": bool(getattr(parts.embedder, "loaded", True)),
        },
        "kv_bytes_per_token": parts.kv_shape.bytes_per_token,
        "context_tokens": parts.context_tokens,
        "summarizer": type(parts.summarizer).__name__ if parts.summarizer else None,
        "summaries_pending": summaries_pending,
    }
    return ManagerStatus(
        estimated_bytes=sessions.kv_bytes,
        budget_bytes=parts.config.max_bytes_total,
        peak_bytes=max(memory.peak_bytes, sessions.kv_bytes),
        session_count=len(sessions),
        total_entries=sessions.entries,
        evictions_by_reason=dict(memory.evictions),
        hits=memory.hits,
        misses=memory.misses,
        rss_bytes=psutil.Process().memory_info().rss,
        models=models,
        kv_states=kv_states,
    )


async def storage_status(store: Store) -> dict[str, int]:
    """What the database holds, and the bytes it takes (a SQLite file with its WAL)."""
    tables = ("sessions", "messages", "kv_snapshots", "session_summaries")
    counts = await store.counts(tables)
    file_bytes = await store.size_bytes()
    names = ("sessions", "messages", "snapshots", "summaries")
    figures = {name: counts[table] for name, table in zip(names, tables, strict=True)}
    return {**figures, "file_bytes": file_bytes}
