"""Cancellation: a call cut short at any await point leaves the database whole and the
session in memory as the database would rebuild it; nothing is stored twice or lost."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np

import tiermem
from tests.conftest import SHAPE
from tests.fakes import HashingEmbedder
from tiermem import Message

CONFIG = tiermem.KVCacheConfig(
    kv_shape=SHAPE,
    context_window_tokens=4096,
    summary_mode="inline",
    clear_after_conversations=3,  # a clear every third turn
    snapshot_strategy={"kind": "full"},
)


class ThreadedEmbedder(HashingEmbedder):
    """Embeds in a worker thread, as the real one does: more await points to cut."""

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        await anyio.lowlevel.checkpoint()
        return await anyio.to_thread.run_sync(self.vectors, list(texts))


def turn_messages(i: int) -> list[Message]:
    return [
        Message("user", f"what did we plan for day {i} of the trip?", id=f"u{i}"),
        Message("assistant", f"Day {i}: museum {i} then dinner at {18 + i % 4}:00.", id=f"a{i}"),
    ]


async def assert_consistent(mgr: tiermem.KVCacheManager, open_manager: Callable[..., Any]) -> None:
    counts = await mgr._store.counts()
    assert counts["messages"] == counts["messages_fts"]
    assert counts["messages"] == counts["message_embeddings"] == counts["message_index"]
    rows = await mgr._store._read_all(
        "SELECT s.entry_count, (SELECT COUNT(*) FROM kv_snapshot_entries e"
        " WHERE e.snapshot_id = s.id) FROM kv_snapshots s"
    )
    assert all(declared == present for declared, present in rows)  # no half snapshot
    if await mgr.get_session_state("s") is None:
        return
    # the session in memory is what the database rebuilds
    async with await open_manager(config=CONFIG, embedder=HashingEmbedder()) as fresh:
        for view in ("get_session_state", "get_active_cache"):
            mine, theirs = [await getattr(m, view)("s") for m in (mgr, fresh)]
            if view == "get_session_state":
                mine = mine.__class__(**{**vars_of(mine), "last_activity": None})
                theirs = theirs.__class__(**{**vars_of(theirs), "last_activity": None})
            else:
                mine = [e.message_id for e in mine]
                theirs = [e.message_id for e in theirs]
            assert mine == theirs, view


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


async def test_cancelled_turns_and_retrievals_leave_everything_consistent(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    sent: list[Message] = []
    cut = 0
    async with await open_manager(config=CONFIG, embedder=ThreadedEmbedder()) as mgr:
        await mgr.process_conversation("s", [Message("system", "You plan trips.", id="sys")])
        sent.append(Message("system", "You plan trips.", id="sys"))
        for attempt in range(60):
            delay = (attempt % 20) * 0.0004
            sent += turn_messages(attempt)
            with anyio.move_on_after(delay) as scope:
                await mgr.process_conversation("s", sent)  # the whole conversation so far
            cut += scope.cancelled_caught
            with anyio.move_on_after(delay / 2):
                await mgr.retrieve_context("s", f"what about museum {attempt}?")
            await assert_consistent(mgr, open_manager)
        assert cut >= 20  # calls were really cut, at many points
        await mgr.process_conversation("s", sent)
        history = await mgr.get_conversation_history("s")
        assert [m.id for m in history] == [m.id for m in sent]  # each once, in order
        await assert_consistent(mgr, open_manager)
