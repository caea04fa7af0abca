"""The `tiermem` command line: `demo` and `status`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from .config import KVCacheConfig
from .errors import TierMemError


def _config(args: argparse.Namespace) -> KVCacheConfig:
    if args.config:
        return KVCacheConfig.from_toml(args.config)
    return KVCacheConfig.from_env()


async def _status(args: argparse.Namespace) -> int:
    from .manager import KVCacheManager

    if not await anyio.Path(args.db).is_file():
        raise TierMemError(f"no database at {args.db}")
    async with await KVCacheManager.open(args.db, _config(args)) as mgr:
        status = dataclasses.asdict(await mgr.status())
        status["stored"] = await mgr.storage_status()
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        for key, value in status.items():
            print(f"{key:>20}: {value}")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(args.db, args.fixture, sys.stdout, _config(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiermem", description="Tiered conversational memory: demo and inspection."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--db", default="tiermem.db", help="SQLite file (default: tiermem.db)")
        p.add_argument("--config", help="TOML config file (TIERMEM_* variables override it)")
        return p

    demo = add("demo", "Replay the demo conversation with the bundled models, turn by turn.")
    demo.add_argument(
        "--fixture", help="conversation JSON (default: fixtures/demo_conversation.json)"
    )
    status = add(
        "status",
        "Print memory, budget and model figures, and what the database holds. The memory "
        "figures are this process's: a manager embedded in a host reports its own through "
        "`await manager.status()`.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers: dict[str, Any] = {"demo": _demo, "status": _status}
    try:
        return int(anyio.run(handlers[args.command], args))
    except TierMemError as exc:
        print(f"tiermem: {exc}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        print(f"tiermem: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
