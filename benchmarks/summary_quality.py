"""Summary quality with the bundled model: which planted facts survive into the cumulative
summary after 1, 2 and 5 clears, and how long a summary takes.

The first five chat sessions of each conversation in fixtures/retrieval_eval.json (16 turns
each, so a clear ends every session) are fed through `process_conversation` with the
default config except inline summaries, so each clearing turn returns its summary and its
time is the summary's. Those sessions plant 14 facts per user (a pet's name, a sister's
name and city, an allergy, a car, an employer, an anniversary, a budget, a medicine and its
dose, a teacher, a child, a diet, coffee and running habits). A fact survives a summary when
every one of its key words or numbers is in it (`FACT_KEYS`); the share is taken over the
facts planted before that clear.

Run: .venv/bin/python benchmarks/summary_quality.py [--conversations 5]
Prints a table and writes benchmarks/results/summary_quality.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from common import write_results

import tiermem

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_retrieval_eval import PERSONAS  # noqa: E402
from retrieval_eval import FIXTURE, turns  # noqa: E402

SESSIONS = 5
TURNS_PER_SESSION = 16
REPORTED = (1, 2, 5)


def _caps(value: str) -> list[str]:
    """The capitalised words and numbers of a value ("secondhand Skoda Octavia" -> both
    names), or the whole value when it has none ("shellfish")."""
    found = [w for w in re.findall(r"[\w.,]+", value) if w[0].isupper() or w[0].isdigit()]
    return found or [value]


# fact -> the persona's key words that a summary must keep for the fact to survive
FACT_KEYS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "pet": lambda p: [p["pet"]],
    "sister": lambda p: [p["sister"], p["sister_city"]],
    "home": lambda p: [p["city1"]],
    "allergy": lambda p: [p["allergen"]],
    "car": lambda p: _caps(p["car"]),
    "diet": lambda p: ["vegetarian"],
    "job": lambda p: _caps(p["company"]),
    "anniversary": lambda p: [re.sub(r"\D", "", p["anniversary"]), p["anniversary"].split()[-1]],
    "coffee": lambda p: ["black"],
    "budget": lambda p: [p["reno_budget"]],
    "medicine": lambda p: [p["med"], p["dose"]],
    "running": lambda p: ["Monday", "Thursday"],
    "teacher": lambda p: [p["instrument"], p["teacher"].split()[-1]],
    "child": lambda p: [p["kid"], p["kid_thing"].split()[-1]],
}


def _normal(text: str) -> str:
    """Lower case, thousands separators dropped ("18,500" = "18500"), "5mg" = "5 mg",
    spaces collapsed."""
    text = re.sub(r"(?<=\d)[,.](?=\d{3}\b)", "", text.lower())
    return " ".join(re.sub(r"(\d)\s*mg\b", r"\1 mg", text).split())


def holds(summary: str, key: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(_normal(key)), _normal(summary)) is not None


def planted_in(messages: list[dict[str, Any]], keys: list[str]) -> int | None:
    """The session in which a message first holds all of a fact's keys."""
    for m in messages:
        if all(holds(m["content"], k) for k in keys):
            return int(m["id"].split("-")[1][1:])
    return None


def config() -> tiermem.KVCacheConfig:
    return tiermem.KVCacheConfig(summary_mode="inline", retrieval_enabled=False)


async def run_conversation(conv: dict[str, Any], persona: dict[str, Any], db: Path) -> list[Any]:
    facts = {name: keys(persona) for name, keys in FACT_KEYS.items()}
    where = {name: planted_in(conv["messages"], keys) for name, keys in facts.items()}
    rows = []
    async with await tiermem.KVCacheManager.open(db, config()) as mgr:
        history: list[tiermem.Message] = []
        for i, turn in enumerate(turns(conv["messages"])[: SESSIONS * TURNS_PER_SESSION]):
            history += turn
            started = time.perf_counter()
            result = await mgr.process_conversation(conv["id"], history)
            seconds = time.perf_counter() - started
            clear = result.clear_result
            if clear is None:
                continue
            clears = (i + 1) // TURNS_PER_SESSION
            text = clear.summary.text if clear.summary else ""
            due = [n for n, s in where.items() if s is not None and s < clears]
            kept = [n for n in due if all(holds(text, k) for k in facts[n])]
            rows.append(
                {
                    "conversation": conv["id"],
                    "clears": clears,
                    "planted": len(due),
                    "kept": kept,
                    "lost": sorted(set(due) - set(kept)),
                    "seconds": round(seconds, 2),
                    "tokens": clear.summary.token_count if clear.summary else 0,
                    "error": clear.summary_error,
                    "summary": text,
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "summary"}), flush=True)
    return rows


def main(args: argparse.Namespace) -> None:
    data = json.loads(FIXTURE.read_text())["conversations"][: args.conversations]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for conv, persona in zip(data, PERSONAS, strict=False):
            rows += anyio.run(run_conversation, conv, persona, Path(folder) / f"{conv['id']}.db")
    table = []
    for k in REPORTED:
        at = [r for r in rows if r["clears"] == k]
        planted = sum(r["planted"] for r in at)
        kept = sum(len(r["kept"]) for r in at)
        seconds = sorted(r["seconds"] for r in at)
        table.append(
            {
                "clears": k,
                "facts": planted,
                "kept": kept,
                "share": round(kept / planted, 3) if planted else None,
                "worst_conversation": min(
                    (round(len(r["kept"]) / r["planted"], 3) for r in at if r["planted"]),
                    default=None,
                ),
                "summary_s_p50": seconds[len(seconds) // 2] if seconds else None,
                "summary_s_max": seconds[-1] if seconds else None,
            }
        )
    print(f"\n{'clears':>6}{'facts':>7}{'kept':>6}{'share':>8}{'worst':>8}{'p50 s':>8}{'max s':>8}")
    for t in table:
        print(
            f"{t['clears']:>6}{t['facts']:>7}{t['kept']:>6}{t['share']:>8}"
            f"{t['worst_conversation']:>8}{t['summary_s_p50']:>8}{t['summary_s_max']:>8}"
        )
    out = {"table": table, "rows": rows}
    write_results("summary_quality", out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=5)
    main(parser.parse_args())
