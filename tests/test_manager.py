"""The manager loop on fakes: clears, preservation, snapshots, summaries, bridges, tiers.
Every test runs on both stores (SQLite, PostgreSQL)."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tiermem
from tests import pg, rawfile
from tests.conftest import SHAPE
from tests.fakes import RecordingSummarizer
from tiermem import ClearReason, KVCacheConfig, Message

SYSTEM = Message("system", "You are a helpful assistant for Ana's trip.", id="sys")


@pytest.fixture
def db_path(database: str | Path) -> str | Path:
    """The manager's database, on every store."""
    return database


async def whole(db: str | Path) -> dict[str, int]:
    """The database's row counts, once checked whole (see rawfile, pg)."""
    return await pg.assert_whole(db) if isinstance(db, str) else rawfile.assert_whole(db)


def turn(i: int, user: str | None = None, assistant: str | None = None) -> list[Message]:
    return [
        Message("user", user or f"small talk number {i} about the weather", id=f"u{i}"),
        Message("assistant", assistant or f"reply {i} about clouds", id=f"a{i}"),
    ]


async def run_turns(
    mgr: tiermem.KVCacheManager, n: int, sid: str = "s", start: int = 0, **kw: Any
) -> list[tiermem.CacheProcessingResult]:
    results = []
    for i in range(start, start + n):
        msgs = ([SYSTEM] if i == 0 else []) + turn(i)
        results.append(await mgr.process_conversation(sid, msgs, **kw))
    return results


async def test_clear_happens_at_turn_16(manager: tiermem.KVCacheManager) -> None:
    results = await run_turns(manager, 17)
    cleared = [i + 1 for i, r in enumerate(results) if r.should_clear_cache]
    assert cleared == [16]
    clear = results[15].clear_result
    assert clear is not None and clear.clear_reason == ClearReason.CONVERSATION_LIMIT
    assert results[15].updated_session_state.conversation_count == 0
    assert results[16].updated_session_state.conversation_count == 1


async def test_clear_by_memory_threshold(open_manager: Callable[..., Any]) -> None:
    config = KVCacheConfig(kv_shape=SHAPE, max_cache_bytes=128 * 100, memory_threshold_percent=0.5)
    mgr = await open_manager(config=config)
    try:
        long_text = "word " * 30  # 30 tokens * 128 B
        first = await mgr.process_conversation("s", [Message("user", long_text)])
        second = await mgr.process_conversation("s", [Message("assistant", long_text)])
        assert not first.should_clear_cache
        assert second.clear_result is not None
        assert second.clear_result.clear_reason == ClearReason.MEMORY_THRESHOLD
    finally:
        await mgr.aclose()


async def test_system_prompt_and_code_are_preserved(manager: tiermem.KVCacheManager) -> None:
    await manager.process_conversation("s", [SYSTEM, *turn(0)])
    code = "```python\ndef total(xs):\n    return sum(xs)\n```"
    await manager.process_conversation("s", turn(1, "show me code", code))
    result = await manager.manual_clear_cache("s")
    kept = {e.message_id for e in result.entries_to_keep}
    assert kept == {"sys", "a1"}
    assert result.entries_cleared == 3
    state = await manager.get_session_state("s")
    assert state is not None and state.entry_count == 2


async def test_important_entries_survive_and_chatter_does_not(
    manager: tiermem.KVCacheManager,
) -> None:
    await manager.process_conversation(
        "s", turn(0, "Important: remember I am allergic to peanuts, never forget it!")
    )
    await run_turns(manager, 3, start=1)
    result = await manager.manual_clear_cache("s")
    assert [e.message_id for e in result.entries_to_keep] == ["u0"]


async def test_summary_is_cumulative(
    manager: tiermem.KVCacheManager, summarizer: RecordingSummarizer
) -> None:
    await run_turns(manager, 32)
    assert len(summarizer.calls) == 2
    first_prior, first_lines = summarizer.calls[0]
    second_prior, _ = summarizer.calls[1]
    assert first_prior is None
    assert second_prior is not None and second_prior.startswith("summary #1")
    assert all(line.role != "system" for line in first_lines)
    summary = await manager.get_summary("s")
    assert summary is not None
    assert summary.clear_count == 2
    assert summary.message_count == 65  # the system prompt + 32 turns of 2
    assert summary.text.startswith("summary #1") and "summary #2" in summary.text


