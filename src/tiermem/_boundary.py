"""The one boundary every public coroutine goes through: what escapes tiermem is a
`TierMemError` (or a cancellation), never a third-party or built-in exception.

Input is checked where it enters, so what reaches here unconverted is a failure of a part
(SQLite, a model) or a bug; either way the caller gets the library's error, with the
original chained as its cause and logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pysqlite3.dbapi2 as sqlite3

from ._errors import StorageError, TierMemError

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
