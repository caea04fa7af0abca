"""Cancellation: a call cut short at any await point leaves the database whole and the
session in memory as the database would rebuild it; nothing is stored twice or lost.

Each test cuts at a known point, as httpcore's cancellation tests do, never at a guessed
moment: a fake through the model protocols (token counter, embedder, summarizer) signals
`reached` and waits until released, and the test cancels the caller's scope right there.
A write is caught in the act as another process would catch it: the test's own connection
holds the file's write lock, so the manager's write waits in SQLite while it is cancelled.
The turn's retrieval is cut at its first await, right after the clear's telemetry event."""

import dataclasses
import functools
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.from_thread
import numpy as np
import pysqlite3.dbapi2 as sqlite3
import pytest

import tiermem
from tests import rawfile
from tests.conftest import SHAPE
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter
from tiermem import Message, SummaryText, TranscriptLine

CLEAR_AFTER = 3  # a clear every third turn
CONFIG = tiermem.KVCacheConfig(
    kv_shape=SHAPE,
    context_window_tokens=4096,
    summary_mode="inline",
    clear_after_conversations=CLEAR_AFTER,
    snapshot_strategy={"kind": "full"},
)
TURNS = 6
DEADLINE = 30  # seconds: a point never reached fails the test here, not at the suite's timeout


# -- points that block until released ---------------------------------------------------


class Gate:
    """Armed, the next call to pass stops here: `reached` is set and the call waits until
    `release()`. Unarmed, calls pass straight through."""

    def __init__(self) -> None:
        self._armed = False
        self.reached = anyio.Event()
        self._open = anyio.Event()

    def arm(self) -> None:
        self._armed, self.reached, self._open = True, anyio.Event(), anyio.Event()

    def release(self) -> None:
        self._open.set()

    async def pass_through(self) -> None:
        if self._armed:
            self._armed = False
            self.reached.set()
            await self._open.wait()


class ThreadGate(Gate):
    """A gate for a blocking call that the library runs in a worker thread."""

    def arm(self) -> None:
        super().arm()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def pass_in_thread(self) -> None:
        if self._armed:
            self._armed = False
            # raises RuntimeError if the library called the blocking counter on the loop
            anyio.from_thread.run_sync(self.reached.set)
            self._released.wait(DEADLINE)


class GatedCounter(WordCounter):
    def __init__(self) -> None:
        self.gate = ThreadGate()

    def count(self, texts: list[str]) -> list[int]:
        self.gate.pass_in_thread()
        return super().count(texts)


class GatedEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        await self.gate.pass_through()
        return await super().embed(texts)


class GatedSummarizer(RecordingSummarizer):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    async def summarize(
        self, prior: str | None, transcript: Sequence[TranscriptLine]
    ) -> SummaryText:
        await self.gate.pass_through()
        return await super().summarize(prior, transcript)


class SignallingTelemetry:
    """Armed with an event type, sets `reached` when the manager emits one."""

    def __init__(self) -> None:
        self.kind: type | None = None
        self.reached = anyio.Event()

    def arm(self, kind: type) -> None:
        self.kind, self.reached = kind, anyio.Event()

    def emit(self, event: tiermem.TelemetryEvent) -> None:
        if self.kind is not None and isinstance(event, self.kind):
            self.kind = None
            self.reached.set()


class Point(Protocol):
    def arm(self) -> None: ...

    async def reached(self) -> None: ...

    def release(self) -> None: ...