async def test_llm_summary_keeps_prior_facts_and_adds_the_new_ones() -> None:
    """The model is asked for the facts of the user's new statements only; the summary is
    the prior facts plus those, each once."""

    class Chat:
        n_ctx = 2048

        def __init__(self) -> None:
            self.prompts: list[str] = []

        async def complete(
            self, messages: list[dict[str, str]], max_tokens: int, timeout: float
        ) -> tuple[str, int]:
            self.prompts.append(messages[1]["content"])
            return "1. The user: stays in room 412\n- The user: stays in room 412\nok", 9

    from tests.fakes import WordCounter

    chat = Chat()
    llm = tiermem.LLMSummarizer(chat, WordCounter(), timeout=5)
    lines = [
        tiermem.TranscriptLine("user", "I stay in room 412"),
        tiermem.TranscriptLine("user", "Which floor is it on?"),
        tiermem.TranscriptLine("assistant", "The fourth floor."),
    ]
    first = await llm.summarize(None, lines)
    assert first.text == "- stays in room 412"
    assert "I stay in room 412" in chat.prompts[0] and "floor" not in chat.prompts[0]
    second = await llm.summarize("- flies in on TP1351 at 10:40", lines)
    assert second.text == "- flies in on TP1351 at 10:40\n- stays in room 412"


async def test_llm_summary_stays_within_its_budget_dropping_the_least_informative() -> None:
    from tests.fakes import WordCounter

    class Chat:
        n_ctx = 2048

        async def complete(
            self, messages: list[dict[str, str]], max_tokens: int, timeout: float
        ) -> tuple[str, int]:
            return "\n".join(f"- the user said a plain thing number {i}" for i in range(60)), 1

    llm = tiermem.LLMSummarizer(Chat(), WordCounter(), timeout=5)
    prior = "- Ana lands on flight TP1351 at 10:40 in Lisbon"
    out = await llm.summarize(prior, [tiermem.TranscriptLine("user", "many things")])
    assert out.token_count <= 400
    assert out.text.startswith(prior)  # names and numbers outlive plain lines


async def test_llm_summarizer_folds_what_does_not_fit() -> None:
    from tests.fakes import WordCounter

    class Chat:
        n_ctx = 1400
        calls = 0

        async def complete(
            self, messages: list[dict[str, str]], max_tokens: int, timeout: float
        ) -> tuple[str, int]:
            Chat.calls += 1
            assert len(" ".join(m["content"] for m in messages).split()) + max_tokens < self.n_ctx
            return f"- facts of chunk {Chat.calls}", 2

    lines = [tiermem.TranscriptLine("user", "word " * 100 + str(i)) for i in range(20)]
    out = await tiermem.LLMSummarizer(Chat(), WordCounter(), timeout=5).summarize(None, lines)
    assert Chat.calls > 1
    assert out.text.splitlines() == [f"- facts of chunk {i + 1}" for i in range(Chat.calls)]


async def test_bridge_texts(open_manager: Callable[..., Any]) -> None:
    mgr = await open_manager(summarizer=RecordingSummarizer(fail=True))
    try:
        results = await run_turns(mgr, 16)
        clear = results[-1].clear_result
        assert clear is not None and clear.summary_error == "summarizer is down"
        assert (
            results[-1]
            .bridge_messages[0]
            .startswith(
                "[Cache Management] Cleared 32 entries from cache, preserved 1 important entries "
                "related to: "
            )
        )
    finally:
        await mgr.aclose()


async def test_summary_and_prior_summary_bridges(manager: tiermem.KVCacheManager) -> None:
    results = await run_turns(manager, 17)
    summary = await manager.get_summary("s")
    assert summary is not None
    assert results[15].bridge_messages[0] == (
        "[Memory compressed — conversation summary up to this point:]\n" + summary.text
    )
    assert results[16].bridge_messages[0] == (
        "[Prior conversation summary — context before memory compression:]\n" + summary.text
    )


async def test_retrieval_and_restore_bridges(manager: tiermem.KVCacheManager) -> None:
    await manager.process_conversation(
        "s", [SYSTEM, *turn(0, "Ana stays at Casa do Largo, room 412.")]
    )
    result = await manager.process_conversation("s", turn(1, "Which room does Ana stay in?"))
    assert result.retrieval_result is not None
    hits = result.retrieval_result.entries
    assert hits and hits[0].message_ids == ["u0"]
    assert (
        result.bridge_messages[-1].startswith("[Memory Retrieval] Retrieved ")
        and "from active cache for 'room', 'ana', 'stay'" in result.bridge_messages[-1]
    )
    assert "(similarity: " in result.bridge_messages[-1]

    await run_turns(manager, 14, start=2)  # the 16th turn clears with a snapshot
    snapshots = await manager.list_snapshots("s")
    assert len(snapshots) == 1
    restored = await manager.restore_from_snapshot("s", snapshots[0].snapshot_id)
    assert restored.bridge_message == (
        f"[Cache Restoration] Restored {restored.entries_restored} entries from previous "
        "snapshot (0 minutes old)."
    )


