"""One lock per key (a session), existing only while some task holds or waits for it, so
the locks of keys no longer used do not pile up over a long-running process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True, eq=False)
class _Lock:
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0  # tasks holding or waiting for it


class KeyedLocks(Generic[K]):
    def __init__(self) -> None:
        self._locks: dict[K, _Lock] = {}

    def busy(self, key: K) -> bool:
        """True while a task holds or waits for the key's lock."""
        return key in self._locks

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        """Hold the key's lock: one holder at a time per key, in arrival order."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _Lock()
        entry.users += 1  # counted before any await: `busy` is true from here on
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[key]
