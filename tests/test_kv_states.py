"""Kept KV states with the bundled GGUF: restored instead of re-prefilled, the same greedy
output as a cold prefill on every path, and never a state that does not match."""

import dataclasses
from collections.abc import AsyncIterator

import pytest

import tiermem
from tiermem import KVStateCache
from tiermem._llm import bundled_gguf_path

pytestmark = pytest.mark.real_models

WINDOW = 2048
REPLY = 16


def conversation(name: str, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a friendly assistant. Answer briefly."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"{name}, turn {i}: a fact about the number {i * 7}?"},
            {"role": "assistant", "content": f"The number {i * 7} is interesting, {name}."},
        ]
    return [*messages, {"role": "user", "content": f"{name}: what did we talk about first?"}]


@pytest.fixture
async def models() -> AsyncIterator[tuple[tiermem.LlamaChat, tiermem.LlamaChat]]:
    """A chat keeping states (sessions' budgets roomy) and one that keeps none."""
    pool = tiermem.ModelPool()
    states = KVStateCache(max_bytes_per_session=10**9, max_bytes_total=10**9, max_sessions=8)
    kept = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="kept", kv_states=states)
    cold = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="cold")
    try:
        yield kept, cold
    finally:
        await pool.aclose()


async def test_restored_states_give_the_cold_output_and_sessions_never_mix(
    models: tuple[tiermem.LlamaChat, tiermem.LlamaChat],
) -> None:
    kept, cold = models
    assert kept.kv_states is not None
    for turns in (3, 6, 9):
        for name in ("ana", "ben"):  # interleaved: each call restores the session's state
            messages = conversation(name, turns)
            assert await kept.complete(messages, REPLY, 60, ("ns", name)) == (
                await cold.complete(messages, REPLY, 60)
            )
            if turns > 3:
                assert kept.last_reused > 0
    stats = kept.kv_states.stats
    assert stats.restores == 4 and stats.rejected == 0 and stats.states == 2
    assert stats.tokens_reused > 0
    assert stats.bytes == sum(
        state.nbytes
        for key in (("ns", "ana"), ("ns", "ben"))
        if (state := kept.kv_states.get(key)) is not None
    )


async def test_a_state_that_does_not_match_is_a_cold_prefill(
    models: tuple[tiermem.LlamaChat, tiermem.LlamaChat],
) -> None:
    kept, cold = models
    states = kept.kv_states
    assert states is not None
    key = ("ns", "ana")
    await kept.complete(conversation("ana", 3), REPLY, 60, key)
    good = states.get(key)
    assert good is not None
    flipped = bytearray(good.data)
    flipped[len(flipped) // 2] ^= 0xFF
    truncated = good.data[: len(good.data) // 2]
    bad = [
        dataclasses.replace(good, data=bytes(flipped)),  # its checksum no longer holds
        dataclasses.replace(good, fingerprint="another model"),
        dataclasses.replace(good, data=truncated, crc=__import__("zlib").crc32(truncated)),
        dataclasses.replace(good, tokens=good.tokens * 20),  # more tokens than the window
    ]
    messages = conversation("ana", 6)
    expected = await cold.complete(messages, REPLY, 60)
    for i, state in enumerate(bad, start=1):
        await kept.complete(conversation("ben", 1), REPLY, 60, ("ns", "ben"))  # not live
        states.put(key, state)
        assert await kept.complete(messages, REPLY, 60, key) == expected
        assert states.stats.rejected == i
        assert kept.last_reused == 0


async def test_a_session_over_its_budget_keeps_the_longest_prefix_that_fits() -> None:
    pool = tiermem.ModelPool()
    per_token = 23_052  # the bundled model's f16 KV bytes a token, with cell metadata
    states = KVStateCache(
        max_bytes_per_session=100 * per_token, max_bytes_total=150 * per_token, max_sessions=8
    )
    kept = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, kv_states=states)
    cold = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="cold")
    try:
        await kept.complete(conversation("ana", 6), REPLY, 60, ("ns", "ana"))
        ana = states.get(("ns", "ana"))
        assert ana is not None and 90 <= len(ana.tokens) < 100
        assert ana.nbytes <= 100 * per_token and states.stats.bytes == ana.nbytes
        messages = conversation("ana", 7)
        assert await kept.complete(messages, REPLY, 60, ("ns", "ana")) == (
            await cold.complete(messages, REPLY, 60)
        )
        assert kept.last_reused == len(ana.tokens)
        # a second session's state does not fit beside the first: the older one goes
        await kept.complete(conversation("ben", 6), REPLY, 60, ("ns", "ben"))
        assert states.get(("ns", "ana")) is None and states.stats.evictions == 1
        assert states.stats.states == 1 and states.stats.bytes <= 150 * per_token
    finally:
        await pool.aclose()