async def test_hits_come_from_each_tier_with_caller_ids(manager: tiermem.KVCacheManager) -> None:
    code = "```python\ndef parse_expenses(path):\n    return open(path).read()\n```"
    await manager.process_conversation("s", [SYSTEM, *turn(0, "help with parse_expenses", code)])
    await manager.process_conversation("s", turn(1, "the zebra sanctuary opens at nine"))
    await run_turns(manager, 14, start=2)  # turn 16: clear, snapshot keeps system + code
    manager.update_config(preserve_code_entries=False, min_importance_to_preserve=0.99)
    await manager.manual_clear_cache("s")  # code leaves the cache, stays in the snapshot
    await manager.process_conversation("s", turn(20, "my favourite colour is teal"))

    def tier_of(result: tiermem.RetrievalResult, message_id: str) -> int:
        return next(e.source_tier for e in result.entries if message_id in e.message_ids)

    assert tier_of(await manager.retrieve_context("s", "favourite colour teal"), "u20") == 1
    assert tier_of(await manager.retrieve_context("s", "parse_expenses function"), "a0") == 2
    zebra = await manager.retrieve_context("s", "when does the zebra sanctuary open")
    assert tier_of(zebra, "u1") == 3
    assert zebra.tiers_searched == [1, 2, 3]
    for e in zebra.entries:
        assert 0.0 <= e.similarity_score <= 1.0
    scores = [e.similarity_score for e in zebra.entries]
    assert scores == sorted(scores, reverse=True)


async def test_each_message_is_one_hit_with_its_best_tier(
    manager: tiermem.KVCacheManager,
) -> None:
    await manager.process_conversation("s", turn(0, "the teal bicycle is in the garage"))
    hits = await manager.retrieve_context("s", "teal bicycle garage")
    ids = [i for e in hits.entries for i in e.message_ids]
    assert len(ids) == len(set(ids))
    assert hits.entries[0].source_tier == 1  # also in tier 3, reported once at tier 1


async def test_restart_recovery(open_manager: Callable[..., Any]) -> None:
    mgr = await open_manager()
    await run_turns(mgr, 20)
    before = await mgr.get_session_state("s")
    await mgr.aclose()
    mgr = await open_manager()
    try:
        after = await mgr.get_session_state("s")
        assert before is not None and after is not None
        for field in (
            "conversation_count",
            "clear_count",
            "entry_count",
            "message_count",
            "token_count",
            "cache_size_bytes",
        ):
            assert getattr(after, field) == getattr(before, field), field
        results = await run_turns(mgr, 12, start=20)
        assert [r.should_clear_cache for r in results].index(True) == 11  # turn 32
        assert (await mgr.status()).misses == 1
    finally:
        await mgr.aclose()


async def test_delete_session_leaves_nothing(
    manager: tiermem.KVCacheManager, db_path: str | Path
) -> None:
    await run_turns(manager, 17, sid="gone")
    await run_turns(manager, 2, sid="kept")
    before = await whole(db_path)
    assert before["kv_snapshots"] > 0 and before["session_summaries"] > 0
    assert await manager.delete_session("gone") is True
    counts = await whole(db_path)  # no index row left behind either
    kept = len(await manager.get_conversation_history("kept"))
    assert kept == 5 and counts["messages"] == kept
    assert counts["kv_snapshots"] == counts["kv_snapshot_entries"] == 0
    assert counts["session_summaries"] == 0
    assert counts["sessions"] == 1
    with pytest.raises(tiermem.NotFoundError):
        await manager.retrieve_context("gone", "weather")
    assert await manager.get_summary("kept") is None
    assert await manager.delete_session("gone") is False


async def test_whole_conversation_or_new_messages_store_once(
    manager: tiermem.KVCacheManager,
) -> None:
    conversation: list[Message] = []
    for i in range(3):
        conversation += [Message("user", f"question {i}?"), Message("assistant", f"answer {i}")]
        await manager.process_conversation("whole", conversation)
    assert len(await manager.get_conversation_history("whole")) == 6
    for i in range(3):
        await manager.process_conversation("new", turn(i))
    await manager.process_conversation("new", turn(2))  # re-sent with the same ids
    history = await manager.get_conversation_history("new")
    assert [m.id for m in history] == ["u0", "a0", "u1", "a1", "u2", "a2"]
    with pytest.raises(tiermem.InvalidInputError, match="other content"):
        await manager.process_conversation("new", [Message("user", "changed", id="u0")])
    derived = await manager.get_conversation_history("whole")
    assert derived[0].id == "whole#0"


