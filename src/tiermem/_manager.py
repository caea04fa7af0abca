"""KVCacheManager: the public facade. Every coroutine reads the same way: check open (and
count the call, so `aclose` can wait for it), take the session (lock, load, check against
the database, again on a fresh copy if another process changed it), delegate to the
memory loop, convert; every error is a `TierMemError` (see `_boundary`)."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from . import _convert as convert
from ._boundary import Calls, map_errors
from ._config import KVCacheConfig
from ._embedder import Embedder
from ._errors import (
    InvalidInputError,
    ManagerClosedError,
    NotFoundError,
)
from ._intake import Intake, check_text, validate_off_loop
from ._llm import LlamaChat
from ._loop import MemoryLoop
from ._opening import Parts, check_changeable, open_parts
from ._pool import ModelPool
from ._sessions import Ident, Session, SessionMemory
from ._summaries import SummaryKeeper
from ._summarizer import Summarizer, TokenCounter
from ._telemetry import Guarded, LoggingTelemetry, Telemetry
from ._types import (
    DEFAULT_NAMESPACE,
    ActiveEntry,
    CacheClearResult,
    CacheProcessingResult,
    CacheStatisticsExport,
    ClearReason,
    MaintenanceResult,
    ManagerStatus,
    Message,
    RestoreResult,
    RetrievalResult,
    SessionCacheState,
    SessionInfo,
    SessionSummary,
    SnapshotInfo,
    StoredMessage,
)

log = logging.getLogger("tiermem")

INGEST_BATCH = 256
MAX_RETRIEVAL_LIMIT = 1000
T = TypeVar("T")


class KVCacheManager:
    """Tiered memory for chat sessions. Open with `await KVCacheManager.open(path)`."""

    def __init__(self, parts: Parts, clock: Callable[[], float], telemetry: Telemetry) -> None:
        self._parts = parts
        self._config = parts.config
        self._store = parts.store
        self._telemetry = Guarded(telemetry)
        intake = Intake(
            parts.store, parts.embedder, parts.tokens, parts.kv_shape.bytes_per_token, clock
        )
        self._memory = SessionMemory(
            parts.store, intake, lambda: self._config, self._telemetry, clock, self._loaded
        )
        self._sessions = self._memory.sessions
        self._summaries = SummaryKeeper(
            parts.store, parts.summarizer, clock, self._telemetry, self._sessions.get
        )
        self._loop = MemoryLoop(
            parts, self._memory, self._summaries, self._telemetry, clock, self.max_cache_bytes
        )
        self._calls = Calls()
        self._closed = False  # everything flushed and closed

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path | None = None,
        config: KVCacheConfig | None = None,
        *,
        embedder: Embedder | None = None,
        summarizer: Summarizer | None = None,
        tokenizer: TokenCounter | None = None,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
    ) -> KVCacheManager:
        """Open the database at `path` (created and migrated if new) with the given models:
        a SQLite file, or a PostgreSQL URL (`postgresql://user@host/db`, with pgvector);
        unset, `config.database_url` (`TIERMEM_DATABASE_URL`), else "tiermem.db".

        Unset models default to the bundled ones; the GGUF is checked now (its vocabulary
        and shape are read), so a missing or corrupt model fails here, not at a later turn.
        Events go to `telemetry` (default: `LoggingTelemetry`, records on the
        `tiermem.events` logger).
        """
        with map_errors():
            config = config or KVCacheConfig()
            path = path if path is not None else config.database_url or "tiermem.db"
            parts = await open_parts(path, config, embedder, summarizer, tokenizer, clock)
            return cls(parts, clock, telemetry or LoggingTelemetry())

    async def __aenter__(self) -> KVCacheManager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new calls (`ManagerClosedError`), wait up to `close_wait_seconds` for the
        calls in flight (then cancel them: each ends whole or not at all), wait for
        background summaries (up to `summary_close_wait_seconds`; the spans of those still
        running stay pending), flush every session under its lock, then close the database
        and the models."""
        if self._calls.closing:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._calls.close(self._config.close_wait_seconds)
                cancelled = await self._summaries.aclose(
                    self._config.summary_close_wait_seconds, self._parts.stop_models
                )
                if cancelled:
                    log.warning("%d summaries left pending at shutdown", cancelled)
                for session in self._sessions:
                    async with self._sessions.locks.hold(session.ident):
                        await self._memory.flush_quietly(session)
                for chat in self._parts.chats:
                    await chat.close_states()
            finally:
                self._closed = True
                self._sessions.clear()
                await self._store.close()
                await self._parts.pool.aclose()
                for close in self._parts.closers:
                    close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._store.abandon()  # its threads would keep the process from exiting
            warnings.warn(
                "KVCacheManager was not closed; use `async with` or `await aclose()`",
                ResourceWarning,
                stacklevel=2,
            )

    def _call(self) -> AbstractAsyncContextManager[None]:
        return self._calls.enter()

    def _session(
        self, ident: Ident, work: Callable[[Session], Awaitable[T]], create: bool = False
    ) -> Awaitable[T]:
        return self._memory.held(ident, work, create)

    def _loaded(self, session: Session) -> None:
        if self._config.summary_mode == "background":
            self._summaries.catch_up(session)  # a clear whose summary did not land before

    # -- configuration and sizes -----------------------------------------------------------

    @property
    def config(self) -> KVCacheConfig:
        return self._config

    def update_config(self, config: KVCacheConfig | None = None, **changes: Any) -> KVCacheConfig:
        """Replace the config (or change some fields). Settings read at `open()` (the
        models, the KV shape, the window, storage options) cannot change: `ConfigError`."""
        self._calls.check_open()
        new = config if config is not None else self._config.replace(**changes)
        check_changeable(self._config, new)
        self._config = new
        self._loop.configure(new)
        return new

    @property
    def model_pool(self) -> ModelPool:
        """The pool the bundled models load through (`unload` a model there to free it)."""
        return self._parts.pool

    def attach_chat(self, chat: LlamaChat) -> None:
        """Let the manager look after `chat`'s kept KV states: a deleted session's are
        dropped (and the live context reset), idle ones leave RAM at maintenance,
        `status()` reports them, and `aclose()` spills them to disk (`open_chat_model`
        attaches the model it opens)."""
        self._calls.check_open()
        if chat not in self._parts.chats:
            chat.telemetry = self._telemetry  # its state evictions are this manager's events
            self._parts.chats.append(chat)
            self._parts.stoppers.append(chat.stop)

    @property
    def kv_state_dir(self) -> Path | None:
        """Where chat models opened for this manager keep KV states on disk
        (`kv_state_dir`, or beside the database); None for a database in memory."""
        return self._parts.kv_state_dir

    def context_capacity(self) -> int | None:
        """Tokens in the model's context window (None when no model says)."""
        return self._parts.context_tokens

    def max_cache_bytes(self) -> int:
        """The KV bytes the memory threshold is measured against."""
        return self._parts.max_cache_bytes(self._config)

    # -- turns -----------------------------------------------------------------------------

    async def process_conversation(
        self,
        session_id: str,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> CacheProcessingResult:
        """Record one conversation turn: store what is new, clear if due, retrieve if asked.

        `messages` may be the whole conversation so far or only the new messages; messages
        already stored are not stored again.
        """
        async with self._call():
            checked = await validate_off_loop(messages, self._config)
            return await self._session(
                (namespace, session_id),
                lambda s: self._loop.turn(s, checked),
                create=True,
            )

    async def ingest(
        self,
        session_id: str,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        batch_size: int = INGEST_BATCH,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Bulk-import existing history into tier 3, in batches; returns how many were new.

        Imported messages are stored, indexed and embedded, but do not count as turns, are
        not retrieved for, and do not enter the active cache. Each batch commits on its
        own; `progress(stored, new)` is called after each.
        """
        async with self._call():
            checked = await validate_off_loop(messages, self._config)
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise InvalidInputError("batch_size must be an integer of at least 1")
            return await self._loop.ingest((namespace, session_id), checked, batch_size, progress)

    async def clear_cache(
        self,
        session_id: str,
        reason: ClearReason | str = ClearReason.MANUAL,
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> CacheClearResult:
        """Clear a session's active cache now, for the given reason."""
        async with self._call():
            try:
                why = ClearReason(reason)
            except ValueError as exc:
                raise InvalidInputError(f"unknown clear reason {reason!r}") from exc
            return await self._session((namespace, session_id), lambda s: self._loop.clear(s, why))

    async def manual_clear_cache(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> CacheClearResult:
        return await self.clear_cache(session_id, ClearReason.MANUAL, namespace=namespace)

    async def wait_for_summaries(self, timeout: float | None = None) -> bool:
        """Wait until every background summary has landed; False if `timeout` passed first."""
        async with self._call():
            timeout = None if timeout is None else _seconds("timeout", timeout)
            return await self._summaries.wait(timeout)

    # -- retrieval and snapshots -----------------------------------------------------------

    async def retrieve_context(
        self,
        session_id: str,
        query: str,
        limit: int | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> RetrievalResult:
        """Search the session's three tiers for `query`; best hits first.

        Each hit's `similarity_score` is in [0, 1] (higher is better) and comparable across
        tiers; `message_ids` are the caller's ids of the messages it came from.
        """
        async with self._call():
            check_text("query", query, self._config.max_message_bytes)
            wanted = self._config.retrieval_limit if limit is None else limit
            if isinstance(wanted, bool) or not isinstance(wanted, int):
                raise InvalidInputError(f"limit must be an integer, not {type(wanted).__name__}")
            if not 1 <= wanted <= MAX_RETRIEVAL_LIMIT:
                raise InvalidInputError(f"limit must be between 1 and {MAX_RETRIEVAL_LIMIT}")
            return await self._session(
                (namespace, session_id), lambda s: self._loop.retrieve(s, query, wanted, set())
            )

    async def list_snapshots(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> list[SnapshotInfo]:
        """The session's snapshots, newest first."""
        async with self._call():
            key = await self._memory.key(session_id, namespace)
            return [convert.snapshot(r) for r in await self._store.snapshots(key)]

    async def restore_from_snapshot(
        self, session_id: str, snapshot_id: int, *, namespace: str = DEFAULT_NAMESPACE
    ) -> RestoreResult:
        """Bring a snapshot's entries back into the session's active cache."""
        async with self._call():
            if isinstance(snapshot_id, bool) or not isinstance(snapshot_id, int):
                raise InvalidInputError(
                    f"snapshot_id must be an integer, not {type(snapshot_id).__name__}"
                )
            return await self._session(
                (namespace, session_id), lambda s: self._loop.restore(s, snapshot_id)
            )

    # -- reading ---------------------------------------------------------------------------

    async def get_session_state(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> SessionCacheState | None:
        """The session's counters and sizes; None for an unknown session."""
        async with self._call():
            try:
                return await self._session((namespace, session_id), _view(convert.state))
            except NotFoundError:
                return None

    async def get_summary(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> SessionSummary | None:
        """The session's cumulative summary; None before its first summarized clear."""
        async with self._call():
            row = await self._store.summary(await self._memory.key(session_id, namespace))
            return convert.summary(row) if row else None

    async def get_conversation_history(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> list[StoredMessage]:
        """Every stored message of the session, in order."""
        async with self._call():
            key = await self._memory.key(session_id, namespace)
            return [convert.stored_message(r) for r in await self._store.messages_between(key, -1)]

    async def context_usage(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Tokens in the session's active cache."""
        async with self._call():
            return await self._session(
                (namespace, session_id), _view(lambda s: s.cache.token_count)
            )

    async def get_active_cache(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> list[ActiveEntry]:
        """The session's active cache in order: what the host's model currently sees."""
        async with self._call():
            return await self._session((namespace, session_id), _view(convert.active_cache))

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, the most recently active first."""
        async with self._call():
            return [convert.session_info(r) for r in await self._store.list_sessions()]

    # -- writing ---------------------------------------------------------------------------

    async def flush_to_database(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> None:
        """Persist the session's in-memory figures (its entries' access counts and
        engagement) now; everything else is written as it changes."""
        async with self._call(), self._memory.use((namespace, session_id)):
            session = self._sessions.get((namespace, session_id))
            if session is None:
                await self._memory.key(session_id, namespace)
                return
            await self._memory.flush(session)

    async def delete_session(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Remove a session and all derived from it (its background summary is cancelled
        and awaited first); False if it did not exist."""
        async with self._call():
            deleted = await self._loop.delete((namespace, session_id))
            for chat in self._parts.chats:
                await chat.forget((namespace, session_id))
            return deleted

    # -- maintenance and observability ------------------------------------------------------

    async def perform_maintenance(self) -> MaintenanceResult:
        """Flush and drop sessions idle past `idle_eviction_seconds`; prune old snapshots."""
        async with self._call():
            for chat in self._parts.chats:
                chat.evict_idle()
            return await self._loop.maintain()

    async def run_maintenance(self, interval_seconds: float = 300.0) -> None:
        """Run `perform_maintenance` every `interval_seconds` until cancelled or closed."""
        interval = _seconds("interval_seconds", interval_seconds)
        if interval <= 0:
            raise InvalidInputError("interval_seconds must be positive")
        while not self._calls.closing:
            try:
                await self.perform_maintenance()
            except ManagerClosedError:
                return
            await anyio.sleep(interval)

    def export_statistics(self) -> CacheStatisticsExport:
        return self._loop.stats.export(active_sessions=len(self._sessions))

    def reset_statistics(self) -> None:
        self._loop.stats.reset()

    async def status(self) -> ManagerStatus:
        """Memory, budget and eviction figures, and the models' state."""
        async with self._call():
            kv_states = None
            for chat in self._parts.chats:
                stats = await chat.state_stats()
                if stats is not None:
                    kv_states = stats if kv_states is None else kv_states.add(stats)
            return convert.status(self._parts, self._memory, self._summaries.pending, kv_states)

    async def storage_status(self) -> dict[str, int]:
        """What the database holds: sessions, messages, snapshots and summaries, and the
        bytes of its files (the WAL included)."""
        async with self._call():
            return await convert.storage_status(self._store)


def _view(read: Callable[[Session], T]) -> Callable[[Session], Awaitable[T]]:
    """A read of a held session, as the coroutine `_session` runs."""

    async def view(session: Session) -> T:
        return read(session)

    return view


def _seconds(what: str, value: object) -> float:
    """A finite, non-negative number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{what} must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInputError(f"{what} must be a finite, non-negative number of seconds")
    return seconds
