"""Safe to embed: a deleted tenant's background work never lands elsewhere, aclose waits for
calls in flight and loses nothing, and every failure of input or of a part is a
TierMemError with the file holding exactly what was acknowledged."""

import math
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pysqlite3.dbapi2 as sqlite3
import pytest

import tiermem
from tests import rawfile
from tests.conftest import SHAPE
from tests.fakes import GatedSummarizer, HashingEmbedder, RecordingSummarizer, WordCounter
from tiermem import Message


class GatedEmbedder(HashingEmbedder):
    """Embeds once `gate` is set; `entered` is set when a call starts waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.entered = anyio.Event()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.entered.set()
        await self.gate.wait()
        return await super().embed(texts)


class FailingEmbedder(HashingEmbedder):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error: Exception | None = error

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return await super().embed(texts)


class FailingCounter(WordCounter):
    def __init__(self) -> None:
        self.fail = True

    def count(self, texts: list[str]) -> list[int]:
        if self.fail:
            raise RuntimeError("tokenizer crashed")
        return super().count(texts)


class RaisingSummarizer(RecordingSummarizer):
    """Raises a plain TimeoutError, not a TierMemError: a summarizer of the host's."""

    async def summarize(self, prior: str | None, transcript: Sequence[Any]) -> Any:
        raise TimeoutError("the host's LLM timed out")


def config(**changes: Any) -> tiermem.KVCacheConfig:
    base: dict[str, Any] = {
        "kv_shape": SHAPE,
        "context_window_tokens": 4096,
        "summary_mode": "inline",
    }
    return tiermem.KVCacheConfig(**{**base, **changes})


async def stored_ids(open_manager: Callable[..., Any], sid: str, **kw: Any) -> list[str]:
    async with await open_manager(config=config()) as mgr:
        try:
            return [m.id for m in await mgr.get_conversation_history(sid, **kw)]
        except tiermem.NotFoundError:
            return []


# -- isolation -------------------------------------------------------------------------


async def test_a_deleted_tenants_summary_never_lands_in_another_session(
    open_manager: Callable[..., Any],
) -> None:
    summarizer = GatedSummarizer()
    mgr = await open_manager(
        config=config(summary_mode="background", clear_after_conversations=3),
        summarizer=summarizer,
    )
    async with mgr:
        for i in range(3):
            await mgr.process_conversation(
                "alice",
                [
                    Message("user", f"my PIN is 4417 and note {i}", id=f"u{i}"),
                    Message("assistant", f"noted {i}", id=f"a{i}"),
                ],
                namespace="tenant-a",
            )
        await summarizer.entered.wait()  # alice's summary is being written
        assert await mgr.delete_session("alice", namespace="tenant-a")
        bob = await mgr.process_conversation(
            "bob", [Message("user", "hello, I like kites")], namespace="tenant-b"
        )
        summarizer.gate.set()
        assert await mgr.wait_for_summaries(10)
        assert await mgr.get_summary("bob", namespace="tenant-b") is None
        later = await mgr.process_conversation(
            "bob", [Message("user", "what do I like?")], namespace="tenant-b"
        )
        for text in [*bob.bridge_messages, *later.bridge_messages]:
            assert "4417" not in text
        hits = await mgr.retrieve_context("bob", "PIN", namespace="tenant-b")
        assert all("4417" not in h.text for h in hits.entries)
        assert (await mgr.status()).models["summaries_pending"] == 0


async def test_a_summarizer_raising_anything_never_wedges_a_session(
    open_manager: Callable[..., Any],
) -> None:
    async with await open_manager(
        config=config(clear_after_conversations=2), summarizer=RaisingSummarizer()
    ) as mgr:
        results = [
            await mgr.process_conversation(
                "s",
                [Message("user", f"fact {i}: the gate code is {i}{i}"), Message("assistant", "ok")],
            )
            for i in range(6)
        ]
    clears = [r.clear_result for r in results if r.clear_result is not None]
    assert len(clears) == 3
    assert all(c.summary_error and "timed out" in c.summary_error for c in clears)
    assert all(c.bridge_message.startswith("[Cache Management]") for c in clears)


# -- lifecycle -------------------------------------------------------------------------


