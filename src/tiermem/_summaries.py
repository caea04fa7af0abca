"""Keeping each session's cumulative summary up to date: what an update covers, and when.

A summary covers the session's messages up to `covered_through`. An update feeds the
summarizer the prior summary and every message since, up to the last clear. It runs either
inline (the clearing turn waits for it) or in the background (the turn returns at once;
the summary is stored, and used by later turns, when it is ready). Updates of one session
run one at a time, in order, and each takes in everything not yet covered up to the last
clear when it starts, so one that fails or is cancelled is made up by the next, and
updates queued behind a slow one collapse into one. A span left uncovered at shutdown is pending
in the database itself (the summary covers fewer messages than were cleared): it is
summarized when the session is next loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ._errors import TierMemError
from ._locks import KeyedLocks
from ._store import Store, SummaryRow
from ._summarizer import Summarizer, TranscriptLine
from ._telemetry import SummaryEvent, Telemetry

if TYPE_CHECKING:
    from ._sessions import Ident, Session

log = logging.getLogger("tiermem._summaries")

# fewer new messages than this are not worth a summary yet
MIN_SUMMARY_MESSAGES = 4
# an update reads at most this many of the newest uncovered messages (a backlog of 16 clears
# at the default 16 turns; older ones of a bigger backlog, say an ingested history, are
# left to the history, tier 3)
SUMMARY_MAX_MESSAGES = 512


@dataclass(frozen=True, slots=True)
class SummaryOutcome:
    """An update's result: the new summary, or why there is none (both None: nothing new),
    with the summarizer's time and the number of messages it was given."""

    summary: SummaryRow | None
    error: str | None = None
    duration_ms: float = 0.0
    messages: int = 0


