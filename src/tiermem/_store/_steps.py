"""The Python steps of migrations (`-- migrate: python NAME`): what SQL cannot say. They
make `message_index`, the vec0 bit index whose width is the embedding model's, record
that model in `meta`, and move the float vectors of the oldest files' `message_vectors`
(a vec0 table made beside the migrations before migration 4) into `message_embeddings`.
Each runs inside its migration's transaction on a blocking connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _vectors as vectors


@dataclass(frozen=True, slots=True)
class Parameters:
    """What only the opener of a database knows: the embedding model its vectors come
    from, and their dimension."""

    embedding_model: str
    dimensions: int


Step = Callable[[Any, Parameters], None]


def _table_exists(conn: Any, name: str) -> bool:
    return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone())


def move_float_vectors(conn: Any, params: Parameters) -> None:
    """Migration 9: the float vec0 `message_vectors` of files made before migration 4 go
    into `message_embeddings` (the messages' own vectors, as they were) and the table
    goes. Files made later never had it."""
    if _table_exists(conn, "message_vectors"):
        conn.execute(
            "INSERT OR IGNORE INTO message_embeddings(message_rowid, embedding) "
            "SELECT v.rowid, v.embedding FROM message_vectors v JOIN messages m ON m.id = v.rowid"
        )
        conn.execute("DROP TABLE message_vectors")


def message_index(conn: Any, params: Parameters) -> None:
    """Migration 10: the bit index for `params.dimensions`, filled from
    `message_embeddings`, and the embedding model recorded in `meta` (where the opener
    checks it from then on). A file whose store made the index before this migration
    existed (with these chunks, at the dimension `meta` holds, checked before migrating)
    keeps it."""
    if not _table_exists(conn, "message_index"):
        conn.execute(vectors.index_ddl(params.dimensions))
        vectors.index_embeddings(conn)
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('embedding_model', ?), "
        "('embedding_dims', ?)",
        (params.embedding_model, str(params.dimensions)),
    )


STEPS: dict[str, Step] = {
    "move_float_vectors": move_float_vectors,
    "message_index": message_index,
}
