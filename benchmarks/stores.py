"""SQLite beside PostgreSQL (pgvector), same data, same run: turn p50/p95, ingest rate,
`retrieve_context` p50/p95 at 10k and 100k messages in one session (and 1M over 1k
sessions with --big), and the turns per second of 1, 2 and 4 processes driving one
database.

The stores are what differs, so the rest is kept out of the figures where it would be the
same for both: turns and fills embed with a stand-in (random unit vectors under the bundled
model's name, as benchmarks/retrieval_latency.py), the summarizer is off; queries embed
with the real bundled model, as a user's would, once the filled database is settled
(vacuumed, analysed and checkpointed, as a running one would be). Floors measured in the
same run: one bare write transaction on each store (a turn writes at least one), and on
PostgreSQL one round trip (`SELECT 1`). PostgreSQL is pgserver's (PostgreSQL 16 and
pgvector from the `pgserver` wheel, default settings, on this machine) unless --postgres
names a server.

Run: .venv/bin/python benchmarks/stores.py [--sizes 10000,100000] [--big] [--turns 300]
     [--queries 50] [--processes 1,2,4] [--seconds 20] [--postgres URL] [--keep DIR]
Prints a table and writes benchmarks/results/stores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from common import pct, write_results
from retrieval_latency import Corpus, RandomEmbedder, config, fill, measure

import tiermem
from tiermem._embedder import SentenceTransformerEmbedder
from tiermem._store._connection import raw_connect

ROOT = Path(__file__).resolve().parent.parent


async def turns(db: str, n: int, corpus: Corpus, name: str, dims: int) -> dict[str, Any]:
    """`n` turns of one session (a question every third, which retrieves), each timed."""
    texts = corpus.texts(2 * n)
    questions = corpus.queries(n)
    embedder = RandomEmbedder(name, dims)
    timings = []
    async with await tiermem.KVCacheManager.open(db, config(), embedder=embedder) as mgr:
        for i in range(n):
            user = questions[i] if i % 3 == 2 else texts[2 * i]
            messages = [
                tiermem.Message("user", user, id=f"u{i}"),
                tiermem.Message("assistant", texts[2 * i + 1], id=f"a{i}"),
            ]
            started = time.perf_counter()
            await mgr.process_conversation("turns", messages)
            timings.append((time.perf_counter() - started) * 1000)
    return {"turn_p50_ms": round(pct(timings, 0.5), 2), "turn_p95_ms": round(pct(timings, 0.95), 2)}


async def floors(db: str, folder: Path) -> dict[str, float]:
    """A bare write transaction (and, on PostgreSQL, a round trip), p50 of 200."""
    writes, trips = [], []
    if db.startswith("postgresql://"):
        conn = await asyncpg.connect(db)
        await conn.execute("CREATE TEMP TABLE floor (x int)")
        for i in range(200):
            started = time.perf_counter()
            await conn.fetchval("SELECT 1")
            trips.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute("INSERT INTO floor VALUES ($1)", i)
            writes.append((time.perf_counter() - started) * 1000)
        await conn.close()
        return {"write_floor_ms": round(pct(writes, 0.5), 3), "trip_ms": round(pct(trips, 0.5), 3)}
    sqlite = raw_connect(str(folder / "floor.db"), 10_000)
    sqlite.execute("CREATE TABLE IF NOT EXISTS floor (x INTEGER)")
    for i in range(200):
        started = time.perf_counter()
        sqlite.execute("BEGIN IMMEDIATE")
        sqlite.execute("INSERT INTO floor VALUES (?)", (i,))
        sqlite.execute("COMMIT")
        writes.append((time.perf_counter() - started) * 1000)
    sqlite.close()
    return {"write_floor_ms": round(pct(writes, 0.5), 3)}


# one process of the throughput run: turns over its own sessions and shared ones until the
# deadline; prints how many it made
WORKER = textwrap.dedent(
    """
    import sys, time, anyio, tiermem
    sys.path.insert(0, {bench!r})
    from retrieval_latency import Corpus, RandomEmbedder, config

    async def main(db, worker, start, seconds, name, dims):
        corpus = Corpus(seed=100 + worker)
        texts = corpus.texts(20_000)
        embedder = RandomEmbedder(name, dims, seed=worker)
        async with await tiermem.KVCacheManager.open(db, config(), embedder=embedder) as mgr:
            await mgr.process_conversation(f"warm-{{worker}}", [tiermem.Message("user", "hi")])
            while time.time() < start:
                await anyio.sleep(0.01)
            made = 0
            while time.time() < start + seconds:
                sid = f"shared-{{made % 4}}" if made % 2 else f"own-{{worker}}-{{made % 8}}"
                await mgr.process_conversation(sid, [
                    tiermem.Message("user", texts[made % 20_000], id=f"w{{worker}}-{{made}}")])
                made += 1
        print(made)

    anyio.run(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]),
              sys.argv[5], int(sys.argv[6]))
    """
).format(bench=str(Path(__file__).resolve().parent))


def throughput(db: str, processes: int, seconds: float, name: str, dims: int) -> float:
    """Turns per second of `processes` processes on one database, all started together."""
    start = time.time() + 8  # after every process has imported and opened
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, db, str(w), str(start), str(seconds), name, str(dims)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(processes)
    ]
    made = [int(p.communicate(timeout=seconds + 300)[0].split()[-1]) for p in workers]
    return round(sum(made) / seconds, 1)


def start_postgres(folder: Path) -> tuple[str, Any]:
    import pgserver

    server = pgserver.get_server(folder / "postgres", cleanup_mode="stop")
    return str(server.get_uri()), server


async def fresh(server: str, name: str) -> str:
    conn = await asyncpg.connect(server)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    parts = urllib.parse.urlsplit(server)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def settle(db: str) -> None:
    """After a fill, before timing searches: the database as a running deployment keeps
    it (PostgreSQL vacuumed and analysed, as autovacuum would, and checkpointed; SQLite's
    WAL checkpointed), so neither store's background work lands inside the timings."""
    if db.startswith("postgresql://"):
        conn = await asyncpg.connect(db)
        try:
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
        return
    sqlite = raw_connect(db, 60_000)
    try:
        sqlite.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        sqlite.close()


