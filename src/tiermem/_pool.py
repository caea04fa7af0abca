"""ModelPool: the loaded models, reference-counted while in use, unloaded least recently
used first when a model-memory limit would be exceeded.

A model is registered with a loader (blocking, run in a worker thread), a closer and its
size estimate in bytes; `use(name)` loads it on first use and holds a reference for the
duration of the `async with`. A model in use is never unloaded: when loading another would
exceed the limit and only models in use could make room, `BudgetError` names them. A model
registered with `idle_seconds` is unloaded once no call has used it for that long (a
summarizer's LLM between bursts of clears), and loads again on its next use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from ._errors import BudgetError, ModelError

log = logging.getLogger("tiermem._pool")


@dataclass(slots=True)
class _Slot:
    name: str
    loader: Callable[[], Any]
    closer: Callable[[Any], None]
    size_bytes: int
    model: Any = None
    references: int = 0
    last_used: float = 0.0
    loading: bool = False  # its bytes are counted while it loads
    retired: bool = False  # the pool closed: unload once the last call releases it
    idle_seconds: float | None = None  # unloaded after this long unused
    idle_timer: asyncio.TimerHandle | None = None
    load_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def loaded(self) -> bool:
        return self.model is not None


class ModelPool:
    """Lazily loaded models under an optional memory limit (`limit_bytes`)."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self._slots: dict[str, _Slot] = {}
        self._lock = anyio.Lock()
        self.loads = 0
        self.unloads = 0
        self.hits = 0
        self.idle_unloads = 0
        self._idle_tasks: set[asyncio.Task[None]] = set()

    def register(
        self,
        name: str,
        loader: Callable[[], Any],
        size_bytes: int,
        closer: Callable[[Any], None] = lambda _model: None,
        idle_seconds: float | None = None,
    ) -> None:
        """Make a model known to the pool (nothing is loaded yet)."""
        if name in self._slots:
            raise ModelError(f"a model named {name!r} is already registered")
        self._slots[name] = _Slot(
            name, loader, closer, max(0, int(size_bytes)), idle_seconds=idle_seconds
        )

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Any]:
        """The loaded model, loaded now if it is not; it stays loaded until released.

        A model loads under its own lock, not the pool's: calls to other models go on
        while one loads (the pool's lock only guards the accounting)."""
        slot = self._slot(name)
        async with slot.load_lock:
            if slot.retired:
                raise ModelError(f"model {name!r} is closed")
            async with self._lock:
                if slot.loaded:
                    self.hits += 1
                else:
                    await self._make_room(slot)
                    slot.loading = True
            if not slot.loaded:
                try:
                    slot.model = await anyio.to_thread.run_sync(slot.loader)
                    self.loads += 1
                finally:
                    slot.loading = False
            slot.references += 1
            slot.last_used = time.monotonic()
        try:
            yield slot.model
        finally:
            slot.references -= 1
            slot.last_used = time.monotonic()
            if slot.retired and not slot.references and slot.loaded:
                with anyio.CancelScope(shield=True):
                    await self._close(slot)
            elif slot.idle_seconds is not None and not slot.references:
                self._arm_idle_timer(slot)

    async def unload(self, name: str) -> bool:
        """Unload a model now; False if it was not loaded. A model in use cannot be."""
        slot = self._slot(name)
        async with self._lock:
            if not slot.loaded:
                return False
            if slot.references:
                raise BudgetError(f"model {name!r} is in use ({slot.references} calls)")
            await self._close(slot)
            return True

    async def aclose(self) -> None:
        """Unload every model; one still in use is unloaded when its last call releases
        it, never under it."""
        with anyio.CancelScope(shield=True):
            for task in list(self._idle_tasks):
                task.cancel()
            async with self._lock:
                for slot in self._slots.values():
                    slot.retired = True
                    if slot.idle_timer is not None:
                        slot.idle_timer.cancel()
                    if slot.loaded and not slot.references:
                        await self._close(slot)

    def is_loaded(self, name: str) -> bool:
        return self._slot(name).loaded

    @property
    def loaded_bytes(self) -> int:
        return sum(s.size_bytes for s in self._slots.values() if s.loaded or s.loading)

    def stats(self) -> dict[str, Any]:
        """Loaded models (bytes, references), totals and counters, for `status().models`."""
        return {
            "limit_bytes": self.limit_bytes,
            "loaded_bytes": self.loaded_bytes,
            "loaded": {
                s.name: {"bytes": s.size_bytes, "in_use": s.references}
                for s in self._slots.values()
                if s.loaded
            },
            "registered": sorted(self._slots),
            "loads": self.loads,
            "unloads": self.unloads,
            "idle_unloads": self.idle_unloads,
            "hits": self.hits,
        }

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise ModelError(f"no model named {name!r} in the pool")
        return slot

    def _arm_idle_timer(self, slot: _Slot) -> None:
        """(Re)start the slot's countdown to an unload; a use before it ends wins."""
        assert slot.idle_seconds is not None
        if slot.idle_timer is not None:
            slot.idle_timer.cancel()
        loop = asyncio.get_running_loop()
        slot.idle_timer = loop.call_later(slot.idle_seconds, self._idle_expired, slot)

    def _idle_expired(self, slot: _Slot) -> None:
        slot.idle_timer = None
        task = asyncio.get_running_loop().create_task(self._unload_idle(slot))
        self._idle_tasks.add(task)
        task.add_done_callback(self._idle_tasks.discard)

    async def _unload_idle(self, slot: _Slot) -> None:
        try:
            async with slot.load_lock, self._lock:  # not while it loads or is used
                unused = time.monotonic() - slot.last_used >= (slot.idle_seconds or 0.0) * 0.99
                if unused and slot.loaded and not slot.references and not slot.retired:
                    await self._close(slot)
                    self.idle_unloads += 1
        except Exception as exc:  # no caller to raise to: the model stays as it is
            log.warning("unloading idle model %r failed: %s", slot.name, exc)

    async def _make_room(self, incoming: _Slot) -> None:
        """Unload idle models, least recently used first, until `incoming` fits."""
        limit = self.limit_bytes
        if limit is None:
            return
        if incoming.size_bytes > limit:
            raise BudgetError(
                f"model {incoming.name!r} needs {incoming.size_bytes:,} bytes; the model "
                f"memory limit is {limit:,}"
            )
        idle = sorted(
            (s for s in self._slots.values() if s.loaded and not s.references),
            key=lambda s: s.last_used,
        )
        while self.loaded_bytes + incoming.size_bytes > limit:
            if not idle:
                busy = ", ".join(
                    f"{s.name} ({s.size_bytes:,} bytes)" for s in self._slots.values() if s.loaded
                )
                raise BudgetError(
                    f"cannot load model {incoming.name!r} ({incoming.size_bytes:,} bytes) "
                    f"within the model memory limit of {limit:,} bytes: in use: {busy}"
                )
            await self._close(idle.pop(0))

    async def _close(self, slot: _Slot) -> None:
        model, slot.model = slot.model, None
        self.unloads += 1
        await anyio.to_thread.run_sync(slot.closer, model)
