"""Message vectors: `message_embeddings` (each message's float32 vector, a blob keyed by
message id: exact distances by primary key) and `message_index` (a vec0 table of their
sign bits, partitioned by session: a Hamming pass over 48 bytes a message, never another
session's, proposes candidates that the float vectors then rank exactly). Its dimension is
the embedding model's, recorded in `meta`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite
import numpy as np

Row = tuple[Any, ...]

# the bit index proposes this many candidates per nearest neighbour wanted (see vector_search)
KNN_OVERSAMPLE = 4
# vectors per vec0 chunk of the bit index. A session holds at least one whole chunk, 56 B a
# vector (bits and rowid): 14 KB at 256, where vec0's default of 1,024 made it 57 KB, more
# than a small session's messages take. Smaller chunks cost KNN time on big sessions (a pass
# merges its top k per chunk): k=200 at 100k messages took 17 ms at 1,024, 31 ms at 256
INDEX_CHUNK_SIZE = 256
VEC0_MAX_K = 4096
INDEX_INSERT = "INSERT INTO message_index(rowid, session_key, embedding) VALUES (?, ?, vec_bit(?))"


def index_ddl(dimensions: int) -> str:
    """The bit index for vectors of `dimensions` (rounded up to whole bytes)."""
    bits = -(-dimensions // 8) * 8
    return (
        "CREATE VIRTUAL TABLE message_index USING vec0("
        f"session_key integer partition key, embedding bit[{bits}], "
        f"chunk_size={INDEX_CHUNK_SIZE})"
    )


def blob(vector: np.ndarray[Any, Any]) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def bits(vector: np.ndarray[Any, Any]) -> bytes:
    """The vector's sign bits, the key of the Hamming index (padded to whole bytes)."""
    return np.packbits(np.asarray(vector) > 0).tobytes()


def cosine_distances(query: np.ndarray[Any, Any], rows: Sequence[Row]) -> dict[int, float]:
    """(rowid, float32 blob) rows -> cosine distance from `query` to each."""
    if not rows:
        return {}
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    return distances_to(query, [r[0] for r in rows], matrix)


def distances_to(
    query: np.ndarray[Any, Any], rowids: Sequence[int], matrix: np.ndarray[Any, Any]
) -> dict[int, float]:
    """Cosine distance from `query` to each row of `matrix` (a zero vector's is 1)."""
    norms = np.linalg.norm(matrix, axis=1) * (float(np.linalg.norm(query)) or 1.0)
    similarity = (matrix @ np.asarray(query, dtype=np.float32)) / np.where(norms > 0, norms, 1.0)
    return {int(i): float(1.0 - s) for i, s in zip(rowids, similarity, strict=True)}


def ids_json(ids: Iterable[int]) -> str:
    return json.dumps([int(i) for i in ids])


async def insert_vector(
    db: aiosqlite.Connection, rowid: int, key: int, vector: np.ndarray[Any, Any]
) -> None:
    """Store a message's vector and its bits (inside the caller's transaction)."""
    await db.execute(
        "INSERT INTO message_embeddings(message_rowid, embedding) VALUES (?, ?)",
        (rowid, blob(vector)),
    )
    await db.execute(INDEX_INSERT, (rowid, key, bits(vector)))


def index_embeddings(conn: Any) -> None:
    """Blocking: fill a new bit index from the stored float vectors, a page at a time."""
    after = 0
    while True:
        rows = conn.execute(
            "SELECT e.message_rowid, m.session_key, e.embedding FROM message_embeddings e "
            "JOIN messages m ON m.id = e.message_rowid WHERE e.message_rowid > ? "
            "ORDER BY e.message_rowid LIMIT 10000",
            (after,),
        ).fetchall()
        if not rows:
            return
        conn.executemany(
            INDEX_INSERT,
            [(r[0], r[1], bits(np.frombuffer(r[2], dtype=np.float32))) for r in rows],
        )
        after = rows[-1][0]
