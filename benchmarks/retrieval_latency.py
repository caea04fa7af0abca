"""`retrieve_context` latency at scale: one session of 1k, 10k and 100k messages, and a
database of 1M messages over 1k sessions.

The databases are filled through `ingest` with synthetic text (Zipf-distributed words, so
FTS5 posting lists look like real chat) and random unit vectors from a stand-in embedder
that carries the bundled model's name and dimension: embedding 1M texts with MiniLM would
take hours here and does not change what a query costs. Queries then run on a manager
opened with the real bundled embedder, so every figure includes embedding the query.

Run: .venv/bin/python benchmarks/retrieval_latency.py [--sizes 1000,10000,100000]
     [--big] [--queries 50] [--keep DIR]
Prints a table and writes benchmarks/results/retrieval_latency.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from common import write_results

import tiermem
from tiermem._embedder import SentenceTransformerEmbedder

VOCABULARY = 20_000
CHUNK = 20_000


class RandomEmbedder:
    """Random unit vectors under the real model's name: fills big databases fast."""

    def __init__(self, name: str, dimensions: int, seed: int = 7) -> None:
        self.model_name, self.dimensions = name, dimensions
        self._rng = np.random.default_rng(seed)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._rng.standard_normal((len(texts), self.dimensions)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class Corpus:
    """Synthetic chat text: 8-30 words each from a Zipf-distributed vocabulary."""

    def __init__(self, seed: int = 11) -> None:
        self._rng = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        self.words = [
            "".join(self._rng.choice(letters, size=int(n)))
            for n in self._rng.integers(3, 10, VOCABULARY)
        ]
        ranks = np.arange(1, VOCABULARY + 1)
        self._p = (1.0 / ranks) / (1.0 / ranks).sum()

    def texts(self, n: int) -> list[str]:
        lengths = self._rng.integers(8, 31, n)
        picks = self._rng.choice(VOCABULARY, size=int(lengths.sum()), p=self._p)
        out, at = [], 0
        for length in lengths:
            out.append(" ".join(self.words[i] for i in picks[at : at + length]))
            at += length
        return out

    def queries(self, n: int) -> list[str]:
        """Questions of 3-8 content words, like the evaluation's (2-7 keywords each)."""
        picks = self._rng.choice(VOCABULARY, size=(n, 8), p=self._p)
        sizes = self._rng.integers(3, 9, n)
        return [
            "what did I say about " + " ".join(self.words[i] for i in row[:size]) + "?"
            for row, size in zip(picks, sizes, strict=True)
        ]


def messages(texts: list[str], offset: int) -> list[tiermem.Message]:
    roles = ("user", "assistant")
    return [
        tiermem.Message(roles[(offset + i) % 2], t, id=f"m{offset + i}")
        for i, t in enumerate(texts)
    ]


def config() -> tiermem.KVCacheConfig:
    return tiermem.KVCacheConfig(summarizer_enabled=False)


async def fill(db: Path, sessions: dict[str, int], corpus: Corpus, name: str, dims: int) -> float:
    started = time.perf_counter()
    embedder = RandomEmbedder(name, dims)
    async with await tiermem.KVCacheManager.open(db, config(), embedder=embedder) as mgr:
        for session, count in sessions.items():
            for offset in range(0, count, CHUNK):
                texts = corpus.texts(min(CHUNK, count - offset))
                await mgr.ingest(session, messages(texts, offset), batch_size=1000)
    return time.perf_counter() - started


async def measure(db: Path, sessions: list[str], queries: list[str]) -> dict[str, Any]:
    async with await tiermem.KVCacheManager.open(db, config()) as mgr:
        await mgr.retrieve_context(sessions[0], "warm up the embedder?")
        timings, hits = [], []
        for i, q in enumerate(queries):
            started = time.perf_counter()
            result = await mgr.retrieve_context(sessions[i % len(sessions)], q, limit=10)
            timings.append((time.perf_counter() - started) * 1000)
            hits.append(len(result.entries))
    ordered = sorted(timings)
    return {
        "p50_ms": round(ordered[len(ordered) // 2], 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
        "max_ms": round(ordered[-1], 1),
        "mean_hits": round(sum(hits) / len(hits), 1),
    }


def main(args: argparse.Namespace) -> None:
    real = SentenceTransformerEmbedder()
    name, dims = real.model_name, real.dimensions
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tiermem-lat-"))
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus()
    queries = corpus.queries(args.queries)
    cases: list[tuple[str, dict[str, int]]] = [
        (f"1 session x {n:,}", {"big": n}) for n in (int(s) for s in args.sizes.split(",") if s)
    ]
    if args.big:
        cases.append(("1k sessions x 1,000", {f"s{i:04d}": 1000 for i in range(1000)}))
    rows = []
    for label, sessions in cases:
        db = folder / (label.replace(" ", "_").replace(",", "") + ".db")
        fill_s = None
        if not db.exists():
            fill_s = anyio.run(fill, db, sessions, corpus, name, dims)
        figures = anyio.run(measure, db, list(sessions), queries)
        row = {
            "case": label,
            "messages": sum(sessions.values()),
            "fill_s": round(fill_s, 1) if fill_s else None,
            "db_mib": round(db.stat().st_size / 2**20),
            **figures,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'case':<24}{'messages':>11}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'db MiB':>8}")
    for r in rows:
        print(
            f"{r['case']:<24}{r['messages']:>11,}{r['p50_ms']:>9}{r['p95_ms']:>9}"
            f"{r['max_ms']:>9}{r['db_mib']:>8}"
        )
    write_results("retrieval_latency", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--big", action="store_true", help="also 1M messages over 1k sessions")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--keep", help="folder for the databases (reused when present)")
    main(parser.parse_args())
