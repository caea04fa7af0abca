"""Concurrency and resources: many sessions at once in one event loop, nothing crossing
between them; opening and closing leaves no threads or files behind."""

import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
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


async def join_threads_since(before: set[threading.Thread]) -> None:
    """Wait for the threads started since `before` to end (anyio's idle worker threads,
    kept for reuse, excepted): a closed connection's thread ends a moment after `close()`."""
    for thread in set(threading.enumerate()) - before:
        if thread.name != "AnyIO worker thread":
            await anyio.to_thread.run_sync(thread.join, 10)
            assert not thread.is_alive(), thread


async def test_opening_and_closing_100_times_leaves_nothing_open(
    open_manager: Callable[..., Any],
) -> None:
    async with await open_manager() as mgr:  # create the file, warm the imports
        await mgr.process_conversation("s", [Message("user", "hello")])
    gc.collect()
    before = set(threading.enumerate())
    threads, files = threading.active_count(), open_files()
    for i in range(100):
        async with await open_manager() as mgr:
            await mgr.process_conversation("s", [Message("user", f"turn {i}?")])
    gc.collect()
    await join_threads_since(before)
    assert open_files() == files
    assert threading.active_count() <= threads + 1  # anyio's idle worker pool may hold one


# opens a manager, stores a turn, drops the manager unclosed and collects it; then exits,
# at once if argv[2] is "exit-now", else as a program does (waiting for its threads)
UNCLOSED = textwrap.dedent(
    """
    import gc, os, sys, warnings
    sys.path.insert(0, {root!r})
    import anyio, tiermem
    from tests.conftest import SHAPE
    from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

    async def main(path):
        mgr = await tiermem.KVCacheManager.open(
            path, tiermem.KVCacheConfig(kv_shape=SHAPE, summary_mode="inline"),
            embedder=HashingEmbedder(), summarizer=RecordingSummarizer(),
            tokenizer=WordCounter())
        await mgr.process_conversation("s", [tiermem.Message("user", "kept?", id="m0")])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del mgr
            gc.collect()
        for w in caught:
            print(w.category.__name__, w.message, flush=True)
        print("collected", flush=True)

    anyio.run(main, sys.argv[1])
    if sys.argv[2] == "exit-now":
        os._exit(0)
    """
).format(root=str(Path(__file__).parent.parent))


def drop_unclosed(path: Path, exit_now: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", UNCLOSED, str(path), "exit-now" if exit_now else "wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_an_unclosed_manager_warns_and_keeps_what_it_stored(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    child = drop_unclosed(db_path, exit_now=True)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    warned = [line for line in out.splitlines() if "KVCacheManager was not closed" in line]
    assert len(warned) == 1 and warned[0].startswith("ResourceWarning ")
    async with await open_manager() as again:
        assert [m.id for m in await again.get_conversation_history("s")] == ["m0"]


@pytest.mark.slow
def test_an_unclosed_manager_does_not_keep_the_process_alive(db_path: Path) -> None:
    child = drop_unclosed(db_path, exit_now=False)
    try:
        assert child.stdout is not None
        lines = iter(child.stdout.readline, "")
        assert "collected\n" in lines, child.wait(120)  # read up to it, or fail at its exit
        assert child.wait(timeout=10) == 0  # its threads end with the connections
    finally:
        child.kill()
        child.communicate()
