"""Sessions held in memory, least recently used first, with one lock per session.

A session in memory is its persistent state (counters, what its active cache holds), its
summary and its active cache. When it is not in use it may leave memory at any time, once
its state is flushed; the next call that names it rebuilds it from the database.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from . import _budgets as budgets
from ._cache import ActiveCache, CacheEntry, Totals
from ._config import KVCacheConfig
from ._errors import InvalidInputError, NotFoundError, TierMemError
from ._intake import Intake, check_name
from ._locks import KeyedLocks
from ._store import StaleSession, StateRow, Store, SummaryRow
from ._telemetry import BudgetExceededEvent, EvictionEvent, Telemetry

log = logging.getLogger("tiermem")

Ident = tuple[str, str]  # (namespace, session id)
T = TypeVar("T")
# how many times a call starts again on a fresh copy of a session another process changed
STALE_RETRIES = 8


@dataclass(slots=True, eq=False)
class Session:
    key: int
    session_id: str
    namespace: str
    state: StateRow
    summary: SummaryRow | None
    cache: ActiveCache = field(default_factory=ActiveCache)
    last_activity: float = 0.0

    @property
    def ident(self) -> Ident:
        return (self.namespace, self.session_id)

    def stats_of(self, entries: Iterable[CacheEntry]) -> dict[str, list[float]]:
        """The access counts and engagement of `entries`, as the state keeps them."""
        return {
            str(e.rowid): [e.access_count, round(e.engagement, 4)]
            for e in entries
            if e.access_count or e.engagement > 1e-3
        }


class Sessions:
    """The sessions in memory, in least-recently-used order, and their locks (which
    outlive neither their holders nor their waiters)."""

    def __init__(self) -> None:
        self._live: OrderedDict[Ident, Session] = OrderedDict()
        self.locks = KeyedLocks[Ident]()
        self._totals = Totals()

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Session]:
        """Oldest use first; a copy, so sessions may leave while it is walked."""
        return iter(list(self._live.values()))

    def get(self, ident: Ident) -> Session | None:
        return self._live.get(ident)

    def use(self, ident: Ident) -> Session | None:
        """The session, now the most recently used."""
        session = self._live.get(ident)
        if session is not None:
            self._live.move_to_end(ident)
        return session

    def add(self, session: Session) -> None:
        self.remove(session.ident)
        self._live[session.ident] = session
        session.cache.count_in(self._totals)

    def remove(self, ident: Ident) -> Session | None:
        session = self._live.pop(ident, None)
        if session is not None:
            session.cache.count_in(None)
        return session

    def clear(self) -> None:
        for ident in list(self._live):
            self.remove(ident)

    @property
    def kv_bytes(self) -> int:
        return self._totals.kv_bytes

    @property
    def entries(self) -> int:
        return self._totals.entries


class SessionMemory:
    """Which sessions are in memory: rebuilt from the database when named, flushed and
    sent out when the budget needs room or they sit idle, with the figures `status` shows.
    """

    def __init__(
        self,
        store: Store,
        intake: Intake,
        config: Callable[[], KVCacheConfig],
        telemetry: Telemetry,
        clock: Callable[[], float],
        on_load: Callable[[Session], None],
    ) -> None:
        self.sessions = Sessions()
        self._store = store
        self.intake = intake
        self._config = config
        self._telemetry = telemetry
        self._clock = clock
        self._on_load = on_load
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions: dict[str, int] = {}

    @asynccontextmanager
    async def use(self, ident: Ident) -> AsyncIterator[None]:
        """Hold a session's lock for one call; then, if sessions in use kept the manager
        over its budget, let the least recently used leave now that they can.

        A session in memory changes only once its writes committed, but a call cut short
        (cancelled, failed, or beaten by another process) may still leave it out of step
        with the database: it leaves memory, and the next call rebuilds it from the
        database. A session this call created that holds nothing yet is removed again."""
        async with self.sessions.locks.hold(ident):
            try:
                yield
            except (InvalidInputError, NotFoundError):
                raise  # refused before anything changed
            except BaseException:
                session = self.sessions.remove(ident)
                if session is not None and session.state.version == 0:
                    with anyio.CancelScope(shield=True):
                        await self._store.delete_if_unused(session.key)
                raise
        await self.hold_budget()

    async def held(
        self, ident: Ident, work: Callable[[Session], Awaitable[T]], create: bool = False
    ) -> T:
        """`work` on the session under its lock; when another process changed the session
        since this one read it (nothing of this attempt was written), again on a fresh
        copy."""
        for attempt in range(STALE_RETRIES):
            try:
                async with self.use(ident), self._store.hold(*ident):
                    return await work(await self.get(ident[1], ident[0], create))
            except StaleSession:
                if attempt == STALE_RETRIES - 1:
                    raise
                await anyio.sleep(0.002 * attempt)
        raise AssertionError("unreachable")

    async def get(self, session_id: str, namespace: str, create: bool) -> Session:
        """The session in memory (the caller holds its lock), checked against the database
        (another process may have changed or deleted it) and rebuilt from it if it left
        memory or is stale; sessions used least recently leave if the budget needs room."""
        ident = (namespace, session_id)
        session = self.sessions.use(ident)
        if session is not None:
            current = await self._store.session_version(session.key)
            if current is not None and current.version == session.state.version:
                covered = session.summary.covered_through if session.summary else -1
                if current.summary_covered_through != covered:  # another process wrote it
                    session.summary = await self._store.summary(session.key)
                self.hits += 1
                return session
            self.sessions.remove(ident)
        key = await self._stored_key(session_id, namespace, missing_ok=create)
        if key is None:
            key = await self._store.create_session(namespace, session_id)
        else:
            self.misses += 1
        state = await self._store.load_state(key)
        session = Session(key, session_id, namespace, state, await self._store.summary(key))
        rows = await self._store.messages_by_rowid(state.pinned or [])
        rows += await self._store.messages_between(key, state.cleared_through)
        embedded = self._config().generate_cache_embeddings
        session.cache.add(await self.intake.entries(rows, embedded))
        for entry in session.cache.entries:
            access, engagement = (state.entry_stats or {}).get(str(entry.rowid), (0, 0.0))
            entry.access_count, entry.engagement = int(access), float(engagement)
        session.last_activity = self._clock()
        await self.hold_budget(sessions=1, kv_bytes=session.cache.kv_bytes)
        self.sessions.add(session)
        self.note_peak()
        self._on_load(session)
        return session

    async def key(self, session_id: str, namespace: str) -> int:
        """The session's database key, whether or not it is in memory (read from the
        database: another process may have deleted the session)."""
        key = await self._stored_key(session_id, namespace, missing_ok=False)
        assert key is not None
        return key

    async def _stored_key(self, session_id: str, namespace: str, missing_ok: bool) -> int | None:
        check_name("session_id", session_id)
        check_name("namespace", namespace)
        key = await self._store.session_key(namespace, session_id)
        if key is None and not missing_ok:
            raise NotFoundError(f"unknown session {session_id!r} in namespace {namespace!r}")
        return key

    async def hold_budget(self, sessions: int = 0, kv_bytes: int = 0) -> None:
        """Make room for `sessions` more sessions and `kv_bytes` more under the manager's
        budget: sessions used least recently leave memory, each flushed first. Sessions in
        use stay, so a budget smaller than those can be exceeded for a while."""

        config = self._config()
        if config.max_sessions is None and config.max_bytes_total is None:
            return  # no manager-wide budget: nothing to sum on every call

        def excess() -> budgets.Excess | None:
            return budgets.manager_excess(
                config, len(self.sessions) + sessions, self.sessions.kv_bytes + kv_bytes
            )

        over = excess()
        if over is None:
            return
        self._telemetry.emit(BudgetExceededEvent(over.scope, over.value, over.limit))
        for victim in self.sessions:  # least recently used first
            if self.sessions.locks.busy(victim.ident):
                continue
            try:
                await self.evict(victim, over.eviction_reason)
            except TierMemError as exc:  # it stays in memory; the call goes on
                log.warning("could not flush session %r to evict it: %s", victim.session_id, exc)
            over = excess()
            if over is None:
                return

    async def evict_idle(self) -> tuple[int, list[str]]:
        """Send out the sessions idle past `idle_eviction_seconds` (not those in use);
        how many left, and the errors of those that could not be flushed."""
        cutoff = self._clock() - self._config().idle_eviction_seconds
        evicted, errors = 0, []
        for session in self.sessions:
            if session.last_activity > cutoff or self.sessions.locks.busy(session.ident):
                continue
            try:
                evicted += await self.evict(session, budgets.IDLE)
            except TierMemError as exc:
                errors.append(f"session {session.session_id!r}: {exc}")
        return evicted, errors

    async def evict(self, session: Session, reason: str) -> bool:
        """Flush the session's state, then drop it from memory; False if it had already
        left. Its next call rebuilds the same active cache, counters and summary."""
        ident = session.ident
        async with self.sessions.locks.hold(ident):
            if self.sessions.get(ident) is not session:
                return False
            await self.flush(session)
            self.sessions.remove(ident)
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        self._telemetry.emit(
            EvictionEvent(
                session.session_id,
                session.namespace,
                reason,
                session.cache.kv_bytes,
                len(session.cache.entries),
            )
        )
        return True

    async def flush(self, session: Session) -> None:
        """Write the figures kept only in memory (entry access counts and engagement);
        dropped if another process changed the session since (its state is newer)."""
        stats = session.stats_of(session.cache.entries)
        if stats != (session.state.entry_stats or {}) and await self._store.save_entry_stats(
            session.key, session.state.version, stats
        ):
            session.state.entry_stats = stats

    async def flush_quietly(self, session: Session) -> None:
        """`flush`, with a failure logged (at shutdown: the figures are soft)."""
        try:
            await self.flush(session)
        except TierMemError as exc:
            log.warning("could not flush session %r: %s", session.session_id, exc)

    def note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.sessions.kv_bytes)
