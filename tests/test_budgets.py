"""Budgets: least-recently-used sessions leave memory and come back intact, a session over
its own budget is trimmed, idle sessions leave in maintenance, busy ones stay."""

from collections.abc import Callable
from typing import Any

import anyio
import pytest

import tiermem
from tests.conftest import SHAPE
from tests.fakes import GatedSummarizer, RecordingTelemetry
from tests.test_manager import SYSTEM, run_turns, turn
from tiermem import (
    BudgetExceededEvent,
    ClearReason,
    EvictionEvent,
    KVCacheConfig,
    Message,
)
from tiermem._locks import KeyedLocks

TURN_BYTES = 11 * 128  # a `turn(i)`: 7 + 4 words, 128 B per token


def config(**values: Any) -> KVCacheConfig:
    return KVCacheConfig(
        kv_shape=SHAPE, context_window_tokens=4096, summary_mode="inline", **values
    )


async def test_least_recently_used_sessions_leave_first(
    open_manager: Callable[..., Any],
) -> None:
    events = RecordingTelemetry()
    async with await open_manager(config=config(max_sessions=2), telemetry=events) as mgr:
        for sid in ("a", "b", "c"):
            await mgr.process_conversation(sid, turn(0))
        await mgr.process_conversation("a", turn(1))  # back from the database; b leaves
        await mgr.process_conversation("c", turn(1))  # now c was used after a
        await mgr.process_conversation("d", turn(0))  # so a leaves, not c
        evicted = [(e.session_id, e.reason, e.bytes_freed) for e in events.of(EvictionEvent)]
        assert evicted == [
            ("a", "SessionLimit", TURN_BYTES),
            ("b", "SessionLimit", TURN_BYTES),
            ("a", "SessionLimit", 2 * TURN_BYTES),
        ]
        exceeded = events.of(BudgetExceededEvent)
        assert [(e.scope, e.value, e.limit) for e in exceeded] == [("sessions", 3, 2)] * 3
        status = await mgr.status()
        assert status.session_count == 2
        assert status.evictions_by_reason == {"SessionLimit": 3}
        assert status.misses == 1  # a, rebuilt once
        for sid, turns in (("a", 2), ("b", 1), ("c", 2), ("d", 1)):
            assert len(await mgr.get_conversation_history(sid)) == 2 * turns


async def test_an_evicted_session_comes_back_the_same(open_manager: Callable[..., Any]) -> None:
    async with await open_manager(config=config(max_sessions=1)) as mgr:
        code = "```python\nprint('vault')\n```"
        await mgr.process_conversation("keep", [SYSTEM, *turn(0, "show code", code)])
        await run_turns(mgr, 16, sid="keep", start=1)  # a clear at turn 16, with a summary
        await mgr.process_conversation("keep", turn(17, "what about the weather?"))
        before = (
            await mgr.get_active_cache("keep"),
            await mgr.get_session_state("keep"),
            await mgr.get_summary("keep"),
        )
        assert before[1] is not None and before[1].clear_count == 1
        assert any(e.access_count for e in before[0])  # the retrieval engaged some

        await mgr.process_conversation("other", turn(0))  # keep leaves memory
        assert (await mgr.status()).evictions_by_reason == {"SessionLimit": 1}
        after = (
            await mgr.get_active_cache("keep"),
            await mgr.get_session_state("keep"),
            await mgr.get_summary("keep"),
        )
        assert after == before
        assert (await mgr.status()).misses == 1
        # and it carries on: the next clear comes 16 turns after the last
        results = await run_turns(mgr, 16, sid="keep", start=18)
        # 16 turns after the clear at call 16: call 32, the 14th of these
        assert [r.should_clear_cache for r in results].index(True) == 13


async def test_a_summary_landing_after_eviction_reaches_the_session(
    open_manager: Callable[..., Any],
) -> None:
    slow = GatedSummarizer()
    background = config(max_sessions=1).replace(summary_mode="background")
    async with await open_manager(config=background, summarizer=slow) as mgr:
        await run_turns(mgr, 16, sid="a")  # clears; its summary is held
        await mgr.process_conversation("b", turn(0))  # a leaves memory
        slow.gate.set()
        assert await mgr.wait_for_summaries(timeout=5)
        summary = await mgr.get_summary("a")
        assert summary is not None
        later = await run_turns(mgr, 1, sid="a", start=16)
        assert later[0].bridge_messages[0].endswith(summary.text)


