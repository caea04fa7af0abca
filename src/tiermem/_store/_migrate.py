"""Migrations runner: applies the numbered `.sql` files of `migrations/`, each in its own
transaction, and records them in its table, `schema_migrations` (version, name, when).

Every schema object comes from a migration. Two directives, each a line of the file:
- `-- migrate: rebuilds tables`: the migration runs with foreign keys off and is checked
  with `PRAGMA foreign_key_check` before its commit: SQLite's procedure for the schema
  changes ALTER TABLE cannot make (create new_X, copy, drop X, rename new_X to X), where a
  DROP with foreign keys on would cascade to every row pointing at X.
- `-- migrate: python NAME`: after the file's statements, the Python step NAME (see
  `_steps.py`) runs in the same transaction with the runtime `Parameters` (the embedding
  model and its dimension): what SQL cannot say, such as a vec0 table whose width is the
  embedding model's.

The folder is the repository's top-level `migrations/`; the wheel carries it as
`tiermem/migrations` (hatch force-include), so an installed package and a checkout read
the same files.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pysqlite3.dbapi2 as sqlite3

from .._errors import StorageError
from ._steps import STEPS, Parameters, Step

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_REBUILDS_TABLES = re.compile(r"^-- migrate: rebuilds tables\s*$", re.MULTILINE)
_PYTHON_STEP = re.compile(r"^-- migrate: python ([a-z0-9_]+)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    # run after the statements, in their transaction, with the runtime parameters
    step: Step | None = None

    @property
    def rebuilds_tables(self) -> bool:
        """Whether it must run with foreign keys off (see the module docstring)."""
        return bool(_REBUILDS_TABLES.search(self.sql))

    @classmethod
    def of(cls, version: int, name: str, sql: str) -> Migration:
        """The migration of a file, its Python step (if it names one) found in `STEPS`."""
        match = _PYTHON_STEP.search(sql)
        if match and match[1] not in STEPS:
            raise RuntimeError(f"migration {version} ({name}) names no known step {match[1]!r}")
        return cls(version, name, sql, STEPS[match[1]] if match else None)


def folder() -> Traversable:
    """Where the migrations are: `tiermem/migrations` in an installed wheel, else (a
    checkout, or an editable install running from `src/`) the repository's top level."""
    packaged = resources.files("tiermem").joinpath("migrations")
    if packaged.is_dir():
        return packaged
    checkout = Path(str(resources.files("tiermem"))).parent.parent / "migrations"
    if checkout.is_dir():
        return checkout
    raise StorageError(f"tiermem's migrations are missing (neither {packaged} nor {checkout})")


def available(backend: str | None = None) -> list[Migration]:
    """Every migration shipped with the package, in version order: SQLite's, or those of
    another backend (`postgres`: its own folder inside `migrations/`)."""
    found = []
    place = folder() if backend is None else folder().joinpath(backend)
    for entry in place.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration.of(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


def apply(
    conn: Any,
    migrations: Sequence[Migration] | None = None,
    *,
    params: Parameters | None = None,
) -> list[int]:
    """Bring a (blocking DB-API) connection up to date with `migrations` (default: those
    shipped); returns the versions applied now. `params` go to the Python steps (one that
    needs them refuses to run without).

    `BEGIN IMMEDIATE` takes the write lock first, so two processes opening one new file
    cannot both apply the same migration.
    """
    check_ours(conn)
    known = available() if migrations is None else list(migrations)
    check_not_newer(conn, known)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied_now = []
    for migration in known:
        with _foreign_keys_off(conn) if migration.rebuilds_tables else nullcontext():
            if _apply_one(conn, migration, params):
                applied_now.append(migration.version)
    return applied_now


def recorded(conn: Any) -> set[int]:
    """The versions recorded as applied (none on a blank database)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not exists:
        return set()
    return {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}


def check_not_newer(conn: Any, known: Sequence[Migration]) -> None:
    """Refuse a database written by a newer tiermem (a migration this one does not know)."""
    newest = max((m.version for m in known), default=0)
    unknown = sorted(v for v in recorded(conn) if v > newest)
    if unknown:
        raise StorageError(
            f"the database has schema version {unknown[-1]}, newer than this tiermem knows "
            f"({newest}): upgrade tiermem to open it"
        )


def check_ours(conn: Any) -> None:
    """Refuse a database of another program (tables, but no tiermem migration recorded):
    tiermem's tables are not added to it."""
    if recorded(conn):
        return
    foreign = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " AND name != 'schema_migrations' LIMIT 1"
    ).fetchone()
    if foreign:
        raise StorageError(
            f"not a tiermem database: it holds other tables (such as {foreign[0]!r})"
        )


def pending(conn: Any) -> list[Migration]:
    """The shipped migrations not applied to the database yet (checking it is not newer)."""
    known = available()
    check_ours(conn)
    check_not_newer(conn, known)
    done = recorded(conn)
    return [m for m in known if m.version not in done]


def _apply_one(conn: Any, migration: Migration, params: Parameters | None) -> bool:
    """Apply `migration` unless recorded already; True if applied now."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = conn.execute(
            "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
        ).fetchone()
        if not done:
            for statement in _statements(migration.sql):
                conn.execute(statement)
            if migration.step is not None:
                if params is None:
                    raise StorageError(
                        f"migration {migration.version} ({migration.name}) needs the "
                        "embedding model's parameters"
                    )
                migration.step(conn, params)
            if migration.rebuilds_tables:
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StorageError(
                        f"migration {migration.version} ({migration.name}) would leave "
                        f"{len(broken)} rows pointing at missing ones, first {tuple(broken[0])}"
                    )
            conn.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return not done


@contextmanager
def _foreign_keys_off(conn: Any) -> Iterator[None]:
    """Foreign keys off, then back as they were (the pragma is a no-op inside a
    transaction, so this wraps the migration's whole transaction)."""
    before = int(conn.execute("PRAGMA foreign_keys").fetchone()[0])
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA foreign_keys = {'ON' if before else 'OFF'}")


def _statements(sql: str) -> list[str]:
    """Split a script into complete statements (`executescript` would commit on its own)."""
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        if not buffer and line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
