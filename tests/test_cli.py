"""The command line: `tiermem status` on a database, and user mistakes as one line."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tiermem
from tests.fakes import HashingEmbedder
from tests.test_manager import run_turns
from tiermem.cli import main


@pytest.fixture
async def stored_db(open_manager: Callable[..., Any], db_path: Path) -> Path:
    # the bundled embedder's name and size, so the CLI's default config opens the file
    bundled = tiermem.SentenceTransformerEmbedder()
    fake = HashingEmbedder(bundled.dimensions, bundled.model_name)
    async with await open_manager(embedder=fake) as mgr:
        await run_turns(mgr, 17, sid="a")
        await run_turns(mgr, 2, sid="b", namespace="tenant")
    return db_path


@pytest.mark.anyio
async def test_status_json(stored_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # anyio.run inside a running loop is not allowed: run the CLI in a thread
    import anyio.to_thread

    code = await anyio.to_thread.run_sync(main, ["status", "--db", str(stored_db), "--json"])
    assert code == 0
    status = json.loads(capsys.readouterr().out)
    for name in (
        "estimated_bytes",
        "budget_bytes",
        "peak_bytes",
        "session_count",
        "total_entries",
        "evictions_by_reason",
        "hits",
        "misses",
        "rss_bytes",
        "models",
    ):
        assert name in status, name
    stored = status["stored"]
    assert stored["sessions"] == 2 and stored["messages"] == 1 + 17 * 2 + 1 + 2 * 2
    assert stored["snapshots"] == 1 and stored["summaries"] == 1
    assert stored["file_bytes"] > 0
    assert status["models"]["kv_bytes_per_token"] > 0


def test_status_of_a_missing_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.db"
    assert main(["status", "--db", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"tiermem: no database at {missing}\n"
    assert not missing.exists()