async def test_aclose_waits_for_a_turn_in_flight(open_manager: Callable[..., Any]) -> None:
    embedder = GatedEmbedder()
    embedder.gate.set()
    mgr = await open_manager(embedder=embedder)
    await mgr.process_conversation("s", [Message("user", "first", id="m0")])
    embedder.gate = anyio.Event()
    result: list[tiermem.CacheProcessingResult] = []

    async def turn() -> None:
        result.append(await mgr.process_conversation("s", [Message("user", "second", id="m1")]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(turn)
        await embedder.entered.wait()
        tg.start_soon(mgr.aclose)
        await anyio.wait_all_tasks_blocked()  # aclose waits for the turn
        with pytest.raises(tiermem.ManagerClosedError):  # closing: no new call
            await mgr.get_session_state("s")
        embedder.gate.set()  # the turn in flight finishes, then aclose goes on
    assert result and result[0].stored_message_ids == ["m1"]
    assert await stored_ids(open_manager, "s") == ["m0", "m1"]


async def test_aclose_cancels_a_stuck_turn_and_loses_nothing(
    open_manager: Callable[..., Any],
) -> None:
    embedder = GatedEmbedder()
    embedder.gate.set()
    mgr = await open_manager(config=config(close_wait_seconds=0.1), embedder=embedder)
    for i in range(2):
        await mgr.process_conversation("s", [Message("user", f"note {i}", id=f"m{i}")])
    embedder.gate = anyio.Event()  # the next embedding never returns
    failure: list[BaseException] = []

    async def turn() -> None:
        try:
            await mgr.process_conversation("s", [Message("user", "note 2", id="m2")])
        except tiermem.TierMemError as exc:
            failure.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(turn)
        await embedder.entered.wait()
        await mgr.aclose()
    assert failure and isinstance(failure[0], tiermem.ManagerClosedError)
    async with await open_manager(config=config()) as again:
        state = await again.get_session_state("s")
        assert state is not None and state.message_count == 2
        assert [m.id for m in await again.get_conversation_history("s")] == ["m0", "m1"]
        # the client sends the unacknowledged message again: it is stored now
        resent = await again.process_conversation("s", [Message("user", "note 2", id="m2")])
        assert resent.stored_message_ids == ["m2"]
    assert await stored_ids(open_manager, "s") == ["m0", "m1", "m2"]


# -- one error contract ----------------------------------------------------------------

CIRCULAR: dict[str, Any] = {}
CIRCULAR["self"] = CIRCULAR

BAD_MESSAGES = {
    "created_at as a string": {"role": "user", "content": "x", "created_at": "2024-01-01"},
    "created_at as an int": {"role": "user", "content": "x", "created_at": 1_700_000_000},
    "created_at as a date": {"role": "user", "content": "x", "created_at": date(2024, 1, 1)},
    "metadata as a string": {"role": "user", "content": "x", "metadata": "tag"},
    "metadata as a list": {"role": "user", "content": "x", "metadata": [1, 2]},
    "circular metadata": {"role": "user", "content": "x", "metadata": CIRCULAR},
    "metadata with int keys": {"role": "user", "content": "x", "metadata": {1: "a"}},
    "huge metadata": {"role": "user", "content": "x", "metadata": {"k": "v" * 200_000}},
    "surrogate id": {"role": "user", "content": "x", "id": "\udc00"},
    "huge id": {"role": "user", "content": "x", "id": "i" * 100_000},
    "NUL in id": {"role": "user", "content": "x", "id": "a\x00b"},
    "role as a list": {"role": ["user"], "content": "x"},
    "content as bytes": {"role": "user", "content": b"x"},
    "surrogate content": {"role": "user", "content": "\ud800"},
}


@pytest.mark.parametrize("message", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
async def test_a_bad_message_is_invalid_input_and_stores_nothing(
    manager: tiermem.KVCacheManager, message: dict[str, Any]
) -> None:
    await manager.process_conversation("s", [Message("user", "kept", id="k")])
    with pytest.raises(tiermem.InvalidInputError):
        await manager.process_conversation("s", [message])
    with pytest.raises(tiermem.InvalidInputError):
        await manager.ingest("s", [message])
    assert [m.id for m in await manager.get_conversation_history("s")] == ["k"]
    assert [s.session_id for s in await manager.list_sessions()] == ["s"]


@pytest.mark.parametrize("name", ["\ud800", "a\x00b", "", "x" * 600, 7, None])
async def test_bad_session_ids_and_namespaces_are_invalid_input(
    manager: tiermem.KVCacheManager, name: Any
) -> None:
    msg = [Message("user", "hi")]
    with pytest.raises(tiermem.InvalidInputError):
        await manager.process_conversation(name, msg)
    with pytest.raises(tiermem.InvalidInputError):
        await manager.process_conversation("s", msg, namespace=name)
    with pytest.raises(tiermem.InvalidInputError):
        await manager.retrieve_context(name, "q")
    assert await manager.list_sessions() == []


@pytest.mark.parametrize(
    "when",
    [
        datetime.min,
        datetime.max,
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
async def test_dates_at_the_ends_of_the_calendar_are_stored_and_read_back(
    manager: tiermem.KVCacheManager, when: datetime
) -> None:
    await manager.process_conversation("s", [Message("user", "an old note", created_at=when)])
    await manager.process_conversation("s", [Message("user", "what did I note last week?")])
    [stored, _] = await manager.get_conversation_history("s")
    assert stored.created_at.year == when.year
    hits = await manager.retrieve_context("s", "what did I say 3 days ago about the note?")
    assert all(h.created_at.tzinfo is not None for h in hits.entries)


async def test_bad_arguments_are_typed_errors(manager: tiermem.KVCacheManager) -> None:
    await manager.process_conversation("s", [Message("user", "hello there")])
    for limit in (1.5, 0, -1, True, "3", 10**9):
        with pytest.raises(tiermem.InvalidInputError):
            await manager.retrieve_context("s", "hello", limit=limit)  # type: ignore[arg-type]
    for snapshot in (2**70, -1, 0):
        with pytest.raises(tiermem.NotFoundError):
            await manager.restore_from_snapshot("s", snapshot)
    with pytest.raises(tiermem.InvalidInputError):
        await manager.restore_from_snapshot("s", "1")  # type: ignore[arg-type]
    for interval in (math.nan, math.inf, -1.0, 0, "5"):
        with pytest.raises(tiermem.InvalidInputError):
            await manager.run_maintenance(interval)  # type: ignore[arg-type]
    with pytest.raises(tiermem.InvalidInputError):
        await manager.retrieve_context("s", b"hello")  # type: ignore[arg-type]
    with pytest.raises(tiermem.InvalidInputError):
        await manager.ingest("s", [Message("user", "x")], batch_size=0)
    with pytest.raises(tiermem.InvalidInputError):
        await manager.clear_cache("s", "NoSuchReason")


async def test_a_nul_in_the_path_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(tiermem.StorageError):
        await tiermem.KVCacheManager.open(
            str(tmp_path / "a\x00b.db"),
            config(),
            embedder=HashingEmbedder(),
            summarizer=RecordingSummarizer(),
            tokenizer=WordCounter(),
        )


# -- failures of the parts -------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [tiermem.ModelError("embedder down"), RuntimeError("boom"), ValueError("bad")]
)
async def test_an_embedder_failure_is_a_tiermem_error_and_stores_nothing(
    open_manager: Callable[..., Any], error: Exception
) -> None:
    embedder = FailingEmbedder(error)
    embedder.error = None
    async with await open_manager(embedder=embedder) as mgr:
        await mgr.process_conversation("s", [Message("user", "kept", id="k")])
        embedder.error = error
        with pytest.raises(tiermem.TierMemError):
            await mgr.process_conversation("s", [Message("user", "lost?", id="l")])
        with pytest.raises(tiermem.TierMemError):
            await mgr.process_conversation("new", [Message("user", "first", id="f")])
        with pytest.raises(tiermem.TierMemError):
            await mgr.retrieve_context("s", "kept")
        with pytest.raises(tiermem.TierMemError):
            await mgr.ingest("s", [Message("user", "bulk", id="b")])
        # a session whose first call failed is not left behind, empty
        assert [s.session_id for s in await mgr.list_sessions()] == ["s"]
        embedder.error = None
        resent = await mgr.process_conversation("s", [Message("user", "lost?", id="l")])
        assert resent.stored_message_ids == ["l"]
    assert await stored_ids(open_manager, "s") == ["k", "l"]


async def test_a_token_counter_failure_is_a_tiermem_error(
    open_manager: Callable[..., Any],
) -> None:
    counter = FailingCounter()
    async with await open_manager(tokenizer=counter) as mgr:
        with pytest.raises(tiermem.TierMemError):
            await mgr.process_conversation("s", [Message("user", "hello", id="h")])
        counter.fail = False
        await mgr.process_conversation("s", [Message("user", "hello", id="h")])
    assert await stored_ids(open_manager, "s") == ["h"]


async def test_a_failing_telemetry_sink_never_fails_a_call(
    open_manager: Callable[..., Any],
) -> None:
    class Broken:
        def emit(self, event: tiermem.TelemetryEvent) -> None:
            raise RuntimeError("sink down")

    async with await open_manager(
        config=config(clear_after_conversations=2), telemetry=Broken()
    ) as mgr:
        for i in range(4):
            await mgr.process_conversation("s", [Message("user", f"what about {i}?", id=f"m{i}")])
        assert (await mgr.perform_maintenance()).errors == []
    assert await stored_ids(open_manager, "s") == ["m0", "m1", "m2", "m3"]


async def test_a_full_disk_is_a_storage_error_and_loses_nothing_acknowledged(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    acked: list[str] = []
    async with await open_manager() as mgr:
        await mgr.process_conversation("s", [Message("user", "first", id="m0")])
        acked.append("m0")
        # the files may grow by 512 KiB (a few turns), no more, as on a disk about to fill
        with rawfile.full_disk(db_path, room=512 * 1024), pytest.raises(tiermem.StorageError):
            for i in range(1, 200):
                await mgr.process_conversation("s", [Message("user", "x " * 2000, id=f"m{i}")])
                acked.append(f"m{i}")
        assert 2 < len(acked) < 200  # some turns fit, then the disk was full
    stored = await stored_ids(open_manager, "s")
    assert stored == acked


async def test_a_locked_database_is_a_storage_error(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    async with await open_manager(config=config(busy_timeout_ms=50)) as mgr:
        await mgr.process_conversation("s", [Message("user", "first", id="m0")])
        other = sqlite3.connect(str(db_path), timeout=0)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(tiermem.StorageError):
                await mgr.process_conversation("s", [Message("user", "second", id="m1")])
            # reads go on beside the writer
            state = await mgr.get_session_state("s")
            assert state is not None and state.message_count == 1
        finally:
            other.rollback()
            other.close()
        await mgr.process_conversation("s", [Message("user", "second", id="m1")])
    assert await stored_ids(open_manager, "s") == ["m0", "m1"]


async def test_a_closed_manager_refuses_every_call(manager: tiermem.KVCacheManager) -> None:
    await manager.aclose()
    calls = [
        manager.process_conversation("s", [Message("user", "x")]),
        manager.retrieve_context("s", "x"),
        manager.get_session_state("s"),
        manager.list_sessions(),
        manager.status(),
        manager.perform_maintenance(),
        manager.delete_session("s"),
    ]
    for call in calls:
        with pytest.raises(tiermem.ManagerClosedError):
            await call


async def test_a_read_only_database_still_serves_reads(
    open_manager: Callable[..., Any],
) -> None:
    async with await open_manager() as mgr:
        await mgr.process_conversation("s", [Message("user", "the harbour is north", id="m0")])
    async with await open_manager(config=config(read_only=True)) as mgr:
        assert [s.session_id for s in await mgr.list_sessions()] == ["s"]
        assert (await mgr.retrieve_context("s", "where is the harbour?")).entries
        state = await mgr.get_session_state("s")
        assert state is not None and state.message_count == 1
        assert [m.id for m in await mgr.get_conversation_history("s")] == ["m0"]
        assert (await mgr.storage_status())["messages"] == 1
        await mgr.storage_status()
        with pytest.raises(tiermem.StorageError):
            await mgr.process_conversation("s", [Message("user", "more", id="m1")])
        with pytest.raises(tiermem.StorageError):
            await mgr.delete_session("s")
    assert await stored_ids(open_manager, "s") == ["m0"]


async def test_another_programs_database_is_refused_untouched(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    other = sqlite3.connect(str(db_path))
    other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    other.commit()
    other.close()
    before = await anyio.Path(db_path).read_bytes()
    with pytest.raises(tiermem.StorageError, match="not a tiermem database"):
        await open_manager()
    assert await anyio.Path(db_path).read_bytes() == before