class SummaryKeeper:
    """Runs summary updates for every session of a manager, inline or in the background,
    and hands each new summary to the session it was written for (if it is in memory)."""

    def __init__(
        self,
        store: Store,
        summarizer: Summarizer | None,
        clock: Callable[[], float],
        telemetry: Telemetry,
        find: Callable[[Ident], Session | None],
    ) -> None:
        self._store = store
        self._summarizer = summarizer
        self._clock = clock
        self._telemetry = telemetry
        self._find = find  # the session in memory now, by (namespace, session id)
        self._locks = KeyedLocks[int]()
        self._jobs: dict[int, _Job] = {}

    @property
    def enabled(self) -> bool:
        return self._summarizer is not None

    def catch_up(self, session: Session) -> bool:
        """Start a background update if the session's clears are not all summarized yet
        (after a clear, or at load: a span left pending at shutdown). True if one was."""
        summary, state = session.summary, session.state
        if self._summarizer is None or state.clear_count <= (summary.clear_count if summary else 0):
            return False
        if not self.due(summary.covered_through if summary else -1, state.cleared_through):
            return False
        key, ident = session.key, session.ident
        self.schedule(key, lambda outcome: self.landed(key, ident, outcome))
        return True

    async def update_now(self, session: Session, through: int, clear_count: int) -> SummaryOutcome:
        """An inline update up to `through`: the clearing turn waits for it."""
        if self._summarizer is None:
            return SummaryOutcome(None, "no summarizer configured")
        outcome = await self.update(session.key, through, clear_count)
        self.landed(session.key, session.ident, outcome)
        return outcome

    def landed(self, key: int, ident: Ident, outcome: SummaryOutcome) -> None:
        """Report an update, and hand its summary to the session in memory if it is the
        one the summary was written for (keys are never reused)."""
        new = outcome.summary
        if new is None and outcome.error is None:
            return  # nothing was due
        self._telemetry.emit(
            SummaryEvent(
                ident[1],
                ident[0],
                outcome.duration_ms,
                new.token_count if new else 0,
                outcome.messages,
                outcome.error,
            )
        )
        holder = self._find(ident)
        if (
            new is not None
            and holder is not None
            and holder.key == key
            and (holder.summary is None or holder.summary.covered_through < new.covered_through)
        ):
            holder.summary = new

    @property
    def pending(self) -> int:
        """Sessions with a background update scheduled or running."""
        return len(self._jobs)

    def due(self, covered_through: int, through: int) -> bool:
        return through - covered_through >= MIN_SUMMARY_MESSAGES

    async def update(
        self, key: int, through: int | None = None, clear_count: int | None = None
    ) -> SummaryOutcome:
        """Bring the session's summary up to message position `through` (which `clear_count`
        clears reach), and store it. Unset, both are read when the update starts: a
        session's last clear then, so updates queued behind a slow one have nothing left.
        """
        async with self._locks.hold(key):
            if through is None or clear_count is None:
                state = await self._store.load_state(key)
                through, clear_count = state.cleared_through, state.clear_count
            prior = await self._store.summary(key)
            covered = prior.covered_through if prior else -1
            if not self.due(covered, through):
                return SummaryOutcome(None)
            rows = await self._store.messages_between(
                key, max(covered, through - SUMMARY_MAX_MESSAGES), through
            )
            # the system prompt is preserved through every clear; it needs no summarizing
            lines = [
                TranscriptLine(r.role, r.content)
                for r in rows
                if r.content.strip() and r.role != "system"
            ]
            started = time.perf_counter()
            assert self._summarizer is not None
            try:
                result = await self._summarizer.summarize(prior.text if prior else None, lines)
            except Exception as exc:  # any failure of the summarizer is the summary's only
                reason = str(exc) if isinstance(exc, TierMemError) else repr(exc)
                return SummaryOutcome(None, reason, _ms_since(started), len(lines))
            row = SummaryRow(
                text=result.text,
                token_count=result.token_count,
                message_count=(prior.message_count if prior else 0) + through - covered,
                clear_count=clear_count,
                covered_through=through,
                updated_at=self._clock(),
            )
            if not await self._store.save_summary(key, row):
                # deleted meanwhile, or another process summarized this clear first
                return SummaryOutcome(await self._store.summary(key))
            return SummaryOutcome(row, None, _ms_since(started), len(lines))

    def schedule(self, key: int, done: Callable[[SummaryOutcome], None]) -> None:
        """Bring the session's summary up to its last clear in the background; `done` gets
        each outcome (on the event loop). At most one update per session is pending: a
        clear while one runs makes it go once more when it ends (reading the state then)."""
        job = self._jobs.get(key)
        if job is not None:
            job.again = True
            return
        job = self._jobs[key] = _Job(anyio.CancelScope())
        job.task = asyncio.get_running_loop().create_task(
            self._background(key, job, done), name=f"tiermem-summary-{key}"
        )

    async def cancel(self, key: int) -> None:
        """Cancel the session's background update, and wait until it has stopped."""
        job = self._jobs.get(key)
        if job is not None and job.task is not None:
            job.scope.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({job.task})

    async def _background(
        self, key: int, job: _Job, done: Callable[[SummaryOutcome], None]
    ) -> None:
        # cancelled through anyio (see `aclose`), not `Task.cancel()`: anyio's cancellation
        # waits for a model call running in a worker thread to return, while a native one
        # would leave it running on a model about to be closed
        try:
            while True:
                job.again = False
                try:
                    with job.scope:
                        outcome = await self.update(key)
                except TierMemError as exc:
                    outcome = SummaryOutcome(None, str(exc))
                except Exception:
                    log.exception("background summary of session %s failed", key)
                    return
                if job.scope.cancel_called:  # deleted or shutting down: the span stays pending
                    return
                if outcome.error:
                    log.warning("summary of session %s failed: %s", key, outcome.error)
                done(outcome)
                if not job.again:
                    return
        finally:
            del self._jobs[key]

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until no background update is left; False if `timeout` passed first."""
        with anyio.move_on_after(timeout):
            while self._jobs:
                await asyncio.wait({j.task for j in self._jobs.values() if j.task is not None})
        return not self._jobs

    async def aclose(self, wait_seconds: float, stop: Callable[[], None]) -> int:
        """Wait up to `wait_seconds` for background updates, then `stop` the model and cancel
        the rest (their spans stay pending); returns how many were cancelled."""
        left: set[asyncio.Task[None]] = set()
        with anyio.CancelScope(shield=True):
            if not await self.wait(wait_seconds):
                stop()
                jobs = list(self._jobs.values())
                left = {j.task for j in jobs if j.task is not None}
                for job in jobs:
                    job.scope.cancel()
                await asyncio.wait(left)
        return len(left)


@dataclass(slots=True, eq=False)
class _Job:
    """A session's background update: its task, the scope that cancels it, and whether
    another clear came while it ran."""

    scope: anyio.CancelScope
    task: asyncio.Task[None] | None = None
    again: bool = False


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
