"""The store. The first part runs on every backend through the `store` fixture and uses only
`Store` protocol methods, so another backend proves itself on the same tests; the second is
SQLite's own (its migrations, old files, the file's size, the wheel that carries the
migrations); the last checks through the public API that a snapshot's age is measured on
the manager's clock."""

from __future__ import annotations

import json
import os
import sqlite3 as stdlib_sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

import tiermem
from tests import pg
from tests.conftest import Clock
from tiermem import (
    EmbeddingMismatchError,
    NewMessage,
    PostgresStore,
    SnapshotEntryRow,
    SQLiteStore,
    StaleSession,
    StateRow,
    StorageError,
    Store,
)
from tiermem._store import _migrate as migrate
from tiermem._store._connection import raw_connect
from tiermem._store._steps import Parameters
from tiermem._store._vectors import bits

DIMS = 8
PARAMS = Parameters("m", DIMS)
ROOT = Path(__file__).resolve().parent.parent


# -- the backends ------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    open: Callable[[], Awaitable[Store]]  # opens the same database again each call


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, db_path: Path, clock: Clock) -> Backend:
    """Every backend, on a database of its own."""
    if request.param == "sqlite":
        return Backend("sqlite", lambda: SQLiteStore.open(db_path, "m", DIMS, clock=clock))
    url = request.getfixturevalue("postgres_url")
    return Backend("postgres", lambda: PostgresStore.open(url, "m", DIMS, clock=clock))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()


async def add(
    store: Store,
    key: int,
    texts: Sequence[str],
    vectors: np.ndarray[Any, Any] | None = None,
    times: Sequence[float] | None = None,
) -> list[int]:
    """Append messages after the session's last, with its state (as a turn does)."""
    state = await store.load_state(key)
    first = state.message_count
    rows = [
        NewMessage(
            first + i,
            f"m{first + i}",
            "user",
            t,
            f"hash of {t}",
            None,
            times[i] if times else 0.0,
            len(t.split()),
        )
        for i, t in enumerate(texts)
    ]
    state.message_count += len(texts)
    return await store.append_messages(key, rows, vectors, state)


def exact_distances(vectors: np.ndarray[Any, Any], query: np.ndarray[Any, Any]) -> Any:
    return 1 - (vectors @ query) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)


# -- the protocol, on every backend ------------------------------------------------------


async def test_a_session_is_created_once_and_found_by_its_names(store: Store) -> None:
    assert await store.session_key("ns", "s") is None
    key = await store.create_session("ns", "s")
    assert await store.create_session("ns", "s") == key
    assert await store.session_key("ns", "s") == key
    other = await store.create_session("other", "s")
    assert other != key
    state = await store.load_state(key)
    assert (state.message_count, state.cleared_through, state.pinned) == (0, -1, [])


async def test_messages_come_back_by_id_position_range_and_time(store: Store) -> None:
    key = await store.create_session("ns", "s")
    texts = [f"message number {i}" for i in range(6)]
    rowids = await add(store, key, texts, times=[100.0 + i for i in range(6)])
    assert rowids == sorted(rowids) and len(set(rowids)) == 6

    between = await store.messages_between(key, 1, 3)
    assert [(r.position, r.content, r.rowid) for r in between] == [
        (2, texts[2], rowids[2]),
        (3, texts[3], rowids[3]),
    ]
    assert [r.position for r in await store.messages_between(key, -1)] == list(range(6))
    assert [r.position for r in await store.messages_at(key, [5, 0, 9, -1])] == [0, 5]
    by_id = await store.messages_by_rowid([rowids[4], rowids[1]])
    assert [r.message_id for r in by_id] == ["m1", "m4"]
    assert by_id[0].created_at == 101.0 and by_id[0].token_count == 3

    keys = await store.message_keys(key, 2, newest_first=True)
    assert [(k.position, k.message_id) for k in keys] == [(4, "m4"), (5, "m5")]
    assert [k.position for k in await store.message_keys(key, 2)] == [0, 1]
    like = await store.message_keys(key, like=(["hash of message number 3"], ["m1"]))
    assert [k.message_id for k in like] == ["m1", "m3"]
    assert await store.existing_ids(key, ["m2", "nope"]) == {"m2": "hash of message number 2"}

    assert await store.latest_time(key) == 105.0
    assert await store.rowids_between_times(key, 101.0, 104.0, 10) == rowids[3:0:-1]
    assert await store.rowids_between_times(key, 101.0, 104.0, 2) == rowids[3:1:-1]
    empty = await store.create_session("ns", "empty")
    assert await store.latest_time(empty) is None
    assert await store.messages_between(empty, -1) == []


async def test_a_write_over_a_stale_version_is_refused_and_changes_nothing(
    store: Store,
) -> None:
    key = await store.create_session("ns", "s")
    stale = await store.load_state(key)
    fresh = stale.copy()
    fresh.conversation_count = 3
    await store.save_state(key, fresh)
    assert fresh.version == stale.version + 1
    current = await store.session_version(key)
    assert current is not None and current.version == fresh.version

    with pytest.raises(StaleSession):
        await store.save_state(key, stale.copy())
    with pytest.raises(StaleSession):
        await store.append_messages(
            key, [NewMessage(0, "m0", "user", "lost", "h", None, 0.0, 1)], None, stale.copy()
        )
    with pytest.raises(StaleSession):
        await store.save_clear(key, stale.copy(), None)
    assert await store.messages_between(key, -1) == []
    assert (await store.load_state(key)).conversation_count == 3

    # soft figures land only over the version they were read at
    assert await store.save_entry_stats(key, stale.version, {"1": [1, 0.5]}) is False
    assert await store.save_entry_stats(key, fresh.version, {"1": [2, 0.5]}) is True
    assert (await store.load_state(key)).entry_stats == {"1": [2, 0.5]}
    assert (await store.session_version(key)) == current