async def test_total_bytes_budget_holds(open_manager: Callable[..., Any]) -> None:
    budget = 3 * TURN_BYTES + 100
    async with await open_manager(config=config(max_bytes_total=budget)) as mgr:
        for i in range(4):
            for sid in ("a", "b", "c", "d", "e"):
                await mgr.process_conversation(sid, turn(i))
                status = await mgr.status()
                assert status.estimated_bytes <= budget
        status = await mgr.status()
        # within a turn, a session alone over the budget holds its new messages until the
        # turn's clear trims it
        assert budget < status.peak_bytes <= budget + TURN_BYTES
        assert status.budget_bytes == budget
        assert status.evictions_by_reason["MemoryBudget"] > 0
        for sid in ("a", "b", "c", "d", "e"):
            assert len(await mgr.get_conversation_history(sid)) == 8


async def test_a_session_over_its_budget_is_trimmed_by_a_clear(
    open_manager: Callable[..., Any],
) -> None:
    events = RecordingTelemetry()
    limit = 30 * 128
    mgr = await open_manager(config=config(max_bytes_per_session=limit), telemetry=events)
    async with mgr:
        reasons = []
        for i in range(10):
            result = await mgr.process_conversation("s", turn(i))
            assert result.updated_session_state.cache_size_bytes <= limit
            if result.clear_result:
                reasons.append(result.clear_result.clear_reason)
        assert reasons and set(reasons) == {ClearReason.SESSION_BUDGET}
        assert {e.scope for e in events.of(BudgetExceededEvent)} == {"session_bytes"}
        assert len(await mgr.get_conversation_history("s")) == 20


async def test_what_a_clear_preserves_is_shed_when_it_is_still_too_much(
    open_manager: Callable[..., Any],
) -> None:
    limit = 40 * 128
    async with await open_manager(config=config(max_bytes_per_session=limit)) as mgr:
        shed: list[str] = []
        for i in range(8):
            code = f"```python\nvalue_{i} = compute({i}) + offset * scale - {i}\n```"
            result = await mgr.process_conversation("s", turn(i, f"code {i} please", code))
            assert result.updated_session_state.cache_size_bytes <= limit
            shed += result.slid_out_message_ids
        # code is preserved at every clear; the oldest of it had to go
        assert "a0" in shed
        history = await mgr.get_conversation_history("s")
        assert [m.id for m in history] == [f"{r}{i}" for i in range(8) for r in "ua"]
        hits = await mgr.retrieve_context("s", "value_0 compute")
        assert hits.entries[0].message_ids == ["a0"] and hits.entries[0].source_tier == 3


async def test_a_session_over_its_entry_budget_is_trimmed(
    open_manager: Callable[..., Any],
) -> None:
    async with await open_manager(config=config(max_entries_per_session=5)) as mgr:
        results = await run_turns(mgr, 6)
        assert all(r.updated_session_state.entry_count <= 5 for r in results)
        reasons = {r.clear_result.clear_reason for r in results if r.clear_result}
        assert reasons == {ClearReason.ENTRY_LIMIT}


async def test_a_busy_session_is_not_evicted(open_manager: Callable[..., Any]) -> None:
    slow = GatedSummarizer()
    events = RecordingTelemetry()
    mgr = await open_manager(config=config(max_sessions=1), summarizer=slow, telemetry=events)
    done = anyio.Event()

    async def clearing_turn() -> None:
        await run_turns(mgr, 1, "a", 15)  # clears inline: held in its summary
        done.set()

    async with mgr, anyio.create_task_group() as tg:
        await run_turns(mgr, 15, sid="a")
        tg.start_soon(clearing_turn)
        await slow.entered.wait()
        await mgr.process_conversation("b", turn(0))
        # a is in use: b, the only session free to leave, leaves once its call is done
        assert [e.session_id for e in events.of(EvictionEvent)] == ["b"]
        assert (await mgr.status()).session_count == 1
        slow.gate.set()
        await done.wait()
        await mgr.process_conversation("c", turn(0))
        assert [e.session_id for e in events.of(EvictionEvent)] == ["b", "a"]
        assert (await mgr.status()).session_count == 1


