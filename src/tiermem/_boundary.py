"""The one boundary every public coroutine goes through: what escapes tiermem is a
`TierMemError` (or a cancellation), never a third-party or built-in exception.

Input is checked where it enters, so what reaches here unconverted is a failure of a part
(SQLite, a model) or a bug; either way the caller gets the library's error, with the
original chained as its cause and logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import pysqlite3.dbapi2 as sqlite3

from ._errors import ManagerClosedError, StorageError, TierMemError

log = logging.getLogger("tiermem")


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def convert(exc: Exception) -> TierMemError:
    """The library's error for `exc` (unchanged when it is one already)."""
    if isinstance(exc, TierMemError):
        return exc
    if isinstance(exc, ExceptionGroup):
        leaves = [e for e in _leaves(exc) if isinstance(e, Exception)]
        # a task group's failure is its first member's; a TierMemError is the most telling
        first = next((e for e in leaves if isinstance(e, TierMemError)), None)
        if not leaves:
            return TierMemError(str(exc))
        return first or convert(leaves[0])
    if isinstance(exc, sqlite3.Error):
        return StorageError(f"database error: {exc}")
    log.error("tiermem internal error", exc_info=exc)
    return TierMemError(f"internal error: {type(exc).__name__}: {exc}")


@contextmanager
def map_errors() -> Iterator[None]:
    """Convert whatever the body raises (cancellation aside) into a `TierMemError`."""
    try:
        yield
    except TierMemError:
        raise
    except Exception as exc:
        mapped = convert(exc)
        if mapped is exc:
            raise
        raise mapped from exc


class Calls:
    """The public calls in flight, so that closing can refuse new ones, wait for those
    running, and cancel what is left (a cancelled call raises `ManagerClosedError`)."""

    def __init__(self) -> None:
        self.closing = False
        self._scopes: set[anyio.CancelScope] = set()
        self._drained = anyio.Event()  # set when closing and no call is left

    def check_open(self) -> None:
        if self.closing:
            raise ManagerClosedError("this KVCacheManager is closed")

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        """One call: refused once closing; counted while it runs; every error it raises
        converted to a `TierMemError`."""
        self.check_open()
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope, map_errors():
                yield
        finally:
            self._scopes.discard(scope)
            if self.closing and not self._scopes:
                self._drained.set()
        if scope.cancelled_caught:
            raise ManagerClosedError("the manager was closed while this call ran")

    async def close(self, wait_seconds: float) -> None:
        """Refuse new calls, wait up to `wait_seconds` for those running, cancel the rest
        and wait until they have ended."""
        self.closing = True
        if self._scopes:
            with anyio.move_on_after(wait_seconds):
                await self._drained.wait()
            for scope in list(self._scopes):
                scope.cancel()
            await self._drained.wait()
