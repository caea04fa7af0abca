"""Retrieval quality: evidence recall@5 and @10 of `retrieve_context` beside plain baselines.

Each conversation of fixtures/retrieval_eval.json (5 users, 320 turns each, seven months of
timestamped chat) is fed through `process_conversation` turn by turn with the default
config and the bundled models, so clears, snapshots and summaries happen as in production.
Then every question is asked with `retrieve_context(limit=10)`. A question's recall@k is
the share of its evidence messages among the top k hits; the table averages it overall
and per question type. In the same run, on the same stored messages and vectors:

- bm25: FTS5 bm25 over all the conversation's messages, the question's words OR-ed;
- vector: exact cosine (numpy) between the question's MiniLM embedding and every message;
- ablations: the default with one retrieval feature turned off at a time.

With `--locomo PATH` the conversations are LoCoMo's instead (real long chats between two
people, with labelled evidence; the protocol of ../shared/data/README.md): speaker_a is the
user, speaker_b the assistant, a message reads "Speaker: text" plus " [shares a photo:
caption]", its id is the dia_id, created_at the session's date plus one minute per message;
questions of categories 1-4 (multi-hop, temporal, inference, single-hop). The data stays
outside the repository (its license forbids copying it in): the run is skipped, exit 0,
when the file is absent.

Run: .venv/bin/python benchmarks/retrieval_eval.py [--locomo PATH] [--no-summarizer]
[--keep DIR] [--embedding-backend onnx|onnx-int8|sentence-transformers]
(`--no-summarizer` skips the LLM to iterate faster; it does not change what is stored or
searched, only the summaries. `--keep DIR` keeps the databases and reuses them.)
Prints a table and writes benchmarks/results/retrieval_eval.json (or retrieval_locomo.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pysqlite3.dbapi2 as sqlite3
import sqlite_vec
from common import write_results

import tiermem
from tiermem._embedder import Embedder, make_embedder
from tiermem._text import words

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "retrieval_eval.json"
K = (5, 10)

# One retrieval feature off at a time (config overrides on the default).
ABLATIONS: dict[str, dict[str, Any]] = {
    "no neighbour context": {"retrieval_neighbour_weight": 0.0},
    "no time/speaker cues": {"retrieval_query_cues": False},
    "no name hop": {"retrieval_entity_hop": False},
    "vector only in fusion": {"vector_weight": 1.0},
    "bm25 only in fusion": {"vector_weight": 0.0},
}


def fixture_conversations(path: Path) -> list[dict[str, Any]]:
    """The synthetic fixture's conversations: messages grouped by turn (the id without its
    last part), in order."""
    out = []
    for conv in json.loads(path.read_text(encoding="utf-8"))["conversations"]:
        grouped: dict[str, list[tiermem.Message]] = {}
        for m in conv["messages"]:
            grouped.setdefault(m["id"].rsplit("-", 1)[0], []).append(
                tiermem.Message(
                    m["role"],
                    m["content"],
                    id=m["id"],
                    created_at=datetime.fromisoformat(m["created_at"]),
                )
            )
        out.append(
            {"id": conv["id"], "turns": list(grouped.values()), "questions": conv["questions"]}
        )
    return out


LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "inference", 4: "single-hop"}


def locomo_conversations(path: Path) -> list[dict[str, Any]]:
    """LoCoMo samples in the protocol's form: a turn is a user message and the replies
    after it; evidence ids as labelled ("D8:6; D9:17" read as two), questions without
    evidence left out."""
    out = []
    for sample in json.loads(path.read_text(encoding="utf-8")):
        conv = sample["conversation"]
        roles = {conv["speaker_a"]: "user", conv["speaker_b"]: "assistant"}
        turns: list[list[tiermem.Message]] = []
        n = 1
        while f"session_{n}" in conv:
            start = datetime.strptime(conv[f"session_{n}_date_time"], "%I:%M %p on %d %B, %Y")
            for i, t in enumerate(conv[f"session_{n}"]):
                content = f"{t['speaker']}: {t['text']}"
                if t.get("blip_caption"):
                    content += f" [shares a photo: {t['blip_caption']}]"
                message = tiermem.Message(
                    roles[t["speaker"]],
                    content,
                    id=t["dia_id"],
                    created_at=(start + timedelta(minutes=i)).replace(tzinfo=UTC),
                )
                if message.role == "user" or not turns:
                    turns.append([])
                turns[-1].append(message)
            n += 1
        questions = [
            {
                "id": f"{sample['sample_id']}-q{i}",
                "question": q["question"],
                "evidence": [e.strip() for ev in q["evidence"] for e in ev.split(";")],
                "type": LOCOMO_CATEGORIES[q["category"]],
            }
            for i, q in enumerate(sample["qa"])
            # two questions label no evidence at all: nothing to find, left out
            if q["category"] in LOCOMO_CATEGORIES and any(e.strip() for e in q["evidence"])
        ]
        out.append({"id": sample["sample_id"], "turns": turns, "questions": questions})
    return out


def recall(ranked: list[list[str]], evidence: list[str], k: int) -> float:
    """Share of `evidence` among the top k hits (a hit carries the ids of every message
    with its text: tiermem folds repeats into one hit, the baselines do not)."""
    top = {i for hit in ranked[:k] for i in hit}
    return sum(1 for e in evidence if e in top) / len(evidence)


async def feed(db: Path, conv: dict[str, Any], config: tiermem.KVCacheConfig) -> dict[str, Any]:
    started = time.perf_counter()
    clears = 0
    async with await tiermem.KVCacheManager.open(db, config=config) as mgr:
        for turn in conv["turns"]:
            result = await mgr.process_conversation(conv["id"], turn)
            clears += result.should_clear_cache
        fed = time.perf_counter() - started
        await mgr.wait_for_summaries()  # background summaries catch up
        summary = await mgr.get_summary(conv["id"])
    return {
        "seconds": round(fed, 1),
        "summaries_done_s": round(time.perf_counter() - started, 1),
        "clears": clears,
        "summary_clears": summary.clear_count if summary else 0,
    }


async def ask(
    db: Path, conv: dict[str, Any], config: tiermem.KVCacheConfig
) -> dict[str, dict[str, list[list[str]]]]:
    """Ranked message ids per question, for the default and each ablation."""
    out: dict[str, dict[str, list[list[str]]]] = defaultdict(dict)
    async with await tiermem.KVCacheManager.open(db, config=config) as mgr:
        for name, overrides in {"tiermem": {}, **ABLATIONS}.items():
            mgr.update_config(config.replace(**overrides))
            for q in conv["questions"]:
                hits = await mgr.retrieve_context(conv["id"], q["question"], limit=10)
                out[name][q["id"]] = [h.message_ids for h in hits.entries]
    return out


def baselines(
    db: Path, conv: dict[str, Any], embedder: Embedder
) -> dict[str, dict[str, list[list[str]]]]:
    conn = sqlite3.connect(str(db))
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    key = conn.execute("SELECT id FROM sessions WHERE session_id = ?", (conv["id"],)).fetchone()[0]
    rows = conn.execute(
        "SELECT m.id, m.message_id, v.embedding FROM messages m "
        "JOIN message_embeddings v ON v.message_rowid = m.id WHERE m.session_key = ?",
        (key,),
    ).fetchall()
    ids = [r[1] for r in rows]
    matrix = np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows])
    questions = [q["question"] for q in conv["questions"]]
    vectors = anyio.run(embedder.embed, questions)
    out: dict[str, dict[str, list[list[str]]]] = {"bm25": {}, "vector": {}}
    for q, qv in zip(conv["questions"], vectors, strict=True):
        terms = words(q["question"])
        query = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        out["bm25"][q["id"]] = [
            [r[0]]
            for r in conn.execute(
                "SELECT m.message_id FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                "WHERE messages_fts MATCH ? ORDER BY bm25(messages_fts, 1.0, 0.0) LIMIT 10",
                (f'session_key : "{key}" AND content : ({query})',),
            )
        ]
        order = np.argsort(-(matrix @ qv))[:10]
        out["vector"][q["id"]] = [[ids[i]] for i in order]
    conn.close()
    return out


def table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    head = f"{'method':<24}" + "".join(f"{c:>14}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, values in rows.items():
        lines.append(f"{name:<24}" + "".join(f"{values.get(c, 0.0):>14.3f}" for c in columns))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.locomo:
        if not Path(args.locomo).is_file():
            print(f"skipped: {args.locomo} not found (LoCoMo stays outside the repository)")
            return
        conversations = locomo_conversations(Path(args.locomo))
    else:
        conversations = fixture_conversations(FIXTURE)
    config = tiermem.KVCacheConfig(
        summarizer_enabled=not args.no_summarizer, embedding_backend=args.embedding_backend
    )
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tiermem-eval-"))
    folder.mkdir(parents=True, exist_ok=True)
    embedder = make_embedder(config)  # the vector baseline's, on the same backend
    ranked: dict[str, dict[str, list[list[str]]]] = defaultdict(dict)
    feeds = {}
    questions = {}
    for conv in conversations[: args.conversations]:
        db = folder / f"{conv['id']}.db"
        if not db.exists():
            feeds[conv["id"]] = anyio.run(feed, db, conv, config)
            print(f"fed {conv['id']}: {feeds[conv['id']]}", flush=True)
        for name, per_q in anyio.run(ask, db, conv, config).items():
            ranked[name].update(per_q)
        for name, per_q in baselines(db, conv, embedder).items():
            ranked[name].update(per_q)
        questions.update({q["id"]: q for q in conv["questions"]})

    types = sorted({q["type"] for q in questions.values()})
    columns = [f"all@{k}" for k in K] + [f"{t}@10" for t in types]
    scores: dict[str, dict[str, float]] = {}
    order = ["bm25", "vector", "tiermem", *ABLATIONS]
    for name in order:
        per_type: dict[str, list[float]] = defaultdict(list)
        for qid, q in questions.items():
            for k in K:
                per_type[f"all@{k}"].append(recall(ranked[name][qid], q["evidence"], k))
            per_type[f"{q['type']}@10"].append(recall(ranked[name][qid], q["evidence"], 10))
        scores[name] = {c: float(np.mean(v)) for c, v in per_type.items()}
    counts = {t: sum(1 for q in questions.values() if q["type"] == t) for t in types}
    print(f"\n{len(questions)} questions ({', '.join(f'{t} {n}' for t, n in counts.items())})")
    print(table(scores, columns))
    best = max(scores["bm25"]["all@10"], scores["vector"]["all@10"])
    margin = scores["tiermem"]["all@10"] - best
    print(f"\ntiermem recall@10 - best baseline = {margin * 100:+.1f} points")
    below = [
        c for c in columns if scores["tiermem"][c] < max(scores["bm25"][c], scores["vector"][c])
    ]
    print(f"columns where the better baseline beats tiermem: {', '.join(below) or 'none'}")
    misses = {
        qid: {"question": q["question"], "evidence": q["evidence"], "top10": ranked["tiermem"][qid]}
        for qid, q in questions.items()
        if recall(ranked["tiermem"][qid], q["evidence"], 10) < 1.0
    }
    report = {
        "questions": len(questions),
        "per_type": counts,
        "scores": scores,
        "margin_at_10": margin,
        "below_better_baseline": below,
        "feeds": feeds,
        "summarizer": not args.no_summarizer,
        "embedding_backend": args.embedding_backend,
        "misses": misses,
    }
    name = "retrieval_locomo" if args.locomo else "retrieval_eval"
    default = tiermem.KVCacheConfig().embedding_backend
    suffix = "" if args.embedding_backend == default else f"_{args.embedding_backend}"
    write_results(name + suffix, report)
    print(json.dumps({k: report[k] for k in ("questions", "margin_at_10", "feeds")}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--locomo", metavar="PATH", help="LoCoMo JSON (e.g. locomo-dev.json)")
    parser.add_argument("--no-summarizer", action="store_true")
    parser.add_argument("--keep", help="folder for the databases (reused when present)")
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument(
        "--embedding-backend",
        default=tiermem.KVCacheConfig().embedding_backend,
        choices=["onnx", "onnx-int8", "sentence-transformers"],
    )
    main(parser.parse_args())