async def test_lexical_search_and_term_counts_stay_in_their_session(store: Store) -> None:
    key = await store.create_session("ns", "s")
    other = await store.create_session("ns", "other")
    contents = [f"hello there number {i}" for i in range(9)] + ["hello zebra"]
    rowids = await add(store, key, contents)
    await add(store, other, ["hello zebra", "zebra zebra"])
    both = await store.lexical_search(["hello", "zebra"], key, 20)
    assert {hit.rowid for hit in both} == set(rowids)
    assert both[0].rowid == rowids[9] and both[0].score > 0
    assert len(await store.lexical_search(["hello"], key, 3)) == 3
    # how many of the session's latest messages hold each term, beside how many those are
    assert await store.term_counts(["hello", "zebra", "absent"], key, 100) == (10, [10, 1, 0])
    assert await store.term_counts(["hello", "zebra", "there"], key, 3) == (3, [3, 1, 2])
    await add(store, other, ["hello again"])  # later ids in another session count nowhere
    assert await store.term_counts(["zebra", "hello"], other, 100) == (3, [2, 2])
    assert await store.term_counts(["hello"], key, 1) == (1, [1])
    assert await store.term_counts([], key, 5) == (5, [])
    assert await store.term_counts(["hello"], await store.create_session("ns", "new"), 5) == (
        0,
        [0],
    )
    # nothing in a term is query syntax
    assert await store.lexical_search(['zebra" OR "hello', "NEAR(a b)"], key, 20) == []
    assert await store.term_counts(['zebra" OR "hello'], key, 100) == (10, [0])
    assert await store.lexical_search([], key, 20) == []


async def test_latest_openings_read_the_newest_messages_of_the_session(store: Store) -> None:
    key = await store.create_session("ns", "s")
    other = await store.create_session("ns", "other")
    await add(store, key, ["Ana: first", "Ben: second " + "x" * 1000, "Ana: third"])
    await add(store, other, ["Eve: elsewhere"])
    openings = await store.latest_openings(key, 2, 10)
    assert [text for _, text in openings] == ["Ana: third", "Ben: secon"]


async def test_vector_search_ranks_exactly_within_the_session(store: Store) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((30, DIMS)).astype(np.float32)
    key = await store.create_session("ns", "s")
    other = await store.create_session("ns", "other")
    rowids = await add(store, key, [f"text {i}" for i in range(30)], vectors)
    await add(store, other, ["close to seven"], vectors[7:8] * 1.01)

    query = vectors[7] + 0.1
    exact = exact_distances(vectors, query)
    nearest = await store.vector_search(query, key, 5)
    assert [hit.rowid for hit in nearest] == [rowids[i] for i in np.argsort(exact)[:5]]
    assert [hit.score for hit in nearest] == pytest.approx(sorted(exact)[:5], abs=1e-5)

    wanted = [rowids[3], rowids[9]]
    distances = await store.distances(query, wanted)
    assert distances == pytest.approx({rowids[3]: exact[3], rowids[9]: exact[9]}, abs=1e-5)
    stored = await store.message_vectors(wanted)
    np.testing.assert_array_equal(stored[rowids[9]], vectors[9])
    # a text is embedded once per database: its vector is found from any session
    by_hash = await store.vectors_by_hash(["hash of text 4", "hash of nothing"])
    assert list(by_hash) == ["hash of text 4"]
    np.testing.assert_array_equal(by_hash["hash of text 4"], vectors[4])


async def test_words_inside_addresses_paths_and_dates_are_found(store: Store) -> None:
    key = await store.create_session("ns", "s")
    [rowid] = await add(
        store, key, ["mail ana@example.com, see github.com/ana/notes.txt by 2024-05-01"]
    )
    for term in ("example", "github", "notes", "txt", "05", "2024"):
        assert [h.rowid for h in await store.lexical_search([term], key, 5)] == [rowid], term
    assert await store.term_counts(["github", "absent"], key, 10) == (1, [1, 0])


async def test_a_zero_vector_is_at_distance_one(store: Store) -> None:
    key = await store.create_session("ns", "s")
    await add(store, key, ["a", "b"], np.array([[1.0] + [0.0] * (DIMS - 1), [0.0] * DIMS]))
    hits = await store.vector_search(np.zeros(DIMS), key, 5)
    assert [h.score for h in hits] == [1.0, 1.0]
    hits = await store.vector_search(np.ones(DIMS), key, 5)
    assert hits[1].score == 1.0


async def test_a_clear_saves_its_snapshot_and_state_together(store: Store, clock: Clock) -> None:
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((6, DIMS)).astype(np.float32)
    key = await store.create_session("ns", "s")
    rowids = await add(store, key, [f"entry {i}" for i in range(6)], vectors)
    assert await store.snapshots(key) == []

    state = (await store.load_state(key)).copy()
    state.cleared_through, state.pinned = 5, rowids[1:3]
    entries = [
        SnapshotEntryRow(rowids[1], 0.9, "code", 40),
        SnapshotEntryRow(rowids[2], 0.5, "user", 2),
    ]
    snapshot_id = await store.save_clear(key, state, ("conversation_limit", "incremental", entries))
    assert snapshot_id is not None and state.last_snapshot_id == snapshot_id

    [row] = await store.snapshots(key)
    assert (row.id, row.reason, row.entry_count, row.size_bytes) == (
        snapshot_id,
        "conversation_limit",
        2,
        42,
    )
    assert row.created_at == clock.now
    contents = await store.snapshot_entries(key, snapshot_id)
    assert contents is not None and contents.created_at == clock.now
    assert contents.entries == entries
    assert sorted(await store.snapshot_message_rowids(key)) == rowids[1:3]
    hits = await store.snapshot_vector_search(vectors[2], key, 5)
    assert [hit.rowid for hit in hits] == [rowids[2], rowids[1]]
    assert hits[0].score == pytest.approx(0.0, abs=1e-6)
    loaded = await store.load_state(key)
    assert (loaded.cleared_through, loaded.pinned, loaded.last_snapshot_id) == (
        5,
        rowids[1:3],
        snapshot_id,
    )

    # another session cannot read it; a clear without a snapshot keeps the old one
    other = await store.create_session("ns", "other")
    assert await store.snapshot_entries(other, snapshot_id) is None
    assert await store.save_clear(key, await store.load_state(key), None) is None
    assert len(await store.snapshots(key)) == 1

    for _ in range(3):
        await store.save_clear(key, await store.load_state(key), ("manual", "full", entries[:1]))
    assert [r.id for r in await store.snapshots(key)][-1] == snapshot_id
    assert await store.prune_snapshots(2) == 2
    kept = await store.snapshots(key)
    assert len(kept) == 2 and snapshot_id not in {r.id for r in kept}
    assert await store.snapshot_entries(key, snapshot_id) is None


