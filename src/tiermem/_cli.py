"""The `tiermem` command line: demo, chat, ingest, search, sessions, status, maintain,
delete-session, export-session. A user mistake (a missing file, a bad line in one, an
unknown session, a bad argument, database or config) prints one line and exits 2, and
nothing is half done: the CLI checks what it reads itself, whatever the library checks. An
unexpected error prints one line and exits 1. Never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.to_thread

from ._config import KVCacheConfig, is_url
from ._errors import InvalidInputError, NotFoundError, TierMemError
from ._jsonl import (
    check_json,
    check_name,
    check_stored,
    check_unicode,
    kind,
    read_jsonl,
    shown,
    to_message,
)
from ._types import DEFAULT_NAMESPACE

MAX_LIMIT = 1000  # search hits, as the config's retrieval_limit
MIGRATIONS_TABLE = "schema_migrations"  # in every tiermem database, from its first migration


def _config(args: argparse.Namespace) -> KVCacheConfig:
    if args.config:
        return KVCacheConfig.from_toml(args.config)
    return KVCacheConfig.from_env()


def _tables(path: str) -> set[str] | None:
    """Blocking: the tables of the SQLite file at `path`, read without writing; None when it
    cannot be read here (not SQLite, locked, damaged: opening it says which)."""
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=0)
        try:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return {row[0] for row in rows}


async def _check_db(path: str, create: bool) -> None:
    """`--db` names a tiermem database (or, if `create`, no file yet): not a folder, and not
    another program's SQLite file, which opening would migrate. A PostgreSQL URL is checked
    by opening it (a database holding other tables is refused then)."""
    if is_url(path):
        return
    db = anyio.Path(path)
    if await db.is_dir():
        raise InvalidInputError(f"{path} is a folder, not a database")
    exists = await db.is_file()
    if not exists and not create:
        raise TierMemError(f"no database at {path}")
    tables = await anyio.to_thread.run_sync(_tables, path) if exists else None
    if tables is not None and MIGRATIONS_TABLE not in tables and (tables or not create):
        held = f"it holds {', '.join(map(shown, sorted(tables)[:3]))}" if tables else "it is empty"
        raise InvalidInputError(f"{path} is not a tiermem database ({held})")


async def _open(
    args: argparse.Namespace, config: KVCacheConfig | None = None, *, create: bool = False
) -> Any:
    """The manager on `--db`; a database that is not there is an error unless `create`."""
    from ._manager import KVCacheManager

    await _check_db(args.db, create)
    return await KVCacheManager.open(args.db, config or _config(args))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, ensure_ascii=False))


async def _status(args: argparse.Namespace) -> int:
    async with await _open(args) as mgr:
        status = dataclasses.asdict(await mgr.status())
        status["stored"] = await mgr.storage_status()
    if args.json:
        _print_json(status)
    else:
        for key, value in status.items():
            print(f"{key:>20}: {value}")
    return 0


def _check_fixture(path: Path) -> None:
    """The demo's conversation file, as the demo reads it: {"sessions": [{"session_id",
    "system", "messages": [{"id", "role", "content"}, ...]}, ...]}."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: not UTF-8 text") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{path}: not JSON") from exc
    sessions = data.get("sessions") if isinstance(data, dict) else None
    if not isinstance(sessions, list):
        raise InvalidInputError(f"{path}: expected an object with a list of sessions")
    for number, session in enumerate(sessions, start=1):
        try:
            if not isinstance(session, dict) or not isinstance(session.get("messages"), list):
                raise InvalidInputError("expected an object with a list of messages")
            check_name("session_id", session.get("session_id"))
            check_json("system", session.get("system"))
            if not isinstance(session.get("system"), str):
                raise InvalidInputError("system must be a string")
            for m in session["messages"]:
                if not isinstance(m, dict):
                    raise InvalidInputError(f"a message is {kind(m)}, not an object")
                fields = {k: v for k, v in m.items() if k in ("role", "content", "id")}
                to_message(fields, sys.maxsize)  # no size limit: the demo's own text
                check_name("a message id", m.get("id"))
        except TierMemError as exc:
            raise InvalidInputError(f"{path}: session {number}: {exc}") from exc


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import find_fixture, run_demo

    await anyio.to_thread.run_sync(_check_fixture, find_fixture(args.fixture))
    await _check_db(args.db, create=True)
    return await run_demo(args.db, args.fixture, sys.stdout, _config(args))


