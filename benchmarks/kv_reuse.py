"""Time to first token with kept KV states: a 30-token turn after 500-4,000 tokens of
history, cold (everything prefilled) against restored from the RAM tier, beside "p30" (the
same turn on an empty context), with the bundled GGUF (f16 KV, one thread, window 8192).

For each history length: a chat that keeps no state answers the history plus the new
turn (cold); a chat keeping states answers the history alone (its state is kept), then
another session's turn (so the live context holds something else), then the history plus
the new turn: that call restores the session's state and prefills only the new turn. TTFT
is a one-token completion; the same prompts then run 16 greedy tokens through both paths,
which must be identical. Medians of `--repeat` runs.

Only the RAM tier is built so far: the disk tier and the restart case are not measured
because they do not exist yet (issue 18).

Run: .venv/bin/python benchmarks/kv_reuse.py [--quick] [--repeat 3]
Prints a table and writes benchmarks/results/kv_reuse.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
from common import write_results

import tiermem
from tiermem._llm import bundled_gguf_path

WINDOW = 8192
SYSTEM = "You are a friendly assistant. Answer in one or two sentences."
NEW_TURN = "Thinking back over all of this, which of the places we discussed would you pick?"


def history(tokens: int) -> list[dict[str, str]]:
    """Chat turns of about `tokens` tokens (about 40 a turn with the bundled tokenizer)."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(max(1, tokens // 40)):
        messages += [
            {"role": "user", "content": f"Day {i}: we walked to viewpoint {i} and had lunch."},
            {"role": "assistant", "content": f"Viewpoint {i} sounds lovely; what did you eat?"},
        ]
    return messages


async def timed(chat: tiermem.LlamaChat, messages: list[dict[str, str]], **kw: Any) -> float:
    started = time.perf_counter()
    await chat.complete(messages, 1, 600, **kw)
    return (time.perf_counter() - started) * 1000


async def run(sizes: list[int], repeat: int) -> dict[str, Any]:
    pool = tiermem.ModelPool()
    states = tiermem.KVStateCache(
        max_bytes_per_session=1 << 32, max_bytes_total=1 << 33, max_sessions=64
    )
    path = bundled_gguf_path()
    cold = tiermem.LlamaChat(path, WINDOW, 1, pool, name="cold")
    kept = tiermem.LlamaChat(path, WINDOW, 1, pool, name="kept", kv_states=states)
    turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": NEW_TURN}]
    other = [*turn, {"role": "assistant", "content": "Sure."}]
    try:
        await timed(cold, turn)  # loads
        await timed(kept, other, session=("bench", "other"))
        p30 = statistics.median([await timed(cold, turn) for _ in range(repeat)])
        out: dict[str, Any] = {"p30_ms": round(p30, 1), "ttft_ms": {}, "tokens": {}}
        identical = True
        for size in sizes:
            past = history(size)
            asked = [*past, {"role": "user", "content": NEW_TURN}]
            cold_ms, ram_ms, reused = [], [], 0
            for r in range(repeat):
                cold_ms.append(await timed(cold, asked))
                key = ("bench", f"s{size}-{r}")
                await timed(kept, past, session=key)
                await timed(kept, other, session=("bench", "other"))
                ram_ms.append(await timed(kept, asked, session=key))
                reused = kept.last_reused
            prompt_tokens = kept.last_reused + kept.last_prefilled
            a = await cold.complete(asked, 16, 600)
            await kept.complete(other, 1, 600, session=("bench", "other"))
            b = await kept.complete(asked, 16, 600, session=("bench", f"s{size}-0"))
            identical = identical and a == b
            out["ttft_ms"][str(size)] = {
                "cold": round(statistics.median(cold_ms), 1),
                "ram": round(statistics.median(ram_ms), 1),
            }
            out["tokens"][str(size)] = {"prompt": prompt_tokens, "reused": reused}
            print(
                f"{size:>5} history: prompt {prompt_tokens} tokens, reused {reused}; "
                f"cold {out['ttft_ms'][str(size)]['cold']:.0f} ms, "
                f"RAM {out['ttft_ms'][str(size)]['ram']:.0f} ms (p30 {p30:.0f} ms)",
                flush=True,
            )
        out["identical_outputs"] = identical
        out["state_bytes"] = states.stats.bytes
        out["not_measured"] = ["disk", "restart", "replay"]  # not built yet (issue 18)
        return out
    finally:
        await pool.aclose()


def main(args: argparse.Namespace) -> None:
    sizes = [4000] if args.quick else [500, 1000, 2000, 4000]
    result = anyio.run(run, sizes, args.repeat)
    p30 = result["p30_ms"]
    print(f"\n{'history':>8} {'cold ms':>9} {'RAM ms':>8} {'RAM/p30':>8} {'cold/RAM':>9}")
    for size, t in result["ttft_ms"].items():
        print(
            f"{size:>8} {t['cold']:>9.0f} {t['ram']:>8.0f} {t['ram'] / p30:>8.2f} "
            f"{t['cold'] / t['ram']:>9.1f}"
        )
    print(f"p30 {p30:.0f} ms; identical greedy outputs: {result['identical_outputs']}")
    write_results("kv_reuse", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 4,000-token case only")
    parser.add_argument("--repeat", type=int, default=3)
    main(parser.parse_args())
