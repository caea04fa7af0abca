"""Storage: the `Store` protocol and its SQLite implementation, split by concern.

Tables (all made by the numbered migrations in migrations/): `sessions`, `session_state`
and `session_summaries` (`_state.py`); `messages` and `messages_fts` (`_messages.py`);
`message_embeddings` and `message_index` (`_vectors.py`, searched in `_search.py`);
`kv_snapshots` and `kv_snapshot_entries` (`_snapshots.py`); `meta` and
`schema_migrations` (`_connection.py`, `_migrate.py`, `_steps.py`). The same tables in
PostgreSQL with pgvector: `_postgres.py` (opening, migrations), `_pg_base.py` (the pool),
`_pg_state.py` and `_pg_search.py`.
"""

from ._pg_base import is_url
from ._postgres import PostgresStore
from ._protocol import StaleSession, Store
from ._rows import (
    MessageKey,
    MessageRow,
    NewMessage,
    SearchHit,
    SessionRow,
    SessionVersion,
    SnapshotContents,
    SnapshotEntryRow,
    SnapshotRow,
    StateRow,
    SummaryRow,
    TermCounts,
)
from ._sqlite import COUNTED_TABLES, SQLiteStore

__all__ = [
    "COUNTED_TABLES",
    "MessageKey",
    "MessageRow",
    "NewMessage",
    "PostgresStore",
    "SQLiteStore",
    "SearchHit",
    "SessionRow",
    "SessionVersion",
    "SnapshotContents",
    "SnapshotEntryRow",
    "SnapshotRow",
    "StaleSession",
    "StateRow",
    "Store",
    "SummaryRow",
    "TermCounts",
    "is_url",
]
