"""The command line: `tiermem status` on a database, and user mistakes as one line."""

import json
import os
import subprocess
import sys
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


COMMANDS = ("demo", "chat", "ingest", "search", "sessions", "status", "maintain")
COMMANDS += ("delete-session", "export-session")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--db" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["search", "a", "hello"],
        ["sessions"],
        ["maintain"],
        ["delete-session", "a"],
        ["export-session", "a"],
    ],
)
def test_reading_commands_refuse_a_missing_database(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.db"
    assert main([*argv, "--db", str(missing)]) == 2
    assert capsys.readouterr().err == f"tiermem: no database at {missing}\n"
    assert not missing.exists()


@pytest.mark.anyio
async def test_user_mistakes_on_a_database_are_one_line(
    stored_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import anyio.to_thread

    for argv, message in [
        (["search", "nosuch", "hello"], "unknown session 'nosuch'"),
        (["search", "a", "   "], "the query is empty"),
        (["search", "a", "hi", "--namespace", "other"], "unknown session 'a'"),
        (["delete-session", "b"], "no session 'b' in namespace 'default'"),
        (["export-session", "zzz"], "unknown session 'zzz'"),
    ]:
        code = await anyio.to_thread.run_sync(main, [*argv, "--db", str(stored_db)])
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.startswith("tiermem: ") and err.count("\n") == 1, err
        assert message in err
    bundled = tiermem.SentenceTransformerEmbedder()
    fake = HashingEmbedder(bundled.dimensions, bundled.model_name)
    async with await tiermem.KVCacheManager.open(stored_db, embedder=fake) as mgr:
        counts = {s.session_id: s.message_count for s in await mgr.list_sessions()}
    assert counts == {"a": 35, "b": 5}  # nothing lost


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"session_id": "s", "role": "user", "content": "ok"}', "{broken"], ":2: not JSON"),
        (['{"session_id": "s", "role": "user"}'], ":1: 'content' (need role and content)"),
        (['{"role": "user", "content": "no session"}'], ":1: no session_id"),
        (['{"session_id": "s", "role": "user", "content": "x", "colour": 1}'], "unknown fields"),
        (['{"session_id": "s", "role": "robot", "content": "x"}'], "role"),
        (['["a", "list"]'], ":1: expected a JSON object"),
    ],
)
def test_a_bad_jsonl_file_is_one_line_and_stores_nothing(
    lines: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = tmp_path / "new.db"
    assert main(["ingest", str(log), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiermem: ") and err.count("\n") == 1, err
    assert message in err
    assert not db.exists()


@pytest.mark.real_models
def test_ingest_sessions_search_export_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    rows = [
        {"session_id": "trip", "role": ("user", "assistant")[i % 2], "id": f"t{i}",
         "content": f"day {i}: we saw the {animal} at the zoo"}
        for i, animal in enumerate(["lion", "otter", "zebra", "heron"] * 10)
    ]  # fmt: skip
    rows.append({"session_id": "cats", "namespace": "bob", "role": "user", "content": "Tom"})
    log.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    db = str(tmp_path / "m.db")

    assert main(["ingest", str(log), "--db", db]) == 0
    out = capsys.readouterr()
    assert "ingested 41 new messages of 41 into 2 sessions" in out.out
    assert "41/41 messages" in out.err and "Traceback" not in out.err
    assert main(["ingest", str(log), "--db", db]) == 0  # again: nothing twice
    assert "ingested 0 new messages of 41" in capsys.readouterr().out

    assert main(["sessions", "--db", db, "--json"]) == 0
    sessions = {s["session_id"]: s for s in json.loads(capsys.readouterr().out)}
    assert sessions["trip"]["message_count"] == 40 and sessions["cats"]["namespace"] == "bob"
    assert sessions["trip"]["text_bytes"] == sum(len(r["content"]) for r in rows[:40])

    assert main(["search", "trip", "which day did we see the otter?", "--db", db, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["entries"]
    assert "otter" in hits[0]["text"] and hits[0]["source_tier"] == 3

    exported = tmp_path / "trip.json"
    assert main(["export-session", "trip", "--db", db, "-o", str(exported)]) == 0
    data = json.loads(exported.read_text(encoding="utf-8"))
    assert [m["id"] for m in data["messages"]] == [f"t{i}" for i in range(40)]
    assert data["state"]["message_count"] == 40

    assert main(["delete-session", "cats", "--namespace", "bob", "--db", db]) == 0
    assert main(["sessions", "--db", db, "--json"]) == 0
    out = capsys.readouterr().out
    assert [s["session_id"] for s in json.loads(out[out.index("[") :])] == ["trip"]
    assert main(["maintain", "--db", db]) == 0


@pytest.mark.real_models
def test_chat_shows_what_memory_does(tmp_path: Path) -> None:
    lines = [
        "Hi! My name is Ana and my dog is called Pico.",
        "I live in Porto and work as a nurse.",
        "What should I cook tonight?",
        "I love hiking on weekends.",
        "What is my dog called?",
    ]
    env = {**os.environ, "TIERMEM_CLEAR_AFTER_CONVERSATIONS": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "tiermem.cli", "chat", "--db", str(tmp_path / "c.db")],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no loader noise, no warnings
    out = done.stdout
    assert out.count("assistant: ") == 5
    assert "[memory] cleared" in out and "summary being written in the background" in out
    assert "[memory] summary updated in the background" in out
    assert "[memory] retrieved" in out and "my dog is called Pico" in out
    assert "session 'chat': 10 messages, 2 clears" in out
