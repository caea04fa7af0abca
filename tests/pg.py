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
