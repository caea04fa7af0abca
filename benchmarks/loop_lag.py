"""Event-loop lag while the bundled models run: does tiermem ever block the loop?

Run: .venv/bin/python benchmarks/loop_lag.py [--sessions 8 --turns 40] [--skip-chat]
     [--cases hex-80k,prose-10mb] [--skip-messages]

A ticker task sleeps 5 ms at a time and records how late each wake-up is.

Chat phase: `--sessions` sessions run `--turns` turns each at once (embeddings, clears with
background summaries by the GGUF model, retrievals).

Messages phase: one message at a time, each in a session of its own: pathological texts
(80 000 hex digits, runs of one character, "a(" runs, nested calls, blank runs, month names)
and ordinary prose of 100 KB, 1 MB and 10 MB. For each, three steps while the ticker runs:
the message as a turn (stored, and retrieved for, since it is long), the message as a query,
and a short query whose hit is the message. Then, with no loop, the text functions that run
on the loop per message are timed one by one on it: what the lag is made of. The floor of
each case is the ticker's max lag over `--floor` seconds with nothing else running, just
before it: what this machine's load alone costs (on a busy machine it is not zero).

Target: max lag under 50 ms. Prints tables and writes benchmarks/results/loop_lag.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from common import pct, write_results

import tiermem
from tiermem import _query as query
from tiermem import _retrieval as retrieval
from tiermem import _scoring as scoring
from tiermem import _text as text
from tiermem._cache import entry_type

TICK = 0.005
TARGET_MS = 50
MB = 1_000_000


def fill(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def prose(size: int) -> str:
    """A pasted document: sentences with names, numbers and dates, a line break per line."""
    line = (
        "On March 3rd Marta met Jorge at the Lisbon harbour; the ferry left at 10:45 and "
        "cost 12.50 euros, so they walked along the river instead.\n"
    )
    return fill(line, size)


CASES: dict[str, Callable[[], str]] = {
    "hex-80k": lambda: fill("0123456789abcdef", 80_000),
    "letter-run-1mb": lambda: fill("a", MB),
    "digit-run-1mb": lambda: fill("7", MB),
    "newline-run-1mb": lambda: fill("\n", MB),
    "space-run-1mb": lambda: fill(" ", MB - 1) + "x",
    "a(-run-1mb": lambda: fill("a(", MB),
    "nested-calls-1mb": lambda: "f(" * (MB // 4) + ")" * (MB // 4),
    "months-1mb": lambda: fill("in May 3rd of May ", MB),
    "prose-100kb": lambda: prose(100_000),
    "prose-1mb": lambda: prose(MB),
    "prose-10mb": lambda: prose(10 * MB),
}


def text_functions(content: str) -> dict[str, Callable[[], object]]:
    """What runs on the loop for one message (as a turn, a query and a hit)."""
    terms = text.keywords(content)
    row = retrieval.MessageRow(1, 0, "m", "user", content, 0.0, 1, None)
    candidate = retrieval.Candidate(1, row=row)
    calls: dict[str, Callable[[], object]] = {
        "text.content_hash": lambda: text.content_hash("user", content),
        "cache.entry_type": lambda: entry_type("user", content),
        "scoring.content_score": lambda: scoring.content_score("user", content),
        "query.analyse": lambda: query.analyse(content, 1.7e9),
        "text.keywords": lambda: text.keywords(content),
        "text.top_keywords": lambda: text.top_keywords([content]),
        "text.matched_keywords": lambda: text.matched_keywords(content, terms),
        "retrieval.names_in": lambda: retrieval.names_in(content),
        "retrieval._is_question": lambda: retrieval._is_question(row),
        "retrieval._collapse": lambda: retrieval._collapse([candidate]),
    }
    return calls


def time_text_functions(content: str) -> dict[str, float]:
    out = {}
    for name, call in text_functions(content).items():
        t0 = time.perf_counter()
        call()
        out[name] = round((time.perf_counter() - t0) * 1000, 2)
    return out


class Ticker:
    """Records how late each 5 ms sleep wakes, while running."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._done = anyio.Event()

    async def run(self) -> None:
        while not self._done.is_set():
            t0 = time.perf_counter()
            await anyio.sleep(TICK)
            self.lags.append((time.perf_counter() - t0 - TICK) * 1000)

    def stop(self) -> None:
        self._done.set()


