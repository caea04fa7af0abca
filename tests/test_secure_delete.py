"""Deleting a session removes its bytes: its words and vectors are in neither the database
file nor the WAL afterwards, while the other sessions stay whole and searchable."""

import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tiermem
from tests.fakes import HashingEmbedder
from tiermem import Message, NewMessage, SQLiteStore, StateRow
from tiermem._store._connection import raw_connect
from tiermem._store._vectors import bits


def _token(seed: int) -> str:
    rnd = random.Random(seed)
    return "".join(rnd.choice(string.ascii_lowercase) for _ in range(20))


def _file_bytes(db_path: Path) -> bytes:
    """The database file and its WAL, as a reader of the disk would find them."""
    wal = Path(f"{db_path}-wal")
    return db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


async def _converse(mgr: tiermem.KVCacheManager, sid: str, word: str, turns: int) -> None:
    system = Message("system", f"You help with questions about the {word}.", id="sys")
    for i in range(turns):
        await mgr.process_conversation(
            sid,
            [
                *([system] if i == 0 else []),
                Message("user", f"tell me about the {word} number {i} please", id=f"u{i}"),
                Message("assistant", f"the {word} is a lovely thing, case {i}", id=f"a{i}"),
            ],
        )


def _wal_size(db_path: Path) -> int:
    wal = Path(f"{db_path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _traces(needles: dict[str, bytes], db_path: Path) -> list[str]:
    """The names of the needles found in the database file or its WAL."""
    found = _file_bytes(db_path)
    return [name for name, needle in needles.items() if needle in found]


async def test_a_deleted_sessions_words_and_vectors_leave_the_files(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    secret = _token(1)
    # 384 dimensions: a message's sign bits are 48 bytes, too many to turn up by chance
    embedder = HashingEmbedder(dimensions=384)
    mgr = await open_manager(embedder=embedder)
    try:
        await _converse(mgr, "kept-1", "walrus", 6)
        # enough turns for a clear: the session has a snapshot and a summary too
        await _converse(mgr, f"gone-{secret}", secret, 20)
        await _converse(mgr, "kept-2", "pelican", 6)
        gone = await mgr.get_conversation_history(f"gone-{secret}")
        assert await mgr.list_snapshots(f"gone-{secret}") != []
        vectors = embedder.vectors([m.content for m in gone])
        needles = {
            "the word": secret.encode(),
            # the full-text index keeps the stem (no other term shares a prefix with it)
            "its stem": secret[:12].encode(),
            **{f"float vector {i}": v.astype(np.float32).tobytes() for i, v in enumerate(vectors)},
            **{f"sign bits {i}": bits(v) for i, v in enumerate(vectors)},
        }
        # there before, so the check can see them (but the few sign bits that straddle two
        # overflow pages of a vec0 chunk, which no byte search finds)
        before = _traces(needles, db_path)
        assert {n for n in needles if not n.startswith("sign")} <= set(before)
        assert len(before) > len(needles) * 0.9

        assert await mgr.delete_session(f"gone-{secret}") is True

        assert _traces(needles, db_path) == []
        assert _wal_size(db_path) == 0
        for sid, word in (("kept-1", "walrus"), ("kept-2", "pelican")):
            hits = await mgr.retrieve_context(sid, f"what about the {word}")
            assert hits.entries and all(word in e.text for e in hits.entries)
            assert len(await mgr.get_conversation_history(sid)) == 13
    finally:
        await mgr.aclose()
    assert _traces(needles, db_path) == []

    # the file is sound and what remains is still found after a reopen
    mgr = await open_manager(embedder=embedder)
    try:
        hits = await mgr.retrieve_context("kept-2", "pelican")
        assert hits.entries
        assert {s.session_id for s in await mgr.list_sessions()} == {"kept-1", "kept-2"}
    finally:
        await mgr.aclose()


async def test_a_reader_holding_the_wal_delays_the_purge_but_not_the_delete(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process reading an old snapshot keeps the WAL frames it may need: the delete
    still succeeds (and says so in the log), and the next delete's checkpoint purges them."""
    secret = _token(2)
    store = await SQLiteStore.open(db_path, "m", 8, busy_timeout_ms=100)
    try:
        keys = {}
        for sid in ("gone", "later"):
            keys[sid] = await store.create_session("ns", sid)
            await store.append_messages(
                keys[sid],
                [NewMessage(0, "m", "user", f"{secret} in {sid}", "h", None, 0.0, 3)],
                None,
                StateRow(),
            )
        reader = raw_connect(str(db_path), 100)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM messages").fetchone()
            await store.delete_session(keys["gone"])
        finally:
            reader.execute("COMMIT")
            reader.close()
        assert "could not be emptied" in caplog.text
        assert await store.session_key("ns", "gone") is None
        gone = {"its message": f"{secret} in gone".encode()}
        assert _traces(gone, db_path) == ["its message"]  # still in the WAL

        await store.delete_session(keys["later"])
        assert _traces({**gone, "the word": secret.encode()}, db_path) == []
    finally:
        await store.close()
