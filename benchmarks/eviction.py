"""1,000 sessions under a memory budget that holds 100, with the bundled models.

Run: .venv/bin/python benchmarks/eviction.py [--sessions 1000 --resident 100]

Phase 1 gives every session `--rounds` turns, round-robin: with room for a tenth of them,
almost every turn rebuilds its session from the database. Phase 2 is a skewed load: 80%
of `--hot-turns` turns go to 50 hot sessions (resident; half of `--sessions` when that is
fewer), 20% to random others (rebuilt).
`max_bytes_total` is set to `--resident` times a session's KV bytes after phase 1, so the
budget holds about that many sessions. Reports the modelled KV bytes (peak against the
budget), the process RSS (which holds the embedding model too), evictions, turn latency of
resident and rebuilt sessions, and checks every session's stored messages against what was
sent. The summarizer is off (see summary_quality.py for summaries).
Prints a table and writes benchmarks/results/eviction.json.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
from common import pct, write_results

import tiermem

WORDS = [
    *("museum", "harbour", "ticket", "train", "dinner", "budget", "hotel", "river"),
    *("bridge", "market", "garden", "coffee", "concert", "gallery", "castle", "ferry"),
    *("island", "mountain", "lake", "forest", "village", "temple", "tower", "park"),
]


def turn(rng: random.Random, session: int, i: int) -> list[tiermem.Message]:
    topic = " ".join(rng.choice(WORDS) for _ in range(12))
    return [
        tiermem.Message("user", f"Session {session} turn {i}: tell me about {topic}.", id=f"u{i}"),
        tiermem.Message("assistant", f"About {topic}: noted for turn {i}.", id=f"a{i}"),
    ]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    process = psutil.Process()
    sent: dict[str, list[str]] = {}
    latency: dict[str, list[float]] = {"resident": [], "rebuilt": [], "new": []}
    peak_rss = 0

    async def run_turn(mgr: tiermem.KVCacheManager, sid: int) -> None:
        nonlocal peak_rss
        name = f"s{sid:04d}"
        msgs = turn(rng, sid, len(sent.setdefault(name, [])) // 2)
        before = await mgr.status()
        t0 = time.perf_counter()
        await mgr.process_conversation(name, msgs)
        ms = (time.perf_counter() - t0) * 1000
        sent[name] += [m.content for m in msgs]
        after = await mgr.status()
        kind = "new" if len(sent[name]) == 2 else "resident"
        if after.misses > before.misses:
            kind = "rebuilt"
        latency[kind].append(ms)
        peak_rss = max(peak_rss, process.memory_info().rss)

    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "eviction.db"
        # size the budget from one session's bytes after the same number of turns
        async with await tiermem.KVCacheManager.open(db) as probe:
            for i in range(args.rounds):
                await probe.process_conversation("probe", turn(rng, -1, i))
            per_session = (await probe.status()).estimated_bytes
            await probe.delete_session("probe")
        budget = per_session * args.resident
        # no summarizer: the LLM would compete with the turns for the 2 cores, and the
        # figures here are about memory (summaries have their own benchmark)
        config = tiermem.KVCacheConfig(max_bytes_total=budget, summarizer_enabled=False)
        async with await tiermem.KVCacheManager.open(db, config) as mgr:
            await mgr.process_conversation("warm", [tiermem.Message("user", "warm up?")])
            await mgr.delete_session("warm")
            rss_start = process.memory_info().rss
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                for sid in range(args.sessions):
                    await run_turn(mgr, sid)
            phase1_s = time.perf_counter() - t0
            hot = min(50, args.sessions // 2)
            for _ in range(args.hot_turns):
                if rng.random() < 0.8:
                    await run_turn(mgr, rng.randrange(hot))
                else:
                    await run_turn(mgr, rng.randrange(hot, args.sessions))
            status = await mgr.status()
            intact = 0
            for name, contents in sent.items():
                history = await mgr.get_conversation_history(name)
                intact += [m.content for m in history] == contents
    figures = {
        "sessions": args.sessions,
        "turns": sum(len(v) for v in latency.values()),
        "budget_bytes": budget,
        "budget_sessions": args.resident,
        "peak_kv_bytes": status.peak_bytes,
        "peak_over_budget": round(status.peak_bytes / budget, 3),
        "end_session_count": status.session_count,
        "evictions": status.evictions_by_reason,
        "hits": status.hits,
        "misses": status.misses,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_peak_mb": round(peak_rss / 2**20, 1),
        "rss_end_mb": round(status.rss_bytes / 2**20, 1),
        "phase1_turns_per_s": round(args.rounds * args.sessions / phase1_s, 1),
        **{
            f"{kind}_{q}_ms": round(pct(values, p), 1)
            for kind, values in latency.items()
            for q, p in (("p50", 0.5), ("p95", 0.95))
        },
        **{f"{kind}_turns": len(values) for kind, values in latency.items()},
        "sessions_intact": f"{intact}/{len(sent)}",
    }
    for key, value in figures.items():
        print(f"{key:>20}  {value}")
    write_results("eviction", figures)
    if intact != len(sent):
        raise SystemExit("some sessions lost messages")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--resident", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hot-turns", type=int, default=2000)
    anyio.run(main, parser.parse_args())
