"""Event-loop lag while the bundled models run: does tiermem ever block the loop?

Run: .venv/bin/python benchmarks/loop_lag.py [--sessions 8 --turns 40]

A ticker task sleeps 5 ms at a time and records how late each wake-up is, while
`--sessions` sessions run `--turns` turns each at once (embeddings, clears with background
summaries by the GGUF model, retrievals). Target: max lag under 50 ms. Prints a table and
writes benchmarks/results/loop_lag.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
from common import pct, write_results

import tiermem

TICK = 0.005


async def main(args: argparse.Namespace) -> None:
    lags: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await anyio.sleep(TICK)
            lags.append((time.perf_counter() - t0 - TICK) * 1000)

    async def chat(mgr: tiermem.KVCacheManager, n: int) -> None:
        for i in range(args.turns):
            user = f"Session {n}, note {i}: my locker code is {1000 + i}."
            if i % 5 == 4:
                user = f"What was my locker code at note {i - 2}?"
            await mgr.process_conversation(
                f"s{n}",
                [
                    tiermem.Message("user", user, id=f"u{i}"),
                    tiermem.Message("assistant", f"Noted {i}.", id=f"a{i}"),
                ],
            )

    with tempfile.TemporaryDirectory() as folder:
        config = tiermem.KVCacheConfig(clear_after_conversations=8)
        async with await tiermem.KVCacheManager.open(Path(folder) / "lag.db", config) as mgr:
            await mgr.process_conversation("warm", [tiermem.Message("user", "warm up?")])
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                t0 = time.perf_counter()
                async with anyio.create_task_group() as sessions:
                    for n in range(args.sessions):
                        sessions.start_soon(chat, mgr, n)
                await mgr.wait_for_summaries()
                seconds = time.perf_counter() - t0
                done.set()
            summaries = mgr.export_statistics().total_clears
    figures = {
        "sessions": args.sessions,
        "turns": args.sessions * args.turns,
        "clears": summaries,
        "seconds": round(seconds, 1),
        "ticks": len(lags),
        "lag_p50_ms": round(pct(lags, 0.5), 2),
        "lag_p99_ms": round(pct(lags, 0.99), 2),
        "lag_max_ms": round(max(lags), 2),
        "target_max_ms": 50,
    }
    for key, value in figures.items():
        print(f"{key:>16}  {value}")
    write_results("loop_lag", figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=40)
    anyio.run(main, parser.parse_args())
