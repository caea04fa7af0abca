"""Search within one session: lexical over `messages_fts` (FTS5, bm25, restricted to the
session inside FTS5 through its `session_key` column), nearest neighbours over
`message_index` (sign bits) ranked exactly by `message_embeddings` (float vectors), and
over the messages of `kv_snapshot_entries`. Another session's rows are never scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _text as text
from ._messages import MessageQueries
from ._rows import SearchHit, TermCounts
from ._vectors import KNN_OVERSAMPLE, VEC0_MAX_K, bits, cosine_distances


def _in_session(key: int) -> str:
    """The FTS5 filter on the session key column (an integer, so nothing to escape)."""
    return f'session_key : "{int(key)}"'


def nearest(distances: dict[int, float], k: int) -> list[SearchHit]:
    return [SearchHit(*item) for item in sorted(distances.items(), key=lambda item: item[1])[:k]]


class SearchQueries(MessageQueries):
    async def lexical_search(self, terms: Sequence[str], key: int, limit: int) -> list[SearchHit]:
        """The session's best `limit` matches for any of `terms` (each quoted, so nothing in
        them is FTS5 syntax), scored by bm25 (higher is better). The query is restricted to
        the session inside FTS5, so other sessions' rows are never scored."""
        query = text.fts_query(terms)
        if not query:
            return []
        rows = await self._read_all(
            "SELECT rowid, -bm25(messages_fts, 1.0, 0.0) AS score FROM messages_fts "
            "WHERE messages_fts MATCH ? ORDER BY score DESC LIMIT ?",
            (f"{_in_session(key)} AND content : ({query})", limit),
        )
        return [SearchHit(int(r[0]), float(r[1])) for r in rows]

    async def term_counts(self, terms: Sequence[str], key: int, latest: int) -> TermCounts:
        """How many of the session's `latest` messages (by position) hold each of `terms`,
        beside how many those are: a share that costs the same in a session of 1k or 1M
        messages. Ids grow with positions, so the latest messages are those from the
        first one's id on, a range FTS5 seeks to; counting walks posting lists without
        scoring."""
        counts = ", ".join(
            "(SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH ? AND rowid >= since)"
            for _ in terms
        )
        row = await self._read_one(
            "WITH latest AS (SELECT id FROM messages WHERE session_key = ? "
            "ORDER BY position DESC LIMIT ?) "
            f"SELECT n{', ' if terms else ''}{counts} FROM "
            "(SELECT COUNT(*) AS n, IFNULL(MIN(id), 0) AS since FROM latest)",
            [
                key,
                latest,
                *(f"{_in_session(key)} AND content : {text.fts_query([t])}" for t in terms),
            ],
        )
        assert row is not None
        return TermCounts(int(row[0]), [int(n) for n in row[1:]])

    async def vector_search(self, query: np.ndarray[Any, Any], key: int, k: int) -> list[SearchHit]:
        """The session's k nearest messages by cosine distance, nearest first.

        The bit index proposes `KNN_OVERSAMPLE` x k candidates by Hamming distance (a scan of
        48 bytes a message instead of 1.5 KB), which their float vectors then rank exactly.
        """
        rows = await self._read_all(
            "WITH knn AS (SELECT rowid, distance FROM message_index "
            "WHERE embedding MATCH vec_bit(?) AND k = ? AND session_key = ?) "
            "SELECT e.message_rowid, e.embedding FROM knn "
            "JOIN message_embeddings e ON e.message_rowid = knn.rowid",
            (bits(query), min(VEC0_MAX_K, KNN_OVERSAMPLE * k), key),
            conn=self._vector_reader,
        )
        return nearest(cosine_distances(query, rows), k)

    async def snapshot_vector_search(
        self, query: np.ndarray[Any, Any], key: int, k: int
    ) -> list[SearchHit]:
        """The session's k nearest snapshot entries by cosine distance, nearest first: an
        exact pass over their messages' stored vectors (a session's snapshots hold at most a
        few cache-fulls of entries, so no index is needed)."""
        rows = await self._read_all(
            "SELECT message_rowid, embedding FROM message_embeddings WHERE message_rowid IN "
            "(SELECT e.message_rowid FROM kv_snapshots s "
            "JOIN kv_snapshot_entries e ON e.snapshot_id = s.id WHERE s.session_key = ?)",
            (key,),
            conn=self._vector_reader,
        )
        return nearest(cosine_distances(query, rows), k)

    async def distances(
        self, query: np.ndarray[Any, Any], rowids: Sequence[int]
    ) -> dict[int, float]:
        """Cosine distance from `query` to each given message's vector."""
        return cosine_distances(query, await self._embedding_rows(rowids))