class AtGate:
    """Cut while a model call is in progress."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def arm(self) -> None:
        self.gate.arm()

    async def reached(self) -> None:
        await self.gate.reached.wait()

    def release(self) -> None:
        self.gate.release()


class AfterEvent:
    """Cut at the first await after the manager emits an event of `kind`: the test's task
    runs only once the call is suspended there (the clear's event is the clear's last step
    before the turn's retrieval)."""

    def __init__(self, telemetry: SignallingTelemetry, kind: type) -> None:
        self.telemetry = telemetry
        self.kind = kind

    def arm(self) -> None:
        self.telemetry.arm(self.kind)

    async def reached(self) -> None:
        await self.telemetry.reached.wait()

    def release(self) -> None:
        pass


class InWrite:
    """Cut in the write that follows `after` (a gated model call): once the call is held
    there, the tests' connection takes the file's write lock, lets the call go on, and waits
    until every task is blocked, the manager's on the write that waits for the lock."""

    def __init__(self, after: Gate, db_path: Path) -> None:
        self.after = after
        self.db_path = db_path
        self.holder: Any = None

    def arm(self) -> None:
        self.after.arm()

    async def reached(self) -> None:
        await self.after.reached.wait()
        self.holder = sqlite3.connect(str(self.db_path), timeout=DEADLINE, isolation_level=None)
        self.holder.execute("BEGIN IMMEDIATE")
        self.after.release()
        await anyio.wait_all_tasks_blocked()

    def release(self) -> None:
        self.after.release()
        if self.holder is not None:
            self.holder.execute("ROLLBACK")
            self.holder.close()
            self.holder = None


async def cut(point: Point, call: Callable[[], Awaitable[object]]) -> bool:
    """Run `call` until it reaches `point`, cancel it there, release the point; True if
    the call ended cancelled."""
    scope = anyio.CancelScope()

    async def run() -> None:
        with scope:
            await call()

    point.arm()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            with anyio.fail_after(DEADLINE):
                await point.reached()
            scope.cancel()
        finally:
            point.release()
    return scope.cancelled_caught


# -- the conversation and its checks ---------------------------------------------------

SYSTEM = Message("system", "You plan trips.", id="sys")


def turn_messages(i: int) -> list[Message]:
    return [
        Message("user", f"what did we plan for day {i} of the trip?", id=f"u{i}"),
        Message("assistant", f"Day {i}: museum {i} then dinner at {18 + i % 4}:00.", id=f"a{i}"),
    ]


async def history_ids(mgr: tiermem.KVCacheManager) -> list[str]:
    return [m.id for m in await mgr.get_conversation_history("s")]


async def assert_consistent(
    mgr: tiermem.KVCacheManager, open_manager: Callable[..., Any], db_path: Path
) -> None:
    """The file is whole, and what `mgr` holds of the session in memory is what a manager
    opened afresh on the file sees."""
    rawfile.assert_whole(db_path)
    mine = await mgr.get_session_state("s")
    if mine is None:
        return
    async with await open_manager(
        config=mgr.config,
        embedder=HashingEmbedder(),
        summarizer=RecordingSummarizer(),
        tokenizer=WordCounter(),
    ) as fresh:
        theirs = await fresh.get_session_state("s")
        assert theirs is not None
        assert dataclasses.replace(mine, last_activity=None) == dataclasses.replace(
            theirs, last_activity=None
        )
        mine_active = [e.message_id for e in await mgr.get_active_cache("s")]
        assert mine_active == [e.message_id for e in await fresh.get_active_cache("s")]
        assert await mgr.get_summary("s") == await fresh.get_summary("s")
        assert await history_ids(mgr) == await history_ids(fresh)


@dataclasses.dataclass
class Fakes:
    counter: GatedCounter = dataclasses.field(default_factory=GatedCounter)
    embedder: GatedEmbedder = dataclasses.field(default_factory=GatedEmbedder)
    summarizer: GatedSummarizer = dataclasses.field(default_factory=GatedSummarizer)
    telemetry: SignallingTelemetry = dataclasses.field(default_factory=SignallingTelemetry)


@dataclasses.dataclass(frozen=True)
class Case:
    point: Callable[[Fakes, Path], Point]
    config: tiermem.KVCacheConfig = CONFIG
    call: str = "turn"  # the call cut: a turn, or a retrieval after the turn
    before_write: bool = False  # the point comes before anything of the turn is written
    clearing_only: bool = False  # only a turn that clears reaches the point


CASES = {
    "token-count": Case(lambda f, _: AtGate(f.counter.gate), before_write=True),
    "embedding": Case(lambda f, _: AtGate(f.embedder.gate), before_write=True),
    "turn-write": Case(lambda f, db: InWrite(f.embedder.gate, db)),
    "summary": Case(lambda f, _: AtGate(f.summarizer.gate), clearing_only=True),
    "summary-write": Case(lambda f, db: InWrite(f.summarizer.gate, db), clearing_only=True),
    "turn-retrieval": Case(
        lambda f, _: AfterEvent(f.telemetry, tiermem.ClearEvent), clearing_only=True
    ),
    "retrieve-context": Case(lambda f, _: AtGate(f.embedder.gate), call="retrieval"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_call_cut_at_each_await_point_leaves_everything_consistent(
    name: str, open_manager: Callable[..., Any], db_path: Path
) -> None:
    case = CASES[name]
    fakes = Fakes()
    point = case.point(fakes, db_path)
    sent = [SYSTEM]
    cuts = 0
    async with await open_manager(
        config=case.config,
        embedder=fakes.embedder,
        summarizer=fakes.summarizer,
        tokenizer=fakes.counter,
        telemetry=fakes.telemetry,
    ) as mgr:
        await mgr.process_conversation("s", sent)
        for i in range(TURNS):
            sent += turn_messages(i)
            state = await mgr.get_session_state("s")
            assert state is not None
            clearing = state.conversation_count + 1 >= CLEAR_AFTER
            new = [m.id for m in turn_messages(i)]
            call: Callable[[], Awaitable[object]]
            if case.call == "retrieval":
                await mgr.process_conversation("s", sent)
                new = []
                call = functools.partial(mgr.retrieve_context, "s", f"what about museum {i}?")
            else:
                call = functools.partial(mgr.process_conversation, "s", list(sent))
            if case.clearing_only and not clearing:
                await call()
                continue
            before = await history_ids(mgr)
            assert await cut(point, call), "the call ended before it was cancelled"
            cuts += 1
            after = await history_ids(mgr)
            # the turn's messages are stored all together or not at all
            assert after in (before, before + new)
            if case.before_write:
                assert after == before
            await assert_consistent(mgr, open_manager, db_path)

            # the client sends the conversation again: each message is stored once
            await mgr.process_conversation("s", sent)
            assert await history_ids(mgr) == [m.id for m in sent]
            await assert_consistent(mgr, open_manager, db_path)
        state = await mgr.get_session_state("s")
        assert state is not None and state.clear_count >= 2
    assert cuts >= 2 if case.clearing_only else cuts == TURNS


async def test_a_turn_cut_while_queued_behind_another_on_the_session_changes_nothing(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    """A turn waiting for the session's lock (another turn of the session is storing) is
    cut; the other goes on, and the cut one, sent again, is stored after it."""
    fakes = Fakes()
    async with await open_manager(
        config=CONFIG, embedder=fakes.embedder, summarizer=fakes.summarizer
    ) as mgr:
        await mgr.process_conversation("s", [SYSTEM])
        first, second = turn_messages(0), turn_messages(1)
        queued = anyio.CancelScope()

        async def send_second() -> None:
            with queued:
                await mgr.process_conversation("s", second)

        fakes.embedder.gate.arm()
        async with anyio.create_task_group() as tg:
            tg.start_soon(mgr.process_conversation, "s", first)
            with anyio.fail_after(DEADLINE):
                await fakes.embedder.gate.reached.wait()
            tg.start_soon(send_second)
            await anyio.wait_all_tasks_blocked()  # the second waits for the session
            queued.cancel()
            await anyio.wait_all_tasks_blocked()
            assert queued.cancelled_caught  # cut before the first turn was let go
            fakes.embedder.gate.release()
        assert await history_ids(mgr) == ["sys", "u0", "a0"]
        await assert_consistent(mgr, open_manager, db_path)
        await mgr.process_conversation("s", second)
        assert await history_ids(mgr) == ["sys", "u0", "a0", "u1", "a1"]
        await assert_consistent(mgr, open_manager, db_path)
