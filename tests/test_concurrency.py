"""Concurrency and resources: many sessions at once in one event loop, nothing crossing
between them; opening and closing leaves no threads or files behind."""

import gc
import os
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import tiermem
from tests.conftest import SHAPE
from tiermem import Message


@pytest.mark.slow
async def test_200_sessions_at_once_keep_order_and_their_own_data(
    open_manager: Callable[..., Any],
) -> None:
    config = tiermem.KVCacheConfig(
        kv_shape=SHAPE, context_window_tokens=4096, summary_mode="background"
    )
    sessions, turns = 200, 50
    seen: dict[str, list[str]] = {}
    async with await open_manager(config=config) as mgr:

        async def chat(n: int) -> None:
            sid, tag = f"s{n}", f"tag{n}x"
            for i in range(turns):
                user = f"{tag} note {i}: pack item {i}"
                if i % 7 == 6:
                    user = f"{tag} what did I pack at note {i - 3}?"
                msgs = [
                    Message("user", user, id=f"u{i}"),
                    Message("assistant", f"{tag} reply {i}", id=f"a{i}"),
                ]
                result = await mgr.process_conversation(sid, msgs)
                texts = list(result.bridge_messages)
                if result.retrieval_result is not None:
                    texts += [e.text for e in result.retrieval_result.entries]
                if i % 10 == 9:
                    hits = await mgr.retrieve_context(sid, f"pack item {i}")
                    texts += [e.text for e in hits.entries]
                seen[sid] = texts + seen.get(sid, [])

        with anyio.fail_after(240):  # a deadlock fails here, not at the suite's timeout
            async with anyio.create_task_group() as tg:
                for n in range(sessions):
                    tg.start_soon(chat, n)
            assert await mgr.wait_for_summaries(timeout=60)
        for n in range(sessions):
            sid, tag = f"s{n}", f"tag{n}x"
            history = await mgr.get_conversation_history(sid)
            assert [m.id for m in history] == [f"{r}{i}" for i in range(turns) for r in "ua"]
            summary = await mgr.get_summary(sid)
            assert summary is not None
            for text in [*seen[sid], summary.text]:
                others = {w for w in text.replace(":", " ").split() if w.startswith("tag")}
                assert others <= {tag}, (sid, text)
        stats = mgr.export_statistics()
        assert stats.total_clears == sessions * 3


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_opening_and_closing_100_times_leaves_nothing_open(
    open_manager: Callable[..., Any],
) -> None:
    async with await open_manager() as mgr:  # create the file, warm the imports
        await mgr.process_conversation("s", [Message("user", "hello")])
    gc.collect()
    threads, files = threading.active_count(), open_files()
    for i in range(100):
        async with await open_manager() as mgr:
            await mgr.process_conversation("s", [Message("user", f"turn {i}?")])
    gc.collect()
    await anyio.sleep(0.1)  # worker threads of finished calls wind down
    assert open_files() == files
    assert threading.active_count() <= threads + 1  # anyio's idle worker pool may hold one


async def test_an_unclosed_manager_warns(open_manager: Callable[..., Any]) -> None:
    mgr = await open_manager()
    store, pool = mgr._store, mgr.model_pool  # to free what the forgotten manager held
    with pytest.warns(ResourceWarning, match="not closed"):
        del mgr
        gc.collect()
    await store.close()
    await pool.aclose()
