"""The manager against a small reference model (a hypothesis state machine): turns,
re-sent conversations, clears, snapshots, restores, summaries, deletes, idle eviction,
maintenance and restarts, in any order, over sessions of two namespaces, on both stores
(a SQLite file; a PostgreSQL database of the session's server, see tests/pg.py).

The reference knows only the rules of DESIGN.md section 2. Importance is made to depend on
the content alone (every other scoring weight is 0), so what a clear keeps is decidable:
system prompts always, "remember ..." messages (content score 0.9) unless the threshold
is raised above it, plain messages (0.1) never.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import tiermem
from tests import pg
from tests.conftest import SHAPE, Clock
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

CLEAR_AFTER = 3
MAX_SNAPSHOTS = 2
MIN_SUMMARY = 4  # messages a summary update needs since the last one
IDLE_SECONDS = 600.0
KEYS = [("alpha", "s1"), ("beta", "s1")]
WORDS = ("apple", "river", "stone", "cloud", "maple", "ember")
LOW, HIGH = 0.8, 0.95  # preservation thresholds: below and above "remember" (0.9)


def letters(n: int) -> str:
    """A unique digit-free tag (digits would raise the content score)."""
    out = ""
    while True:
        n, r = divmod(n, 26)
        out = chr(ord("a") + r) + out
        if n == 0:
            return "qz" + out


@dataclass
class Ref:
    """What one session must look like."""

    history: list[tiermem.Message] = field(default_factory=list)
    cache: list[str] = field(default_factory=list)  # message ids, in history order
    turns: int = 0
    clears: int = 0
    snapshots: dict[int, list[str]] = field(default_factory=dict)  # id -> message ids
    summary_clears: int = 0
    summarized_through: int = -1


class ManagerMachine(RuleBasedStateMachine):
    postgres = False

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        self.path: str | Path = Path(self.folder.name) / "state.db"
        if self.postgres:
            self.path = self.run(pg.fresh_database(pg.url()))
        self.clock = Clock()
        self.refs: dict[tuple[str, str], Ref] = {}
        self.counter = 0
        self.threshold = LOW
        try:
            self.mgr = self.run(self.open())
        except BaseException:
            self.loop.close()
            self.folder.cleanup()
            raise

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def open(self) -> tiermem.KVCacheManager:
        config = tiermem.KVCacheConfig(
            kv_shape=SHAPE,
            context_window_tokens=100_000,
            max_cache_bytes=10**12,
            summary_mode="inline",
            clear_after_conversations=CLEAR_AFTER,
            min_importance_to_preserve=self.threshold,
            preserve_code_entries=False,
            snapshot_strategy={"kind": "incremental", "max_snapshots": MAX_SNAPSHOTS},
            scoring={"recency": 0, "access": 0, "content": 1, "size": 0, "engagement": 0},
            idle_eviction_seconds=IDLE_SECONDS,
            retrieval_enabled=False,
        )
        return await tiermem.KVCacheManager.open(
            self.path,
            config,
            embedder=HashingEmbedder(),
            summarizer=RecordingSummarizer(),
            tokenizer=WordCounter(),
            clock=self.clock,
        )

    def teardown(self) -> None:
        try:
            self.run(self.mgr.aclose())
            if isinstance(self.path, str):
                self.run(pg.drop_database(pg.url(), self.path))
        finally:
            self.loop.close()
            self.folder.cleanup()

    # -- the reference's rules -------------------------------------------------------------

    def message(self, role: str, word: str, remember: bool) -> tiermem.Message:
        self.counter += 1
        tag = letters(self.counter)
        text = f"{'remember ' if remember else ''}{word} entry {tag}"
        return tiermem.Message(role, text, id=f"id-{tag}")

    def kept(self, ref: Ref) -> list[str]:
        by_id = {m.id: m for m in ref.history}
        return [
            i
            for i in ref.cache
            if by_id[i].role == "system"
            or (by_id[i].content.startswith("remember ") and self.threshold < 0.9)
        ]

    def clear(self, ref: Ref, result: tiermem.CacheClearResult, by_limit: bool) -> None:
        keep = self.kept(ref)
        assert [e.message_id for e in result.entries_to_keep] == keep
        assert result.entries_cleared == len(ref.cache) - len(keep)
        ref.clears += 1
        ref.turns = 0
        ref.cache = keep
        if by_limit and keep:
            assert result.snapshot_id is not None
            ref.snapshots[result.snapshot_id] = list(keep)
        else:
            assert result.snapshot_id is None
        through = len(ref.history) - 1
        if through - ref.summarized_through >= MIN_SUMMARY:
            ref.summarized_through = through
            ref.summary_clears = ref.clears

    def ordered(self, ref: Ref, ids: set[str]) -> list[str]:
        return [m.id for m in ref.history if m.id in ids]

    # -- rules -----------------------------------------------------------------------------

    @rule(
        key=st.sampled_from(KEYS),
        word=st.sampled_from(WORDS),
        remember=st.booleans(),
        system=st.booleans(),
    )
    def turn(self, key: tuple[str, str], word: str, remember: bool, system: bool) -> None:
        ref = self.refs.setdefault(key, Ref())
        new = [self.message("system", word, False)] if system else []
        new += [self.message("user", word, remember), self.message("assistant", word, False)]
        result = self.run(self.mgr.process_conversation(key[1], new, namespace=key[0]))
        assert result.stored_message_ids == [m.id for m in new]
        ref.history += new
        ref.cache += [m.id for m in new]
        self.after_turn(ref, result)

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def resend_whole_conversation(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.refs)))
        ref = self.refs[key]
        result = self.run(self.mgr.process_conversation(key[1], ref.history, namespace=key[0]))
        assert result.stored_message_ids == []
        self.after_turn(ref, result)

    def after_turn(self, ref: Ref, result: tiermem.CacheProcessingResult) -> None:
        due = ref.turns + 1 >= CLEAR_AFTER
        assert result.should_clear_cache == due
        ref.turns += 1
        if due:
            assert result.clear_result is not None
            assert result.clear_result.clear_reason == tiermem.ClearReason.CONVERSATION_LIMIT
            self.clear(ref, result.clear_result, by_limit=True)

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), high=st.booleans())
    def manual_clear(self, data: st.DataObject, high: bool) -> None:
        """A clear after the threshold is set (it stays for later clears too)."""
        key = data.draw(st.sampled_from(sorted(self.refs)))
        self.threshold = HIGH if high else LOW
        self.mgr.update_config(min_importance_to_preserve=self.threshold)
        result = self.run(self.mgr.manual_clear_cache(key[1], namespace=key[0]))
        assert result.clear_reason == tiermem.ClearReason.MANUAL
        self.clear(self.refs[key], result, by_limit=False)

    @precondition(lambda self: any(r.snapshots for r in self.refs.values()))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, r in self.refs.items() if r.snapshots)))
        ref = self.refs[key]
        snapshot_id = data.draw(st.sampled_from(sorted(ref.snapshots)))
        result = self.run(self.mgr.restore_from_snapshot(key[1], snapshot_id, namespace=key[0]))
        assert result.entries_restored == len(ref.snapshots[snapshot_id])
        ref.cache = self.ordered(ref, set(ref.cache) | set(ref.snapshots[snapshot_id]))

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: tuple[str, str]) -> None:
        existed = self.run(self.mgr.delete_session(key[1], namespace=key[0]))
        assert existed == (key in self.refs)
        self.refs.pop(key, None)

    @rule(idle=st.booleans())
    def maintenance(self, idle: bool) -> None:
        """Prunes snapshots to the newest few; with time passed, drops every session from
        memory (after flushing it)."""
        if idle:
            self.clock.advance(IDLE_SECONDS + 1)
        result = self.run(self.mgr.perform_maintenance())
        assert result.errors == []
        pruned = 0
        for ref in self.refs.values():
            for old in sorted(ref.snapshots)[:-MAX_SNAPSHOTS]:
                del ref.snapshots[old]
                pruned += 1
        assert result.snapshots_pruned == pruned
        # the invariant check left every stored session in memory
        assert result.sessions_cleaned == (len(self.refs) if idle else 0)

    @rule()
    def restart(self) -> None:
        self.run(self.mgr.aclose())
        self.mgr = self.run(self.open())

    # -- what must hold after every step ---------------------------------------------------

    @invariant()
    def matches_reference(self) -> None:
        self.run(self.check())

    async def check(self) -> None:
        mgr = self.mgr
        stored = {(s.namespace, s.session_id): s.message_count for s in await mgr.list_sessions()}
        assert stored == {k: len(r.history) for k, r in self.refs.items()}
        for (ns, sid), ref in self.refs.items():
            history = await mgr.get_conversation_history(sid, namespace=ns)
            assert [(m.id, m.role, m.content) for m in history] == [
                (m.id, m.role, m.content) for m in ref.history
            ]
            cache = await mgr.get_active_cache(sid, namespace=ns)
            assert [e.message_id for e in cache] == ref.cache
            state = await mgr.get_session_state(sid, namespace=ns)
            assert state is not None
            assert (state.conversation_count, state.clear_count) == (ref.turns, ref.clears)
            snapshots = await mgr.list_snapshots(sid, namespace=ns)
            assert [s.snapshot_id for s in snapshots] == sorted(ref.snapshots, reverse=True)
            assert [s.entry_count for s in snapshots] == [
                len(ref.snapshots[s.snapshot_id]) for s in snapshots
            ]
            summary = await mgr.get_summary(sid, namespace=ns)
            if ref.summary_clears == 0:
                assert summary is None
            else:
                assert summary is not None
                assert summary.clear_count == ref.summary_clears
        for ns, sid in set(KEYS) - set(self.refs):
            assert await mgr.get_session_state(sid, namespace=ns) is None
            with pytest.raises(tiermem.NotFoundError):
                await mgr.get_conversation_history(sid, namespace=ns)


class PostgresManagerMachine(ManagerMachine):
    postgres = True


for machine, examples in ((ManagerMachine, 150), (PostgresManagerMachine, 60)):
    machine.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
TestManagerAgainstReference = ManagerMachine.TestCase
TestManagerAgainstReferenceOnPostgres = pytest.mark.usefixtures("postgres_server")(
    PostgresManagerMachine.TestCase
)
