"""The chat prompt is laid out stable-first: a turn extends the previous prompt, so a kept
KV state of it stays valid; what belongs to one turn only sits just before its question."""

import itertools
from collections.abc import Callable
from typing import Any

import tiermem
from tiermem import Message, build_prompt


def is_prefix(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    return b[: len(a)] == a


async def test_each_turn_extends_the_last_prompt_until_a_clear(
    open_manager: Callable[..., Any],
) -> None:
    config = tiermem.KVCacheConfig(
        summarizer_enabled=False, clear_after_conversations=1000, retrieve_always=True
    )
    async with await open_manager(config=config) as mgr:
        prompts = []
        for i in range(12):
            turn = [Message("user", f"Question {i}: what about topic {i % 3}?", id=f"u{i}")]
            if i:
                turn.insert(
                    0, Message("assistant", f"Answer {i - 1} on topic {i % 3}.", id=f"a{i}")
                )
            result = await mgr.process_conversation("s", turn)
            prompts.append(build_prompt(result, await mgr.get_active_cache("s")))
        for before, after in itertools.pairwise(prompts):
            # the earlier prompt without its own turn's notes and question is where the
            # later one starts
            stable = before[:-1]
            if len(stable) > 1 and stable[-1]["role"] == "system":
                stable = stable[:-1]
            assert len(stable) > 1 or before is prompts[0]
            assert is_prefix(stable, after)
            assert after[-1]["role"] == "user"
        # this turn's retrieval note sits right before its question, not in the system text
        assert prompts[-1][-2]["role"] == "system"
        assert prompts[-1][-2]["content"].startswith("[Memory Retrieval]")
        assert "[Memory Retrieval]" not in prompts[-1][0]["content"]


async def test_a_full_window_moves_the_history_start_a_block_at_a_time(
    open_manager: Callable[..., Any],
) -> None:
    config = tiermem.KVCacheConfig(summarizer_enabled=False, clear_after_conversations=1000)
    async with await open_manager(config=config) as mgr:
        starts = []
        for i in range(40):
            turn = [
                Message("assistant", f"Reply number {i} " + "word " * 30, id=f"a{i}"),
                Message("user", f"Statement number {i} " + "word " * 30, id=f"u{i}"),
            ]
            result = await mgr.process_conversation("s", turn)
            prompt = build_prompt(result, await mgr.get_active_cache("s"), window_tokens=1200)
            starts.append(prompt[1]["content"])
        changes = sum(1 for a, b in itertools.pairwise(starts) if a != b)
        assert changes > 0  # the window filled up
        assert changes <= len(starts) // 3  # a block at a time, not every turn


async def test_the_question_of_a_turn_that_cleared_it_away_is_still_asked(
    open_manager: Callable[..., Any],
) -> None:
    config = tiermem.KVCacheConfig(summarizer_enabled=False, clear_after_conversations=3)
    async with await open_manager(config=config) as mgr:
        for i in range(3):
            line = f"Plain statement number {i}."
            result = await mgr.process_conversation("s", [Message("user", line, id=f"u{i}")])
            cache = await mgr.get_active_cache("s")
            prompt = build_prompt(result, cache, user_message=line)
            assert prompt[-1] == {"role": "user", "content": line}
            assert sum(m["content"] == line for m in prompt) == 1  # never twice
        assert result.cleared and line not in [e.text for e in cache]