async def test_a_summary_is_kept_only_when_it_covers_more(store: Store) -> None:
    key = await store.create_session("ns", "s")
    assert await store.summary(key) is None
    first = tiermem.SummaryRow("first", 3, 10, 1, 9, 50.0)
    assert await store.save_summary(key, first) is True
    assert await store.summary(key) == first
    current = await store.session_version(key)
    assert current is not None and current.summary_covered_through == 9
    older = tiermem.SummaryRow("older", 3, 5, 1, 4, 60.0)
    assert await store.save_summary(key, older) is False
    assert await store.summary(key) == first
    later = tiermem.SummaryRow("later", 4, 20, 2, 19, 70.0)
    assert await store.save_summary(key, later) is True
    assert await store.summary(key) == later

    await store.delete_session(key)
    assert await store.save_summary(key, tiermem.SummaryRow("late", 1, 1, 1, 99, 1.0)) is False
    assert await store.session_version(key) is None


async def test_deleting_a_session_removes_what_derives_from_it_and_no_other(
    store: Store,
) -> None:
    rng = np.random.default_rng(9)
    keys = {}
    for sid in ("gone", "kept"):
        keys[sid] = await store.create_session("ns", sid)
        rowids = await add(
            store,
            keys[sid],
            [f"{sid} giraffe {i}" for i in range(4)],
            rng.standard_normal((4, DIMS)),
        )
        state = await store.load_state(keys[sid])
        snapshot = ("manual", "full", [SnapshotEntryRow(rowids[0], 1.0, "user", 3)])
        await store.save_clear(keys[sid], state, snapshot)
        await store.save_summary(keys[sid], tiermem.SummaryRow(sid, 1, 4, 1, 3, 0.0))
    before = await store.counts(("sessions", "messages", "kv_snapshots", "session_summaries"))
    assert before == {"sessions": 2, "messages": 8, "kv_snapshots": 2, "session_summaries": 2}

    await store.delete_session(keys["gone"])
    assert await store.session_key("ns", "gone") is None
    after = await store.counts(("sessions", "messages", "kv_snapshots", "session_summaries"))
    assert after == {"sessions": 1, "messages": 4, "kv_snapshots": 1, "session_summaries": 1}
    assert await store.lexical_search(["giraffe"], keys["gone"], 10) == []
    assert await store.vector_search(np.ones(DIMS), keys["gone"], 10) == []
    assert len(await store.lexical_search(["giraffe"], keys["kept"], 10)) == 4
    assert len(await store.vector_search(np.ones(DIMS), keys["kept"], 10)) == 4
    assert [s.session_id for s in await store.list_sessions()] == ["kept"]

    # a session that was created and never written goes; one that was written stays
    unused = await store.create_session("ns", "unused")
    await store.delete_if_unused(unused)
    await store.delete_if_unused(keys["kept"])
    assert await store.session_key("ns", "unused") is None
    assert await store.session_key("ns", "kept") == keys["kept"]


async def test_rows_are_stamped_by_the_stores_clock(store: Store, clock: Clock) -> None:
    quiet = await store.create_session("ns", "quiet")
    clock.advance(60)
    busy = await store.create_session("ns", "busy")
    clock.advance(60)
    await add(store, busy, ["one", "two words"])
    listed = await store.list_sessions()
    assert [(s.session_id, s.last_activity) for s in listed] == [
        ("busy", clock.now),
        ("quiet", clock.now - 120),
    ]
    assert (listed[0].message_count, listed[0].text_bytes) == (2, len("one") + len("two words"))
    assert (listed[1].message_count, listed[1].text_bytes) == (0, 0)

    clock.advance(30)
    await store.save_state(quiet, await store.load_state(quiet))
    assert (await store.list_sessions())[0].last_activity == clock.now


async def test_ids_of_deleted_rows_are_never_handed_out_again(backend: Backend) -> None:
    """Deleting the newest session (its messages and snapshot with it) does not give the
    next session, message or snapshot its id: late work for the deleted one cannot alias."""
    store = await backend.open()
    try:
        kept = await store.create_session("ns", "kept")
        await add(store, kept, ["a", "b"])
        gone = await store.create_session("ns", "gone")
        gone_rowids = await add(store, gone, ["c", "d", "e"])
        snapshot = (
            "conversation_limit",
            "incremental",
            [SnapshotEntryRow(gone_rowids[0], 1, "user", 1)],
        )
        gone_snapshot = await store.save_clear(gone, await store.load_state(gone), snapshot)
        await store.delete_session(gone)

        again = await store.create_session("ns", "gone")
        assert again > gone
        new_rowids = await add(store, kept, ["f", "g"])
        assert min(new_rowids) > max(gone_rowids)
        snapshot = (
            "conversation_limit",
            "incremental",
            [SnapshotEntryRow(new_rowids[0], 1, "user", 1)],
        )
        new_snapshot = await store.save_clear(kept, await store.load_state(kept), snapshot)
        assert gone_snapshot is not None and new_snapshot is not None
        assert new_snapshot > gone_snapshot
    finally:
        await store.close()
    # and not after a reopen either (the counters are kept with the data)
    store = await backend.open()
    try:
        await store.delete_session(again)
        assert await store.create_session("ns", "third") > again
    finally:
        await store.close()


