from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tiermem
from tests import pg
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

SHAPE = tiermem.KVShape(n_layers=2, n_kv_heads=2, head_dim=8, dtype_bytes=2)  # 128 B/token


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "memory.db"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL with pgvector for the whole run (see tests/pg.py)."""
    url = pg.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield url
    finally:
        pg.stop()


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """A database of this test's own on the PostgreSQL server."""
    url = await pg.fresh_database(postgres_server)
    try:
        yield url
    finally:
        await pg.drop_database(postgres_server, url)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, db_path: Path) -> str | Path:
    """A database on every store: a SQLite file, or a PostgreSQL database's URL. A module
    that runs its tests on both makes `db_path` this fixture."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return db_path


@pytest.fixture
def summarizer() -> RecordingSummarizer:
    return RecordingSummarizer()


@pytest.fixture
def open_manager(
    db_path: Path, summarizer: RecordingSummarizer, clock: Clock
) -> Callable[..., Any]:
    """Opens managers on fakes (hashing embedder, recording summarizer, word counter).
    Summaries are inline here, so a clear's summary is there when the turn returns; the
    background mode has its own tests."""

    async def opener(**overrides: Any) -> tiermem.KVCacheManager:
        config = overrides.pop("config", None) or tiermem.KVCacheConfig(
            kv_shape=SHAPE, context_window_tokens=4096, summary_mode="inline"
        )
        return await tiermem.KVCacheManager.open(
            overrides.pop("path", db_path),
            config,
            embedder=overrides.pop("embedder", HashingEmbedder()),
            summarizer=overrides.pop("summarizer", summarizer),
            tokenizer=overrides.pop("tokenizer", WordCounter()),
            clock=overrides.pop("clock", clock),
            telemetry=overrides.pop("telemetry", None),
        )

    return opener


@pytest.fixture
async def manager(open_manager: Callable[..., Any]) -> AsyncIterator[tiermem.KVCacheManager]:
    mgr = await open_manager()
    try:
        yield mgr
    finally:
        await mgr.aclose()
