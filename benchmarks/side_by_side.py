"""tiermem beside a peer (mem0), on the same LoCoMo conversations, each in its own process.

Every round runs each system once, one after the other (the order rotates between rounds),
each in a fresh process with a fresh store:

- small: conversations 0 and 1 (788 messages) written one message at a time, each write
  timed (tiermem: `process_conversation`, so a turn that asks something also retrieves,
  and every 16th clears; mem0: `add(..., infer=False)`: embed and store), then their 231
  questions searched, top 10, each timed; recall@10 of the labelled evidence;
- big: the same two sessions grown to `--big` messages in all by older filler messages
  (phrases of the other conversations' messages, spliced so no text repeats), written in
  bulk once per system (tiermem: `ingest`; mem0: one batch embedding inserted straight
  into its vector store, its fastest path: `add` embeds one message a call), then the
  same questions searched in every round by a fresh process.

Peak RSS is the worker process's own (ru_maxrss), after it closed. Systems: tiermem's
default (background summaries by the bundled GGUF), tiermem with the summarizer off, and
mem0's `Memory` and `AsyncMemory` when `--peer-python` names the Python of a separate
environment with `mem0ai` installed (its worker is benchmarks/peer_mem0.py); without it the
peer's columns are skipped. Both use the bundled MiniLM files. The data stays outside the
repository: the run is skipped, exit 0, when the file is absent.

Run: .venv/bin/python benchmarks/side_by_side.py --locomo PATH [--peer-python PY]
[--rounds 4] [--big 10000]. Prints the table (medians over rounds; the ratio column is the
median of the per-round ratios) and writes benchmarks/results/side_by_side.json.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import pct, write_results

HERE = Path(__file__).resolve().parent
SMALL_CONVERSATIONS = 2
LIMIT = 10
TIERMEM = {"tiermem default": ["--summarizer"], "tiermem, summarizer off": []}
PEER = {"mem0 Memory": [], "mem0 AsyncMemory": ["--async"]}


# --- the jobs -------------------------------------------------------------------------


def jobs(locomo: Path, big: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The small job (written turn by turn) and the big one (filled in bulk)."""
    sys.path.insert(0, str(HERE))
    from retrieval_eval import locomo_conversations

    from tiermem._embedder import bundled_model_path

    conversations = locomo_conversations(locomo)
    turns, questions = [], []
    for conv in conversations[:SMALL_CONVERSATIONS]:
        for turn in conv["turns"]:
            turns += [_record(conv["id"], m) for m in turn]
        questions += [
            {"session": conv["id"], "query": q["question"], "evidence": q["evidence"]}
            for q in conv["questions"]
        ]
    others = [
        m.content.split(": ", 1)[-1] for c in conversations[2:] for t in c["turns"] for m in t
    ]
    fill = []
    per_session = (big - len(turns)) // SMALL_CONVERSATIONS
    for conv in conversations[:SMALL_CONVERSATIONS]:
        own = [r for r in turns if r["session"] == conv["id"]]
        fill += _filler(own, others, per_session, seed=len(fill))
    model = str(bundled_model_path())
    small = {"model_path": model, "turns": turns, "fill": [], "questions": questions}
    # mem0's fastest bulk path: one batch embedding, straight into its vector store
    large = {
        "model_path": model,
        "turns": [],
        "fill": fill + turns,
        "questions": questions,
        "fill_mode": "direct",
    }
    return small | {"limit": LIMIT}, large | {"limit": LIMIT}


def _record(session: str, message: Any) -> dict[str, Any]:
    return {
        "session": session,
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "created_at": message.created_at.timestamp(),
    }