# -- PostgreSQL: opening, migrations, its search paths -----------------------------------


async def test_a_blank_postgres_database_is_migrated_once_and_checked(postgres_url: str) -> None:
    await (await PostgresStore.open(postgres_url, "model-a", DIMS)).close()
    store = await PostgresStore.open(postgres_url, "model-a", DIMS)  # applies nothing again
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        meta = dict(await conn.fetch("SELECT key, value FROM meta"))
        indexes = {r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
    finally:
        await conn.close()
    assert versions == [m.version for m in migrate.available("postgres")]
    assert meta == {"embedding_model": "model-a", "embedding_dims": str(DIMS)}
    assert f"message_embeddings_hnsw_{DIMS}" in indexes and "messages_lexemes" in indexes
    for model, dims in (("model-b", DIMS), ("model-a", 16)):
        with pytest.raises(EmbeddingMismatchError, match="model-a"):
            await PostgresStore.open(postgres_url, model, dims)


async def test_a_postgres_database_of_another_program_or_a_newer_tiermem_is_refused(
    postgres_server: str,
) -> None:
    for setup, message in (
        ("CREATE TABLE invoices (id int)", "not a tiermem database"),
        (
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at double precision NOT NULL);"
            " INSERT INTO schema_migrations VALUES (9999, 'from_the_future', 0)",
            "newer than this tiermem knows",
        ),
    ):
        url = await pg.fresh_database(postgres_server)
        try:
            conn = await asyncpg.connect(url)
            await conn.execute(setup)
            await conn.close()
            with pytest.raises(StorageError, match=message):
                await PostgresStore.open(url, "m", DIMS)
        finally:
            await pg.drop_database(postgres_server, url)


async def test_a_read_only_postgres_store_reads_and_refuses_writes(
    postgres_url: str, postgres_server: str
) -> None:
    blank = await pg.fresh_database(postgres_server)
    try:
        with pytest.raises(StorageError, match="needs migrating"):
            await PostgresStore.open(blank, "m", DIMS, read_only=True)
    finally:
        await pg.drop_database(postgres_server, blank)
    writer = await PostgresStore.open(postgres_url, "m", DIMS)
    key = await writer.create_session("ns", "s")
    await add(writer, key, ["kept words"])
    await writer.close()
    reader = await PostgresStore.open(postgres_url, "m", DIMS, read_only=True)
    try:
        assert [m.content for m in await reader.messages_between(key, -1)] == ["kept words"]
        assert len(await reader.lexical_search(["kept"], key, 5)) == 1
        with pytest.raises(StorageError, match="read-only"):
            await reader.create_session("ns", "new")
    finally:
        await reader.close()


async def test_an_unreachable_postgres_server_is_a_storage_error_without_its_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://me:secret@/db?host={tmp_path}&connect_timeout=2"
    with pytest.raises(StorageError, match="cannot open database") as caught:
        await PostgresStore.open(url, "m", DIMS)
    assert "secret" not in str(caught.value)


async def test_text_with_nul_and_backslashes_comes_back_exactly(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url, "m", DIMS)
    try:
        key = await store.create_session("ns", "s")
        texts = ["a\x00b \\0 \0", "nul\x00here and\x00\x00twice\\", "plain"]
        rows = [
            NewMessage(i, f"m{i}", "user", t, f"h{i}", None, 0.0, 1) for i, t in enumerate(texts)
        ]
        state = await store.load_state(key)
        rowids = await store.append_messages(key, rows, None, state)
        assert [m.content for m in await store.messages_between(key, -1)] == texts
        assert [m.content for m in await store.messages_by_rowid(rowids)] == texts
        assert (await store.latest_openings(key, 3, 4))[1] == ("user", texts[1][:4])
        assert [h.rowid for h in await store.lexical_search(["here"], key, 5)] == rowids[1:2]
        await store.save_summary(key, tiermem.SummaryRow("s\x00um\\", 1, 3, 1, 2, 0.0))
        summary = await store.summary(key)
        assert summary is not None and summary.text == "s\x00um\\"
        [listed] = await store.list_sessions()
        assert listed.text_bytes == sum(len(t.encode()) for t in texts)
    finally:
        await store.close()


async def test_a_big_session_is_searched_through_the_hnsw_index(postgres_url: str) -> None:
    """Past `exact_vectors` a session goes through the index (filtered by session, widened
    by the session's share of the table): the same nearest messages as an exact pass."""
    rng = np.random.default_rng(3)
    store = await PostgresStore.open(postgres_url, "m", DIMS)
    try:
        store.exact_vectors = 50
        key = await store.create_session("ns", "big")
        vectors = rng.standard_normal((400, DIMS)).astype(np.float32)
        rowids = await add(store, key, [f"text {i}" for i in range(400)], vectors)
        for n in range(3):  # most of the table is other sessions'
            other = await store.create_session("ns", f"other-{n}")
            await add(store, other, ["x"] * 800, rng.standard_normal((800, DIMS)))
        conn = await asyncpg.connect(postgres_url)
        await conn.execute("ANALYZE message_embeddings")
        await conn.close()
        for query in rng.standard_normal((5, DIMS)).astype(np.float32):
            exact = exact_distances(vectors, query)
            nearest = await store.vector_search(query, key, 5)
            assert [hit.rowid for hit in nearest] == [rowids[i] for i in np.argsort(exact)[:5]]
            assert [h.score for h in nearest] == pytest.approx(sorted(exact)[:5], abs=1e-5)
    finally:
        await store.close()


