"""Telemetry: every event reaches the sink; logging, JSON lines and OpenTelemetry metrics;
a failing sink never breaks a turn."""

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import tiermem
from tests.conftest import SHAPE
from tests.fakes import RecordingTelemetry
from tests.test_manager import run_turns, turn
from tiermem import JsonFormatter, LoggingTelemetry, OpenTelemetryMetrics

CONFIG = tiermem.KVCacheConfig(
    kv_shape=SHAPE,
    context_window_tokens=4096,
    summary_mode="inline",
    max_sessions=1,
    snapshot_strategy={"kind": "full"},
)
KINDS = {
    "budget_exceeded",
    "eviction",
    "clear",
    "snapshot",
    "summary",
    "retrieval",
    "maintenance",
}


async def exercise(mgr: tiermem.KVCacheManager) -> None:
    """A little of everything: 17 turns (a clear, a snapshot, a summary), a question, a
    second session (an eviction), maintenance."""
    await run_turns(mgr, 17)
    await mgr.process_conversation("s", turn(17, "what did we say about the weather?"))
    await mgr.process_conversation("t", turn(0))
    await mgr.perform_maintenance()


async def test_every_kind_of_event_is_reported(open_manager: Callable[..., Any]) -> None:
    events = RecordingTelemetry()
    async with await open_manager(config=CONFIG, telemetry=events) as mgr:
        await exercise(mgr)
    assert {e.kind for e in events.events} == KINDS
    (clear,) = events.of(tiermem.ClearEvent)
    assert (clear.session_id, clear.reason, clear.entries_kept) == ("s", "ConversationLimit", 1)
    assert clear.entries_cleared == 32 and clear.bytes_freed == 32 * 11 * 128 // 2
    (summary,) = events.of(tiermem.SummaryEvent)
    assert summary.error is None and summary.tokens > 0 and summary.messages == 32
    retrieval = events.of(tiermem.RetrievalEvent)[-1]
    assert retrieval.hits == sum(retrieval.hits_by_tier.values()) > 0
    assert retrieval.tiers == (1, 2, 3) and retrieval.duration_ms > 0
    (eviction,) = events.of(tiermem.EvictionEvent)
    assert (eviction.session_id, eviction.reason) == ("s", "SessionLimit")


async def test_logging_telemetry_writes_one_json_line_per_event(
    open_manager: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tiermem.events")
    async with await open_manager(config=CONFIG, telemetry=LoggingTelemetry()) as mgr:
        await exercise(mgr)
    records = [r for r in caplog.records if r.name == "tiermem.events"]
    assert {getattr(r, "event", None) for r in records} == KINDS
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    eviction = next(line for line in lines if line["event"] == "eviction")
    assert eviction["session_id"] == "s" and eviction["reason"] == "SessionLimit"
    assert eviction["bytes_freed"] > 0 and eviction["level"] == "INFO"
    assert "eviction session_id=s" in eviction["message"]


async def test_logging_telemetry_is_quiet_unless_enabled(
    open_manager: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tiermem.events")
    async with await open_manager(config=CONFIG) as mgr:  # the default sink
        await exercise(mgr)
    assert [r for r in caplog.records if r.name == "tiermem.events"] == []


async def test_opentelemetry_metrics(open_manager: Callable[..., Any]) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry = OpenTelemetryMetrics(provider)
    async with await open_manager(config=CONFIG, telemetry=telemetry) as mgr:
        await exercise(mgr)
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "tiermem"
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    provider.shutdown()

    def total(name: str, **attrs: Any) -> float:
        return sum(
            p.value for p in points[name] if all(p.attributes.get(k) == v for k, v in attrs.items())
        )

    assert total("tiermem.clears", reason="ConversationLimit") == 1
    assert total("tiermem.clears.entries") == 32
    assert total("tiermem.evictions", reason="SessionLimit") == 1
    assert total("tiermem.evictions.bytes") > 0
    assert total("tiermem.budget.exceeded", scope="sessions") >= 1
    assert total("tiermem.snapshots") == 1
    assert total("tiermem.summary.tokens") > 0
    assert total("tiermem.retrieval.hits") > 0
    for name in ("tiermem.summary.duration", "tiermem.retrieval.duration"):
        assert sum(p.count for p in points[name]) >= 1
    assert sum(p.count for p in points["tiermem.maintenance.duration"]) == 1
    # no session ids in attributes: bounded cardinality
    for name, series in points.items():
        for p in series:
            assert "session_id" not in p.attributes, name


class BrokenSink:
    def __init__(self) -> None:
        self.calls = 0

    def emit(self, event: tiermem.TelemetryEvent) -> None:
        self.calls += 1
        raise RuntimeError("sink down")


async def test_a_failing_sink_does_not_break_turns(
    open_manager: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    sink = BrokenSink()
    async with await open_manager(config=CONFIG, telemetry=sink) as mgr:
        await exercise(mgr)
        assert len(await mgr.get_conversation_history("s")) == 1 + 18 * 2
    assert sink.calls >= len(KINDS)
    logged = [r for r in caplog.records if "telemetry sink" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info  # once, with the traceback


def test_the_protocol_is_small() -> None:
    assert isinstance(RecordingTelemetry(), tiermem.Telemetry)
    assert isinstance(tiermem.NoTelemetry(), tiermem.Telemetry)
    tiermem.NoTelemetry().emit(tiermem.SnapshotEvent("s", "default", 1, 2))