async def test_many_sessions_at_once_under_a_small_budget(
    open_manager: Callable[..., Any],
) -> None:
    async with await open_manager(config=config(max_sessions=3)) as mgr:

        async def chat(sid: str) -> None:
            for i in range(6):
                msgs = [Message("user", f"{sid} says thing {i}", id=f"{sid}-u{i}")]
                await mgr.process_conversation(sid, msgs)

        async with anyio.create_task_group() as tg:
            for n in range(12):
                tg.start_soon(chat, f"s{n}")
        status = await mgr.status()
        assert status.session_count <= 3 and status.evictions_by_reason["SessionLimit"] >= 9
        for n in range(12):
            history = await mgr.get_conversation_history(f"s{n}")
            assert [m.content for m in history] == [f"s{n} says thing {i}" for i in range(6)]


async def test_idle_sessions_leave_in_maintenance(
    open_manager: Callable[..., Any], clock: Any
) -> None:
    events = RecordingTelemetry()
    async with await open_manager(config=config(idle_eviction_seconds=60), telemetry=events) as m:
        await m.process_conversation("idle", turn(0))
        clock.advance(61)
        await m.process_conversation("active", turn(0))
        result = await m.perform_maintenance()
        assert result.sessions_cleaned == 1
        assert [(e.session_id, e.reason) for e in events.of(EvictionEvent)] == [("idle", "Idle")]
        assert (await m.status()).evictions_by_reason == {"Idle": 1}


async def test_status_adds_up(open_manager: Callable[..., Any]) -> None:
    async with await open_manager(config=config(max_bytes_total=10**6)) as mgr:
        await run_turns(mgr, 3, sid="a")
        await run_turns(mgr, 2, sid="b")
        status = await mgr.status()
        caches = [await mgr.get_active_cache(s) for s in ("a", "b")]
        assert status.estimated_bytes == sum(e.kv_bytes for c in caches for e in c)
        assert status.total_entries == sum(len(c) for c in caches) == 12
        assert status.session_count == 2 and status.budget_bytes == 10**6
        assert status.peak_bytes >= status.estimated_bytes
        assert status.hits > 0 and status.misses == 0
        assert status.rss_bytes > 10 * 2**20
        assert status.models["kv_bytes_per_token"] == 128


def test_invalid_budgets_are_refused() -> None:
    with pytest.raises(tiermem.ConfigError, match="max_bytes_per_session"):
        KVCacheConfig(max_bytes_per_session=10, max_bytes_total=5)
    for bad in ({"max_sessions": 0}, {"idle_eviction_seconds": 0}, {"max_bytes_total": -1}):
        with pytest.raises(tiermem.ConfigError, match=next(iter(bad))):
            KVCacheConfig(**bad)


async def test_session_locks_exist_only_while_used() -> None:
    locks = KeyedLocks[tuple[str, str]]()  # the sessions' and the summaries' locks
    ident, other = ("ns", "s"), ("ns", "t")
    order: list[str] = []

    async def user(name: str, hold: anyio.Event) -> None:
        async with locks.hold(ident):
            order.append(name)
            await hold.wait()

    first, second = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(user, "first", first)
        tg.start_soon(user, "second", second)
        await anyio.wait_all_tasks_blocked()
        assert locks.busy(ident) and order == ["first"] and not locks.busy(other)
        first.set()
        await anyio.wait_all_tasks_blocked()
        assert locks.busy(ident) and order == ["first", "second"]
        second.set()
    assert not locks.busy(ident)


async def test_status_totals_follow_every_change_of_every_session(
    open_manager: Callable[..., Any],
) -> None:
    """The manager-wide figures are running sums: after turns, clears, restores,
    evictions and deletes they equal the sum over the sessions' own figures."""
    async with await open_manager() as mgr:
        for i in range(12):
            sid = f"s{i % 4}"
            await mgr.process_conversation(sid, [Message("user", f"note {i} " * (i + 1))])
            if i % 5 == 4:
                await mgr.manual_clear_cache(sid)
        await mgr.delete_session("s1")
        status = await mgr.status()
        states = [await mgr.get_session_state(f"s{i}") for i in (0, 2, 3)]
        assert status.estimated_bytes == sum(s.cache_size_bytes for s in states if s)
        assert status.total_entries == sum(s.entry_count for s in states if s)