async def test_bm25_ranks_a_session_alike_on_both_stores(db_path: Path, postgres_url: str) -> None:
    """Where no message repeats a word (PostgreSQL's bm25 counts a term's presence, FTS5
    its occurrences): the same order."""
    texts = [
        "the garden hose leaks near the old gate",
        "we planted tomatoes in the garden",
        "my sister visits in spring",
        "garden",
        "tomatoes and basil from the market, with a long story about the weather and traffic",
        "the hose is green",
    ]
    orders = []
    for opened in (
        SQLiteStore.open(db_path, "m", DIMS),
        PostgresStore.open(postgres_url, "m", DIMS),
    ):
        store = await opened
        try:
            key = await store.create_session("ns", "s")
            rowids = await add(store, key, texts)
            for terms in (["garden", "hose"], ["tomatoes"], ["gardens", "basil"]):
                hits = await store.lexical_search(terms, key, 10)
                orders.append([rowids.index(h.rowid) for h in hits])
        finally:
            await store.close()
    assert orders[:3] == orders[3:]
    assert orders[1] == [1, 4]  # the shorter message first


# -- SQLite: opening, migrations, old files, size ----------------------------------------


async def test_blank_database_is_migrated_and_recorded(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path, "m", DIMS)
    await store.close()
    conn = stdlib_sqlite3.connect(db_path)
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    conn.close()
    assert versions == [m.version for m in migrate.available()] == list(range(1, 11))
    for table in (
        "sessions",
        "messages",
        "messages_fts",
        "kv_snapshots",
        "kv_snapshot_entries",
        "session_summaries",
        "session_state",
        "message_embeddings",
        "message_index",
    ):
        assert table in tables
    assert "snapshot_entry_vectors" not in tables
    assert meta == {"embedding_model": "m", "embedding_dims": str(DIMS)}


async def test_reopen_applies_nothing_twice(db_path: Path) -> None:
    await (await SQLiteStore.open(db_path, "m", DIMS)).close()
    store = await SQLiteStore.open(db_path, "m", DIMS)
    key = await store.create_session("ns", "s")
    assert await store.session_key("ns", "s") == key
    await store.close()
    conn = stdlib_sqlite3.connect(db_path)
    assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(
        migrate.available()
    )
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest.mark.parametrize(("model", "dims"), [("model-b", 16), ("model-b", DIMS)])
async def test_another_embedding_model_is_refused(db_path: Path, model: str, dims: int) -> None:
    await (await SQLiteStore.open(db_path, "model-a", DIMS)).close()
    with pytest.raises(EmbeddingMismatchError, match="model-a"):
        await SQLiteStore.open(db_path, model, dims)


async def test_a_database_of_a_newer_tiermem_is_refused(db_path: Path) -> None:
    await (await SQLiteStore.open(db_path, "m", DIMS)).close()
    conn = stdlib_sqlite3.connect(db_path)
    conn.execute("INSERT INTO schema_migrations VALUES (9999, 'from_the_future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="newer than this tiermem knows"):
        await SQLiteStore.open(db_path, "m", DIMS)


async def test_corrupt_file_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StorageError):
        await SQLiteStore.open(path, "m", DIMS)
    assert path.read_bytes().startswith(b"this is not")  # nothing overwritten


async def test_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="folder"):
        await SQLiteStore.open(tmp_path / "no" / "such.db", "m", DIMS)


def _database_at_version(db_path: Path, version: int, dims: int = DIMS) -> Any:
    """A database file as an older tiermem left it: migrations up to `version` applied."""
    conn = raw_connect(str(db_path), 1000)
    migrate.apply(conn, migrate.available()[:version], params=Parameters("m", dims))
    return conn


async def test_a_version_1_database_is_migrated_and_its_messages_stay_searchable(
    db_path: Path,
) -> None:
    """A file written before the FTS index carried the session key (migration 3)."""
    conn = _database_at_version(db_path, 1)
    for key in (1, 2):
        conn.execute("INSERT INTO sessions VALUES (?, 'ns', ?, 0, 0)", (key, f"s{key}"))
        conn.execute(
            "INSERT INTO messages(session_key, position, message_id, role, content,"
            " content_hash, created_at, token_count) VALUES (?, 0, 'm', 'user', ?, 'h', 0, 3)",
            (key, f"the zebra sanctuary of session {key}"),
        )
    conn.close()

    store = await SQLiteStore.open(db_path, "m", DIMS)
    try:
        hits = await store.lexical_search(["zebra"], 2, 10)
        rows = await store.messages_by_rowid([hit.rowid for hit in hits])
        assert [r.content for r in rows] == ["the zebra sanctuary of session 2"]
        assert await store.lexical_search(["zebra"], 3, 10) == []
    finally:
        await store.close()


