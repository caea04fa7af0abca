"""KVCacheManager: the public entry point that runs the memory loop for every session.

Per session it keeps the active cache in memory, stores every message (tier 3), decides
when to clear (turn count, KV memory threshold, entry count), preserves and snapshots what
matters (tier 2), keeps the cumulative summary, and searches the three tiers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import numpy as np
import psutil

from . import _bridge as bridge
from . import _budgets as budgets
from . import _text as text
from ._boundary import convert, map_errors
from ._budgets import SessionBudget
from ._cache import CacheEntry
from ._config import (
    KV_CACHE_TYPE_BYTES,
    AdaptiveSnapshots,
    FullSnapshots,
    IncrementalSnapshots,
    KVCacheConfig,
    KVShape,
)
from ._embedder import Embedder, SentenceTransformerEmbedder
from ._errors import (
    ConfigError,
    InvalidInputError,
    ManagerClosedError,
    ModelError,
    NotFoundError,
    TierMemError,
)
from ._intake import LARGE_INPUT_CHARS, Intake, check_text, validate
from ._llm import LlamaChat, LlamaTokenizer, resolve_gguf
from ._pool import ModelPool
from ._retrieval import Retriever
from ._scoring import ImportanceScorer
from ._sessions import Ident, Session, SessionMemory
from ._statistics import CacheStatistics
from ._store import SnapshotEntryRow, SnapshotRow, SQLiteStore, StaleSession, Store, SummaryRow
from ._summaries import SummaryKeeper, SummaryOutcome
from ._summarizer import LLMSummarizer, Summarizer, TokenCounter
from ._telemetry import (
    BudgetExceededEvent,
    ClearEvent,
    Guarded,
    LoggingTelemetry,
    MaintenanceEvent,
    RetrievalEvent,
    SnapshotEvent,
    SummaryEvent,
    Telemetry,
)
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
    PreservedEntry,
    RestoreResult,
    RetrievalResult,
    RetrievedEntry,
    SessionCacheState,
    SessionInfo,
    SessionSummary,
    SnapshotInfo,
    StoredMessage,
    timestamp_to_datetime,
)

log = logging.getLogger("tiermem")

# Used only when neither a GGUF nor `kv_shape` says otherwise: a typical 8B model
# (32 layers, 8 KV heads of 128, f16), so byte figures stay realistic.
FALLBACK_KV_SHAPE = KVShape(n_layers=32, n_kv_heads=8, head_dim=128, dtype_bytes=2)
INGEST_BATCH = 256
# how many times a call starts again on a fresh copy of a session another process changed
STALE_RETRIES = 8
MAX_RETRIEVAL_LIMIT = 1000
T = TypeVar("T")
_RETRIEVE_HINT = re.compile(r"\b(explain|how to|what is|what's)\b", re.IGNORECASE)
_IMMUTABLE_FIELDS = ("embedding_model", "llm_model_path", "summarizer_context_tokens")


class HeuristicTokenCounter:
    """About four bytes of UTF-8 per token; used when no GGUF vocabulary is available."""

    def count(self, texts: list[str]) -> list[int]:
        return [max(1, math.ceil(len(t.encode("utf-8", "surrogatepass")) / 4)) for t in texts]

    def truncate(self, text_: str, max_tokens: int) -> str:
        return text_[: max_tokens * 4]


class KVCacheManager:
    """Tiered memory for chat sessions. Open with `await KVCacheManager.open(path)`."""

    def __init__(
        self,
        store: Store,
        config: KVCacheConfig,
        embedder: Embedder,
        summarizer: Summarizer | None,
        tokens: TokenCounter,
        kv_shape: KVShape,
        context_tokens: int | None,
        clock: Callable[[], float] = time.time,
        *,
        pool: ModelPool,
        stoppers: Sequence[Callable[[], None]] = (),
        telemetry: Telemetry | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._embedder = embedder
        self._summarizer = summarizer
        self._tokens = tokens
        self._kv_shape = kv_shape
        self._context_tokens = context_tokens
        self._clock = clock
        self._pool = pool
        self._stoppers = list(stoppers)
        self._telemetry = Guarded(telemetry or LoggingTelemetry())
        self._intake = Intake(store, embedder, tokens, kv_shape.bytes_per_token, clock)
        self._summaries = SummaryKeeper(store, summarizer, clock) if summarizer else None
        self._scorer = ImportanceScorer(config.scoring)
        self._retriever = self._make_retriever()
        self._stats = CacheStatistics()
        self._memory = SessionMemory(
            store, self._intake, lambda: self._config, self._telemetry, clock, self._loaded
        )
        self._sessions = self._memory.sessions
        self._closing = False  # no new calls
        self._closed = False  # everything flushed and closed
        self._calls: set[anyio.CancelScope] = set()  # public calls in flight
        self._drained = anyio.Event()  # set when closing and no call is left

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path = "tiermem.db",
        config: KVCacheConfig | None = None,
        *,
        embedder: Embedder | None = None,
        summarizer: Summarizer | None = None,
        tokenizer: TokenCounter | None = None,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
    ) -> KVCacheManager:
        """Open the database at `path` (created and migrated if new) with the given models.

        Unset models default to the bundled ones; the GGUF is checked now (its vocabulary
        and shape are read), so a missing or corrupt model fails here, not at a later turn.
        Events go to `telemetry` (default: `LoggingTelemetry`, records on the
        `tiermem.events` logger).
        """
        with map_errors():
            return await cls._open(path, config, embedder, summarizer, tokenizer, clock, telemetry)

    @classmethod
    async def _open(
        cls,
        path: str | Path,
        config: KVCacheConfig | None,
        embedder: Embedder | None,
        summarizer: Summarizer | None,
        tokenizer: TokenCounter | None,
        clock: Callable[[], float],
        telemetry: Telemetry | None,
    ) -> KVCacheManager:
        config = config or KVCacheConfig()
        pool = ModelPool(config.model_memory_limit_bytes)
        if embedder is None:
            embedder = SentenceTransformerEmbedder(
                config.embedding_model, config.embedding_batch_size, pool
            )
        vocab: LlamaTokenizer | None = None
        needs_llm = summarizer is None and config.summarizer_enabled
        if tokenizer is None or needs_llm or config.kv_shape is None:
            try:
                gguf = await anyio.to_thread.run_sync(resolve_gguf, config.llm_model_path)
                vocab = await anyio.to_thread.run_sync(LlamaTokenizer, gguf)
            except ModelError:
                if needs_llm or config.llm_model_path:
                    raise
        dtype = KV_CACHE_TYPE_BYTES[config.kv_cache_type]
        shape = config.kv_shape or (vocab.kv_shape(dtype) if vocab else None) or FALLBACK_KV_SHAPE
        stoppers: list[Callable[[], None]] = []
        if needs_llm:
            assert vocab is not None
            chat = LlamaChat(
                vocab.path,
                config.summarizer_context_tokens,
                config.llm_threads,
                pool,
                shape.bytes_per_token,
            )
            stoppers.append(chat.stop)
            summarizer = LLMSummarizer(chat, vocab, config.summary_timeout_seconds)
        tokens: TokenCounter = tokenizer or vocab or HeuristicTokenCounter()
        context = config.context_window_tokens or (vocab.context_length() if vocab else None)
        store = await SQLiteStore.open(
            path,
            embedder.model_name,
            embedder.dimensions,
            config.busy_timeout_ms,
            read_only=config.read_only,
            check=config.check_on_open,
            clock=clock,
        )
        return cls(
            store,
            config,
            embedder,
            summarizer,
            tokens,
            shape,
            context,
            clock,
            pool=pool,
            stoppers=stoppers,
            telemetry=telemetry,
        )

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
        if self._closing:
            return
        self._closing = True
        with anyio.CancelScope(shield=True):
            try:
                if self._calls:
                    with anyio.move_on_after(self._config.close_wait_seconds):
                        await self._drained.wait()
                    for scope in list(self._calls):
                        scope.cancel()
                    await self._drained.wait()
                if self._summaries is not None:
                    cancelled = await self._summaries.aclose(
                        self._config.summary_close_wait_seconds, self._stop_models
                    )
                    if cancelled:
                        log.warning("%d summaries left pending at shutdown", cancelled)
                for session in self._sessions:
                    async with self._sessions.locks.hold(session.ident):
                        try:
                            await self._memory.flush(session)
                        except TierMemError as exc:
                            log.warning("could not flush session %r: %s", session.session_id, exc)
            finally:
                self._closed = True
                self._sessions.clear()
                await self._store.close()
                await self._pool.aclose()

    def _stop_models(self) -> None:
        for stop in self._stoppers:
            stop()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                "KVCacheManager was not closed; use `async with` or `await aclose()`",
                ResourceWarning,
                stacklevel=2,
            )

    def _check_open(self) -> None:
        if self._closing:
            raise ManagerClosedError("this KVCacheManager is closed")

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """One public call: refused once closing; counted while in flight, so `aclose` can
        wait for it (or cancel it); every error converted to a `TierMemError`."""
        self._check_open()
        scope = anyio.CancelScope()
        self._calls.add(scope)
        try:
            with scope, map_errors():
                yield
        finally:
            self._calls.discard(scope)
            if self._closing and not self._calls:
                self._drained.set()
        if scope.cancelled_caught:
            raise ManagerClosedError("the manager was closed while this call ran")

    async def _retrying(self, ident: Ident, work: Callable[[], Awaitable[T]]) -> T:
        """`work` under the session's lock; when another process changed the session since
        this one read it (nothing of this attempt was written), again on a fresh copy."""
        for attempt in range(STALE_RETRIES):
            try:
                async with self._memory.use(ident):
                    return await work()
            except StaleSession:
                if attempt == STALE_RETRIES - 1:
                    raise
                await anyio.sleep(0.002 * attempt)
        raise AssertionError("unreachable")

    # -- configuration ---------------------------------------------------------------------

    @property
    def config(self) -> KVCacheConfig:
        return self._config

    def update_config(self, config: KVCacheConfig | None = None, **changes: Any) -> KVCacheConfig:
        """Replace the config (or change some fields). Model choices cannot change live."""
        new = config if config is not None else self._config.replace(**changes)
        for name in _IMMUTABLE_FIELDS:
            if getattr(new, name) != getattr(self._config, name):
                raise ConfigError(f"{name} cannot change while the manager is open")
        self._config = new
        self._scorer = ImportanceScorer(new.scoring)
        self._retriever = self._make_retriever()
        return new

    @property
    def model_pool(self) -> ModelPool:
        """The pool the bundled models load through (`unload` a model there to free it)."""
        return self._pool

    def _make_retriever(self) -> Retriever:
        c = self._config
        embedder = self._embedder if c.generate_cache_embeddings else None
        return Retriever(self._store, embedder, c)

    # -- sizes -----------------------------------------------------------------------------

    def context_capacity(self) -> int | None:
        """Tokens in the model's context window (None when no model says)."""
        return self._context_tokens

    def max_cache_bytes(self) -> int:
        """The KV bytes the memory threshold is measured against."""
        if self._config.max_cache_bytes:
            return self._config.max_cache_bytes
        if self._context_tokens:
            return self._context_tokens * self._kv_shape.bytes_per_token
        available = psutil.virtual_memory().available // 4
        return int(min(max(available, 256 * 2**20), 8 * 2**30))

    # -- sessions --------------------------------------------------------------------------

    def _loaded(self, session: Session) -> None:
        if self._config.summary_mode == "background":
            self._schedule_summary(session)  # a clear whose summary did not land before

    # -- the turn --------------------------------------------------------------------------

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
            checked = await self._validate(messages)
            return await self._retrying(
                (namespace, session_id), lambda: self._turn(session_id, namespace, checked)
            )

    async def _validate(self, messages: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
        c = self._config
        if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
            size = sum(len(m.content) for m in messages if isinstance(m, Message))
            if size > LARGE_INPUT_CHARS:  # encoding and checking megabytes: off the loop
                return await anyio.to_thread.run_sync(
                    validate, messages, c.max_message_bytes, c.max_metadata_bytes
                )
        return validate(messages, c.max_message_bytes, c.max_metadata_bytes)

    async def _turn(
        self, session_id: str, namespace: str, checked: Sequence[Message]
    ) -> CacheProcessingResult:
        session = await self._memory.get(session_id, namespace, create=True)
        fresh = await self._intake.new_messages(session, checked)
        state = session.state.copy()
        state.conversation_count += 1
        embed = self._config.generate_cache_embeddings
        # one transaction; a conflict with another process raises before anything is written
        entries = await self._intake.store(session, fresh, state, embed)
        session.state = state
        session.last_activity = self._clock()
        await self._memory.hold_budget(kv_bytes=sum(e.kv_bytes for e in entries))
        self._scorer.decay(session.cache.entries)
        session.cache.add(entries)
        self._memory.note_peak()

        # the turn is stored: from here on a conflict means settling again on a fresh copy
        session, slid_out, clear_result = await self._settle(session)
        state = session.state
        bridges: list[str] = []
        if clear_result is not None:
            bridges.append(clear_result.bridge_message)
        if (
            session.summary is not None
            and state.clear_count > 0
            and (clear_result is None or clear_result.summary_pending)
        ):
            # the newest summary there is, while this clear's is being written
            bridges.append(bridge.prior_summary_bridge(session.summary.text))

        retrieval, retrieval_error = None, None
        query = self._retrieval_query([m for m, _ in fresh])
        if query is not None:
            # the question was embedded a moment ago to be stored: not again to search
            vector = next((e.vector for e in entries if e.content == query), None)
            try:
                retrieval = await self._retrieve(
                    session, query, self._config.retrieval_limit, {e.rowid for e in entries}, vector
                )
            except Exception as exc:  # the turn is stored: it reports the failure, not fails
                retrieval_error = str(convert(exc))
                log.warning("retrieval after a stored turn failed: %s", retrieval_error)
            if retrieval is not None and retrieval.entries and retrieval.bridge_message:
                bridges.append(retrieval.bridge_message)
        if not self._config.bridge_enabled:
            bridges = []
        return CacheProcessingResult(
            should_clear_cache=clear_result is not None,
            clear_result=clear_result,
            should_retrieve=bool(retrieval and retrieval.entries),
            retrieval_result=retrieval,
            bridge_messages=bridges,
            updated_session_state=self._public_state(session),
            stored_message_ids=[e.message_id for e in entries],
            slid_out_message_ids=slid_out,
            retrieval_error=retrieval_error,
        )

    async def _settle(self, session: Session) -> tuple[Session, list[str], CacheClearResult | None]:
        """After a stored turn: slide, clear if due, shed what a clear keeps beyond the
        budget. When another process changed the session meanwhile, the decision is made
        again on a fresh copy (if it cleared already, nothing is due any more)."""
        for _ in range(STALE_RETRIES):
            try:
                slid_out: list[str] = []
                if self._config.context_overflow == "sliding_window":
                    slid_out = await self._shed(session, budget=False)
                reason = self._clear_reason(session)
                clear_result = await self._clear(session, reason) if reason else None
                if clear_result is not None:
                    # what a clear must preserve may not fit the window or the budget either
                    slid_out += await self._shed(session, budget=True)
                return session, slid_out, clear_result
            except StaleSession:
                self._sessions.remove(session.ident)
                session = await self._memory.get(session.session_id, session.namespace, False)
        raise StaleSession(f"session {session.session_id!r} kept changing in another process")

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
            checked = await self._validate(messages)
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise InvalidInputError("batch_size must be an integer of at least 1")
            ident = (namespace, session_id)

            async def work() -> list[tuple[Message, str]]:
                session = await self._memory.get(session_id, namespace, create=True)
                return await self._intake.new_messages(session, checked)

            fresh = await self._retrying(ident, work)
            for start in range(0, len(fresh), batch_size):
                batch = fresh[start : start + batch_size]
                await self._retrying(ident, functools.partial(self._ingest_batch, ident, batch))
                if progress is not None:
                    progress(start + len(batch), len(fresh))
            return len(fresh)

    async def _ingest_batch(self, ident: Ident, batch: Sequence[tuple[Message, str]]) -> None:
        session = await self._memory.get(ident[1], ident[0], create=True)
        state = session.state.copy()
        # imported messages are history (tier 3), not active: "cleared" through the batch,
        # with the active entries kept by row
        state.cleared_through = state.message_count + len(batch) - 1
        state.pinned = session.cache.rowids()
        await self._intake.store(session, batch, state, self._config.generate_cache_embeddings)
        session.state = state
        session.last_activity = self._clock()

    def _clear_reason(self, session: Session) -> ClearReason | None:
        c = self._config
        if not c.enabled:
            return None
        if session.state.conversation_count >= c.clear_after_conversations:
            return ClearReason.CONVERSATION_LIMIT
        if session.cache.kv_bytes / self.max_cache_bytes() >= c.memory_threshold_percent:
            return ClearReason.MEMORY_THRESHOLD
        window = self._context_tokens
        if window is not None and session.cache.token_count > window:
            return ClearReason.CONTEXT_OVERFLOW
        over = SessionBudget.of(c).excess(session.cache)
        if over is None:
            return None
        self._telemetry.emit(
            BudgetExceededEvent(
                over.scope, over.value, over.limit, session.session_id, session.namespace
            )
        )
        if over.scope == "session_entries":
            return ClearReason.ENTRY_LIMIT
        return ClearReason.SESSION_BUDGET

    async def _shed(self, session: Session, *, budget: bool) -> list[str]:
        """Drop the oldest entries (system prompts last) until the active cache fits the
        context window, and the session's budget if `budget`; they stay in the history.
        Returns their message ids."""
        limits = SessionBudget.of(self._config)
        dropped = budgets.shed(
            session.cache.entries,
            max_tokens=self._context_tokens,
            max_bytes=limits.max_bytes if budget else None,
            max_entries=limits.max_entries if budget else None,
        )
        if not dropped:
            return []
        gone = {e.rowid for e in dropped}
        keep = [e for e in session.cache.entries if e.rowid not in gone]
        state = session.state.copy()
        # the state names the active cache as "after cleared_through, plus pinned rows"
        state.cleared_through = max([state.cleared_through, *(e.position for e in dropped)])
        state.pinned = [e.rowid for e in keep if e.position <= state.cleared_through]
        state.entry_stats = session.stats_of(keep)
        await self._store.save_state(session.key, state)
        session.state = state
        session.cache.replace(keep)
        return [e.message_id for e in dropped]

    def _retrieval_query(self, fresh: Sequence[Message]) -> str | None:
        if not self._config.retrieval_enabled:
            return None
        last_user = next((m for m in reversed(fresh) if m.role == "user"), None)
        if last_user is None or not last_user.content.strip():
            return None
        content = last_user.content
        wanted = (
            self._config.retrieve_always
            or "?" in content
            or len(content) > 100
            or "```" in content
            or _RETRIEVE_HINT.search(content) is not None
        )
        return content if wanted else None

    # -- clearing --------------------------------------------------------------------------

    async def _clear(self, session: Session, reason: ClearReason) -> CacheClearResult:
        c = self._config
        entries = session.cache.entries
        self._scorer.rescore(entries)
        keep = [
            e
            for e in entries
            if e.importance >= c.min_importance_to_preserve
            or (c.preserve_system_prompts and e.entry_type == "system_prompt")
            or (c.preserve_code_entries and e.entry_type == "code")
        ]
        snapshot = self._snapshot_plan(reason, keep)
        through = session.state.message_count - 1
        clear_count = session.state.clear_count + 1
        outcome = SummaryOutcome(None)
        if self._summaries is None:
            outcome = SummaryOutcome(None, "no summarizer configured")
        elif c.summary_mode == "inline":
            outcome = await self._summaries.update(session.key, through, clear_count)
            self._summary_landed(session.key, session.ident, outcome)

        state = session.state.copy()
        bytes_before = session.cache.kv_bytes
        state.clear_count = clear_count
        state.conversation_count = 0
        state.cleared_through = through
        state.pinned = [e.rowid for e in keep]
        state.last_cleared_at = self._clock()
        state.entry_stats = session.stats_of(keep)
        snapshot_id = await self._store.save_clear(session.key, state, snapshot)
        session.state = state
        session.cache.replace(keep)
        pending = c.summary_mode == "background" and self._schedule_summary(session)

        keywords = text.top_keywords(e.content for e in keep if e.entry_type != "system_prompt")
        cleared = len(entries) - len(keep)
        # the summary bridge when the summary covers this clear (written now, or nothing new
        # to add to the prior one); the generic one when it failed or is still being written
        if session.summary is not None and outcome.error is None and not pending:
            message = bridge.summary_bridge(session.summary.text)
        else:
            message = bridge.clear_bridge(cleared, len(keep), keywords)
        self._stats.record_clear(len(entries), len(keep), reason.value, session.session_id)
        sid, ns = session.session_id, session.namespace
        freed = bytes_before - session.cache.kv_bytes
        self._telemetry.emit(ClearEvent(sid, ns, reason.value, cleared, len(keep), freed))
        if snapshot_id is not None and snapshot is not None:
            self._stats.record_snapshot(snapshot_id, len(snapshot[2]), sid)
            self._telemetry.emit(SnapshotEvent(sid, ns, snapshot_id, len(snapshot[2])))
        return CacheClearResult(
            entries_to_keep=[
                PreservedEntry(e.message_id, e.role, e.content, e.importance, e.entry_type)
                for e in keep
            ],
            entries_cleared=cleared,
            bridge_message=message,
            snapshot_id=snapshot_id,
            preserved_keywords=keywords,
            clear_reason=reason,
            summary=_public_summary(outcome.summary) if outcome.summary else None,
            summary_error=outcome.error,
            summary_pending=pending,
        )

    def _snapshot_plan(
        self, reason: ClearReason, keep: Sequence[CacheEntry]
    ) -> tuple[str, str, list[SnapshotEntryRow]] | None:
        strategy = self._config.snapshot_strategy
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
        return reason.value, strategy.kind, rows

    def _schedule_summary(self, session: Session) -> bool:
        """Start a background update if the session's clears are not all summarized yet;
        the session in memory gets the summary when it lands. True if one was started."""
        summary = session.summary
        state = session.state
        if self._summaries is None or state.clear_count <= (summary.clear_count if summary else 0):
            return False
        if not self._summaries.due(
            summary.covered_through if summary else -1, state.cleared_through
        ):
            return False
        key, ident = session.key, session.ident
        self._summaries.schedule(key, lambda outcome: self._summary_landed(key, ident, outcome))
        return True

    def _summary_landed(self, key: int, ident: Ident, outcome: SummaryOutcome) -> None:
        """Hand a new summary to the session in memory (if it is the one the summary was
        written for: keys are never reused), and report the update."""
        new = outcome.summary
        if new is None and outcome.error is None:
            return  # nothing was due
        self._telemetry.emit(
            SummaryEvent(
                ident[1],
                ident[0],
                outcome.duration_ms,
                new.token_count if new else 0,
                outcome.messages,
                outcome.error,
            )
        )
        holder = self._sessions.get(ident)
        if (
            new is not None
            and holder is not None
            and holder.key == key
            and (holder.summary is None or holder.summary.covered_through < new.covered_through)
        ):
            holder.summary = new

    async def wait_for_summaries(self, timeout: float | None = None) -> bool:
        """Wait until every background summary has landed; False if `timeout` passed first."""
        async with self._call():
            timeout = None if timeout is None else _seconds("timeout", timeout)
            return True if self._summaries is None else await self._summaries.wait(timeout)

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

            async def work() -> CacheClearResult:
                session = await self._memory.get(session_id, namespace, create=False)
                return await self._clear(session, why)

            return await self._retrying((namespace, session_id), work)

    async def manual_clear_cache(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> CacheClearResult:
        return await self.clear_cache(session_id, ClearReason.MANUAL, namespace=namespace)

    # -- retrieval -------------------------------------------------------------------------

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

            async def work() -> RetrievalResult:
                session = await self._memory.get(session_id, namespace, create=False)
                return await self._retrieve(session, query, wanted, set())

            return await self._retrying((namespace, session_id), work)

    async def _retrieve(
        self,
        session: Session,
        query: str,
        limit: int,
        exclude: set[int],
        query_vector: np.ndarray[Any, Any] | None = None,
    ) -> RetrievalResult:
        started = time.perf_counter()
        outcome = await self._retriever.search(
            session.key, session.cache.entries, query, limit, exclude, query_vector
        )
        hits = [
            RetrievedEntry(
                text=c.row.content,
                similarity_score=round(c.score, 6),
                source_tier=c.tier,
                message_ids=[r.message_id for r in (c.row, *c.same_text)],
                matched_keywords=text.matched_keywords(c.row.content, outcome.keywords),
                role=c.row.role,
                created_at=timestamp_to_datetime(c.row.created_at),
            )
            for c in outcome.hits
            if c.row is not None
        ]
        active = session.cache.by_rowid()
        self._scorer.engage([active[c.rowid] for c in outcome.hits if c.rowid in active])
        self._stats.record_retrieval(
            len(hits), outcome.tiers_searched, len(outcome.keywords), session.session_id
        )
        duration_ms = (time.perf_counter() - started) * 1000
        by_tier = Counter(h.source_tier for h in hits)
        self._telemetry.emit(
            RetrievalEvent(
                session.session_id,
                session.namespace,
                tuple(outcome.tiers_searched),
                len(hits),
                dict(by_tier),
                duration_ms,
            )
        )
        message = None
        if hits:
            primary = max(sorted(by_tier), key=by_tier.__getitem__)
            average = sum(h.similarity_score for h in hits) / len(hits)
            message = bridge.retrieval_bridge(len(hits), primary, outcome.keywords, average)
        return RetrievalResult(
            entries=hits,
            bridge_message=message,
            tiers_searched=outcome.tiers_searched,
            search_duration_ms=duration_ms,
            keywords_used=outcome.keywords,
        )

    # -- snapshots -------------------------------------------------------------------------

    async def list_snapshots(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> list[SnapshotInfo]:
        """The session's snapshots, newest first."""
        async with self._call():
            key = await self._memory.key(session_id, namespace)
            return [_public_snapshot(r) for r in await self._store.snapshots(key)]

    async def restore_from_snapshot(
        self, session_id: str, snapshot_id: int, *, namespace: str = DEFAULT_NAMESPACE
    ) -> RestoreResult:
        """Bring a snapshot's entries back into the session's active cache."""
        async with self._call():
            if isinstance(snapshot_id, bool) or not isinstance(snapshot_id, int):
                raise InvalidInputError(
                    f"snapshot_id must be an integer, not {type(snapshot_id).__name__}"
                )
            return await self._retrying(
                (namespace, session_id), lambda: self._restore(session_id, namespace, snapshot_id)
            )

    async def _restore(self, session_id: str, namespace: str, snapshot_id: int) -> RestoreResult:
        session = await self._memory.get(session_id, namespace, create=False)
        found = None
        if 0 < snapshot_id < 2**63:
            found = await self._store.snapshot_entries(session.key, snapshot_id)
        if found is None:
            raise NotFoundError(f"session {session_id!r} has no snapshot {snapshot_id}")
        messages = await self._store.messages_by_rowid([r.message_rowid for r in found.entries])
        restored = await self._intake.entries(messages, self._config.generate_cache_embeddings)
        state = session.state.copy()
        pinned = set(state.pinned or [])
        pinned.update(r.rowid for r in messages if r.position <= state.cleared_through)
        state.pinned = sorted(pinned)
        state.entry_stats = session.stats_of([*session.cache.entries, *restored])
        await self._store.save_state(session.key, state)
        session.state = state
        session.cache.add(restored)
        minutes = max(0, int((self._clock() - found.created_at) // 60))
        self._stats.record_restore(snapshot_id, len(messages), session.session_id)
        return RestoreResult(
            snapshot_id, len(messages), bridge.restore_bridge(len(messages), minutes), minutes
        )

    # -- reading ---------------------------------------------------------------------------

    async def get_session_state(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> SessionCacheState | None:
        async with self._call():
            try:
                return await self._retrying(
                    (namespace, session_id),
                    lambda: self._with_session(session_id, namespace, self._public_state),
                )
            except NotFoundError:
                return None

    async def _with_session(
        self, session_id: str, namespace: str, view: Callable[[Session], T]
    ) -> T:
        return view(await self._memory.get(session_id, namespace, create=False))

    async def get_summary(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> SessionSummary | None:
        async with self._call():
            row = await self._store.summary(await self._memory.key(session_id, namespace))
            return _public_summary(row) if row else None

    async def get_conversation_history(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> list[StoredMessage]:
        """Every stored message of the session, in order."""
        async with self._call():
            key = await self._memory.key(session_id, namespace)
            rows = await self._store.messages_between(key, -1)
            return [
                StoredMessage(
                    r.message_id,
                    r.position,
                    r.role,
                    r.content,
                    timestamp_to_datetime(r.created_at),
                    json.loads(r.metadata) if r.metadata else None,
                )
                for r in rows
            ]

    async def context_usage(self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Tokens in the session's active cache."""
        async with self._call():
            return await self._retrying(
                (namespace, session_id),
                lambda: self._with_session(session_id, namespace, lambda s: s.cache.token_count),
            )

    async def get_active_cache(
        self, session_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> list[ActiveEntry]:
        """The session's active cache in order: what the host's model currently sees."""
        async with self._call():
            return await self._retrying(
                (namespace, session_id),
                lambda: self._with_session(session_id, namespace, _public_cache),
            )

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session, the most recently active first."""
        async with self._call():
            return [
                SessionInfo(
                    r.namespace,
                    r.session_id,
                    r.message_count,
                    r.text_bytes,
                    timestamp_to_datetime(r.last_activity),
                )
                for r in await self._store.list_sessions()
            ]

    # -- writing state ---------------------------------------------------------------------

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
        async with self._call(), self._memory.use((namespace, session_id)):
            self._sessions.remove((namespace, session_id))
            try:
                key = await self._memory.key(session_id, namespace)
            except NotFoundError:
                return False
            if self._summaries is not None:
                await self._summaries.cancel(key)
            await self._store.delete_session(key)
            return True

    # -- maintenance and observability ------------------------------------------------------

    async def perform_maintenance(self) -> MaintenanceResult:
        """Flush and drop sessions idle past `idle_eviction_seconds`; prune old snapshots."""
        async with self._call():
            started = time.perf_counter()
            evicted, errors = await self._memory.evict_idle()
            pruned = 0
            strategy = self._config.snapshot_strategy
            if isinstance(strategy, (IncrementalSnapshots, AdaptiveSnapshots)):
                try:
                    pruned = await self._store.prune_snapshots(strategy.max_snapshots)
                except TierMemError as exc:
                    errors.append(f"pruning snapshots: {exc}")
            duration_ms = (time.perf_counter() - started) * 1000
            self._telemetry.emit(MaintenanceEvent(evicted, pruned, len(errors), duration_ms))
            return MaintenanceResult(evicted, pruned, errors, duration_ms)

    async def run_maintenance(self, interval_seconds: float = 300.0) -> None:
        """Run `perform_maintenance` every `interval_seconds` until cancelled or closed."""
        interval = _seconds("interval_seconds", interval_seconds)
        if interval <= 0:
            raise InvalidInputError("interval_seconds must be positive")
        while not self._closing:
            try:
                await self.perform_maintenance()
            except ManagerClosedError:
                return
            await anyio.sleep(interval)

    def export_statistics(self) -> CacheStatisticsExport:
        return self._stats.export(active_sessions=len(self._sessions))

    def reset_statistics(self) -> None:
        self._stats = CacheStatistics()

    async def status(self) -> ManagerStatus:
        """Memory, budget and eviction figures, and the models' state."""
        async with self._call():
            models: dict[str, Any] = {
                **self._pool.stats(),
                "embedding": {
                    "name": self._embedder.model_name,
                    "dimensions": self._embedder.dimensions,
                    "loaded": bool(getattr(self._embedder, "loaded", True)),
                },
                "kv_bytes_per_token": self._kv_shape.bytes_per_token,
                "context_tokens": self._context_tokens,
                "summarizer": type(self._summarizer).__name__ if self._summarizer else None,
                "summaries_pending": self._summaries.pending if self._summaries else 0,
            }
            memory = self._memory
            return ManagerStatus(
                estimated_bytes=self._sessions.kv_bytes,
                budget_bytes=self._config.max_bytes_total,
                peak_bytes=max(memory.peak_bytes, self._sessions.kv_bytes),
                session_count=len(self._sessions),
                total_entries=self._sessions.entries,
                evictions_by_reason=dict(memory.evictions),
                hits=memory.hits,
                misses=memory.misses,
                rss_bytes=psutil.Process().memory_info().rss,
                models=models,
            )

    async def storage_status(self) -> dict[str, int]:
        """What the database holds: sessions, messages, snapshots and summaries, and the
        bytes of its files (the WAL included)."""
        async with self._call():
            counts = await self._store.counts(
                ("sessions", "messages", "kv_snapshots", "session_summaries")
            )
            file_bytes = 0
            for suffix in ("", "-wal"):
                file = anyio.Path(self._store.path + suffix)
                if await file.exists():
                    file_bytes += (await file.stat()).st_size
            return {
                "sessions": counts["sessions"],
                "messages": counts["messages"],
                "snapshots": counts["kv_snapshots"],
                "summaries": counts["session_summaries"],
                "file_bytes": file_bytes,
            }

    def _public_state(self, session: Session) -> SessionCacheState:
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
            last_cleared_at=(
                timestamp_to_datetime(s.last_cleared_at) if s.last_cleared_at else None
            ),
            last_snapshot_id=s.last_snapshot_id,
            last_activity=timestamp_to_datetime(session.last_activity),
        )


def _public_summary(row: SummaryRow) -> SessionSummary:
    return SessionSummary(
        text=row.text,
        clear_count=row.clear_count,
        token_count=row.token_count,
        message_count=row.message_count,
        updated_at=timestamp_to_datetime(row.updated_at),
    )


def _public_snapshot(row: SnapshotRow) -> SnapshotInfo:
    return SnapshotInfo(
        row.id, row.reason, row.entry_count, row.size_bytes, timestamp_to_datetime(row.created_at)
    )


def _public_cache(session: Session) -> list[ActiveEntry]:
    return [
        ActiveEntry(
            e.message_id, e.role, e.content, e.token_count, e.kv_bytes, e.entry_type, e.access_count
        )
        for e in session.cache.entries
    ]


def _seconds(what: str, value: object) -> float:
    """A finite, non-negative number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{what} must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInputError(f"{what} must be a finite, non-negative number of seconds")
    return seconds
