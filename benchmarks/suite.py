"""The benchmark suite: each figure beside its floor, measured in the same run.

- turns: `process_conversation` p50/p95 without a clear (plain statements, and questions
  that retrieve), and with a clear; the background summarizer's time shown apart. Floor:
  the bare embedding model (as the default backend runs it, outside tiermem) embedding
  one message.
- ingest: messages/s through `ingest` (embeddings included). Floors: the bare model
  embedding the same texts in batches, and a raw SQLite insert of the same rows.
- retrieval: `retrieve_context` p50/p95 at 1k and 10k messages (100k with --full). Floor:
  embedding the query with the bare model, then a numpy exact cosine search over the same
  vectors. Databases are filled with random unit vectors (see retrieval_latency.py).
- maintenance: `perform_maintenance` evicting idle sessions and pruning snapshots.
- peak RSS of the whole run.

Run: make bench   (= .venv/bin/python benchmarks/suite.py [--full] [--turns 96])
Prints a table and writes benchmarks/results/suite.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import numpy as np
import pysqlite3 as sqlite3
from common import pct, write_results
from retrieval_eval import FIXTURE
from retrieval_latency import Corpus, RandomEmbedder, fill

import tiermem
from tiermem._embedder import SentenceTransformerEmbedder, make_embedder

Encode = Callable[[list[str]], np.ndarray]


@dataclass
class Row:
    figure: str
    value: float
    unit: str
    floor: str = ""
    floor_value: float | None = None
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if not self.floor_value:
            return None
        return self.value / self.floor_value


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a list that receives the block's duration in ms."""
    out: list[float] = []
    started = time.perf_counter()
    yield out
    out.append((time.perf_counter() - started) * 1000)


class SummaryTimes:
    """A telemetry sink keeping the background summarizer's durations."""

    def __init__(self) -> None:
        self.ms: list[float] = []

    def emit(self, event: object) -> None:
        if isinstance(event, tiermem.SummaryEvent) and event.error is None:
            self.ms.append(event.duration_ms)


def chat_turns(n: int) -> list[tuple[str, str]]:
    """(user, assistant) pairs of real-looking chat: the retrieval evaluation's messages."""
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    msgs = [m for c in data["conversations"] for m in c["messages"]]
    pairs = [
        (u["content"], a["content"])
        for u, a in itertools.pairwise(msgs)
        if u["role"] == "user" and a["role"] == "assistant"
    ]
    return pairs[:n]


async def turns(model: Encode, n: int, summaries: bool) -> list[Row]:
    """Turns back to back, each timed right after the bare model embeds its user message
    (the floor), so both see the same machine. Without summaries this is the turn's own
    path; with them (the default config) the GGUF model writes each clear's summary in the
    background, on the same two cores, for most of the run."""
    sink = SummaryTimes()
    one: list[float] = []
    plain: list[float] = []
    asking: list[float] = []
    clearing: list[float] = []
    config = tiermem.KVCacheConfig(summarizer_enabled=summaries)
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "turns.db"
        async with await tiermem.KVCacheManager.open(db, config, telemetry=sink) as mgr:
            await mgr.process_conversation("warm", [tiermem.Message("user", "warm up?")])
            for user, reply in chat_turns(n):
                with stopwatch() as ms:
                    model([user])
                one.extend(ms)
                msgs = [tiermem.Message("user", user), tiermem.Message("assistant", reply)]
                with stopwatch() as ms:
                    result = await mgr.process_conversation("bench", msgs)
                bucket = asking if result.retrieval_result is not None else plain
                (clearing if result.should_clear_cache else bucket).extend(ms)
            await mgr.wait_for_summaries(timeout=600)
    floor = "embed the user message (bare model)"
    f50 = pct(one, 0.5)
    how = "summaries running" if summaries else "no summarizer"
    rows = [
        Row(f"turn ({how}), no clear, no retrieval p50", pct(plain, 0.5), "ms", floor, f50,
            "<= 3x floor", pct(plain, 0.5) <= 3 * f50),
        Row(f"turn ({how}), no clear, no retrieval p95", pct(plain, 0.95), "ms", floor,
            pct(one, 0.95), "< 40 ms", pct(plain, 0.95) < 40),
        Row(f"turn ({how}), no clear, retrieving p50", pct(asking, 0.5), "ms", floor, f50),
        Row(f"turn ({how}), no clear, retrieving p95", pct(asking, 0.95), "ms", floor,
            pct(one, 0.95)),
        Row(f"turn ({how}), with a clear p50", pct(clearing, 0.5), "ms", floor, f50),
    ]  # fmt: skip
    if summaries:
        rows.append(
            Row("background summary (not in any turn) p50", pct(sink.ms, 0.5), "ms",
                target="clear turns do not wait for it",
                met=bool(sink.ms) and pct(clearing, 0.95) < pct(sink.ms, 0.5)),
        )  # fmt: skip
    return rows


