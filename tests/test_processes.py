"""Several worker processes on one database, as under `uvicorn --workers N` or replicas of a
backend: 4 workers run turns over shared and private sessions of two namespaces (500 each
on a SQLite file, 2,000 each on PostgreSQL) while one of them is SIGKILLed at random
moments and restarted. Afterwards the database is whole, every acknowledged message is
stored once in its own session, counters agree with the histories, every worker's view
equals the database, and no tenant's text reached another tenant."""

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import asyncpg
import pytest

import tiermem
from tests import pg, rawfile
from tests.conftest import SHAPE
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

ROOT = Path(__file__).parent.parent
WORKERS = 4
TURNS = {"sqlite": 500, "postgres": 2000}  # per worker
CLEAR_AFTER = 7
SHARED = [("tenant-a", "shared-0"), ("tenant-b", "shared-1"), ("tenant-a", "shared-2")]


def plan(worker: int, turns: int) -> list[tuple[str, str]]:
    """The (namespace, session) of each of a worker's turns: half shared, half private."""
    rng = random.Random(worker)
    own = ("tenant-a" if worker % 2 else "tenant-b", f"private-{worker}")
    return [rng.choice(SHARED) if rng.random() < 0.5 else own for _ in range(turns)]


# runs a worker's plan from its first unacknowledged turn; an acknowledgement is a line
# in the worker's log written after the call returned; then, once every worker is done,
# writes what it sees of every session
WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    import anyio, tiermem
    from tests.conftest import SHAPE
    from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter
    from tests.test_processes import CLEAR_AFTER, SHARED, WORKERS, plan

    async def main(folder, worker, database, turns):
        folder = os.path.abspath(folder)
        log = os.path.join(folder, f"acks-{{worker}}")
        done = len(open(log).read().split()) if os.path.exists(log) else 0
        config = tiermem.KVCacheConfig(
            kv_shape=SHAPE, summary_mode="inline", clear_after_conversations=CLEAR_AFTER,
            busy_timeout_ms=60_000)
        mgr = await tiermem.KVCacheManager.open(
            database, config, embedder=HashingEmbedder(),
            summarizer=RecordingSummarizer(), tokenizer=WordCounter())
        leaks = 0
        with open(log, "a") as acks:
            for turn, (ns, sid) in enumerate(plan(worker, turns)):
                if turn < done:
                    continue
                text = f"{{ns}} keeps secret {{worker}}x{{turn}} in {{sid}}"
                await mgr.process_conversation(
                    sid, [tiermem.Message("user", text, id=f"w{{worker}}-t{{turn}}")],
                    namespace=ns)
                acks.write(f"{{turn}}\\n")
                acks.flush()
                if turn % 25 == 0:
                    hits = await mgr.retrieve_context(sid, "which secret?", namespace=ns)
                    leaks += sum(not h.text.startswith(ns + " ") for h in hits.entries)
        open(os.path.join(folder, f"done-{{worker}}"), "w").write(str(leaks))
        sys.stdin.read()  # the parent closes it once every worker is done
        sessions = set(SHARED) | {{
            (ns, sid) for w in range(WORKERS) for ns, sid in plan(w, turns)}}
        view = {{}}
        for ns, sid in sorted(sessions):
            state = await mgr.get_session_state(sid, namespace=ns)
            history = await mgr.get_conversation_history(sid, namespace=ns)
            view[f"{{ns}}/{{sid}}"] = [
                state.message_count, state.conversation_count, state.clear_count,
                [m.id for m in history]]
        await mgr.aclose()
        open(os.path.join(folder, f"view-{{worker}}"), "w").write(json.dumps(view))

    anyio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    """
).format(root=str(ROOT))


def start(folder: Path, worker: int, database: str, turns: int) -> subprocess.Popen[bytes]:
    with open(folder / f"stderr-{worker}", "ab") as err:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, str(folder), str(worker), database, str(turns)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def close_stdin(worker: subprocess.Popen[bytes]) -> None:
    assert worker.stdin is not None
    worker.stdin.close()


async def file_view(database: str) -> dict[str, list[object]]:
    async with await tiermem.KVCacheManager.open(
        database,
        tiermem.KVCacheConfig(kv_shape=SHAPE, summary_mode="inline"),
        embedder=HashingEmbedder(),
        summarizer=RecordingSummarizer(),
        tokenizer=WordCounter(),
    ) as mgr:
        view: dict[str, list[object]] = {}
        for info in await mgr.list_sessions():
            state = await mgr.get_session_state(info.session_id, namespace=info.namespace)
            history = await mgr.get_conversation_history(info.session_id, namespace=info.namespace)
            assert state is not None
            view[f"{info.namespace}/{info.session_id}"] = [
                state.message_count,
                state.conversation_count,
                state.clear_count,
                [m.id for m in history],
            ]
        return view


async def crossed(database: str) -> int:
    """Messages stored under a namespace their text does not name."""
    sql = (
        "SELECT COUNT(*) FROM messages m JOIN sessions s ON s.id = m.session_key "
        "WHERE m.content NOT LIKE s.namespace || ' keeps secret %'"
    )
    if not database.startswith("postgresql://"):
        with rawfile.reading(database) as conn:
            return int(conn.execute(sql).fetchone()[0])
    conn = await asyncpg.connect(database)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_four_workers_with_kills_keep_one_truth(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    database = str(tmp_path / "shared.db")
    if store == "postgres":
        database = request.getfixturevalue("postgres_url")
    turns = TURNS[store]
    rng = random.Random(7)
    workers = {w: start(tmp_path, w, database, turns) for w in range(WORKERS)}
    kills = 0
    released = False
    deadline = time.monotonic() + 1200
    while any(p.poll() is None for p in workers.values()) and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 2.5))
        if any(p.poll() not in (None, 0) for p in workers.values()):
            break  # a worker failed on its own (killed ones are restarted at once)
        alive = [w for w, p in workers.items() if p.poll() is None]
        unfinished = [w for w in alive if not (tmp_path / f"done-{w}").exists()]
        if kills < 8 and unfinished:
            victim = rng.choice(unfinished)
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            close_stdin(workers[victim])
            kills += 1
            workers[victim] = start(tmp_path, victim, database, turns)
        if not released and all((tmp_path / f"done-{w}").exists() for w in range(WORKERS)):
            for p in workers.values():  # every worker is done: all may read the file now
                close_stdin(p)
            released = True
    for w, p in workers.items():
        close_stdin(p)
        p.wait(timeout=120)
        err = (tmp_path / f"stderr-{w}").read_text()
        assert p.returncode == 0, f"worker {w} failed:\n{err[-3000:]}"
    assert kills >= 4

    if store == "postgres":
        anyio.run(pg.assert_whole, database)
    else:
        rawfile.assert_whole(database)

    truth = anyio.run(file_view, database)
    expected: dict[str, list[str]] = {}
    for w in range(WORKERS):
        for turn, (ns, sid) in enumerate(plan(w, turns)):
            expected.setdefault(f"{ns}/{sid}", []).append(f"w{w}-t{turn}")
    assert set(truth) == set(expected)
    for name, (messages, turns, clears, ids) in truth.items():
        assert isinstance(ids, list)
        # every turn was acknowledged in the end (a killed one was sent again): each
        # message is stored exactly once, in its own session
        assert sorted(ids) == sorted(expected[name]), name
        assert messages == len(ids)
        # every turn was counted and every clear seen: the count never passed the limit
        assert isinstance(turns, int) and 0 <= turns < CLEAR_AFTER
        # (turns racing a clear in another process are absorbed by it: at most 2x)
        assert isinstance(clears, int) and clears >= len(ids) // (2 * CLEAR_AFTER)
    for w in range(WORKERS):
        assert json.loads((tmp_path / f"view-{w}").read_text()) == truth, f"worker {w}"
        assert (tmp_path / f"done-{w}").read_text() == "0", f"worker {w} saw another tenant"
    # no message text of one namespace is stored under the other
    assert anyio.run(crossed, database) == 0
