"""The memory loop of one session: a turn (store what is new, clear if due, retrieve if
asked), an ingested batch, a clear, a retrieval, a restore. Each works on a session the
caller holds (its lock, loaded and checked against the database) and changes the session
in memory only once its write committed."""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _bridge as bridge
from . import _clearing as clearing
from . import _convert as convert
from . import _text as text
from ._boundary import convert as library_error
from ._config import KVCacheConfig
from ._errors import NotFoundError, TierMemError
from ._opening import Parts
from ._retrieval import EMBED_MAX_CHARS, Query, Retriever
from ._scoring import ImportanceScorer
from ._sessions import STALE_RETRIES, Ident, Session, SessionMemory
from ._statistics import CacheStatistics
from ._store import StaleSession
from ._summaries import SummaryKeeper, SummaryOutcome
from ._telemetry import (
    BudgetExceededEvent,
    ClearEvent,
    MaintenanceEvent,
    RetrievalEvent,
    SnapshotEvent,
    Telemetry,
)
from ._types import (
    CacheClearResult,
    CacheProcessingResult,
    ClearReason,
    MaintenanceResult,
    Message,
    RestoreResult,
    RetrievalResult,
)

_RETRIEVE_HINT = re.compile(r"\b(explain|how to|what is|what's)\b", re.IGNORECASE)