async def test_float_vectors_of_a_version_3_database_move_to_the_bit_index(
    db_path: Path,
) -> None:
    """Before migration 4, message vectors lived in a float vec0 table that the store made;
    migration 9 moves them into `message_embeddings`, migration 10 indexes their sign bits,
    and they search exactly as before."""
    vectors = np.random.default_rng(3).standard_normal((40, DIMS)).astype(np.float32)
    conn = _database_at_version(db_path, 3)
    conn.execute(
        "CREATE VIRTUAL TABLE message_vectors USING vec0(session_key integer partition key,"
        f" embedding float[{DIMS}] distance_metric=cosine)"
    )
    conn.execute("INSERT INTO meta VALUES ('embedding_model', 'm'), ('embedding_dims', ?)", (DIMS,))
    conn.execute("INSERT INTO sessions VALUES (1, 'ns', 's', 0, 0)")
    for i, vector in enumerate(vectors):
        conn.execute(
            "INSERT INTO messages(id, session_key, position, message_id, role, content,"
            " content_hash, created_at, token_count) VALUES (?, 1, ?, ?, 'user', 'x', ?, 0, 1)",
            (i + 1, i, f"m{i}", f"h{i}"),
        )
        conn.execute(
            "INSERT INTO message_vectors(rowid, session_key, embedding) VALUES (?, 1, ?)",
            (i + 1, vector.tobytes()),
        )
    conn.close()

    store = await SQLiteStore.open(db_path, "m", DIMS)
    try:
        counts = await store.counts()
        assert counts["message_embeddings"] == counts["message_index"] == 40
        query = vectors[7] + 0.1
        exact = exact_distances(vectors, query)
        nearest = await store.vector_search(query, 1, 5)
        assert [hit.rowid for hit in nearest] == [int(i) + 1 for i in np.argsort(exact)[:5]]
        assert [hit.score for hit in nearest] == pytest.approx(sorted(exact)[:5], abs=1e-5)
    finally:
        await store.close()
    conn = stdlib_sqlite3.connect(db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    recorded = dict(conn.execute("SELECT version, name FROM schema_migrations WHERE version > 8"))
    conn.close()
    assert "message_vectors" not in tables
    assert recorded == {9: "float_vectors_to_embeddings", 10: "message_index"}


def _old_vector_tables(conn: Any, dims: int) -> None:
    """The vec0 tables the store made beside migrations 1-4 (default chunks of 1,024)."""
    conn.execute("INSERT INTO meta VALUES ('embedding_model', 'm'), ('embedding_dims', ?)", (dims,))
    conn.execute(
        "CREATE VIRTUAL TABLE snapshot_entry_vectors USING vec0(session_key integer partition"
        f" key, embedding float[{dims}] distance_metric=cosine)"
    )
    conn.execute(
        "CREATE VIRTUAL TABLE message_index USING vec0(session_key integer partition key,"
        f" embedding bit[{dims}])"
    )


async def test_a_version_4_database_keeps_its_ids_rows_and_searches(db_path: Path) -> None:
    """Migration 5 rebuilds sessions, messages and snapshots with AUTOINCREMENT ids: the ids
    stay, so the rows pointing at them (FTS, vectors, state, snapshots, summaries) stay valid;
    the snapshot vec0 table goes and the bit index is remade with small chunks."""
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((12, 384)).astype(np.float32)
    conn = _database_at_version(db_path, 4, dims=384)
    _old_vector_tables(conn, 384)
    # sessions 2 and 5 (ids with gaps, as deletes leave them), six messages each
    for key in (2, 5):
        conn.execute("INSERT INTO sessions VALUES (?, 'ns', ?, 1.0, 2.0)", (key, f"s{key}"))
        conn.execute(
            "INSERT INTO session_state(session_key, message_count, pinned, updated_at)"
            " VALUES (?, 6, ?, 3.0)",
            (key, f"[{key * 10}]"),
        )
        conn.execute(
            "INSERT INTO session_summaries VALUES (?, ?, 4, 6, 1, 5, 3.0)", (key, f"sum {key}")
        )
        for i in range(6):
            rowid, n = key * 10 + i, (key == 5) * 6 + i
            conn.execute(
                "INSERT INTO messages(id, session_key, position, message_id, role, content,"
                " content_hash, created_at, token_count) VALUES (?, ?, ?, ?, 'user', ?, ?, ?, 3)",
                (rowid, key, i, f"m{i}", f"giraffe {n} of session {key}", f"h{n}", float(i)),
            )
            conn.execute(
                "INSERT INTO message_embeddings VALUES (?, ?)", (rowid, vectors[n].tobytes())
            )
            conn.execute(
                "INSERT INTO message_index(rowid, session_key, embedding)"
                " VALUES (?, ?, vec_bit(?))",
                (rowid, key, bits(vectors[n])),
            )
        conn.execute(
            "INSERT INTO kv_snapshots VALUES (?, ?, 'conversation_limit', 'incremental', 2, 9,"
            " 3.0)",
            (key + 100, key),
        )
        for rowid in (key * 10, key * 10 + 3):
            cursor = conn.execute(
                "INSERT INTO kv_snapshot_entries(snapshot_id, message_rowid, importance,"
                " entry_type, kv_bytes) VALUES (?, ?, 0.5, 'user', 4)",
                (key + 100, rowid),
            )
            conn.execute(
                "INSERT INTO snapshot_entry_vectors(rowid, session_key, embedding)"
                " VALUES (?, ?, ?)",
                (cursor.lastrowid, key, vectors[rowid % 10 + (key == 5) * 6].tobytes()),
            )
    conn.close()

    store = await SQLiteStore.open(db_path, "m", 384)
    try:
        assert await store.session_key("ns", "s5") == 5
        hits = await store.lexical_search(["giraffe"], 5, 10)
        assert sorted(hit.rowid for hit in hits) == list(range(50, 56))
        assert [r.content for r in await store.messages_by_rowid([53])] == [
            "giraffe 9 of session 5"
        ]
        query = vectors[9] + 0.05
        nearest = await store.vector_search(query, 5, 1)
        assert [hit.rowid for hit in nearest] == [53]
        snapshot_hits = await store.snapshot_vector_search(query, 5, 5)
        assert [hit.rowid for hit in snapshot_hits] == [53, 50]
        assert snapshot_hits[0].score == pytest.approx(
            1 - vectors[9] @ query / np.linalg.norm(vectors[9]) / np.linalg.norm(query), abs=1e-5
        )
        found = await store.snapshot_entries(5, 105)
        assert found is not None and [e.message_rowid for e in found.entries] == [50, 53]
        assert (await store.load_state(5)).pinned == [50]
        summary = await store.summary(5)
        assert summary is not None and summary.text == "sum 5"
        assert await store.counts() == {
            "sessions": 2,
            "messages": 12,
            "messages_fts": 12,
            "message_embeddings": 12,
            "message_index": 12,
            "kv_snapshots": 2,
            "kv_snapshot_entries": 4,
            "session_summaries": 2,
            "session_state": 2,
        }

        # foreign keys still cascade from the rebuilt tables
        await store.delete_session(5)
        assert await store.lexical_search(["giraffe"], 5, 10) == []
        assert len(await store.lexical_search(["giraffe"], 2, 10)) == 6
        assert (await store.counts())["message_index"] == 6
        # and ids go on from the largest ever given, the deleted newest one's included
        assert await store.create_session("ns", "new") == 6
        new = NewMessage(6, "m6", "user", "a new giraffe", "h", None, 9.0, 3)
        assert await store.append_messages(2, [new], None, StateRow()) == [56]
    finally:
        await store.close()
    # the pages of the dropped vec0 table (1.5 MB for each session with a snapshot) left
    # the file: it was compacted after the migrations
    assert _file_size(db_path) < 500_000
    conn = raw_connect(str(db_path), 1000)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "snapshot_entry_vectors" not in tables
        assert (
            "chunk_size=256"
            in conn.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'message_index'"
            ).fetchone()[0]
        )
    finally:
        conn.close()


