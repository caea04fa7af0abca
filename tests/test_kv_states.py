"""Kept KV states with the bundled GGUF: restored instead of re-prefilled, the same greedy
output as a cold prefill on every path, and never a state that does not match."""

import dataclasses
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import tiermem
from tiermem import KVStateCache, KVStateDisk
from tiermem._kvstate import reusable  # private: the rule for what a restore reuses
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


async def test_a_regenerated_reply_and_a_longer_one_equal_the_cold_ones(
    models: tuple[tiermem.LlamaChat, tiermem.LlamaChat],
) -> None:
    """The same prompt again (all of it kept: its last two tokens are decoded again for
    the logits, not one alone), and a reply that continues past the last one (the kept
    state holds the prompt only: a reply's KV, decoded a token at a time, differs in its
    last bits from a prefill's)."""
    kept, cold = models
    messages = conversation("ana", 2)
    expected = await cold.complete(messages, 24, 60)
    for _ in range(3):
        assert await kept.complete(messages, 24, 60, ("ns", "ana")) == expected
    prompt = kept.last_reused + kept.last_prefilled
    assert kept.last_prefilled == 2  # never one token alone: see `reusable`
    text, _ = expected
    follow = [*messages, {"role": "assistant", "content": text}]
    follow.append({"role": "user", "content": "Tell me more."})
    assert await kept.complete(follow, 24, 60, ("ns", "ana")) == (
        await cold.complete(follow, 24, 60)
    )
    assert kept.last_reused == prompt  # the reply itself is prefilled with the new turn


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
        # just under 100 tokens' state: a cut from a longer state must still fit
        max_bytes_per_session=100 * per_token + 743,
        max_bytes_total=150 * per_token,
        max_sessions=8,
    )
    kept = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, kv_states=states)
    cold = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="cold")
    try:
        await kept.complete(conversation("ana", 6), REPLY, 60, ("ns", "ana"))
        ana = states.get(("ns", "ana"))
        assert ana is not None and 90 <= len(ana.tokens) < 100
        assert ana.nbytes <= 100 * per_token + 743 and states.stats.bytes == ana.nbytes
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


def settle(tier: KVStateCache) -> None:
    """Until every state that left RAM is on disk."""
    deadline = time.monotonic() + 30
    while tier.stats.spills < tier.stats.evictions:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def damage(folder: Path) -> None:
    """Each session's file damaged its own way: cut short, a KV byte or a token id flipped."""
    for path in folder.glob("*.kvs"):
        raw = bytearray(path.read_bytes())
        head_end = raw.index(b"}") + 1
        session = raw[:head_end].split(b'"session": "')[1].split(b'"')[0]
        if session == b"truncated":
            raw = raw[: len(raw) - 5000]
        elif session == b"flipped-kv":
            raw[-3000] ^= 0x10
        else:
            raw[head_end + 40] ^= 0x01  # a token id
        path.write_bytes(raw)


async def ask(
    chat: tiermem.LlamaChat, name: str, turns: int, got: dict[str, tuple[str, int]]
) -> None:
    got[name] = await chat.complete(conversation(name, turns), REPLY, 60, ("ns", name))


def states(folder: Path | None, max_sessions: int = 8) -> KVStateCache:
    return KVStateCache(
        max_bytes_per_session=10**9,
        max_bytes_total=10**9,
        max_sessions=max_sessions,
        disk=KVStateDisk(folder, 10**9) if folder else None,
    )


