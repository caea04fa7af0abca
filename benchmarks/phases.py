"""Where a turn's and a search's time goes: every store coroutine and the embedder timed.

LoCoMo conversations 0 and 1 are written message by message through `process_conversation`
(summarizer off), then their questions are searched with `retrieve_context(limit=10)`,
twice (the first pass warms up). Each store method and `embed` is wrapped with a timer;
per kind of turn (plain, retrieving, clearing) and for searches the table gives the total
p50 / p95 and, per phase, its mean time and p95 per call of the kind, and calls per call.
Phases of one search overlap (the vector pass runs beside the text reads), so they add up
to more than the total. The data stays outside the repository: skipped, exit 0, when the
file is absent.

Run: .venv/bin/python benchmarks/phases.py --locomo PATH [--embedding-backend B]
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from common import pct, write_results
from retrieval_eval import locomo_conversations

import tiermem

Timings = dict[str, list[tuple[float, int]]]


class Clocks:
    """Time spent in each wrapped coroutine since the last `take()`."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj: Any, name: str, label: str) -> None:
        call: Callable[..., Any] = getattr(obj, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                self.spent[label] += (time.perf_counter() - started) * 1000
                self.calls[label] += 1

        setattr(obj, name, timed)

    def take(self) -> dict[str, tuple[float, int]]:
        out = {k: (self.spent[k], self.calls[k]) for k in self.spent}
        self.spent.clear()
        self.calls.clear()
        return out


async def measure(locomo: Path, backend: str) -> dict[str, Any]:
    conversations = locomo_conversations(locomo)[:2]
    config = tiermem.KVCacheConfig(summarizer_enabled=False, embedding_backend=backend)
    totals: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, Timings] = defaultdict(lambda: defaultdict(list))
    clocks = Clocks()
    with tempfile.TemporaryDirectory() as folder:
        async with await tiermem.KVCacheManager.open(Path(folder) / "p.db", config) as mgr:
            store = mgr._parts.store  # private: the timers wrap the store's own coroutines
            for name, _ in inspect.getmembers(type(store), inspect.iscoroutinefunction):
                if not name.startswith("_") and name not in ("close", "transaction"):
                    clocks.wrap(store, name, name)
            clocks.wrap(mgr._parts.embedder, "embed", "embed")  # private: as above
            for conv in conversations:
                for message in (m for turn in conv["turns"] for m in turn):
                    clocks.take()
                    started = time.perf_counter()
                    result = await mgr.process_conversation(conv["id"], [message])
                    kind = (
                        "clearing turn"
                        if result.should_clear_cache
                        else "retrieving turn"
                        if result.retrieval_result
                        else "plain turn"
                    )
                    totals[kind].append((time.perf_counter() - started) * 1000)
                    for label, spent in clocks.take().items():
                        phases[kind][label].append(spent)
            for warm in (True, False):
                for conv in conversations:
                    for q in conv["questions"]:
                        clocks.take()
                        started = time.perf_counter()
                        await mgr.retrieve_context(conv["id"], q["question"], limit=10)
                        if not warm:
                            totals["search"].append((time.perf_counter() - started) * 1000)
                            for label, spent in clocks.take().items():
                                phases["search"][label].append(spent)
    report: dict[str, Any] = {}
    for kind, values in totals.items():
        rows = {
            label: {
                "mean_ms": sum(ms for ms, _ in spent) / len(values),
                "p95_ms": pct([ms for ms, _ in spent], 0.95),
                "calls": sum(n for _, n in spent) / len(values),
            }
            for label, spent in phases[kind].items()
        }
        ordered = dict(sorted(rows.items(), key=lambda item: -item[1]["mean_ms"]))
        report[kind] = {
            "n": len(values),
            "p50_ms": pct(values, 0.5),
            "p95_ms": pct(values, 0.95),
            "phases": ordered,
        }
    return report


def main(args: argparse.Namespace) -> None:
    if not Path(args.locomo).is_file():
        print(f"skipped: {args.locomo} not found (LoCoMo stays outside the repository)")
        return
    report = anyio.run(measure, Path(args.locomo), args.embedding_backend)
    for kind, figures in report.items():
        print(
            f"\n{kind}: n {figures['n']}, p50 {figures['p50_ms']:.1f} ms, "
            f"p95 {figures['p95_ms']:.1f} ms"
        )
        for label, row in list(figures["phases"].items())[:10]:
            print(
                f"  {label:<28} mean {row['mean_ms']:6.2f} ms   p95 {row['p95_ms']:6.2f} ms"
                f"   calls {row['calls']:.1f}"
            )
    write_results("phases", report | {"embedding_backend": args.embedding_backend})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--locomo", required=True, metavar="PATH")
    parser.add_argument(
        "--embedding-backend",
        default=tiermem.KVCacheConfig().embedding_backend,
        choices=["onnx-int8", "onnx", "sentence-transformers"],
    )
    main(parser.parse_args())