def size_mib(db: str) -> float:
    """The database's size: the file and its WAL, or PostgreSQL's database size."""
    if not db.startswith("postgresql://"):
        total = sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s))
        return round(total / 2**20, 1)

    async def read() -> int:
        conn = await asyncpg.connect(db)
        try:
            return int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        finally:
            await conn.close()

    return round(anyio.run(read) / 2**20, 1)


def main(args: argparse.Namespace) -> None:
    real = SentenceTransformerEmbedder()
    name, dims = real.model_name, real.dimensions
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tiermem-stores-"))
    folder.mkdir(parents=True, exist_ok=True)
    server, handle = (args.postgres, None) if args.postgres else start_postgres(folder)
    stores = {
        "sqlite": lambda label: str(folder / f"{label}.db"),
        "postgres": lambda label: anyio.run(fresh, server, f"bench_{label}"),
    }
    sizes = [int(s) for s in args.sizes.split(",") if s]
    cases = [(f"1 session x {n:,}", {"big": n}) for n in sizes]
    if args.big:
        cases.append(("1k sessions x 1,000", {f"s{i:04d}": 1000 for i in range(1000)}))
    corpus = Corpus()
    queries = corpus.queries(args.queries)
    rows: list[dict[str, Any]] = []
    try:
        for store, database in stores.items():
            # the same texts on both stores: a fresh corpus of the same seed per store
            row: dict[str, Any] = {"store": store, **anyio.run(floors, database("floor"), folder)}
            row.update(anyio.run(turns, database("turns"), args.turns, Corpus(), name, dims))
            for label, sessions in cases:
                key = label.replace(" ", "_").replace(",", "").replace("1k", "k")
                db = database(key)
                total = sum(sessions.values())
                filled = anyio.run(fill, db, sessions, Corpus(seed=11), name, dims)
                row[f"ingest_per_s {label}"] = round(total / filled)
                anyio.run(settle, db)
                figures = anyio.run(measure, db, list(sessions), queries)
                row[f"retrieve_p50_ms {label}"] = figures["p50_ms"]
                row[f"retrieve_p95_ms {label}"] = figures["p95_ms"]
                row[f"mib {label}"] = size_mib(db)
            for n in (int(p) for p in args.processes.split(",") if p):
                db = database(f"procs{n}")
                row[f"turns_per_s x{n}"] = throughput(db, n, args.seconds, name, dims)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if handle is not None:
            handle.cleanup()
    print(f"\n{'figure':<40}" + "".join(f"{r['store']:>12}" for r in rows))
    for figure in rows[0]:
        if figure != "store":
            print(f"{figure:<40}" + "".join(f"{r.get(figure, '-')!s:>12}" for r in rows))
    write_results("stores", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--big", action="store_true", help="also 1M messages over 1k sessions")
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--postgres", help="a PostgreSQL server's URL (default: pgserver's)")
    parser.add_argument("--keep", help="folder for the databases")
    main(parser.parse_args())