def _filler(
    own: list[dict[str, Any]], others: list[str], count: int, seed: int
) -> list[dict[str, Any]]:
    """`count` messages older than the session's first, by its own speakers, each the
    first half of one message of another conversation and the second half of another."""
    rng = random.Random(seed)
    speakers = {r["role"]: r["content"].split(": ", 1)[0] for r in own}
    start = own[0]["created_at"] - 60.0 * (count + 1)
    out = []
    for n in range(count):
        a, b = (rng.choice(others).split() for _ in range(2))
        role = "user" if n % 2 == 0 else "assistant"
        words = a[: max(1, len(a) // 2)] + b[len(b) // 2 :] + [f"({n})"]
        out.append(
            {
                "session": own[0]["session"],
                "id": f"fill-{own[0]['session']}-{n}",
                "role": role,
                "content": f"{speakers.get(role, role)}: {' '.join(words)}",
                "created_at": start + 60.0 * n,
            }
        )
    return out


# --- the tiermem worker ------------------------------------------------------------------


async def tiermem_worker(job: dict[str, Any], summarizer: bool) -> dict[str, Any]:
    import tiermem

    def message(r: dict[str, Any]) -> tiermem.Message:
        when = datetime.fromtimestamp(r["created_at"], UTC)
        return tiermem.Message(r["role"], r["content"], id=r["id"], created_at=when)

    config = tiermem.KVCacheConfig(summarizer_enabled=summarizer, embedding_model=job["model_path"])
    started = time.perf_counter()
    db = Path(job["workdir"]) / "tiermem.db"
    async with await tiermem.KVCacheManager.open(db, config) as mgr:
        # warm: the embedder loaded and the file's pages read, as in a running backend
        await mgr.process_conversation("warm-up", [tiermem.Message("user", "Hello there?")])
        await mgr.delete_session("warm-up")
        load_s = time.perf_counter() - started
        fill_started = time.perf_counter()
        sessions = dict.fromkeys(r["session"] for r in job["fill"])
        for session in sessions:
            await mgr.ingest(session, [message(r) for r in job["fill"] if r["session"] == session])
        fill_s = time.perf_counter() - fill_started
        write_ms = []
        turns_started = time.perf_counter()
        for r in job["turns"]:
            t = time.perf_counter()
            await mgr.process_conversation(r["session"], [message(r)])
            write_ms.append((time.perf_counter() - t) * 1000)
        ingest_s = time.perf_counter() - turns_started
        search_ms, hits = [], []
        for q in job["questions"]:
            t = time.perf_counter()
            found = await mgr.retrieve_context(q["session"], q["query"], limit=job["limit"])
            search_ms.append((time.perf_counter() - t) * 1000)
            hits.append([e.message_ids for e in found.entries])
        summaries = (await mgr.status()).models["summaries_pending"]
    return {
        "system": "tiermem",
        "write_ms": write_ms,
        "fill_s": fill_s,
        "ingest_s": ingest_s,
        "search_ms": search_ms,
        "hits": hits,
        "load_s": load_s,
        "summaries_pending_at_close": summaries,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# --- the driver -----------------------------------------------------------------------


def family_of(name: str) -> str:
    """tiermem or mem0: the systems of one family share the big store."""
    return name.split()[0].strip(",")


def run_worker(command: list[str], job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job | {"workdir": str(workdir)}))
        done = subprocess.run([*command, str(job_file), str(out_file)], check=False)
        if done.returncode != 0:
            raise SystemExit(f"worker failed ({done.returncode}): {' '.join(command)}")
        result: dict[str, Any] = json.loads(out_file.read_text())
        return result


def recall_at(hits: list[list[Any]], questions: list[dict[str, Any]], k: int) -> float:
    """Mean share of each question's evidence among its top k hits (a hit is an id, or
    the ids of the messages it folds together)."""
    scores = []
    for found, q in zip(hits, questions, strict=True):
        top = {i for hit in found[:k] for i in ([hit] if isinstance(hit, str) else hit)}
        scores.append(sum(1 for e in q["evidence"] if e in top) / len(q["evidence"]))
    return statistics.mean(scores)


def figures(
    small: dict[str, Any], big: dict[str, Any], questions: list[dict[str, Any]]
) -> dict[str, float]:
    return {
        "write p50 ms": pct(small["write_ms"], 0.5),
        "write p95 ms": pct(small["write_ms"], 0.95),
        "write 788 turns s": small["ingest_s"],
        "search 1k p50 ms": pct(small["search_ms"], 0.5),
        "search 1k p95 ms": pct(small["search_ms"], 0.95),
        "search 10k p50 ms": pct(big["search_ms"], 0.5),
        "search 10k p95 ms": pct(big["search_ms"], 0.95),
        "recall@10 1k": recall_at(small["hits"], questions, LIMIT),
        "recall@10 10k": recall_at(big["hits"], questions, LIMIT),
        "peak RSS 1k MB": small["peak_rss"] / 2**20,
        "peak RSS 10k MB": big["peak_rss"] / 2**20,
    }


def main(args: argparse.Namespace) -> None:
    if not Path(args.locomo).is_file():
        print(f"skipped: {args.locomo} not found (LoCoMo stays outside the repository)")
        return
    small, big = jobs(Path(args.locomo), args.big)
    systems = {
        name: [sys.executable, __file__, "--worker", *flags] for name, flags in TIERMEM.items()
    }
    if args.peer_python:
        peer = [args.peer_python, str(HERE / "peer_mem0.py")]
        systems |= {name: peer + flags for name, flags in PEER.items()}
    else:
        print("mem0 skipped: no --peer-python (a separate environment with mem0ai)")
    root = Path(tempfile.mkdtemp(prefix="tiermem-side-"))
    # the big stores, filled once per system family by its fastest bulk path, then only
    # searched (so the big rows' RSS is a searching process's)
    filled: dict[str, dict[str, Any]] = {}
    for name, command in systems.items():
        family = family_of(name)
        if family not in filled:
            (root / family).mkdir()
            out = run_worker(command, big | {"questions": []}, root / family)
            filled[family] = {"fill_s": out["fill_s"], "messages": len(big["fill"])}
            print(f"filled {family}: {filled[family]}", flush=True)
    rounds: list[dict[str, dict[str, float]]] = []
    for n in range(args.rounds):
        names = list(systems)
        names = names[n % len(names) :] + names[: n % len(names)]
        row = {}
        for name in names:
            small_dir = root / f"small-{n}-{len(row)}"
            small_dir.mkdir()
            small_out = run_worker(systems[name], small, small_dir)
            big_out = run_worker(systems[name], big | {"fill": []}, root / family_of(name))
            row[name] = figures(small_out, big_out, small["questions"])
            rounded = {k: round(v, 3) for k, v in row[name].items()}
            print(f"round {n + 1} {name}: {json.dumps(rounded)}", flush=True)
        rounds.append(row)
    report = {"rounds": rounds, "filled": filled, "big": args.big}
    print()
    print(table(rounds, filled))
    write_results("side_by_side", report)


def table(rounds: list[dict[str, dict[str, float]]], filled: dict[str, dict[str, Any]]) -> str:
    names = list(rounds[0])
    peer = next((n for n in names if n == "mem0 Memory"), None)
    ours = [n for n in names if n.startswith("tiermem")]
    head = f"| figure | {' | '.join(names)} |"
    if peer:
        head += "".join(
            f" {n.removeprefix('tiermem').strip(', ') or 'default'} / mem0 |" for n in ours
        )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for figure in rounds[0][names[0]]:
        cells = [statistics.median(r[n][figure] for r in rounds) for n in names]
        line = (
            f"| {figure} | "
            + " | ".join(f"{c:.3f}" if "recall" in figure else f"{c:.1f}" for c in cells)
            + " |"
        )
        if peer:
            for n in ours:
                ratios = [r[n][figure] / r[peer][figure] for r in rounds if r[peer][figure]]
                line += f" {statistics.median(ratios):.2f}x |" if ratios else " - |"
        lines.append(line)
    fills = " | ".join(f"{filled[family_of(n)]['fill_s']:.0f}" for n in names)
    lines.append(f"| fill to the big size, s (once, bulk) | {fills} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        import anyio

        flags, (job_path, out_path) = sys.argv[2:-2], sys.argv[-2:]
        job = json.loads(Path(job_path).read_text())
        result = anyio.run(tiermem_worker, job, "--summarizer" in flags)
        Path(out_path).write_text(json.dumps(result))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--locomo", required=True, metavar="PATH")
    parser.add_argument("--peer-python", metavar="PY", help="python of an env with mem0ai")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--big", type=int, default=10_000)
    main(parser.parse_args())
