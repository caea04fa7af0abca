"""Telemetry: what the manager reports as it works, through a small `Telemetry` protocol.

Every event is a frozen dataclass with a `kind`. Built in: `NoTelemetry`; `LoggingTelemetry`
(the default: one stdlib log record per event, its fields on the record, `JsonFormatter`
to write them as JSON lines); and `OpenTelemetryMetrics` (the `otel` extra), which records
counters and histograms through a meter provider the host configures. Nothing is sent
anywhere unless the host sets that up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

from ._errors import ConfigError

log = logging.getLogger("tiermem")


@dataclass(frozen=True, slots=True)
class BudgetExceededEvent:
    """A budget was found exceeded: `scope` is total_bytes or sessions (sessions then leave
    memory), session_bytes or session_entries (the session is then trimmed)."""

    kind: ClassVar[str] = "budget_exceeded"
    scope: str
    value: int
    limit: int
    session_id: str | None = None
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class EvictionEvent:
    """A session left memory (its state flushed first): reason is memory, sessions or idle."""

    kind: ClassVar[str] = "eviction"
    session_id: str
    namespace: str
    reason: str
    bytes_freed: int
    entries: int


@dataclass(frozen=True, slots=True)
class ClearEvent:
    kind: ClassVar[str] = "clear"
    session_id: str
    namespace: str
    reason: str
    entries_cleared: int
    entries_kept: int
    bytes_freed: int


@dataclass(frozen=True, slots=True)
class SnapshotEvent:
    kind: ClassVar[str] = "snapshot"
    session_id: str
    namespace: str
    snapshot_id: int
    entries: int


@dataclass(frozen=True, slots=True)
class SummaryEvent:
    """A summary update ran (inline or in the background); `error` when it failed."""

    kind: ClassVar[str] = "summary"
    session_id: str
    namespace: str
    duration_ms: float
    tokens: int
    messages: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RetrievalEvent:
    kind: ClassVar[str] = "retrieval"
    session_id: str
    namespace: str
    tiers: tuple[int, ...]
    hits: int
    hits_by_tier: dict[int, int]
    duration_ms: float


@dataclass(frozen=True, slots=True)
class MaintenanceEvent:
    kind: ClassVar[str] = "maintenance"
    sessions_evicted: int
    snapshots_pruned: int
    errors: int
    duration_ms: float


@dataclass(frozen=True, slots=True)
class KVStateEvent:
    """A session's kept KV state left RAM (`action` "evicted", `reason` an eviction
    reason; `to` "disk" when the disk tier holds it), or its spill to disk failed
    ("spill_failed", `reason` the error): the state is then lost, the next turn cold."""

    kind: ClassVar[str] = "kv_state"
    session_id: str
    namespace: str
    action: str
    reason: str
    tokens: int
    bytes: int
    to: str | None = None


TelemetryEvent = (
    BudgetExceededEvent
    | KVStateEvent
    | EvictionEvent
    | ClearEvent
    | SnapshotEvent
    | SummaryEvent
    | RetrievalEvent
    | MaintenanceEvent
)


@runtime_checkable
class Telemetry(Protocol):
    """Receives every event, on the event loop: keep `emit` quick and non-blocking. An
    exception it raises is logged and otherwise ignored."""

    def emit(self, event: TelemetryEvent) -> None: ...


class NoTelemetry:
    """Drops every event."""

    def emit(self, event: TelemetryEvent) -> None:
        return None


def event_fields(event: TelemetryEvent) -> dict[str, Any]:
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


class LoggingTelemetry:
    """One log record per event on `logger` (default `tiermem.events`), with the event's
    kind as `record.event` and its fields as the dict `record.fields`."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or logging.getLogger("tiermem.events")
        self.level = level

    def emit(self, event: TelemetryEvent) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        fields = event_fields(event)
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        self.logger.log(
            self.level, "%s %s", event.kind, text, extra={"event": event.kind, "fields": fields}
        )


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, and for tiermem
    events the event kind and its fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
            out.update(getattr(record, "fields", {}))
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class OpenTelemetryMetrics:
    """Counters and histograms through OpenTelemetry (install `tiermem[otel]`).

    Uses `meter_provider`, or the global one the host configured (a no-op if none).
    Attributes are low-cardinality (reason, scope, tier): never session ids."""

    def __init__(self, meter_provider: Any = None) -> None:
        try:
            from opentelemetry import metrics
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "OpenTelemetryMetrics needs the otel extra: pip install 'tiermem[otel]'"
            ) from exc
        from . import __version__

        provider = meter_provider or metrics.get_meter_provider()
        meter = provider.get_meter("tiermem", __version__)
        count, hist = meter.create_counter, meter.create_histogram
        self._budget = count("tiermem.budget.exceeded", "{event}", "budgets found exceeded")
        self._evictions = count("tiermem.evictions", "{session}", "sessions that left memory")
        self._evicted = count("tiermem.evictions.bytes", "By", "KV bytes freed by evictions")
        self._clears = count("tiermem.clears", "{clear}", "active caches cleared")
        self._cleared = count("tiermem.clears.entries", "{entry}", "entries cleared")
        self._snapshots = count("tiermem.snapshots", "{snapshot}", "snapshots written")
        self._summary_ms = hist("tiermem.summary.duration", "ms", "summary update time")
        self._summary_tokens = count("tiermem.summary.tokens", "{token}", "summary tokens")
        self._retrieval_ms = hist("tiermem.retrieval.duration", "ms", "retrieval time")
        self._hits = count("tiermem.retrieval.hits", "{hit}", "hits returned, by tier")
        self._maintenance_ms = hist("tiermem.maintenance.duration", "ms", "maintenance time")
        self._kv_states = count("tiermem.kv_states", "{state}", "KV states out of RAM")

    def emit(self, event: TelemetryEvent) -> None:
        match event:
            case BudgetExceededEvent(scope=scope):
                self._budget.add(1, {"scope": scope})
            case EvictionEvent(reason=reason, bytes_freed=freed):
                self._evictions.add(1, {"reason": reason})
                self._evicted.add(freed, {"reason": reason})
            case ClearEvent(reason=reason, entries_cleared=cleared):
                self._clears.add(1, {"reason": reason})
                self._cleared.add(cleared, {"reason": reason})
            case SnapshotEvent():
                self._snapshots.add(1)
            case SummaryEvent(duration_ms=ms, tokens=tokens, error=error):
                self._summary_ms.record(ms, {"ok": error is None})
                self._summary_tokens.add(tokens)
            case RetrievalEvent(duration_ms=ms, hits_by_tier=by_tier):
                self._retrieval_ms.record(ms)
                for tier, n in by_tier.items():
                    self._hits.add(n, {"tier": tier})
            case MaintenanceEvent(duration_ms=ms):
                self._maintenance_ms.record(ms)
            case KVStateEvent(action=action, reason=reason, to=to):
                reason = reason if action == "evicted" else "error"
                self._kv_states.add(1, {"action": action, "reason": reason, "to": str(to)})


class Guarded:
    """Hands events to a sink, which may fail: a failure is logged (with its traceback the
    first time, then every 1000th), never raised into the turn that emitted the event."""

    def __init__(self, sink: Telemetry) -> None:
        self.sink = sink
        self.failures = 0

    def emit(self, event: TelemetryEvent) -> None:
        try:
            self.sink.emit(event)
        except Exception:
            self.failures += 1
            if self.failures % 1000 == 1:
                log.error(
                    "telemetry sink %s failed on a %s event (%d failures so far)",
                    type(self.sink).__name__,
                    event.kind,
                    self.failures,
                    exc_info=self.failures == 1,
                )
