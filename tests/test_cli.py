"""The command line: `tiermem status` on a database, and every user mistake as one line on
stderr with exit status 2, nothing stored."""

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import tiermem
from tests.fakes import HashingEmbedder
from tests.test_manager import run_turns
from tiermem._cli import main


@pytest.fixture
def stored_db(open_manager: Callable[..., Any], db_path: Path) -> Path:
    # the bundled embedder's name and size, so the CLI's default config opens the file
    bundled = tiermem.SentenceTransformerEmbedder()
    fake = HashingEmbedder(bundled.dimensions, bundled.model_name)

    async def store() -> None:
        async with await open_manager(embedder=fake) as mgr:
            await run_turns(mgr, 17, sid="a")
            await run_turns(mgr, 2, sid="b", namespace="tenant")

    anyio.run(store)
    return db_path


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error the CLI printed: one line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("tiermem: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def listed(db: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """`tiermem sessions --json`: what a user sees stored."""
    assert main(["sessions", "--db", str(db), "--json"]) == 0
    sessions: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return sessions


def test_status_json(stored_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--db", str(stored_db), "--json"])
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


def test_user_mistakes_on_a_database_are_one_line(
    stored_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = listed(stored_db, capsys)
    for argv, message in [
        (["search", "nosuch", "hello"], "unknown session 'nosuch'"),
        (["search", "a", "   "], "the query is empty"),
        (["search", "a", "hi", "--namespace", "other"], "unknown session 'a'"),
        (["delete-session", "b"], "no session 'b' in namespace 'default'"),
        (["export-session", "zzz"], "unknown session 'zzz'"),
    ]:
        assert main([*argv, "--db", str(stored_db)]) == 2, argv
        assert message in one_line(capsys)
    after = listed(stored_db, capsys)
    assert {s["session_id"]: s["message_count"] for s in after} == {"a": 35, "b": 5}
    assert after == before  # nothing lost, nothing touched


GOOD = '{"session_id": "s", "role": "user", "content": "a good line"}'
BAD_LINES = [
    # JSON and its text
    pytest.param("{broken", ":2: not JSON", id="not-json"),
    pytest.param('["a", "list"]', ":2: expected a JSON object, not an array", id="array"),
    pytest.param('"text"', "expected a JSON object, not a string", id="string"),
    pytest.param("null", "expected a JSON object, not null", id="null"),
    pytest.param(GOOD[:-1] + ', "metadata": {"x": NaN}}', "NaN is not a JSON number", id="nan"),
    pytest.param(GOOD[:-1] + ', "metadata": {"x": 1e999}}', "number too large", id="inf"),
    pytest.param(GOOD[:-1] + ', "metadata": ' + "9" * 5000 + "}", "too many digits", id="huge-int"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="deep"),
    pytest.param(
        GOOD[:-1] + ', "metadata": {"a": ' + "[" * 980 + "]" * 980 + "}}",
        "metadata is nested more than 100 levels deep",
        id="deep-metadata",
    ),
    # fields missing, unknown, or of the wrong type
    pytest.param('{"session_id": "s", "role": "user"}', ":2: no 'content'", id="no-content"),
    pytest.param('{"session_id": "s", "content": "x"}', ":2: no 'role'", id="no-role"),
    pytest.param('{"role": "user", "content": "no session"}', ":2: no session_id", id="no-session"),
    pytest.param(GOOD[:-1] + ', "colour": 1}', "unknown fields 'colour'", id="unknown-field"),
    pytest.param(GOOD.replace('"user"', '"robot"'), "role must be one of", id="role-unknown"),
    pytest.param(GOOD.replace('"user"', '["user"]'), "role must be one of", id="role-list"),
    pytest.param(GOOD.replace('"a good line"', "5"), "content must be a string", id="content-int"),
    pytest.param(GOOD.replace('"a good line"', "null"), "content must be a string", id="content-0"),
    pytest.param(
        GOOD.replace('"s"', "5"), "session_id must be a string, not a number", id="sid-int"
    ),
    pytest.param(GOOD.replace('"s"', '{"a": 1}'), "session_id must be a string", id="sid-object"),
    pytest.param(GOOD.replace('"s"', '" "'), "session_id is empty", id="sid-blank"),
    pytest.param(GOOD.replace('"s"', f'"{"s" * 513}"'), "longer than 512", id="sid-long"),
    pytest.param(GOOD[:-1] + f', "namespace": "{"n" * 600}"}}', "longer than 512", id="ns-long"),
    pytest.param(GOOD[:-1] + ', "namespace": true}', "namespace must be a string", id="ns-bool"),
    pytest.param(GOOD[:-1] + ', "namespace": ""}', "namespace is empty", id="ns-empty"),
    pytest.param(GOOD[:-1] + ', "id": 7}', "id must be a string, not a number", id="id-int"),
    pytest.param(GOOD[:-1] + ', "id": ""}', "id is empty", id="id-empty"),
    pytest.param(GOOD[:-1] + ', "metadata": [1]}', "metadata must be an object", id="meta-list"),
    pytest.param(GOOD[:-1] + ', "metadata": "x"}', "metadata must be an object", id="meta-str"),
    pytest.param(GOOD[:-1] + ', "metadata": 3}', "metadata must be an object", id="meta-int"),
    # odd characters in names and text
    pytest.param(GOOD.replace('"s"', r'"s\u0000x"'), "session_id contains a NUL", id="sid-nul"),
    pytest.param(GOOD.replace('"s"', r'"\ud800"'), "session_id is not valid Unicode", id="sid-sur"),
    pytest.param(GOOD[:-1] + r', "namespace": "n\u0000"}', "namespace contains a NUL", id="ns-nul"),
    pytest.param(GOOD[:-1] + r', "namespace": "\udfff"}', "namespace is not valid", id="ns-sur"),
    pytest.param(GOOD[:-1] + r', "id": "a\u0000b"}', "id contains a NUL", id="id-nul"),
    pytest.param(GOOD[:-1] + r', "id": "\ud83d"}', "id is not valid Unicode", id="id-surrogate"),
    pytest.param(GOOD.replace("a good", r"\ud800 bad"), "content is not valid", id="content-sur"),
    pytest.param(GOOD[:-1] + r', "metadata": {"\udc00": 1}}', "a key in metadata", id="meta-key"),
    pytest.param(GOOD[:-1] + r', "metadata": {"a": ["\udc00"]}}', "metadata is not", id="meta-sur"),
    # dates
    pytest.param(
        GOOD[:-1] + ', "created_at": "yesterday"}', "not an ISO 8601 date", id="date-word"
    ),
    pytest.param(
        GOOD[:-1] + ', "created_at": "2024-13-01"}', "not an ISO 8601 date", id="month-13"
    ),
    pytest.param(
        GOOD[:-1] + ', "created_at": "0000-01-01"}', "year 0 is out of range", id="year-0"
    ),
    pytest.param(GOOD[:-1] + ', "created_at": "99999-01-01"}', "not an ISO 8601", id="year-5"),
    pytest.param(
        GOOD[:-1] + ', "created_at": "9999-12-31T23:00:00-14:00"}', "out of range", id="after-9999"
    ),
    pytest.param(
        GOOD[:-1] + ', "created_at": "0001-01-01T00:00:00+14:00"}', "out of range", id="before-1"
    ),
    pytest.param(GOOD[:-1] + ', "created_at": ""}', "not an ISO 8601 date", id="date-empty"),
    pytest.param(GOOD[:-1] + ', "created_at": 1700000000}', "date string, not a number", id="int"),
    pytest.param(GOOD[:-1] + ', "created_at": 1e300}', "date string, not a number", id="huge"),
    pytest.param(GOOD[:-1] + ', "created_at": [2024]}', "date string, not an array", id="list"),
    # the same id twice in one session (a second line for another session is fine)
    pytest.param(GOOD[:-1] + ', "id": "x"}\n' + GOOD[:-1] + ', "id": "x"}', ":3: id 'x'", id="dup"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_a_bad_jsonl_line_is_one_line_and_stores_nothing(
    bad: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    # a good line first: it must not be stored either
    log.write_text(GOOD + "\n" + bad + "\n" + GOOD.replace('"s"', '"t"') + "\n", "utf-8")
    db = tmp_path / "new.db"
    assert main(["ingest", str(log), "--db", str(db)]) == 2
    err = one_line(capsys)
    assert f"{log}:" in err and message in err, err
    assert len(err) < 300  # the line's content is not echoed
    assert not db.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "holds no messages", id="empty"),
        pytest.param(b"\n  \n\t\r\n", "holds no messages", id="blank-lines"),
        pytest.param(b"\xff\xfe{}\n", ":1: not UTF-8 text", id="utf-16"),
        pytest.param(
            GOOD.encode() + b'\n{"role": "user", "content": "caf\xe9"}\n',
            ":2: not UTF-8 text",
            id="latin-1",
        ),
        pytest.param(b"\x00" * 100 + b"\n", ":1: not JSON", id="zeros"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00", ":1: not UTF-8 text", id="png"),
        pytest.param(GOOD.encode() + b"\n\xef\xbb\xbf" + GOOD.encode(), ":2: not JSON", id="bom-2"),
    ],
)
def test_a_bad_jsonl_file_is_one_line_and_stores_nothing(
    content: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(content)
    db = tmp_path / "new.db"
    assert main(["ingest", str(log), "--db", str(db)]) == 2
    assert message in one_line(capsys)
    assert not db.exists()


def test_ingest_refuses_a_folder_a_missing_file_and_oversized_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "new.db"
    assert main(["ingest", str(tmp_path), "--db", str(db)]) == 2
    assert "is a folder, not a JSONL file" in one_line(capsys)
    assert main(["ingest", str(tmp_path / "nope.jsonl"), "--db", str(db)]) == 2
    assert "No such file" in one_line(capsys)
    log = tmp_path / "log.jsonl"
    log.write_text(GOOD + "\n" + GOOD.replace("a good line", "x" * 12) + "\n", "utf-8")
    config = tmp_path / "small.toml"
    config.write_text("max_message_bytes = 11\n", "utf-8")  # as long as GOOD's content
    assert main(["ingest", str(log), "--db", str(db), "--config", str(config)]) == 2
    assert ":2: content is 12 bytes; the limit is 11" in one_line(capsys)
    # a JSON array of many messages on one line, not read whole into memory
    log.write_text(GOOD + "\n[" + ", ".join([GOOD] * 20_000) + "]\n", "utf-8")
    assert main(["ingest", str(log), "--db", str(db), "--config", str(config)]) == 2
    assert f"{log}:2: longer than {66 + 2**20} bytes" in one_line(capsys)
    assert not db.exists()


def test_a_failed_ingest_into_a_database_stores_nothing(
    stored_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = listed(stored_db, capsys)
    log = tmp_path / "log.jsonl"
    rows = [
        {"session_id": "new", "role": "user", "content": "hello"},
        {"session_id": "a", "role": "user", "content": "more", "id": "extra"},
        # session a's u0 is stored with other content: found before anything is written
        {"session_id": "a", "role": "user", "content": "not what u0 says", "id": "u0"},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    assert main(["ingest", str(log), "--db", str(stored_db)]) == 2
    assert "id 'u0' of session 'a' is already stored with other content" in one_line(capsys)
    assert listed(stored_db, capsys) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "\udcff", "hello"], "the session id is not valid Unicode"),
        (["search", "a\x00", "hello"], "the session id contains a NUL"),
        (["search", " ", "hello"], "the session id is empty"),
        (["search", "a", "\udcff"], "the query is not valid Unicode"),
        (["search", "a", "hi", "--namespace", "\udcff"], "--namespace is not valid Unicode"),
        (["search", "a", "hi", "--namespace", ""], "--namespace is empty"),
        (["search", "a" * 513, "hi"], "the session id is longer than 512 characters"),
        (["search", "a", "hi", "--limit", "0"], "--limit: must be from 1 to 1000, not 0"),
        (["search", "a", "hi", "--limit", "9" * 30], "--limit: must be from 1 to 1000"),
        (["search", "a", "hi", "--limit", "ten"], "--limit: not a whole number: 'ten'"),
        (["search", "a"], "required: query"),
        (["delete-session", "\udcff"], "the session id is not valid Unicode"),
        (["delete-session", "a", "--namespace", "x\x00"], "--namespace contains a NUL"),
        (["export-session", "\ud800"], "the session id is not valid Unicode"),
        (["export-session", "a", "-o", ""], "--output is empty"),
        (["ingest", "log.jsonl", "--session", "\udcff"], "the session id is not valid Unicode"),
        (["ingest", "log.jsonl", "--session", ""], "the session id is empty"),
        (["ingest", "log\x00.jsonl"], "the file contains NUL"),
        (["chat", "--session", "\udcff"], "the session id is not valid Unicode"),
        (["chat", "--namespace", "\t"], "--namespace is empty"),
        (["sessions", "--db", ""], "--db is empty"),
        (["status", "--db", "a\x00.db"], "--db contains NUL"),
        (["maintain", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["vacuum"], "invalid choice: 'vacuum'"),
        ([], "required: COMMAND"),
    ],
)
def test_command_line_mistakes_are_one_line(
    argv: list[str],
    message: str,
    stored_db: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(stored_db.parent)
    (stored_db.parent / "log.jsonl").write_text(GOOD + "\n", "utf-8")
    before = listed(stored_db, capsys)
    db = ["--db", str(stored_db)] if argv and "--db" not in argv else []
    assert main([*argv, *db]) == 2
    assert message in one_line(capsys)
    assert listed(stored_db, capsys) == before


DB_COMMANDS = [
    ["search", "a", "hello"],
    ["sessions"],
    ["status"],
    ["maintain"],
    ["delete-session", "a"],
    ["export-session", "a"],
    ["ingest", "log.jsonl"],
    ["chat"],
    ["demo"],
]


@pytest.mark.parametrize("argv", DB_COMMANDS, ids=lambda argv: argv[0])
@pytest.mark.parametrize(
    ("db", "message"),
    [
        pytest.param("folder", "is a folder, not a database", id="folder"),
        pytest.param("notes.txt", "file is not a database", id="text-file"),
        pytest.param("other.db", "is not a tiermem database (it holds 'people')", id="other-app"),
        pytest.param("broken.db", "malformed", id="truncated"),
    ],
)
def test_a_wrong_database_is_one_line_and_left_as_it_was(
    argv: list[str],
    db: str,
    message: str,
    stored_db: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(stored_db.parent)
    Path("log.jsonl").write_text(GOOD + "\n", "utf-8")
    Path("folder").mkdir()
    Path("notes.txt").write_text("shopping: milk, eggs\n" * 100, "utf-8")
    with sqlite3.connect("other.db") as other:  # another program's database
        other.execute("CREATE TABLE people (name TEXT)")
        other.execute("INSERT INTO people VALUES ('Ana')")
    other.close()
    Path("broken.db").write_bytes(stored_db.read_bytes()[:8192])
    before = Path(db).read_bytes() if Path(db).is_file() else None
    assert main([*argv, "--db", db]) == 2
    assert message in one_line(capsys)
    assert (Path(db).read_bytes() if Path(db).is_file() else None) == before
    assert sorted(p.name for p in Path().iterdir()) == sorted(
        ["broken.db", "folder", "log.jsonl", "memory.db", "notes.txt", "other.db"]
        + [p.name for p in stored_db.parent.glob("memory.db-*")]
    )


@pytest.mark.parametrize("argv", DB_COMMANDS[:6], ids=lambda argv: argv[0])
def test_reading_commands_refuse_an_empty_file(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    assert main([*argv, "--db", str(empty)]) == 2
    assert "is not a tiermem database (it is empty)" in one_line(capsys)
    assert empty.read_bytes() == b""


def test_export_to_a_folder_a_missing_folder_or_the_database_is_one_line(
    stored_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = listed(stored_db, capsys)
    for output, message in [
        (tmp_path, "is a folder"),
        (tmp_path / "no" / "a.json", "no such folder"),
        (stored_db, "is the database itself"),
        (tmp_path / "." / stored_db.name, "is the database itself"),
    ]:
        assert main(["export-session", "a", "--db", str(stored_db), "-o", str(output)]) == 2
        assert message in one_line(capsys)
    assert listed(stored_db, capsys) == before


def cli(*argv: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The CLI as a user runs it: its own process, arguments as the OS gives them."""
    return subprocess.run(
        [sys.executable, "-m", "tiermem._cli", *argv],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_arguments_that_are_not_utf8_are_one_line(stored_db: Path) -> None:
    argvs: list[list[str | bytes]] = [
        ["search", b"\xff", "hi"],
        ["search", "a", b"caf\xe9"],
        ["export-session", b"\xc3"],
    ]
    for argv in argvs:
        done = cli(*argv, "--db", str(stored_db))
        assert done.returncode == 2
        err = done.stderr.decode()
        assert err.startswith("tiermem: ") and err.count("\n") == 1, err
        assert "not valid Unicode" in err


def test_a_reader_that_leaves_early_is_not_an_error(stored_db: Path) -> None:
    # `tiermem export-session a | head -1`: the pipe closes before the export is written
    process = subprocess.Popen(
        [sys.executable, "-m", "tiermem._cli", "export-session", "a", "--db", str(stored_db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    assert process.wait(timeout=120) == 1
    assert process.stderr.read() == b""  # no traceback, no "Exception ignored"
    process.stderr.close()


def test_closed_standard_streams(stored_db: Path, tmp_path: Path) -> None:
    def run(command: str, db: Path) -> subprocess.CompletedProcess[bytes]:
        # `<&-` and `>&-`: the shell starts the CLI with that stream closed
        line = f'exec "$0" -m tiermem._cli {command} --db "$1"'
        return subprocess.run(
            ["sh", "-c", line, sys.executable, str(db)], capture_output=True, timeout=120
        )

    chat = run("chat <&-", tmp_path / "c.db")
    assert chat.returncode == 2
    assert chat.stderr == b"tiermem: chat reads standard input, and it is closed\n"
    assert not (tmp_path / "c.db").exists()
    sessions = run("sessions >&-", stored_db)
    assert (sessions.returncode, sessions.stderr) == (0, b"")


@pytest.mark.real_models
def test_chat_input_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    done = cli("chat", "--db", str(db), stdin=b"caf\xe9 au lait?\n")
    assert done.returncode == 2
    assert done.stderr == b"tiermem: standard input is not UTF-8 text (invalid continuation byte)\n"
    assert b"caf" not in done.stdout  # not echoed as a garbled turn
    listing = cli("sessions", "--db", str(db), "--json")
    assert listing.returncode == 0 and json.loads(listing.stdout) == []


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        pytest.param('["turns"]', "expected an object with a list of sessions", id="array"),
        pytest.param('{"sessions": [7]}', "session 1: expected an object", id="session-int"),
        pytest.param(
            '{"sessions": [{"session_id": "x", "system": "s", "messages": [{"role": "user"}]}]}',
            "session 1: no 'content'",
            id="no-content",
        ),
        pytest.param("{oops", "not JSON", id="not-json"),
    ],
)
def test_a_bad_demo_fixture_is_one_line(
    fixture: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "demo.json"
    path.write_text(fixture, "utf-8")
    db = tmp_path / "demo.db"
    assert main(["demo", "--fixture", str(path), "--db", str(db)]) == 2
    assert message in one_line(capsys)
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

    def chat(lines: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tiermem._cli", "chat", "--db", str(tmp_path / "c.db")],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
            check=False,
        )

    done = chat(lines)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no loader noise, no warnings
    out = done.stdout
    assert out.count("assistant: ") == 5
    assert "[memory] cleared" in out and "summary being written in the background" in out
    assert "[memory] summary updated in the background" in out
    assert "[memory] retrieved" in out and "my dog is called Pico" in out
    assert "session 'chat': 10 messages, 2 clears" in out
    # each reply says what the session's kept KV state saved; a turn that only extends the
    # last prompt reuses it
    reused = [int(n) for n in re.findall(r"\[kv\] (\d+) prompt tokens reused", out)]
    assert len(reused) == 5 and reused[0] == 0 and max(reused) > 0
    assert len(re.findall(r"first token in \d+\.\d\d s", out)) == 5
    # the states went to disk at exit: the next run's first turn restores one
    again = chat(["Where do I live?"])
    assert again.returncode == 0, again.stderr
    (first,) = re.findall(r"\[kv\] (\d+) prompt tokens reused", again.stdout)
    assert int(first) > 0