async def test_states_from_disk_and_after_a_restart_give_the_cold_output(tmp_path: Path) -> None:
    pool = tiermem.ModelPool()
    cold = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="cold")
    tier = states(tmp_path, max_sessions=1)  # every other call finds its state on disk
    kept = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="kept", kv_states=tier)
    try:
        for turns in (2, 4):
            for name in ("ana", "ben"):
                messages = conversation(name, turns)
                expected = await cold.complete(messages, REPLY, 60)
                await anyio.to_thread.run_sync(settle, tier)  # the other's spill lands
                assert await kept.complete(messages, REPLY, 60, ("ns", name)) == expected
        assert tier.stats.disk_restores == 2 and tier.stats.rejected == 0
        assert kept.last_reused > 0
        await kept.close_states()
        # a new process: a new model and cache on the same folder
        restarted = tiermem.LlamaChat(
            bundled_gguf_path(), WINDOW, 1, pool, name="restarted", kv_states=states(tmp_path)
        )
        messages = conversation("ana", 5)
        assert await restarted.complete(messages, REPLY, 60, ("ns", "ana")) == (
            await cold.complete(messages, REPLY, 60)
        )
        assert restarted.kv_states is not None
        assert restarted.kv_states.stats.disk_restores == 1 and restarted.last_reused > 100
        await restarted.close_states()
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    "variant",
    [
        "other GGUF",
        "window too small",
        "KV type",
        "flash attention",
        "rope_freq_base",
        "metadata override",
    ],
)
async def test_a_state_kept_by_a_model_made_another_way_is_never_loaded(
    tmp_path: Path, variant: str
) -> None:
    pool = tiermem.ModelPool()
    gguf, window, options = bundled_gguf_path(), WINDOW, {}
    messages = conversation("ana", 6)
    if variant == "other GGUF":  # a different file (its sha256 differs), loadable as ever
        gguf = tmp_path / "other.gguf"
        shutil.copyfile(bundled_gguf_path(), gguf)
        with gguf.open("ab") as f:
            f.write(b"\0" * 8)
    elif variant == "window too small":
        window, messages = 128, conversation("ana", 0)
    else:
        options = {
            "KV type": {"type_k": 8},  # q8_0 keys
            "flash attention": {"flash_attn": True},
            "rope_freq_base": {"rope_freq_base": 20_000.0},
            "metadata override": {"kv_overrides": {"llama.rope.freq_base": 1000.0}},
        }[variant]
    writer = tiermem.LlamaChat(
        bundled_gguf_path(), WINDOW, 1, pool, name="writer", kv_states=states(tmp_path)
    )
    try:
        await writer.complete(conversation("ana", 6), REPLY, 60, ("ns", "ana"))
        await writer.close_states()
        reader_states = states(tmp_path)
        reader = tiermem.LlamaChat(
            gguf, window, 1, pool, name="reader", kv_states=reader_states, llama_options=options
        )
        cold = tiermem.LlamaChat(gguf, window, 1, pool, name="cold", llama_options=options)
        expected = await cold.complete(messages, REPLY, 60)
        assert await reader.complete(messages, REPLY, 60, ("ns", "ana")) == expected
        assert reader_states.stats.rejected == 1 and reader.last_reused == 0
        await reader.close_states()
    finally:
        await pool.aclose()


async def test_damaged_state_files_are_cold_prefills(tmp_path: Path) -> None:
    pool = tiermem.ModelPool()
    writer = tiermem.LlamaChat(
        bundled_gguf_path(), WINDOW, 1, pool, name="writer", kv_states=states(tmp_path)
    )
    cold = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="cold")
    try:
        for name in ("truncated", "flipped-kv", "flipped-token"):
            await writer.complete(conversation(name, 4), REPLY, 60, ("ns", name))
        await writer.close_states()
        await anyio.to_thread.run_sync(damage, tmp_path)
        reader_states = states(tmp_path)
        reader = tiermem.LlamaChat(
            bundled_gguf_path(), WINDOW, 1, pool, name="reader", kv_states=reader_states
        )
        for i, name in enumerate(("truncated", "flipped-kv", "flipped-token"), start=1):
            messages = conversation(name, 5)
            await reader.complete(conversation("other", 1), REPLY, 60, ("ns", "other"))
            assert await reader.complete(messages, REPLY, 60, ("ns", name)) == (
                await cold.complete(messages, REPLY, 60)
            )
            assert reader_states.stats.rejected == i
        await reader.close_states()
    finally:
        await pool.aclose()


async def test_concurrent_sessions_through_one_model_never_receive_each_others_state(
    tmp_path: Path,
) -> None:
    pool = tiermem.ModelPool()
    tier = states(tmp_path, max_sessions=2)
    kept = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="kept", kv_states=tier)
    cold = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, name="cold")
    names = ("ana", "ben", "cy", "dee")
    try:
        for turns in (1, 3):
            expected = {n: await cold.complete(conversation(n, turns), REPLY, 60) for n in names}
            got: dict[str, tuple[str, int]] = {}
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(ask, kept, name, turns, got)
            assert got == expected
        assert tier.stats.restores + tier.stats.disk_restores >= 2
        await kept.close_states()
    finally:
        await pool.aclose()