async def test_a_version_8_database_keeps_the_bit_index_its_store_made(db_path: Path) -> None:
    """Before migration 10 the store made `message_index` itself when it opened a file;
    migration 10 keeps that index (no row twice) and records it, and it still searches."""
    vectors = np.random.default_rng(11).standard_normal((5, DIMS)).astype(np.float32)
    conn = _database_at_version(db_path, 8)
    conn.execute(
        "CREATE VIRTUAL TABLE message_index USING vec0(session_key integer partition key,"
        f" embedding bit[{DIMS}], chunk_size=256)"
    )
    conn.execute("INSERT INTO meta VALUES ('embedding_model', 'm'), ('embedding_dims', ?)", (DIMS,))
    conn.execute("INSERT INTO sessions VALUES (1, 'ns', 's', 0, 0)")
    conn.execute("INSERT INTO session_state(session_key, updated_at) VALUES (1, 0)")
    for i, vector in enumerate(vectors):
        conn.execute(
            "INSERT INTO messages(id, session_key, position, message_id, role, content,"
            " content_hash, created_at, token_count) VALUES (?, 1, ?, ?, 'user', 'x', ?, 0, 1)",
            (i + 1, i, f"m{i}", f"h{i}"),
        )
        conn.execute("INSERT INTO message_embeddings VALUES (?, ?)", (i + 1, vector.tobytes()))
        conn.execute(
            "INSERT INTO message_index(rowid, session_key, embedding) VALUES (?, 1, vec_bit(?))",
            (i + 1, bits(vector)),
        )
    conn.close()

    with pytest.raises(EmbeddingMismatchError):  # checked before migrating
        await SQLiteStore.open(db_path, "m", 16)
    store = await SQLiteStore.open(db_path, "m", DIMS)
    try:
        assert (await store.counts())["message_index"] == 5
        nearest = await store.vector_search(vectors[2], 1, 1)
        assert [hit.rowid for hit in nearest] == [3]
    finally:
        await store.close()
    conn = stdlib_sqlite3.connect(db_path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == list(
        range(1, 11)
    )
    conn.close()


async def test_200_small_sessions_with_snapshots_take_megabytes_not_hundreds(
    db_path: Path,
) -> None:
    """Storage follows what sessions hold: 200 sessions of 10 messages (384-dimensional
    vectors), each with a snapshot, took 333 MB when every session with a snapshot
    preallocated a 1,024-vector vec0 chunk (1.5 MB) and every session a 57 KB bit-index
    chunk; they take 8 MB now, 3 MB of it the float vectors themselves."""
    dims = 384
    rng = np.random.default_rng(12)
    store = await SQLiteStore.open(db_path, "m", dims)
    try:
        for s in range(200):
            key = await store.create_session("ns", f"s{s}")
            vectors = rng.standard_normal((10, dims)).astype(np.float32)
            rowids = await store.append_messages(
                key,
                [
                    NewMessage(i, f"m{i}", "user", f"message {i} of {s}", f"{s}-{i}", None, i, 5)
                    for i in range(10)
                ],
                vectors,
                await store.load_state(key),
            )
            entries = [SnapshotEntryRow(rowid, 0.5, "user", 100) for rowid in rowids[:5]]
            await store.save_clear(
                key, await store.load_state(key), ("conversation_limit", "incremental", entries)
            )
        hits = await store.snapshot_vector_search(vectors[3], key, 2)
        assert hits[0] == (rowids[3], pytest.approx(0.0, abs=1e-6))
    finally:
        await store.close()
    assert _file_size(db_path) < 12_000_000


def _file_size(db_path: Path) -> int:
    """Bytes of the database file and its WAL."""
    wal = Path(f"{db_path}-wal")
    return db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_a_table_rebuild_that_orphans_rows_is_rolled_back(db_path: Path) -> None:
    """A migration marked as rebuilding tables runs with foreign keys off (a DROP would
    cascade otherwise) and is checked before its commit: one that leaves rows pointing at
    nothing is refused whole, and foreign keys are on again after it."""
    conn = _database_at_version(db_path, len(migrate.available()))
    try:
        conn.execute("INSERT INTO sessions VALUES (1, 'ns', 's', 0, 0)")
        conn.execute(
            "INSERT INTO messages(session_key, position, message_id, role, content,"
            " content_hash, created_at, token_count) VALUES (1, 0, 'm', 'user', 'hi', 'h', 0, 1)"
        )
        losing = migrate.Migration(
            99,
            "drop_sessions",
            "-- migrate: rebuilds tables\n"
            "CREATE TABLE new_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT);\n"
            "DROP TABLE sessions;\n"
            "ALTER TABLE new_sessions RENAME TO sessions;\n",
        )
        with pytest.raises(StorageError, match="pointing at missing"):
            migrate.apply(conn, [losing])
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("SELECT namespace FROM sessions").fetchall() == [("ns",)]
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
        assert conn.execute("SELECT 1 FROM schema_migrations WHERE version = 99").fetchone() is None

        keeping = migrate.Migration(
            99,
            "rebuild_sessions",
            "-- migrate: rebuilds tables\n"
            "CREATE TABLE new_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT);\n"
            "INSERT INTO new_sessions SELECT id, namespace FROM sessions;\n"
            "DROP TABLE sessions;\n"
            "ALTER TABLE new_sessions RENAME TO sessions;\n",
        )
        assert migrate.apply(conn, [keeping]) == [99]
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1  # no cascade
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        conn.close()


def test_a_python_step_gets_the_runtime_parameters_inside_its_migration(db_path: Path) -> None:
    """A migration's Python step runs after its statements, in its transaction, with the
    parameters the opener gives: a failure undoes the statements too and records nothing,
    and a step is never run without its parameters, nor twice."""
    conn = _database_at_version(db_path, len(migrate.available()))
    seen: list[Parameters] = []

    def widths(c: Any, params: Parameters) -> None:
        seen.append(params)
        c.execute("CREATE TABLE widths (n INTEGER)")
        c.execute("INSERT INTO widths VALUES (?)", (params.dimensions,))

    def failing(c: Any, params: Parameters) -> None:
        raise RuntimeError("the step failed")

    def tables() -> set[str]:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}

    def recorded() -> set[int]:
        return {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}

    try:
        sql = "CREATE TABLE made_before_the_step (x INTEGER);\n"
        with pytest.raises(RuntimeError, match="the step failed"):
            migrate.apply(conn, [migrate.Migration(99, "fails", sql, failing)], params=PARAMS)
        assert "made_before_the_step" not in tables() and 99 not in recorded()

        good = migrate.Migration(99, "widths", sql, widths)
        with pytest.raises(StorageError, match="parameters"):
            migrate.apply(conn, [good])
        assert "made_before_the_step" not in tables() and 99 not in recorded()

        assert migrate.apply(conn, [good], params=Parameters("wide", 24)) == [99]
        assert conn.execute("SELECT n FROM widths").fetchall() == [(24,)]
        assert {"made_before_the_step", "widths"} <= tables()
        assert migrate.apply(conn, [good], params=Parameters("wide", 24)) == []
        assert seen == [Parameters("wide", 24)]
    finally:
        conn.close()


