"""The `tiermem` command line: demo, chat, ingest, search, sessions, status, maintain,
delete-session, export-session. A user mistake (a missing file, an unknown session, a bad
query or config) prints one line and exits 2; nothing is half done."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio

from .config import KVCacheConfig
from .errors import InvalidInputError, NotFoundError, TierMemError
from .types import DEFAULT_NAMESPACE, Message


def _config(args: argparse.Namespace) -> KVCacheConfig:
    if args.config:
        return KVCacheConfig.from_toml(args.config)
    return KVCacheConfig.from_env()


async def _open(
    args: argparse.Namespace, config: KVCacheConfig | None = None, *, create: bool = False
) -> Any:
    """The manager on `--db`; a database that is not there is an error unless `create`."""
    from .manager import KVCacheManager

    if not create and not await anyio.Path(args.db).is_file():
        raise TierMemError(f"no database at {args.db}")
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


async def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(args.db, args.fixture, sys.stdout, _config(args))


async def _chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    return await run_chat(
        args.db, args.session, args.namespace, _config(args), sys.stdin, sys.stdout
    )


def _read_jsonl(path: str, session: str | None) -> dict[tuple[str, str], list[Message]]:
    """Messages by (namespace, session), in file order; every line checked before any is
    stored."""
    by_session: dict[tuple[str, str], list[Message]] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{where}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise InvalidInputError(f"{where}: expected a JSON object")
            sid = row.pop("session_id", None) or session
            if not sid:
                raise InvalidInputError(f"{where}: no session_id (or pass --session)")
            ns = row.pop("namespace", None) or DEFAULT_NAMESPACE
            try:
                created = row.pop("created_at", None)
                message = Message(
                    row.pop("role"),
                    row.pop("content"),
                    id=row.pop("id", None),
                    metadata=row.pop("metadata", None),
                    created_at=datetime.fromisoformat(created) if created else None,
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidInputError(f"{where}: {exc!s} (need role and content)") from exc
            if row:
                raise InvalidInputError(f"{where}: unknown fields {sorted(row)}")
            by_session.setdefault((ns, str(sid)), []).append(message)
    return by_session


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
    from .intake import validate

    by_session = _read_jsonl(args.file, args.session)
    config = _config(args)
    for messages in by_session.values():
        validate(messages, config.max_message_bytes)
    total = sum(len(m) for m in by_session.values())
    bar = _Progress(total)
    new = 0
    async with await _open(args, config, create=True) as mgr:
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
    if not args.query.strip():
        raise InvalidInputError("the query is empty")
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


async def _export(args: argparse.Namespace) -> int:
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
        print(f"wrote {len(history)} messages to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiermem", description="Tiered conversational memory in one SQLite file."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, *, session: bool = False, json_: bool = False) -> Any:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--db", default="tiermem.db", help="SQLite file (default: tiermem.db)")
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
    search.add_argument("--limit", type=int, default=10, help="hits to show (default: 10)")
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
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # the command's own output only: no weight-loading progress bars from transformers
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(anyio.run(HANDLERS[args.command], args))
    except (TierMemError, OSError, json.JSONDecodeError) as exc:
        print(f"tiermem: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