async def _chat(args: argparse.Namespace) -> int:
    from ._chat import run_chat

    if sys.stdin is None:  # started with standard input closed
        raise InvalidInputError("chat reads standard input, and it is closed")
    if isinstance(sys.stdin, io.TextIOWrapper):
        # a line that is not UTF-8 ends the chat with one line (not a message of mojibake)
        sys.stdin.reconfigure(errors="strict")
    await _check_db(args.db, create=True)
    try:
        return await run_chat(
            args.db, args.session, args.namespace, _config(args), sys.stdin, sys.stdout
        )
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"standard input is not UTF-8 text ({exc.reason})") from exc


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width, self.done = total, width, 0

    def advance(self, count: int) -> None:
        self.done += count
        filled = self.width * self.done // max(1, self.total)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if self.done >= self.total else ""
        print(f"\r[{bar}] {self.done}/{self.total} messages", end=end, file=sys.stderr, flush=True)


async def _ingest(args: argparse.Namespace) -> int:
    from ._intake import validate

    config = _config(args)
    by_session = await anyio.to_thread.run_sync(
        read_jsonl, args.file, args.session, config.max_message_bytes
    )
    for messages in by_session.values():
        validate(messages, config.max_message_bytes)
    total = sum(len(m) for m in by_session.values())
    bar = _Progress(total)
    new = 0
    async with await _open(args, config, create=True) as mgr:
        await check_stored(mgr, by_session)
        for (ns, sid), messages in by_session.items():
            seen = [0]

            def step(stored: int, fresh: int, seen: list[int] = seen) -> None:
                bar.advance(stored - seen[0])
                seen[0] = stored

            added = await mgr.ingest(sid, messages, namespace=ns, batch_size=64, progress=step)
            bar.advance(len(messages) - seen[0])  # those already stored
            new += added
    print(f"ingested {new} new messages of {total} into {len(by_session)} sessions")
    return 0


async def _search(args: argparse.Namespace) -> int:
    async with await _open(args) as mgr:
        hits = await mgr.retrieve_context(
            args.session, args.query, limit=args.limit, namespace=args.namespace
        )
    if args.json:
        _print_json(dataclasses.asdict(hits))
        return 0
    if not hits.entries:
        print(f"nothing found for {args.query!r}")
    for e in hits.entries:
        print(
            f"{e.similarity_score:.2f}  tier {e.source_tier}  {','.join(e.message_ids)}  {e.text}"
        )
    return 0


async def _sessions(args: argparse.Namespace) -> int:
    async with await _open(args) as mgr:
        sessions = await mgr.list_sessions()
    if args.json:
        _print_json([dataclasses.asdict(s) for s in sessions])
        return 0
    print(f"{'namespace':<16}{'session':<28}{'messages':>9}{'text KiB':>10}  last activity")
    for s in sessions:
        print(
            f"{s.namespace:<16}{s.session_id:<28}{s.message_count:>9}"
            f"{s.text_bytes / 1024:>10.1f}  {s.last_activity:%Y-%m-%d %H:%M:%S}"
        )
    return 0


async def _maintain(args: argparse.Namespace) -> int:
    async with await _open(args) as mgr:
        result = await mgr.perform_maintenance()
    if args.json:
        _print_json(dataclasses.asdict(result))
    else:
        print(
            f"pruned {result.snapshots_pruned} snapshots, dropped {result.sessions_cleaned} "
            f"idle sessions in {result.duration_ms:.0f} ms"
        )
        for error in result.errors:
            print(f"error: {error}")
    return 1 if result.errors else 0