def test_a_migration_naming_an_unknown_step_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no known step 'nope'"):
        migrate.Migration.of(99, "x", "-- migrate: python nope\n")
    assert migrate.Migration.of(10, "message_index", "-- migrate: python message_index\n").step


@pytest.mark.slow
def test_the_wheel_carries_the_migrations(tmp_path: Path) -> None:
    """The wheel holds `migrations/` (PostgreSQL's folder too) as `tiermem/migrations`
    (hatch force-include): the package installed from it, with no checkout in sight,
    migrates a new database."""
    dist, target = tmp_path / "dist", tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # hatchling in the environment: build with it; else pip fetches it for the build
    isolation = ["--no-build-isolation"] if find_spec("hatchling") else []
    subprocess.run(
        [*pip, "wheel", "--no-deps", *isolation, "-w", str(dist), str(ROOT)],
        check=True,
        timeout=300,
    )
    [wheel] = dist.glob("tiermem-*.whl")
    shipped = sorted(
        str(p.relative_to(ROOT / "migrations")) for p in (ROOT / "migrations").rglob("*.sql")
    )
    with zipfile.ZipFile(wheel) as archive:
        carried = sorted(
            name.removeprefix("tiermem/migrations/")
            for name in archive.namelist()
            if name.startswith("tiermem/migrations/")
        )
    assert carried == shipped

    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    script = (
        "import asyncio, json, sqlite3, sys, tiermem\n"
        "from tiermem._store import _migrate\n"
        "async def main():\n"
        "    store = await tiermem.SQLiteStore.open(sys.argv[1], 'm', 8)\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
        "rows = sqlite3.connect(sys.argv[1]).execute('SELECT version FROM schema_migrations')\n"
        "print(json.dumps({'package': tiermem.__file__, 'folder': str(_migrate.folder()),"
        " 'versions': [r[0] for r in rows]}))\n"
    )
    # the installed package first; the environment's packages for its dependencies (an
    # editable install's path to a checkout comes after, and is not what gets imported)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
    }
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "fresh.db")],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    found = json.loads(out.stdout.splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target)
    assert Path(found["folder"]) == target / "tiermem" / "migrations"
    assert found["versions"] == [int(name[:4]) for name in shipped if "/" not in name]


# -- one clock, through the public API ---------------------------------------------------


async def test_a_snapshots_age_is_measured_on_the_managers_clock(
    open_manager: Callable[..., Any], clock: Clock
) -> None:
    """The store stamps snapshots with the clock the manager was given, so a restore 90
    minutes later (on that clock) says so, and the listing shows when it was taken."""
    async with await open_manager() as mgr:
        for i in range(16):  # the 16th turn clears, with a snapshot
            system = [tiermem.Message("system", "You help Ana plan a trip.", id="sys")]
            await mgr.process_conversation(
                "s",
                [
                    *(system if i == 0 else []),
                    tiermem.Message("user", f"small talk number {i} about the weather", id=f"u{i}"),
                    tiermem.Message("assistant", f"reply {i} about clouds", id=f"a{i}"),
                ],
            )
        taken = clock.now
        [snapshot] = await mgr.list_snapshots("s")
        assert snapshot.created_at.timestamp() == taken
        [session] = await mgr.list_sessions()
        assert session.last_activity.timestamp() == taken

        clock.advance(90 * 60)
        restored = await mgr.restore_from_snapshot("s", snapshot.snapshot_id)
        assert restored.age_minutes == 90
        assert restored.bridge_message.endswith("(90 minutes old).")
