"""ModelPool: lazy loads, references while in use, LRU unloading under a memory limit."""

import threading
from typing import Any

import anyio
import pytest

from tiermem import BudgetError, ModelError, ModelPool


class Loader:
    """Counts loads and closes of a stand-in model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loaded = 0
        self.closed = 0

    def load(self) -> dict[str, Any]:
        self.loaded += 1
        return {"model": self.name}

    def close(self, _model: Any) -> None:
        self.closed += 1


def pool_of(limit: int | None, **sizes: int) -> tuple[ModelPool, dict[str, Loader]]:
    pool = ModelPool(limit)
    loaders = {name: Loader(name) for name in sizes}
    for name, size in sizes.items():
        pool.register(name, loaders[name].load, size, loaders[name].close)
    return pool, loaders


async def test_models_load_on_first_use_and_are_reused() -> None:
    pool, loaders = pool_of(None, a=10)
    assert not pool.is_loaded("a") and loaders["a"].loaded == 0
    async with pool.use("a") as model:
        assert model == {"model": "a"}
    async with pool.use("a"):
        pass
    assert loaders["a"].loaded == 1
    stats = pool.stats()
    assert (stats["loads"], stats["hits"], stats["loaded_bytes"]) == (1, 1, 10)


async def test_the_least_recently_used_idle_model_makes_room() -> None:
    pool, loaders = pool_of(100, a=40, b=40, c=40)
    for name in ("a", "b", "a", "c"):  # b is the least recently used when c comes
        async with pool.use(name):
            pass
    assert [pool.is_loaded(n) for n in "abc"] == [True, False, True]
    assert loaders["b"].closed == 1 and pool.stats()["unloads"] == 1


async def test_a_model_in_use_is_never_unloaded() -> None:
    pool, loaders = pool_of(100, a=60, b=60)
    async with pool.use("a"):
        with pytest.raises(BudgetError, match=r"in use: a \(60 bytes\)"):
            async with pool.use("b"):
                pass
        with pytest.raises(BudgetError, match="in use"):
            await pool.unload("a")
    assert pool.is_loaded("a") and loaders["a"].closed == 0
    async with pool.use("b"):  # a is idle now: it makes room
        assert not pool.is_loaded("a")


async def test_a_model_larger_than_the_limit_is_refused() -> None:
    pool, _ = pool_of(100, big=101)
    with pytest.raises(BudgetError, match="limit is 100"):
        async with pool.use("big"):
            pass


async def test_explicit_unload_and_close() -> None:
    pool, loaders = pool_of(None, a=1, b=1)
    assert not await pool.unload("a")
    async with pool.use("a"), pool.use("b"):
        pass
    assert await pool.unload("a") and loaders["a"].closed == 1
    await pool.aclose()
    assert loaders["b"].closed == 1 and pool.stats()["loaded"] == {}


async def test_concurrent_users_share_one_load() -> None:
    pool, loaders = pool_of(None, a=1)
    inside = 0
    all_in = anyio.Event()

    async def use() -> None:
        nonlocal inside
        async with pool.use("a"):
            inside += 1
            if inside == 5:
                all_in.set()
            await all_in.wait()  # the five hold the model at once

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(use)
    assert loaders["a"].loaded == 1 and pool.stats()["hits"] == 4


async def test_a_model_loading_does_not_hold_up_calls_to_another() -> None:
    pool = ModelPool(None)
    started = threading.Event()
    go = threading.Event()

    def slow_load() -> str:
        started.set()
        go.wait(10)
        return "slow"

    pool.register("slow", slow_load, 1)
    pool.register("fast", lambda: "fast", 1)
    order: list[str] = []

    async def use(name: str) -> None:
        async with pool.use(name) as model:
            order.append(model)

    async with anyio.create_task_group() as tg:
        tg.start_soon(use, "slow")
        await anyio.to_thread.run_sync(started.wait, 10)
        with anyio.fail_after(5):
            await use("fast")  # while "slow" is still loading
        go.set()
    assert order == ["fast", "slow"]


async def test_closing_the_pool_never_closes_a_model_under_a_call() -> None:
    pool, loaders = pool_of(None, a=10)
    async with pool.use("a"):
        await pool.aclose()
        assert loaders["a"].closed == 0  # still in use
    assert loaders["a"].closed == 1  # closed as the call released it
    with pytest.raises(ModelError):
        async with pool.use("a"):
            pass


async def test_a_model_unused_for_its_idle_time_is_unloaded_and_loads_again() -> None:
    pool = ModelPool()
    loader = Loader("llm")
    pool.register("llm", loader.load, 10, loader.close, idle_seconds=0.3)
    async with pool.use("llm"):
        await anyio.sleep(0.6)  # in use past its idle time: kept
        assert pool.is_loaded("llm")
    for _ in range(3):  # each use restarts the countdown
        await anyio.sleep(0.1)
        async with pool.use("llm"):
            pass
    assert pool.is_loaded("llm") and loader.closed == 0
    await anyio.sleep(0.8)
    assert not pool.is_loaded("llm") and loader.closed == 1
    assert pool.stats()["idle_unloads"] == 1 and pool.stats()["loaded_bytes"] == 0
    async with pool.use("llm") as model:
        assert model == {"model": "llm"} and loader.loaded == 2
    await pool.aclose()  # closes it once, countdown or not
    await anyio.sleep(0.5)
    assert loader.closed == 2 and pool.stats()["idle_unloads"] == 1


async def test_models_without_an_idle_time_stay_loaded() -> None:
    pool, loaders = pool_of(None, a=10)
    async with pool.use("a"):
        pass
    await anyio.sleep(0.1)
    assert pool.is_loaded("a") and loaders["a"].closed == 0