async def test_the_manager_looks_after_its_chat_models_states(tmp_path: Path) -> None:
    config = tiermem.KVCacheConfig(summarizer_enabled=False, clear_after_conversations=4)
    lines = [
        "Hi, I am Ana and my dog is Pico.",
        "I live in Porto.",
        "I work as a nurse at night.",
        "My sister is called Rita.",
        "What is my dog called?",
        "And where do I live?",
    ]
    key = ("default", "s")
    async with await tiermem.KVCacheManager.open(tmp_path / "m.db", config) as mgr:
        chat = await tiermem.open_chat_model(mgr)
        tier = chat.kv_states
        assert tier is not None and tier.disk is not None
        assert tier.disk.directory == tmp_path / "m.db.kvstates" / "replies"
        cold = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, None, mgr.model_pool, name="cold")
        reply: list[tiermem.Message] = []
        last_prompt, plain = 0, False
        for line in lines:
            result = await mgr.process_conversation("s", [*reply, tiermem.Message("user", line)])
            prompt = tiermem.build_prompt(
                result, await mgr.get_active_cache("s"), user_message=line
            )
            text, n = await chat.complete(prompt, REPLY, 60, session=key)
            assert (text, n) == await cold.complete(prompt, REPLY, 60)
            state = tier.get(key)
            assert state is not None and len(state.tokens) == (
                chat.last_reused + chat.last_prefilled
            )  # the new prompt is the base
            if result.cleared:  # the history changed: only its unchanged start is reused
                assert 0 < chat.last_reused < last_prompt / 2
            elif plain:  # the turn extends the last prompt
                assert chat.last_reused == last_prompt
            # a turn's notes (bridges, retrieved messages) are not in the next prompt
            plain = len(prompt) == 2 * len(reply) + 2 and not result.bridge_messages
            last_prompt = len(state.tokens)
            reply = [tiermem.Message("assistant", text)]
        status = (await mgr.status()).kv_states
        assert status is not None and status.states == 1 and status.hits == 2 and status.misses == 1
        assert status.bytes == tier.stats.bytes > 0

        await chat.complete(conversation("tom", 2), REPLY, 60, session=("default", "t"))
        assert await mgr.delete_session("s")
        assert tier.get(key) is None
        status = (await mgr.status()).kv_states
        assert status is not None and status.states == 1
    # closing spilled the other session's state; a restart restores it, and not the deleted
    async with await tiermem.KVCacheManager.open(tmp_path / "m.db", config) as mgr:
        chat = await tiermem.open_chat_model(mgr)
        await chat.complete(conversation("tom", 3), REPLY, 60, session=("default", "t"))
        assert chat.last_reused > 50  # the system prompt and two turns, from disk
        assert chat.kv_states is not None and chat.kv_states.get(key) is None
        status = (await mgr.status()).kv_states
        assert status is not None and status.disk_restores == 1 and status.disk_states == 1


@pytest.mark.parametrize(
    "common, n, kept",
    [
        (100, 130, 100),  # the usual turn: the rest is 30 tokens
        (130, 130, 128),  # all of it kept: two decoded again, not one alone
        (129, 130, 128),  # one token left: two instead
        (0, 130, 0),
        (600, 1025, 512),  # a cold prefill of 1025 ends with one token alone: 512 + 1 ...
        (1024, 1025, 1024),  # ... so may this one
        (1000, 1025, 512),  # ... not 25 tokens then
        (500, 513, 0),  # cold is 512 + 1: so is this one
        (600, 610, 600),
    ],
)
def test_reused_tokens_leave_no_token_decoded_alone_unless_a_cold_prefill_does(
    common: int, n: int, kept: int
) -> None:
    """llama.cpp decodes a lone token another way (its KV and logits differ in the last
    bits): the tokens decoded after the kept ones make batches of one exactly where a cold
    prefill in batches of 512 does."""
    assert reusable(common, n, 512) == kept
    cold_alone = (n - 1) % 512 == 0
    assert ((n - kept) % 512 == 1) == cold_alone and kept <= common


async def test_a_new_session_never_reuses_another_sessions_tokens(
    models: tuple[tiermem.LlamaChat, tiermem.LlamaChat],
) -> None:
    """Not even the system prompt they share: how much is reused (and so the time to the
    first token) would tell one tenant what another's prompt holds."""
    kept, cold = models
    await kept.complete(conversation("ana", 2), REPLY, 60, ("tenant-a", "s"))
    messages = conversation("ana", 2)
    assert await kept.complete(messages, REPLY, 60, ("tenant-b", "s")) == (
        await cold.complete(messages, REPLY, 60)
    )
    assert kept.last_reused == 0


async def test_a_session_forgotten_while_its_call_is_in_flight_keeps_no_state(
    tmp_path: Path,
) -> None:
    pool = tiermem.ModelPool()
    tier = states(tmp_path)
    kept = tiermem.LlamaChat(bundled_gguf_path(), WINDOW, 1, pool, kv_states=tier)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(kept.complete, conversation("ana", 3), REPLY, 60, ("ns", "ana"))
            # it is loading the model (or, on a fast machine, already generating: the
            # forget then waits for it in the model's turn; either way no state is kept)
            await anyio.wait_all_tasks_blocked()
            await kept.forget(("ns", "ana"))
        assert tier.get(("ns", "ana")) is None
        await kept.complete(conversation("ana", 4), REPLY, 60, ("ns", "ana"))
        assert kept.last_reused == 0
        await kept.forget(("ns", "ana"))
        await kept.close_states()
        assert not await anyio.to_thread.run_sync(lambda: list(tmp_path.glob("*.kvs")))
    finally:
        await pool.aclose()
