"""Turn latency of `process_conversation` with the bundled models, clears apart.

Run: .venv/bin/python benchmarks/turn_latency.py [--turns 48]
Prints a table and one JSON line. The full suite (floors, ingest, retrieval at scale) is
not built yet; see the README's limits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import anyio
from common import pct

import tiermem


async def main(turns: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "bench.db"
        async with await tiermem.KVCacheManager.open(db) as mgr:
            await mgr.process_conversation("warm", [tiermem.Message("user", "warm up?")])
            plain: list[float] = []
            clearing: list[float] = []
            for i in range(turns):
                msgs = [
                    tiermem.Message("user", f"Question {i}: what about museum {i} on day {i}?"),
                    tiermem.Message("assistant", f"Museum {i} opens at {9 + i % 3}:00."),
                ]
                t0 = time.perf_counter()
                result = await mgr.process_conversation("bench", msgs)
                ms = (time.perf_counter() - t0) * 1000
                (clearing if result.should_clear_cache else plain).append(ms)
            t0 = time.perf_counter()
            for _ in range(20):
                await mgr.retrieve_context("bench", "when does museum 7 open?")
            retrieve_ms = (time.perf_counter() - t0) * 1000 / 20
    figures = {
        "turns": turns,
        "turn_p50_ms": round(pct(plain, 0.5), 1),
        "turn_p95_ms": round(pct(plain, 0.95), 1),
        "clear_turns": len(clearing),
        "clear_turn_mean_ms": round(statistics.mean(clearing), 1) if clearing else None,
        "retrieve_mean_ms": round(retrieve_ms, 1),
    }
    for key, value in figures.items():
        print(f"{key:>20}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=48)
    anyio.run(main, parser.parse_args().turns)
