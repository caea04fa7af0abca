"""`PostgresStore`: the `Store` in a PostgreSQL database with pgvector, for backends whose
replicas share one database. Its tables are the SQLite store's: `sessions`,
`session_state`, `session_summaries`, `kv_snapshots`, `kv_snapshot_entries`
(`_pg_state.py`); `messages` and `message_embeddings` (`_pg_search.py`); `meta` (the
embedding model and dimension, checked here) and `schema_migrations` (the numbered files
of `migrations/postgres/`, applied here under an advisory lock, so replicas starting
together apply each once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import StorageError
from . import _migrate as migrate
from . import _pg_base as base
from ._connection import check_embedding_meta
from ._pg_base import redacted, storage_errors
from ._pg_search import PostgresSearchQueries
from ._steps import Parameters

PG_COUNTED_TABLES = (
    "sessions",
    "messages",
    "message_embeddings",
    "kv_snapshots",
    "kv_snapshot_entries",
    "session_summaries",
    "session_state",
)
# the advisory lock of migrations (a constant of tiermem's own)
MIGRATION_LOCK = 0x7469_6572_6D65_6D00


class PostgresStore(PostgresSearchQueries):
    """The tiermem database in PostgreSQL (pgvector). Open with
    `await PostgresStore.open(url, model, dimensions)`."""

    @classmethod
    async def open(
        cls,
        url: str,
        embedding_model: str,
        dimensions: int,
        *,
        pool_size: int = 10,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> PostgresStore:
        """Connect, migrate (creating the tables in a blank database) and check the
        embedding model; `pool_size` connections at most (one of them holds the advisory
        locks of the sessions in use). `read_only`: every transaction is read-only (a
        write is a `StorageError`), and a database that needs migrating is refused."""
        if base.asyncpg is None:
            raise StorageError("a PostgreSQL URL needs asyncpg: pip install 'tiermem[postgres]'")
        where = redacted(url)
        params = Parameters(embedding_model, dimensions)
        with storage_errors(f"cannot open database {where}"):
            conn = await base.asyncpg.connect(url)
            try:
                await _migrate(conn, params, where, read_only)
            finally:
                await conn.close()
            settings = {"default_transaction_read_only": "on"} if read_only else {}
            pool = await base.asyncpg.create_pool(
                url,
                min_size=1,
                max_size=max(2, pool_size),
                init=base.init_connection,
                server_settings=settings,
            )
        return cls(url, pool, dimensions=dimensions, clock=clock)

    async def size_bytes(self) -> int:
        """The bytes of tiermem's tables with their indexes and TOAST."""
        row = await self._read_one(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " WHERE c.relname = ANY($1::text[]) AND c.relkind = 'r'"
            " AND c.relnamespace = current_schema()::regnamespace",
            [*PG_COUNTED_TABLES, "meta", "schema_migrations"],
        )
        return int(row[0])

    async def counts(self, tables: Sequence[str] = PG_COUNTED_TABLES) -> dict[str, int]:
        out = {}
        for table in tables:
            if table not in PG_COUNTED_TABLES:
                raise ValueError(f"not a tiermem table: {table!r}")
            out[table] = int((await self._read_one(f"SELECT COUNT(*) FROM {table}"))[0])
        return out


async def _migrate(conn: Any, params: Parameters, where: str, read_only: bool) -> None:
    """Apply the migrations not recorded yet, each in its transaction, all under one
    advisory lock; then check the embedding model against `meta`."""
    known = migrate.available("postgres")
    newest = max(m.version for m in known)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        # a read-only open creates nothing (a standby, a role that may only read)
        if not read_only:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at double precision NOT NULL)"
            )
        done: set[int] = set()
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is not None:
            rows = await conn.fetch("SELECT version FROM schema_migrations")
            done = {int(r[0]) for r in rows}
        if done and max(done) > newest:
            raise StorageError(
                f"the database {where} has schema version {max(done)}, newer than this "
                f"tiermem knows ({newest}): upgrade tiermem to open it"
            )
        if not done:
            foreign = await conn.fetchval(
                "SELECT table_name FROM information_schema.tables WHERE table_schema ="
                " current_schema() AND table_name <> 'schema_migrations' LIMIT 1"
            )
            if foreign:
                raise StorageError(
                    f"{where} is not a tiermem database: it holds other tables "
                    f"(such as {foreign!r})"
                )
        pending = [m for m in known if m.version not in done]
        if pending and read_only:
            raise StorageError(
                f"database {where} is opened read-only and needs migrating by this tiermem: "
                "open it once with write access"
            )
        for migration in pending:
            async with conn.transaction():
                await conn.execute(migration.sql.replace("{dimensions}", str(params.dimensions)))
                await conn.execute(
                    "INSERT INTO schema_migrations(version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    time.time(),
                )
        # the model the vectors come from, recorded by the first opener
        if not read_only:
            await conn.execute(
                "INSERT INTO meta(key, value) VALUES ('embedding_model', $1),"
                " ('embedding_dims', $2) ON CONFLICT (key) DO NOTHING",
                params.embedding_model,
                str(params.dimensions),
            )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    check_embedding_meta(
        {r[0]: r[1] for r in await conn.fetch("SELECT key, value FROM meta")}, where, params
    )
