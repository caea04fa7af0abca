"""A real PostgreSQL 16 with pgvector for the tests: the `pgserver` wheel's server, started
once per test session in a temporary folder (conftest's `postgres_server`), or the server
of `TIERMEM_TEST_POSTGRES_URL` when the user gives one. Each test gets a database of its
own (`fresh_database`), dropped afterwards."""

from __future__ import annotations

import itertools
import os
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import asyncpg

ENV = "TIERMEM_TEST_POSTGRES_URL"
_names = itertools.count()
_server: dict[str, Any] = {}


def start(folder: Path) -> str:
    """The server's URL (its maintenance database): the user's, or pgserver's started in
    `folder`."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    with warnings.catch_warnings():  # platformdirs, about XDG_RUNTIME_DIR, at import
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(folder, cleanup_mode="stop")
    _server["pgserver"] = server
    _server["url"] = str(server.get_uri())
    return _server["url"]


def stop() -> None:
    server = _server.pop("pgserver", None)
    _server.pop("url", None)
    if server is not None:
        server.cleanup()


def url() -> str:
    """The running server's URL (the session fixture started it)."""
    return _server.get("url") or os.environ[ENV]


def with_database(server: str, name: str) -> str:
    parts = urllib.parse.urlsplit(server)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def fresh_database(server: str) -> str:
    """A new empty database on the server; its URL."""
    name = f"tiermem_test_{os.getpid()}_{next(_names)}"
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return with_database(server, name)


async def drop_database(server: str, database: str) -> None:
    name = urllib.parse.urlsplit(database).path.lstrip("/")
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


TABLES = (
    "sessions",
    "messages",
    "message_embeddings",
    "kv_snapshots",
    "kv_snapshot_entries",
    "session_summaries",
    "session_state",
)


async def counts(database: str) -> dict[str, int]:
    """Row counts of tiermem's tables, read directly (not through a store)."""
    conn = await asyncpg.connect(database)
    try:
        return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}
    finally:
        await conn.close()


async def assert_whole(database: str, *, embedded: bool = True) -> dict[str, int]:
    """Every message has its vector (if `embedded`) and no snapshot is half written, as
    `rawfile.assert_whole` checks a SQLite file. Returns the counts."""
    n = await counts(database)
    if embedded:
        assert n["message_embeddings"] == n["messages"], n
    conn = await asyncpg.connect(database)
    try:
        half = await conn.fetch(
            "SELECT s.id FROM kv_snapshots s LEFT JOIN kv_snapshot_entries e"
            " ON e.snapshot_id = s.id GROUP BY s.id HAVING count(e.id) <> max(s.entry_count)"
        )
    finally:
        await conn.close()
    assert half == []
    return n
