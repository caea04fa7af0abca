"""The context window: usage in tokens against capacity, and what a turn that would
overflow it does (clear with summary, or a sliding window)."""

from collections.abc import Callable
from typing import Any

import tiermem
from tests.conftest import SHAPE
from tests.test_manager import SYSTEM, turn

# the test tokenizer counts words: a turn of `turn(i)` is 11 tokens, the system prompt 9
WINDOW = tiermem.KVCacheConfig(
    kv_shape=SHAPE,
    context_window_tokens=100,
    max_cache_bytes=10**9,  # so only the window decides
    clear_after_conversations=1000,
    summary_mode="inline",
)


async def test_a_turn_that_would_overflow_clears_with_a_summary(
    open_manager: Callable[..., Any],
) -> None:
    async with await open_manager(config=WINDOW) as mgr:
        assert mgr.context_capacity() == 100
        results = [await mgr.process_conversation("s", [SYSTEM, *turn(0)])]
        results += [await mgr.process_conversation("s", turn(i)) for i in range(1, 10)]
        cleared = [r for r in results if r.should_clear_cache]
        assert cleared, "the window was exceeded without a clear"
        clear = cleared[0].clear_result
        assert clear is not None and clear.clear_reason == tiermem.ClearReason.CONTEXT_OVERFLOW
        assert clear.summary is not None
        assert await mgr.context_usage("s") <= 100
        assert {e.message_id for e in clear.entries_to_keep} >= {"sys"}


async def test_sliding_window_drops_the_oldest_and_keeps_the_system_prompt(
    open_manager: Callable[..., Any],
) -> None:
    config = WINDOW.replace(context_overflow="sliding_window")
    async with await open_manager(config=config) as mgr:
        slid: list[str] = []
        await mgr.process_conversation("s", [SYSTEM, *turn(0)])
        for i in range(1, 12):
            result = await mgr.process_conversation("s", turn(i))
            assert not result.should_clear_cache
            assert await mgr.context_usage("s") <= 100
            slid += result.slid_out_message_ids
        assert slid[:4] == ["u0", "a0", "u1", "a1"]  # oldest first, never the system prompt
        state = await mgr.get_session_state("s")
        assert state is not None and state.clear_count == 0
        history = await mgr.get_conversation_history("s")
        assert len(history) == 1 + 2 * 12  # nothing left the history
        hits = await mgr.retrieve_context("s", "small talk number 0 about the weather")
        assert "u0" in hits.entries[0].message_ids and hits.entries[0].source_tier == 3
        usage = await mgr.context_usage("s")
    async with await open_manager(config=config) as mgr:  # the window survives a restart
        assert await mgr.context_usage("s") == usage