async def _delete(args: argparse.Namespace) -> int:
    async with await _open(args) as mgr:
        if not await mgr.delete_session(args.session, namespace=args.namespace):
            raise NotFoundError(f"no session {args.session!r} in namespace {args.namespace!r}")
    print(f"deleted session {args.session!r} and everything derived from it")
    return 0


def _check_output(output: str, db: str) -> None:
    """Blocking: `--output` can be written, and is not the database (checked before the
    database is opened, so a mistake leaves it untouched)."""
    if os.path.isdir(output):
        raise InvalidInputError(f"--output {output} is a folder")
    if not os.path.isdir(os.path.dirname(output) or "."):
        raise InvalidInputError(f"--output {output}: no such folder")
    with contextlib.suppress(OSError, ValueError):
        if os.path.samefile(output, db):
            raise InvalidInputError(f"--output {output} is the database itself")


async def _export(args: argparse.Namespace) -> int:
    if args.output:
        await anyio.to_thread.run_sync(_check_output, args.output, args.db)
    async with await _open(args) as mgr:
        sid, ns = args.session, args.namespace
        history = await mgr.get_conversation_history(sid, namespace=ns)
        summary = await mgr.get_summary(sid, namespace=ns)
        exported = {
            "namespace": ns,
            "session_id": sid,
            "state": dataclasses.asdict(await mgr.get_session_state(sid, namespace=ns)),
            "summary": dataclasses.asdict(summary) if summary else None,
            "snapshots": [
                dataclasses.asdict(s) for s in await mgr.list_snapshots(sid, namespace=ns)
            ],
            "messages": [dataclasses.asdict(m) for m in history],
        }
    text = json.dumps(exported, indent=2, default=str, ensure_ascii=False) + "\n"
    if args.output:
        await anyio.Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {len(history)} messages to {_printable(args.output)}")
    else:
        sys.stdout.write(text)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported as one line like every other mistake."""

    def error(self, message: str) -> NoReturn:
        raise InvalidInputError(f"{message} (see {self.prog} --help)")


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {shown(text)}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_LIMIT}, not {value}")
    return value


def _check_arguments(args: argparse.Namespace) -> None:
    """The command line's names and paths, checked before anything is opened."""
    for name, what in (("session", "the session id"), ("namespace", "--namespace")):
        if getattr(args, name, None) is not None:
            check_name(what, getattr(args, name))
    for name in ("db", "config", "file", "output", "fixture"):
        path = getattr(args, name, None)
        if path is not None and (not path or "\x00" in path):
            what = "the file" if name == "file" else f"--{name}"
            raise InvalidInputError(f"{what} is empty" if not path else f"{what} contains NUL")
    query = getattr(args, "query", None)
    if query is not None:
        check_unicode("the query", query)
        if not query.strip():
            raise InvalidInputError("the query is empty")