async def chat_phase(mgr: tiermem.KVCacheManager, args: argparse.Namespace) -> dict[str, Any]:
    ticker = Ticker()

    async def chat(n: int) -> None:
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

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        t0 = time.perf_counter()
        async with anyio.create_task_group() as sessions:
            for n in range(args.sessions):
                sessions.start_soon(chat, n)
        await mgr.wait_for_summaries()
        seconds = time.perf_counter() - t0
        ticker.stop()
    lags = ticker.lags
    return {
        "sessions": args.sessions,
        "turns": args.sessions * args.turns,
        "clears": mgr.export_statistics().total_clears,
        "seconds": round(seconds, 1),
        "ticks": len(lags),
        "lag_p50_ms": round(pct(lags, 0.5), 2),
        "lag_p99_ms": round(pct(lags, 0.99), 2),
        "lag_max_ms": round(max(lags), 2),
        "target_max_ms": TARGET_MS,
    }


async def idle_floor(seconds: float) -> float:
    """The ticker's max lag while the loop has nothing else to do."""
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(seconds)
        ticker.stop()
    return round(max(ticker.lags, default=0.0), 2)


async def message_case(
    mgr: tiermem.KVCacheManager, name: str, content: str, floor_seconds: float
) -> dict[str, Any]:
    floor = await idle_floor(floor_seconds)
    ticker = Ticker()
    steps: dict[str, float] = {}
    sid = f"big-{name}"

    async def steps_under_ticker() -> None:
        for step, run in (
            ("turn", lambda: mgr.process_conversation(sid, [tiermem.Message("user", content)])),
            ("as_query", lambda: mgr.retrieve_context(sid, content)),
            ("as_hit", lambda: mgr.retrieve_context(sid, "what did I paste about Lisbon?")),
        ):
            t0 = time.perf_counter()
            await run()
            steps[step] = round(time.perf_counter() - t0, 3)
        ticker.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        tg.start_soon(steps_under_ticker)
    lags = ticker.lags or [0.0]
    return {
        "case": name,
        "chars": len(content),
        **{f"{step}_s": s for step, s in steps.items()},
        "ticks": len(ticker.lags),
        "lag_p99_ms": round(pct(lags, 0.99), 2),
        "lag_max_ms": round(max(lags), 2),
        "floor_max_ms": floor,
        "within_target": max(lags) < TARGET_MS,
        "text_functions_ms": time_text_functions(content),
    }


async def main(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {"target_max_ms": TARGET_MS}
    cases = [c for c in args.cases.split(",") if c] if args.cases else list(CASES)
    with tempfile.TemporaryDirectory() as folder:
        config = tiermem.KVCacheConfig(clear_after_conversations=8)
        async with await tiermem.KVCacheManager.open(Path(folder) / "lag.db", config) as mgr:
            await mgr.process_conversation("warm", [tiermem.Message("user", "warm up?")])
            if not args.skip_chat:
                results["chat"] = await chat_phase(mgr, args)
                print("chat phase")
                for key, value in results["chat"].items():
                    print(f"{key:>16}  {value}")
            if not args.skip_messages:
                results["messages"] = []
                print(
                    f"\n{'case':<18}{'chars':>10}{'turn s':>9}{'query s':>9}{'hit s':>8}"
                    f"{'lag p99':>10}{'lag max':>10}{'floor':>8}"
                )
                for name in cases:
                    row = await message_case(mgr, name, CASES[name](), args.floor)
                    results["messages"].append(row)
                    print(
                        f"{name:<18}{row['chars']:>10}{row['turn_s']:>9}{row['as_query_s']:>9}"
                        f"{row['as_hit_s']:>8}{row['lag_p99_ms']:>10}{row['lag_max_ms']:>10}"
                        f"{row['floor_max_ms']:>8}",
                        flush=True,
                    )
                print("\ntext functions on the loop, ms per call")
                names = list(results["messages"][0]["text_functions_ms"]) if cases else []
                print(f"{'case':<18}" + "".join(f"{n.split('.')[-1][:12]:>13}" for n in names))
                for row in results["messages"]:
                    ms = row["text_functions_ms"]
                    print(f"{row['case']:<18}" + "".join(f"{ms.get(n, '-'):>13}" for n in names))
    write_results("loop_lag", results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--skip-chat", action="store_true", help="only the messages phase")
    parser.add_argument("--skip-messages", action="store_true", help="only the chat phase")
    parser.add_argument("--floor", type=float, default=1.0, help="idle seconds per case")
    parser.add_argument("--cases", default="", help=f"comma-separated, of: {', '.join(CASES)}")
    anyio.run(main, parser.parse_args())