async def test_ingest_fills_tier_3_only(manager: tiermem.KVCacheManager) -> None:
    await manager.process_conversation("s", turn(0))
    old = [
        Message("user", f"archived note {i}: the vault code is {1000 + i}", id=f"old{i}")
        for i in range(600)
    ]
    assert await manager.ingest("s", old, batch_size=128) == 600
    assert await manager.ingest("s", old) == 0
    state = await manager.get_session_state("s")
    assert state is not None and state.entry_count == 2 and state.conversation_count == 1
    hits = await manager.retrieve_context("s", "vault code 1433")
    assert hits.entries[0].message_ids == ["old433"] and hits.entries[0].source_tier == 3


async def test_maintenance_evicts_idle_sessions_and_prunes(
    manager: tiermem.KVCacheManager, clock: Any
) -> None:
    manager.update_config(snapshot_strategy={"kind": "full"})
    code = "```js\nconst x = 1;\n```"
    await manager.process_conversation("s", [SYSTEM, *turn(0, "code please", code)])
    for _ in range(6):
        await manager.manual_clear_cache("s")
    await manager.process_conversation("busy", turn(0))
    clock.advance(3000)
    await manager.process_conversation("busy", turn(1))
    clock.advance(700)
    manager.update_config(snapshot_strategy={"kind": "incremental", "max_snapshots": 2})
    result = await manager.perform_maintenance()
    assert result.sessions_cleaned == 1 and result.snapshots_pruned == 4
    assert result.errors == []
    status = await manager.status()
    assert status.session_count == 1 and status.evictions_by_reason == {"Idle": 1}
    state = await manager.get_session_state("s")  # comes back from the database
    assert state is not None and state.entry_count == 2
    assert len(await manager.list_snapshots("s")) == 2


async def test_namespaces_do_not_mix(manager: tiermem.KVCacheManager) -> None:
    await manager.process_conversation("s", turn(0, "alpha secret is marmalade"), namespace="a")
    await manager.process_conversation("s", turn(0, "beta note about rain"), namespace="b")
    hits = await manager.retrieve_context("s", "marmalade secret", namespace="b")
    assert all("marmalade" not in e.text for e in hits.entries)
    assert (await manager.retrieve_context("s", "marmalade", namespace="a")).entries


async def test_closed_manager_refuses(open_manager: Callable[..., Any]) -> None:
    mgr = await open_manager()
    await mgr.aclose()
    await mgr.aclose()
    with pytest.raises(tiermem.ManagerClosedError):
        await mgr.process_conversation("s", turn(0))


async def test_statistics_track_operations(manager: tiermem.KVCacheManager) -> None:
    await run_turns(manager, 16)
    await manager.retrieve_context("s", "weather")
    stats = manager.export_statistics()
    assert stats.total_clears == 1 and stats.total_retrievals == 1
    assert stats.entries_cleared + stats.entries_preserved == 33
    kinds = [op.operation_type.value for op in stats.operation_history]
    assert kinds == ["Clear", "Snapshot", "Retrieve"]
    manager.reset_statistics()
    assert manager.export_statistics().total_clears == 0


async def test_full_snapshots_are_pruned_to_max_snapshots(manager: tiermem.KVCacheManager) -> None:
    manager.update_config(snapshot_strategy={"kind": "full", "max_snapshots": 3})
    code = "```js\nconst x = 1;\n```"
    await manager.process_conversation("s", [SYSTEM, *turn(0, "code please", code)])
    for _ in range(5):
        await manager.manual_clear_cache("s")
    assert len(await manager.list_snapshots("s")) == 5
    assert (await manager.perform_maintenance()).snapshots_pruned == 2
    assert len(await manager.list_snapshots("s")) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"embedding_model": "other"},
        {"context_window_tokens": 128},
        {"kv_shape": {"n_layers": 1, "n_kv_heads": 1, "head_dim": 8, "dtype_bytes": 2}},
        {"model_memory_limit_bytes": 10**9},
        {"summary_timeout_seconds": 5},
        {"embedding_batch_size": 8},
        {"busy_timeout_ms": 1},
        {"read_only": True},
    ],
)
async def test_update_config_refuses_settings_fixed_at_open(
    manager: tiermem.KVCacheManager, change: dict[str, Any]
) -> None:
    before = manager.config
    with pytest.raises(tiermem.ConfigError, match="cannot change"):
        manager.update_config(**change)
    assert manager.config == before
    assert manager.update_config(clear_after_conversations=5).clear_after_conversations == 5


async def test_hits_say_their_tier_and_relevance(manager: tiermem.KVCacheManager) -> None:
    await manager.process_conversation("s", turn(0, "the vault code is 1433"))
    result = await manager.process_conversation("s", turn(1, "what is the vault code?"))
    assert result.retrieved and not result.cleared
    hit = (await manager.retrieve_context("s", "vault code")).entries[0]
    assert hit.source_tier is tiermem.Tier.ACTIVE_CACHE and hit.source_tier == 1
    assert hit.relevance == hit.similarity_score and 0 < hit.relevance <= 1