async def _migrate_store(args: argparse.Namespace) -> int:
    """Copy every session of `--from` into the empty `--to`, then compare the counts."""
    from ._embedder import make_embedder
    from ._opening import open_store
    from ._store_copy import SettableClock, copy_store

    config = _config(args)
    await _check_db(args.source, create=False)
    await _check_db(args.to, create=True)
    # the embedding model both stores must hold vectors of (read, not loaded)
    embedder = make_embedder(config)
    name, dims = embedder.model_name, embedder.dimensions
    source = await open_store(args.source, name, dims, config, time.time)
    try:
        clock = SettableClock()
        target = await open_store(args.to, name, dims, config, clock)
        try:
            counts = await copy_store(source, target, clock)
        finally:
            await target.close()
    finally:
        await source.close()
    figures = ", ".join(f"{n} {table}" for table, n in counts.items())
    print(f"copied {figures}; the counts match the source's")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tiermem",
        description="Tiered conversational memory in one SQLite file, or in PostgreSQL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, *, session: bool = False, json_: bool = False) -> Any:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--db",
            help="SQLite file or postgresql:// URL (default: TIERMEM_DATABASE_URL, else "
            "tiermem.db)",
        )
        p.add_argument("--config", help="TOML config file (TIERMEM_* variables override it)")
        if session:
            p.add_argument("session", help="session id")
            p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="tenant or user")
        if json_:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    demo = add("demo", "Replay the demo conversation with the bundled models, turn by turn.")
    demo.add_argument("--fixture", help="conversation JSON (default: the bundled demo)")
    chat = add(
        "chat",
        "Chat with the bundled GGUF model while tiermem manages its memory; clears, "
        "summaries and retrievals are printed as they happen.",
    )
    chat.add_argument("--session", default="chat", help="session id (default: chat)")
    chat.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="tenant or user")
    ingest = add(
        "ingest",
        'Import a JSONL file of messages ({"session_id", "role", "content", and '
        'optionally "id", "namespace", "created_at", "metadata"} per line).',
    )
    ingest.add_argument("file", help="the JSONL file")
    ingest.add_argument("--session", help="session id for lines without session_id")
    search = add("search", "Search a session's memory (all three tiers).", session=True, json_=True)
    search.add_argument("query", help="what to look for")
    search.add_argument("--limit", type=_limit, default=10, help="hits to show (default: 10)")
    add("sessions", "List stored sessions with their sizes and last activity.", json_=True)
    add(
        "status",
        "Print memory, budget and model figures, and what the database holds. The memory "
        "figures are this process's: a manager embedded in a host reports its own through "
        "`await manager.status()`.",
        json_=True,
    )
    add("maintain", "Prune old snapshots (and drop idle sessions) now.", json_=True)
    add("delete-session", "Delete a session and everything derived from it.", session=True)
    export = add("export-session", "Write a session as JSON.", session=True)
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    copy = sub.add_parser(
        "migrate-store",
        help="Copy a whole database into another store (an empty one), such as a SQLite "
        "file into PostgreSQL, and check the counts.",
    )
    copy.add_argument("--from", dest="source", required=True, help="SQLite file or URL")
    copy.add_argument("--to", required=True, help="postgresql:// URL or SQLite file")
    copy.add_argument("--config", help="TOML config file (TIERMEM_* variables override it)")
    return parser


HANDLERS: dict[str, Any] = {
    "demo": _demo,
    "chat": _chat,
    "ingest": _ingest,
    "search": _search,
    "sessions": _sessions,
    "status": _status,
    "maintain": _maintain,
    "delete-session": _delete,
    "export-session": _export,
    "migrate-store": _migrate_store,
}


def _printable(text: str, width: int = 1000) -> str:
    """`text` on one short line, any lone surrogate (an undecodable file name) escaped."""
    flat = " ".join(text.splitlines())
    flat = flat if len(flat) <= width else flat[: width - 1] + "…"
    return flat.encode("utf-8", "backslashreplace").decode("utf-8")


def _report(exc: BaseException) -> int:
    """One line on stderr for `exc`; the exit status: 2 for a user's mistake, 1 for a bug."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # a task group's error: the first is the cause
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, BrokenPipeError):
        # the reader left (`| head`): stop quietly, and keep Python's flush at exit quiet too
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 1
    if isinstance(exc, (TierMemError, OSError)):
        message, status = str(exc), 2
    else:
        message, status = f"internal error (please report it): {type(exc).__name__}: {exc}", 1
    print(f"tiermem: {_printable(message)}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    # the command's own output only: no weight-loading progress bars from transformers
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args = _parser().parse_args(argv)
        if "db" in args and args.db is None:
            args.db = _config(args).database_url or "tiermem.db"
        _check_arguments(args)
        status = int(anyio.run(HANDLERS[args.command], args))
        if sys.stdout is not None:  # a reader that left (`| head`) is noticed here, not at exit
            sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the promise: one line, never a traceback
        return _report(exc)


if __name__ == "__main__":
    raise SystemExit(main())
