"""Sessions held in memory, least recently used first, with one lock per session.

A session in memory is its persistent state (counters, what its active cache holds), its
summary and its active cache. When it is not in use it may leave memory at any time, once
its state is flushed; the next call that names it rebuilds it from the database.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from .cache import ActiveCache
from .store import StateRow, SummaryRow

Ident = tuple[str, str]  # (namespace, session id)


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


@dataclass(slots=True, eq=False)
class _Lock:
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0  # tasks holding or waiting for it


class Sessions:
    """The sessions in memory, in least-recently-used order, and their locks.

    A lock exists while some task holds or waits for it, so the locks of sessions that
    have left memory do not pile up."""

    def __init__(self) -> None:
        self._live: OrderedDict[Ident, Session] = OrderedDict()
        self._locks: dict[Ident, _Lock] = {}

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
        self._live[session.ident] = session

    def remove(self, ident: Ident) -> Session | None:
        return self._live.pop(ident, None)

    def clear(self) -> None:
        self._live.clear()

    @property
    def kv_bytes(self) -> int:
        return sum(s.cache.kv_bytes for s in self._live.values())

    @property
    def entries(self) -> int:
        return sum(len(s.cache.entries) for s in self._live.values())

    def busy(self, ident: Ident) -> bool:
        """True while a task holds or waits for the session's lock."""
        return ident in self._locks

    @asynccontextmanager
    async def hold(self, ident: Ident) -> AsyncIterator[None]:
        """Hold the session's lock: one call at a time per session, in arrival order."""
        entry = self._locks.get(ident)
        if entry is None:
            entry = self._locks[ident] = _Lock()
        entry.users += 1  # counted before any await: `busy` is true from here on
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[ident]
