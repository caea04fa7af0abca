"""Background summaries: a clearing turn does not wait for the LLM, nothing is lost."""

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

import tiermem
from tests.conftest import SHAPE
from tests.fakes import GatedSummarizer, RecordingSummarizer
from tests.test_manager import run_turns

BACKGROUND = tiermem.KVCacheConfig(
    kv_shape=SHAPE, context_window_tokens=4096, summary_mode="background"
)


async def test_a_clearing_turn_returns_before_its_summary(
    open_manager: Callable[..., Any],
) -> None:
    slow = GatedSummarizer()
    async with await open_manager(config=BACKGROUND, summarizer=slow) as mgr:
        results = await run_turns(mgr, 16)
        clear = results[-1].clear_result
        assert clear is not None and clear.summary is None and clear.summary_pending
        assert results[-1].bridge_messages[0].startswith("[Cache Management] Cleared")
        assert await mgr.get_summary("s") is None
        assert (await mgr.status()).models["summaries_pending"] == 1
        assert not await mgr.wait_for_summaries(timeout=0.05)

        slow.gate.set()
        assert await mgr.wait_for_summaries(timeout=5)
        summary = await mgr.get_summary("s")
        assert summary is not None and summary.clear_count == 1
        assert summary.message_count == 33  # system prompt + 16 turns
        # used as soon as it is there
        later = await run_turns(mgr, 1, start=16)
        assert later[0].bridge_messages == [
            "[Prior conversation summary — context before memory compression:]\n" + summary.text
        ]


async def test_summaries_of_one_session_run_in_order_and_catch_up_in_one_go(
    open_manager: Callable[..., Any],
) -> None:
    slow = GatedSummarizer()
    async with await open_manager(config=BACKGROUND, summarizer=slow) as mgr:
        await run_turns(mgr, 48)  # three clears while the first summary is still held
        slow.gate.set()
        assert await mgr.wait_for_summaries(timeout=5)
        # the first covers clear 1; the next, queued behind it, clears 2 and 3 at once
        assert [len(transcript) for _, transcript in slow.calls] == [32, 64]
        assert slow.calls[0][0] is None
        assert (slow.calls[1][0] or "").startswith("summary #1 of 32 messages")
        summary = await mgr.get_summary("s")
        assert summary is not None and summary.clear_count == 3
        assert summary.message_count == 97


async def test_a_summary_cut_off_at_shutdown_is_written_after_restart(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    config = BACKGROUND.replace(summary_close_wait_seconds=0.05)
    stuck = GatedSummarizer()
    mgr = await open_manager(config=config, summarizer=stuck)
    await run_turns(mgr, 16)
    with anyio.fail_after(5):
        await mgr.aclose()  # does not wait for the held summary beyond 0.05 s
    assert stuck.started == 1 and not stuck.calls

    working = RecordingSummarizer()
    async with await open_manager(config=config, summarizer=working) as mgr:
        assert await mgr.get_summary("s") is None
        await mgr.get_session_state("s")  # loading the session finds the span pending
        assert await mgr.wait_for_summaries(timeout=5)
        summary = await mgr.get_summary("s")
        assert summary is not None and summary.clear_count == 1
        assert len(working.calls) == 1 and len(working.calls[0][1]) == 32


async def test_a_failed_background_summary_is_made_up_at_the_next_clear(
    open_manager: Callable[..., Any],
) -> None:
    flaky = RecordingSummarizer(fail=True)
    async with await open_manager(config=BACKGROUND, summarizer=flaky) as mgr:
        await run_turns(mgr, 16)
        assert await mgr.wait_for_summaries(timeout=5)
        assert await mgr.get_summary("s") is None
        flaky.fail = False
        await run_turns(mgr, 16, start=16)
        assert await mgr.wait_for_summaries(timeout=5)
        summary = await mgr.get_summary("s")
        # one update covering both clears' messages
        assert len(flaky.calls[-1][1]) == 64
        assert summary is not None and summary.clear_count == 2 and summary.message_count == 65


async def test_shutdown_waits_for_a_model_call_in_its_thread(
    open_manager: Callable[..., Any],
) -> None:
    """A summary running in a worker thread when `aclose` gives up waiting is stopped and
    awaited, not abandoned: the model must not be closed under a running call."""
    started = anyio.Event()
    release = threading.Event()
    order: list[str] = []

    class ThreadedSummarizer(RecordingSummarizer):
        async def summarize(self, prior: str | None, transcript: Any) -> Any:
            def generate() -> None:
                anyio.from_thread.run_sync(started.set)
                release.wait(30)
                order.append("generation ended")

            await anyio.to_thread.run_sync(generate)
            raise tiermem.ModelError("generation stopped: the model is shutting down")

    config = BACKGROUND.replace(summary_close_wait_seconds=0)  # gives up at once
    mgr = await open_manager(config=config, summarizer=ThreadedSummarizer())
    await run_turns(mgr, 16)

    async def close() -> None:
        await mgr.aclose()
        order.append("closed")

    async with anyio.create_task_group() as tg:
        await started.wait()  # the summary's thread is running
        tg.start_soon(close)
        await anyio.wait_all_tasks_blocked()  # aclose has given up and waits for the thread
        assert order == []
        release.set()
    assert order == ["generation ended", "closed"]