class MemoryLoop:
    """The operations on one held session, over the manager's parts."""

    def __init__(
        self,
        parts: Parts,
        memory: SessionMemory,
        summaries: SummaryKeeper,
        telemetry: Telemetry,
        clock: Callable[[], float],
        max_cache_bytes: Callable[[], int],
    ) -> None:
        self._store = parts.store
        self._intake = memory.intake
        self._memory = memory
        self._summaries = summaries
        self._telemetry = telemetry
        self._clock = clock
        self._window = parts.context_tokens
        self._max_cache_bytes = max_cache_bytes
        self._embedder = parts.embedder
        self.stats = CacheStatistics()
        self.configure(parts.config)

    def configure(self, config: KVCacheConfig) -> None:
        self.config = config
        self._scorer = ImportanceScorer(config.scoring)
        embedder = self._embedder if config.generate_cache_embeddings else None
        self._retriever = Retriever(self._store, embedder, config)

    # -- the turn --------------------------------------------------------------------------

    async def turn(self, session: Session, checked: Sequence[Message]) -> CacheProcessingResult:
        fresh = await self._intake.new_messages(session, checked)
        state = session.state.copy()
        state.conversation_count += 1
        embed = self.config.generate_cache_embeddings
        asked, retrieval_error = await self._read_question(session, [m for m, _ in fresh])
        # its vector is made in one batch with the messages' (a question kept whole is
        # embedded once, as the message it is)
        wanted = asked.text[:EMBED_MAX_CHARS] if asked is not None else ""
        contents = {m.content for m, _ in fresh}
        also = [wanted] if wanted.strip() and asked and asked.text not in contents else []
        # one transaction; a conflict with another process raises before anything is written
        entries, query_vectors = await self._intake.store(session, fresh, state, embed, also)
        session.state = state
        session.last_activity = self._clock()
        await self._memory.hold_budget(kv_bytes=sum(e.kv_bytes for e in entries))
        self._scorer.decay(session.cache.entries)
        session.cache.add(entries)
        self._memory.note_peak()

        # the turn is stored: from here on a conflict means settling again on a fresh copy
        session, slid_out, clear_result = await self._settle(session)
        bridges: list[str] = []
        if clear_result is not None:
            bridges.append(clear_result.bridge_message)
        if (
            session.summary is not None
            and session.state.clear_count > 0
            and (clear_result is None or clear_result.summary_pending)
        ):
            # the newest summary there is, while this clear's is being written
            bridges.append(bridge.prior_summary_bridge(session.summary.text))

        retrieval = None
        if asked is not None:
            vector = (
                query_vectors[0]
                if also and query_vectors is not None
                else next((e.vector for e in entries if e.content == asked.text), None)
            )
            exclude = {e.rowid for e in entries}
            try:
                retrieval = await self.retrieve(
                    session, asked, self.config.retrieval_limit, exclude, vector
                )
            except Exception as exc:  # the turn is stored: it reports the failure, not fails
                retrieval_error = str(library_error(exc))
            if retrieval is not None and retrieval.entries and retrieval.bridge_message:
                bridges.append(retrieval.bridge_message)
        return CacheProcessingResult(
            should_clear_cache=clear_result is not None,
            clear_result=clear_result,
            should_retrieve=bool(retrieval and retrieval.entries),
            retrieval_result=retrieval,
            bridge_messages=bridges if self.config.bridge_enabled else [],
            updated_session_state=convert.state(session),
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
                if self.config.context_overflow == "sliding_window":
                    slid_out = await self.shed(session, budget=False)
                decision = clearing.decide(
                    self.config,
                    session.cache,
                    session.state.conversation_count,
                    self._max_cache_bytes(),
                    self._window,
                )
                if decision.excess is not None:
                    over, ns = decision.excess, session.namespace
                    self._telemetry.emit(
                        BudgetExceededEvent(
                            over.scope, over.value, over.limit, session.session_id, ns
                        )
                    )
                clear_result = None
                if decision.reason is not None:
                    clear_result = await self.clear(session, decision.reason)
                    # what a clear must preserve may not fit the window or the budget either
                    slid_out += await self.shed(session, budget=True)
                return session, slid_out, clear_result
            except StaleSession:
                self._memory.sessions.remove(session.ident)
                session = await self._memory.get(session.session_id, session.namespace, False)
        raise StaleSession(f"session {session.session_id!r} kept changing in another process")

    async def _read_question(
        self, session: Session, fresh: Sequence[Message]
    ) -> tuple[Query | None, str | None]:
        """A turn that asks something: its query read against the session before the turn
        is stored (its time is the turn's), or why it could not be (the turn goes on)."""
        query = self._retrieval_query(fresh)
        if query is None:
            return None, None
        newest = max(m.created_at.timestamp() if m.created_at else self._clock() for m in fresh)
        try:
            return await self._retriever.read_query(session.key, query, newest), None
        except Exception as exc:  # the turn is stored all the same; it reports this
            return None, str(library_error(exc))

    def _retrieval_query(self, fresh: Sequence[Message]) -> str | None:
        if not self.config.retrieval_enabled:
            return None
        last_user = next((m for m in reversed(fresh) if m.role == "user"), None)
        if last_user is None or not last_user.content.strip():
            return None
        content = last_user.content
        wanted = (
            self.config.retrieve_always
            or "?" in content
            or len(content) > 100
            or "```" in content
            or _RETRIEVE_HINT.search(content) is not None
        )
        return content if wanted else None

    async def ingest(
        self,
        ident: Ident,
        checked: Sequence[Message],
        batch_size: int,
        progress: Callable[[int, int], None] | None,
    ) -> int:
        """Store what is new of `checked` in batches, each its own transaction."""
        memory = self._memory
        fresh = await memory.held(ident, lambda s: self._intake.new_messages(s, checked), True)
        for start in range(0, len(fresh), batch_size):
            batch = fresh[start : start + batch_size]
            await memory.held(ident, functools.partial(self.ingest_batch, batch=batch), True)
            if progress is not None:
                progress(start + len(batch), len(fresh))
        return len(fresh)

    async def delete(self, ident: Ident) -> bool:
        """Remove a session and all derived from it, its background summary cancelled and
        awaited first, under the session's lock (and its hold across processes); False if
        it did not exist."""
        async with self._memory.use(ident), self._store.hold(*ident):
            self._memory.sessions.remove(ident)
            try:
                key = await self._memory.key(ident[1], ident[0])
            except NotFoundError:
                return False
            await self._summaries.cancel(key)
            await self._store.delete_session(key)
            return True

    async def maintain(self) -> MaintenanceResult:
        """Flush and drop sessions idle past `idle_eviction_seconds`; prune old snapshots."""
        started = time.perf_counter()
        evicted, errors = await self._memory.evict_idle()
        pruned = 0
        keep = clearing.max_snapshots(self.config)
        if keep is not None:
            try:
                pruned = await self._store.prune_snapshots(keep)
            except TierMemError as exc:
                errors.append(f"pruning snapshots: {exc}")
        duration_ms = (time.perf_counter() - started) * 1000
        self._telemetry.emit(MaintenanceEvent(evicted, pruned, len(errors), duration_ms))
        return MaintenanceResult(evicted, pruned, errors, duration_ms)

    async def ingest_batch(self, session: Session, batch: Sequence[tuple[Message, str]]) -> None:
        state = session.state.copy()
        # imported messages are history (tier 3), not active: "cleared" through the batch,
        # with the active entries kept by row
        state.cleared_through = state.message_count + len(batch) - 1
        state.pinned = session.cache.rowids()
        await self._intake.store(session, batch, state, self.config.generate_cache_embeddings)
        session.state = state
        session.last_activity = self._clock()

    # -- clearing --------------------------------------------------------------------------

    async def clear(self, session: Session, reason: ClearReason) -> CacheClearResult:
        c = self.config
        entries = session.cache.entries
        self._scorer.rescore(entries)
        keep = clearing.preserved(c, entries)
        snapshot = clearing.snapshot_plan(c, reason, keep)
        through = session.state.message_count - 1
        outcome = SummaryOutcome(None, "no summarizer configured")
        if self._summaries.enabled:
            outcome = SummaryOutcome(None)
            if c.summary_mode == "inline":
                clear_count = session.state.clear_count + 1
                outcome = await self._summaries.update_now(session, through, clear_count)

        state = clearing.cleared_state(
            session.state, keep, through, self._clock(), session.stats_of(keep)
        )
        bytes_before = session.cache.kv_bytes
        snapshot_id = await self._store.save_clear(
            session.key,
            state,
            None if snapshot is None else (snapshot.reason, snapshot.strategy, snapshot.entries),
        )
        session.state = state
        session.cache.replace(keep)
        pending = c.summary_mode == "background" and self._summaries.catch_up(session)

        keywords = text.top_keywords(e.content for e in keep if e.entry_type != "system_prompt")
        cleared = len(entries) - len(keep)
        # the summary bridge when the summary covers this clear (written now, or nothing new
        # to add to the prior one); the generic one when it failed or is still being written
        if session.summary is not None and outcome.error is None and not pending:
            message = bridge.summary_bridge(session.summary.text)
        else:
            message = bridge.clear_bridge(cleared, len(keep), keywords)
        sid, ns = session.session_id, session.namespace
        self.stats.record_clear(len(entries), len(keep), reason.value, sid)
        freed = bytes_before - session.cache.kv_bytes
        self._telemetry.emit(ClearEvent(sid, ns, reason.value, cleared, len(keep), freed))
        if snapshot_id is not None and snapshot is not None:
            self.stats.record_snapshot(snapshot_id, len(snapshot.entries), sid)
            self._telemetry.emit(SnapshotEvent(sid, ns, snapshot_id, len(snapshot.entries)))
        return CacheClearResult(
            entries_to_keep=convert.preserved(keep),
            entries_cleared=cleared,
            bridge_message=message,
            snapshot_id=snapshot_id,
            preserved_keywords=keywords,
            clear_reason=reason,
            summary=convert.summary(outcome.summary) if outcome.summary else None,
            summary_error=outcome.error,
            summary_pending=pending,
        )

    async def shed(self, session: Session, *, budget: bool) -> list[str]:
        """Drop the oldest entries (system prompts last) until the active cache fits the
        context window, and the session's budget if `budget`; they stay in the history.
        Returns their message ids."""
        dropped = clearing.shed(self.config, session.cache.entries, self._window, budget)
        if not dropped:
            return []
        gone = {e.rowid for e in dropped}
        keep = [e for e in session.cache.entries if e.rowid not in gone]
        state = clearing.shed_state(session.state, dropped, keep, session.stats_of(keep))
        await self._store.save_state(session.key, state)
        session.state = state
        session.cache.replace(keep)
        return [e.message_id for e in dropped]

    # -- retrieval and restore -------------------------------------------------------------

    async def retrieve(
        self,
        session: Session,
        query: str | Query,
        limit: int,
        exclude: set[int],
        query_vector: np.ndarray[Any, Any] | None = None,
    ) -> RetrievalResult:
        started = time.perf_counter()
        outcome = await self._retriever.search(
            session.key, session.cache.entries, query, limit, exclude, query_vector
        )
        hits = [convert.hit(c, outcome.keywords) for c in outcome.hits if c.row is not None]
        active = session.cache.by_rowid()
        self._scorer.engage([active[c.rowid] for c in outcome.hits if c.rowid in active])
        self.stats.record_retrieval(
            len(hits), outcome.tiers_searched, len(outcome.keywords), session.session_id
        )
        duration_ms = (time.perf_counter() - started) * 1000
        by_tier = Counter(int(h.source_tier) for h in hits)
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

    async def restore(self, session: Session, snapshot_id: int) -> RestoreResult:
        found = None
        if 0 < snapshot_id < 2**63:
            found = await self._store.snapshot_entries(session.key, snapshot_id)
        if found is None:
            raise NotFoundError(f"session {session.session_id!r} has no snapshot {snapshot_id}")
        messages = await self._store.messages_by_rowid([r.message_rowid for r in found.entries])
        restored = await self._intake.entries(messages, self.config.generate_cache_embeddings)
        state = session.state.copy()
        pinned = set(state.pinned or [])
        pinned.update(r.rowid for r in messages if r.position <= state.cleared_through)
        state.pinned = sorted(pinned)
        state.entry_stats = session.stats_of([*session.cache.entries, *restored])
        await self._store.save_state(session.key, state)
        session.state = state
        session.cache.add(restored)
        minutes = max(0, int((self._clock() - found.created_at) // 60))
        self.stats.record_restore(snapshot_id, len(messages), session.session_id)
        return RestoreResult(
            snapshot_id, len(messages), bridge.restore_bridge(len(messages), minutes), minutes
        )