def raw_insert(db: Path, texts: list[str], vectors: np.ndarray) -> float:
    """ms to insert the same rows with no FTS, no index, no checks: one executemany."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(
        "CREATE TABLE m (id INTEGER PRIMARY KEY, position INT, message_id TEXT, role TEXT, "
        "content TEXT, embedding BLOB)"
    )
    rows = [
        (i, f"m{i}", ("user", "assistant")[i % 2], t, v.tobytes())
        for i, (t, v) in enumerate(zip(texts, vectors, strict=True))
    ]
    started = time.perf_counter()
    with con:
        con.executemany(
            "INSERT INTO m (position, message_id, role, content, embedding) VALUES (?,?,?,?,?)",
            rows,
        )
    ms = (time.perf_counter() - started) * 1000
    con.close()
    return ms


async def ingest(model: Encode, n: int, corpus: Corpus) -> list[Row]:
    """`ingest` of `n` messages in chunks of 500, each chunk right after the bare model
    embeds the same texts (the floor), so both see the same machine."""
    texts = corpus.texts(n)
    msgs = [
        tiermem.Message(("user", "assistant")[i % 2], t, id=f"m{i}") for i, t in enumerate(texts)
    ]
    embed_ms = ingest_ms = 0.0
    vectors = []
    config = tiermem.KVCacheConfig(summarizer_enabled=False)
    with tempfile.TemporaryDirectory() as folder:
        async with await tiermem.KVCacheManager.open(Path(folder) / "ingest.db", config) as mgr:
            await mgr.ingest("warm", [tiermem.Message("user", "warm up")])
            for start in range(0, n, 500):
                chunk = slice(start, start + 500)
                with stopwatch() as floor:
                    vectors.append(model(texts[chunk]))
                with stopwatch() as ms:
                    await mgr.ingest("bulk", msgs[chunk])
                embed_ms, ingest_ms = embed_ms + floor[0], ingest_ms + ms[0]
        insert_ms = raw_insert(Path(folder) / "raw.db", texts, np.concatenate(vectors))
    rate = n / (ingest_ms / 1000)
    embed_rate = n / (embed_ms / 1000)
    return [
        Row(f"ingest {n:,} messages", rate, "msg/s", "embed the same texts (bare model)",
            embed_rate, ">= 0.6x floor", rate >= 0.6 * embed_rate),
        Row(f"ingest {n:,} messages", rate, "msg/s", "raw SQLite insert of the same rows",
            n / (insert_ms / 1000)),
    ]  # fmt: skip


async def retrieval(model: Encode, sizes: list[int], queries: int) -> list[Row]:
    rows = []
    corpus = Corpus()
    questions = corpus.queries(queries)
    bundled = SentenceTransformerEmbedder()  # its name and size; not loaded here
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            db = Path(folder) / f"r{size}.db"
            await fill(db, {"big": size}, corpus, bundled.model_name, bundled.dimensions)
            matrix = session_vectors(db)
            floor: list[float] = []
            for q in questions:
                with stopwatch() as ms:
                    scores = matrix @ model([q])[0]
                    top = np.argpartition(-scores, 10)[:10]
                    top = top[np.argsort(-scores[top])]  # best first, as a search returns them
                floor.extend(ms)
            config = tiermem.KVCacheConfig(summarizer_enabled=False)
            measured = []
            async with await tiermem.KVCacheManager.open(db, config) as mgr:
                await mgr.retrieve_context("big", "warm up the embedder?")
                for q in questions:
                    with stopwatch() as ms:
                        await mgr.retrieve_context("big", q, limit=10)
                    measured.extend(ms)
            floor_p50 = pct(floor, 0.5)
            p50 = pct(measured, 0.5)
            target = "<= 4x floor" if size == 10_000 else ""
            met = p50 <= 4 * floor_p50 if target else None
            rows += [
                Row(f"retrieve_context {size:,} msgs p50", p50, "ms",
                    "embed query + numpy exact search (p50)", floor_p50, target, met),
                Row(f"retrieve_context {size:,} msgs p95", pct(measured, 0.95), "ms",
                    "embed query + numpy exact search (p95)", pct(floor, 0.95)),
            ]  # fmt: skip
    return rows


def session_vectors(db: Path) -> np.ndarray:
    con = sqlite3.connect(db)
    blobs = [r[0] for r in con.execute("SELECT embedding FROM message_embeddings")]
    con.close()
    return np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs])


async def maintenance(sessions: int) -> list[Row]:
    """`sessions` sessions, each cleared 6 times (one snapshot each), go idle; one
    maintenance pass flushes and drops them all and prunes each to 4 snapshots."""
    clock = [time.time()]
    config = tiermem.KVCacheConfig(summarizer_enabled=False, clear_after_conversations=1)
    with tempfile.TemporaryDirectory() as folder:
        async with await tiermem.KVCacheManager.open(
            Path(folder) / "m.db", config, embedder=RandomEmbedder("random", 384),
            clock=lambda: clock[0],
        ) as mgr:  # fmt: skip
            for s in range(sessions):
                for t in range(6):
                    msg = tiermem.Message("user", f"remember: item {t} of session {s} is key")
                    await mgr.process_conversation(f"s{s}", [msg])
            clock[0] += config.idle_eviction_seconds + 1
            result = await mgr.perform_maintenance()
    return [
        Row(f"maintenance: {result.sessions_cleaned} idle sessions, "
            f"{result.snapshots_pruned} snapshots pruned", result.duration_ms, "ms"),
    ]  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = [
        f"{'figure':<56}{'value':>14}  {'floor, same run':<40}{'floor':>12}{'ratio':>7}  target",
    ]
    for r in rows:
        unit = f" {r.unit}"
        value = f"{r.value:,.1f}{unit}"
        floor = f"{r.floor_value:,.1f}{unit}" if r.floor_value is not None else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        verdict = "" if r.met is None else (" met" if r.met else " NOT MET")
        lines.append(
            f"{r.figure:<56}{value:>14}  {r.floor:<40}{floor:>12}{ratio:>7}  {r.target}{verdict}"
        )
    return "\n".join(lines)


def bare_model() -> Encode:
    """The embedding model as the default backend runs it, called directly (no pool, no
    worker thread, none of tiermem's work): the floors' embedder."""
    embedder = make_embedder(tiermem.KVCacheConfig())
    loaded = embedder._load()  # private: the backend's own model, outside tiermem's calls
    return lambda texts: embedder._encode(loaded, texts)  # private: as above


def main(args: argparse.Namespace) -> None:
    model = bare_model()
    model(["warm up"])
    corpus = Corpus(seed=3)
    sizes = [1_000, 10_000] + ([100_000] if args.full else [])
    rows: list[Row] = []
    sections = {
        "turns": lambda: turns(model, args.turns, summaries=False),
        "turns-bg": lambda: turns(model, args.turns, summaries=True),
        "ingest": lambda: ingest(model, args.ingest, corpus),
        "retrieval": lambda: retrieval(model, sizes, args.queries),
        "maintenance": lambda: maintenance(args.sessions),
    }
    for name in args.only.split(","):
        new = anyio.run(sections[name])
        print(table(new).split("\n", 1)[1], flush=True)
        rows += new
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(Row("peak RSS of the whole run", peak, "MiB"))
    print("\n" + table(rows))
    out = write_results("suite", [{**asdict(r), "ratio": r.ratio} for r in rows])
    print(f"\nwrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=96)
    parser.add_argument("--ingest", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=100, help="for the maintenance pass")
    parser.add_argument("--only", default="turns,turns-bg,ingest,retrieval,maintenance")
    parser.add_argument("--full", action="store_true", help="also retrieval at 100k messages")
    main(parser.parse_args())
