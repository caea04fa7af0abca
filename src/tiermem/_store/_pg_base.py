"""The PostgreSQL store's connections (no table of its own): one asyncpg pool, the
`vector` codec, transactions, reads, the mapping of asyncpg's errors to `StorageError`, and
the advisory locks that hold a session for one call.

Every write is one transaction; a session's writes claim its state's version under a row
lock (`SELECT ... FOR UPDATE`), so replicas writing one session are serialised and a stale
copy is refused (`StaleSession`). `hold` takes a session's advisory lock for a whole call,
so replicas take turns instead of retrying.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np

from .._config import is_url as is_url
from .._errors import StorageError
from ._protocol import StaleSession

try:  # the `postgres` extra
    import asyncpg as asyncpg
except ImportError:  # said when a URL is opened
    asyncpg = None

log = logging.getLogger("tiermem._store")

# how long a call waits for a session another replica holds before working optimistically
HOLD_WAIT_SECONDS = 30.0


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def _encode_vector(vector: Any) -> bytes:
    """pgvector's binary form: dimension and a reserved int16, then big-endian float4s."""
    values = np.ascontiguousarray(vector, dtype=">f4").ravel()
    return len(values).to_bytes(2, "big") + b"\x00\x00" + values.tobytes()


def _decode_vector(data: bytes) -> np.ndarray[Any, Any]:
    return np.frombuffer(data, dtype=">f4", offset=4).astype(np.float32)


async def init_connection(conn: Any) -> None:
    schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'vector'"
    )
    await conn.set_type_codec(
        "vector", schema=schema, encoder=_encode_vector, decoder=_decode_vector, format="binary"
    )


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """asyncpg's and the socket's errors as `StorageError` (`StaleSession` passes)."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, TimeoutError) as exc:
        raise StorageError(f"{what}: {exc}") from exc
    except Exception as exc:
        # two replicas' transactions waited on each other; PostgreSQL ended this one, which
        # wrote nothing: the caller reloads and tries again, as for a stale copy
        if asyncpg is not None and isinstance(exc, asyncpg.DeadlockDetectedError):
            raise StaleSession(f"{what}: {exc}") from exc
        if asyncpg is not None and isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
            raise StorageError(f"{what}: {exc}") from exc
        raise


def escape(content: str) -> tuple[str, bool]:
    """PostgreSQL's text holds no NUL: such a text is stored escaped (backslashes doubled,
    NUL as backslash-zero) and marked, so it comes back exactly."""
    if "\x00" not in content:
        return content, False
    return content.replace("\\", "\\\\").replace("\x00", "\\0"), True


def unescape(content: str, escaped: bool) -> str:
    if not escaped:
        return content
    out, i = [], 0
    while i < len(content):
        char = content[i]
        if char == "\\" and i + 1 < len(content):
            out.append("\x00" if content[i + 1] == "0" else content[i + 1])
            i += 2
        else:
            out.append(char if char != "\\" else "")  # a cut escape at the end
            i += 1
    return "".join(out)


class PostgresDatabase:
    """The pool and the only paths to it: `_transaction` for writes, `_read_all` for
    reads. The query classes build on it."""

    def __init__(self, url: str, pool: Any, *, dimensions: int, clock: Callable[[], float]) -> None:
        self.path = redacted(url)
        self.dimensions = dimensions
        self._pool = pool
        self._clock = clock
        # advisory locks of sessions this process holds, on one connection of its own
        self._locker: Any = None
        self._locker_guard = anyio.Lock()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), storage_errors(f"closing {self.path}"):
            if self._locker is not None:
                await self._pool.release(self._locker)
                self._locker = None
            await self._pool.close()

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.terminate()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        """One write transaction; rolled back (shielded from cancellation) on any error."""
        with storage_errors(f"write to {self.path} failed"):
            async with self._pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                try:
                    yield conn
                    with anyio.CancelScope(shield=True):
                        await tx.commit()
                except BaseException:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await tx.rollback()
                    raise

    async def _read_all(self, sql: str, *params: Any) -> list[Any]:
        with storage_errors(f"read from {self.path} failed"):
            return list(await self._pool.fetch(sql, *params))

    async def _read_one(self, sql: str, *params: Any) -> Any:
        with storage_errors(f"read from {self.path} failed"):
            return await self._pool.fetchrow(sql, *params)

    @asynccontextmanager
    async def hold(self, namespace: str, session_id: str) -> AsyncIterator[None]:
        """Hold the session against other replicas for one call (an advisory lock on the
        session's names, released at the end or when this process's connection drops).
        Correctness does not rest on it (writes claim the version): a lock not had within
        `HOLD_WAIT_SECONDS` lets the call go on, and a lost connection only costs retries."""
        key = (namespace, session_id)
        held = await self._lock(key)
        try:
            yield
        finally:
            if held:
                with anyio.CancelScope(shield=True):
                    await self._unlock(key)

    async def _lock(self, key: tuple[str, str]) -> bool:
        deadline = time.monotonic() + HOLD_WAIT_SECONDS
        pause = 0.001
        while True:
            async with self._locker_guard:
                try:
                    if self._locker is None:
                        self._locker = await self._pool.acquire()
                    # shielded: a lock taken by a call cancelled on its way back would be
                    # held, unknown, until the connection closes
                    with anyio.CancelScope(shield=True):
                        taken = await self._locker.fetchval(
                            "SELECT pg_try_advisory_lock(hashtextextended($1 || chr(1) || $2, 0))",
                            *key,
                        )
                    if taken:
                        return True
                except Exception as exc:  # the lock is an optimisation: go on without
                    log.warning("%s: session lock not taken (%s)", self.path, exc)
                    await self._drop_locker()
                    return False
                except BaseException:
                    # cancelled past the shield (a plain asyncio cancel): the lock may have
                    # been taken; the connection goes, and its locks with it
                    await self._drop_locker()
                    raise
            if time.monotonic() > deadline:
                return False
            await anyio.sleep(pause)
            pause = min(pause * 2, 0.02)

    async def _unlock(self, key: tuple[str, str]) -> None:
        async with self._locker_guard:
            if self._locker is None:
                return
            try:
                await self._locker.fetchval(
                    "SELECT pg_advisory_unlock(hashtextextended($1 || chr(1) || $2, 0))", *key
                )
            except BaseException as exc:
                if isinstance(exc, Exception):
                    log.warning("%s: session lock not released (%s)", self.path, exc)
                await self._drop_locker()
                if not isinstance(exc, Exception):
                    raise

    async def _drop_locker(self) -> None:
        """A lock connection that failed is closed (its locks go with it)."""
        locker, self._locker = self._locker, None
        if locker is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._pool.release(locker)
