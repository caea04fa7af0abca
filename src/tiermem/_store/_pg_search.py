"""The PostgreSQL store's messages and their search: `messages` (as in SQLite, plus
`lexemes`, the `tsvector` of the text's opening under the `tiermem` configuration: stemmed,
no stop words, accents folded here first, as FTS5's `porter unicode61 remove_diacritics`)
and `message_embeddings` (pgvector; an HNSW index on the vectors cast to the model's
dimension).

Lexical search scores bm25 with FTS5's constants (k1 1.2, b 0.75) and idf, over the
session's own messages only, so scores mean to the retrieval what they mean on SQLite; a
term counts once in a message (its presence; FTS5 counts each occurrence: extracting them
from the `tsvector`s made a search at 100k messages three times slower). Vector search
ranks a session's first `EXACT_VECTORS` exactly (a sort of its own rows: small sessions
never touch the index, nor pay for it when written) and the rest through the HNSW index,
searched wide enough that its filter by session still leaves `KNN_OVERSAMPLE` x k
candidates, ranked by exact distance (exactly through the session, if the filter left too
few); the two lists merged.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import anyio.to_thread
import numpy as np

from .. import _text as text
from ._pg_base import escape, unescape
from ._pg_state import PostgresSessionQueries, claim, write_state
from ._rows import MessageKey, MessageRow, NewMessage, SearchHit, StateRow, TermCounts
from ._search import nearest as _nearest
from ._vectors import KNN_OVERSAMPLE, distances_to

MESSAGE_COLUMNS = (
    "id, position, message_id, role, content, created_at, token_count, metadata, escaped"
)
# a session's first vectors, ranked exactly (a sort of its own, ~10 ms at this many); its
# later ones go into the HNSW index
EXACT_VECTORS = 20_000
# the HNSW candidate list (`hnsw.ef_search`) is at least pgvector's default, at most this
MAX_EF_SEARCH = 1000
# a batch with more text than this has its index text prepared off the event loop
INLINE_TEXT_CHARS = 64 * 1024


def _row(r: Any) -> MessageRow:
    return MessageRow(
        int(r[0]),
        int(r[1]),
        r[2],
        r[3],
        unescape(r[4], r[8]),
        float(r[5]),
        int(r[6]),
        r[7],
    )


def folded(value: str) -> list[str]:
    """The words the full-text index reads of a text: those of its opening, accents removed
    (NFKD without combining marks), split as everywhere in tiermem (`_text.words`: letters
    and digits, so an address, a path or a date is its words, as FTS5's `unicode61` splits
    them, where PostgreSQL's parser would keep them whole)."""
    decomposed = unicodedata.normalize("NFKD", text.head(value, text.HEAD_CHARS))
    return text.words("".join(c for c in decomposed if not unicodedata.combining(c)))


def prepare(contents: Sequence[str]) -> list[tuple[str, bool, str, int]]:
    """Each text as stored (escaped if it holds NUL, and whether it is), its folded
    opening for the full-text index, and that opening's word count (bm25's length)."""
    out = []
    for content in contents:
        words = folded(content)
        out.append((*escape(content), " ".join(words), len(words)))
    return out


def _terms(terms: Sequence[str]) -> list[str]:
    """Each term as the index reads text (a term with no word matches nothing)."""
    return [" ".join(folded(t)) for t in terms if t.strip()]


class PostgresSearchQueries(PostgresSessionQueries):
    # a session's vectors past this many go into the HNSW index
    exact_vectors = EXACT_VECTORS

    # -- messages --------------------------------------------------------------------------

    async def existing_ids(self, key: int, message_ids: Sequence[str]) -> dict[str, str]:
        if not message_ids:
            return {}
        rows = await self._read_all(
            "SELECT message_id, content_hash FROM messages WHERE session_key = $1 AND "
            "message_id = ANY($2::text[])",
            key,
            list(message_ids),
        )
        return {r[0]: r[1] for r in rows}

    async def message_keys(
        self,
        key: int,
        limit: int | None = None,
        newest_first: bool = False,
        like: tuple[Sequence[str], Sequence[str]] | None = None,
    ) -> list[MessageKey]:
        where = "session_key = $1"
        params: list[Any] = [key, limit]
        if like is not None:
            where += " AND (content_hash = ANY($3::text[]) OR message_id = ANY($4::text[]))"
            params += [list(like[0]), list(like[1])]
        rows = await self._read_all(
            f"SELECT position, message_id, content_hash FROM messages WHERE {where}"
            f" ORDER BY position {'DESC' if newest_first else 'ASC'} LIMIT $2",
            *params,
        )
        keys = [MessageKey(int(r[0]), r[1], r[2]) for r in rows]
        return keys[::-1] if newest_first else keys

    async def append_messages(
        self,
        key: int,
        messages: Sequence[NewMessage],
        vectors: np.ndarray[Any, Any] | None,
        state: StateRow,
    ) -> list[int]:
        """Messages, their index text and vectors, and the session's state (with its bm25
        figures): one transaction."""
        contents = [m.content for m in messages]
        if sum(len(c) for c in contents) > INLINE_TEXT_CHARS:
            prepared = await anyio.to_thread.run_sync(prepare, contents)
        else:
            prepared = prepare(contents)
        async with self._transaction() as conn:
            await claim(conn, key, state.version)
            rows = await conn.fetch(
                "INSERT INTO messages(session_key, position, message_id, role, content,"
                " escaped, content_hash, metadata, created_at, token_count, lexemes,"
                " lexical_length)"
                " SELECT $1, m.position, m.message_id, m.role, m.content, m.escaped,"
                " m.content_hash, m.metadata, m.created_at, m.token_count,"
                " to_tsvector('tiermem', m.folded), m.words"
                " FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::boolean[],"
                " $7::text[], $8::text[], $9::float8[], $10::bigint[], $11::text[],"
                " $12::int[]) WITH ORDINALITY AS m(position, message_id, role, content,"
                " escaped, content_hash, metadata, created_at, token_count, folded, words, n)"
                " ORDER BY m.n RETURNING id, position",
                key,
                [m.position for m in messages],
                [m.message_id for m in messages],
                [m.role for m in messages],
                [p[0] for p in prepared],
                [p[1] for p in prepared],
                [m.content_hash for m in messages],
                [m.metadata for m in messages],
                [m.created_at for m in messages],
                [m.token_count for m in messages],
                [p[2] for p in prepared],
                [p[3] for p in prepared],
            )
            ids = {int(r[1]): int(r[0]) for r in rows}
            rowids = [ids[m.position] for m in messages]
            if vectors is not None:
                # past the session's first `exact_vectors`, into the HNSW index
                held = await conn.fetchval(
                    "SELECT indexed_vectors FROM session_state WHERE session_key = $1", key
                )
                await conn.executemany(
                    "INSERT INTO message_embeddings(message_rowid, session_key, embedding,"
                    " indexed) VALUES ($1, $2, $3, $4)",
                    [
                        (rowid, key, vectors[i], held + i >= self.exact_vectors)
                        for i, rowid in enumerate(rowids)
                    ],
                )
            await conn.execute(
                "UPDATE session_state SET indexed_messages = indexed_messages + $2,"
                " indexed_length = indexed_length + $3, indexed_vectors = indexed_vectors + $4"
                " WHERE session_key = $1",
                key,
                len(messages),
                sum(p[3] for p in prepared),
                0 if vectors is None else len(messages),
            )
            await write_state(conn, key, state, self._clock())
        return rowids

    async def messages_by_rowid(self, rowids: Sequence[int]) -> list[MessageRow]:
        if not rowids:
            return []
        rows = await self._read_all(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ANY($1::bigint[]) "
            "ORDER BY position",
            [int(i) for i in rowids],
        )
        return [_row(r) for r in rows]

    async def messages_between(
        self, key: int, after: int, through: int = 2**62
    ) -> list[MessageRow]:
        rows = await self._read_all(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_key = $1 AND position > $2 "
            "AND position <= $3 ORDER BY position",
            key,
            after,
            through,
        )
        return [_row(r) for r in rows]

    async def messages_at(self, key: int, positions: Iterable[int]) -> list[MessageRow]:
        wanted = sorted({int(p) for p in positions if p >= 0})
        if not wanted:
            return []
        rows = await self._read_all(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_key = $1 AND "
            "position = ANY($2::bigint[])",
            key,
            wanted,
        )
        return [_row(r) for r in rows]

    async def rowids_between_times(
        self, key: int, start: float, end: float, limit: int
    ) -> list[int]:
        rows = await self._read_all(
            "SELECT id FROM messages WHERE session_key = $1 AND created_at >= $2 AND "
            "created_at < $3 ORDER BY created_at DESC, id DESC LIMIT $4",
            key,
            start,
            end,
            limit,
        )
        return [int(r[0]) for r in rows]

    async def latest_openings(self, key: int, count: int, chars: int) -> list[tuple[str, str]]:
        rows = await self._read_all(
            # an escaped text takes at most two characters for one of the original
            "SELECT role, substr(content, 1, CASE WHEN escaped THEN 2 * $1 ELSE $1 END),"
            " escaped FROM messages WHERE session_key = $2 "
            "ORDER BY position DESC LIMIT $3",
            chars,
            key,
            count,
        )
        return [(str(r[0]), unescape(r[1], r[2])[:chars]) for r in rows]

    async def latest_time(self, key: int) -> float | None:
        row = await self._read_one(
            "SELECT MAX(created_at) FROM messages WHERE session_key = $1", key
        )
        return float(row[0]) if row and row[0] is not None else None

    async def message_vectors(self, rowids: Sequence[int]) -> dict[int, np.ndarray[Any, Any]]:
        return {int(r[0]): r[1] for r in await self._embedding_rows(rowids)}

    async def _embedding_rows(self, rowids: Sequence[int]) -> list[Any]:
        if not rowids:
            return []
        return await self._read_all(
            "SELECT message_rowid, embedding FROM message_embeddings "
            "WHERE message_rowid = ANY($1::bigint[])",
            [int(i) for i in rowids],
        )

    async def vectors_by_hash(self, hashes: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        if not hashes:
            return {}
        rows = await self._read_all(
            "SELECT DISTINCT ON (m.content_hash) m.content_hash, v.embedding FROM messages m "
            "JOIN message_embeddings v ON v.message_rowid = m.id "
            "WHERE m.content_hash = ANY($1::text[]) ORDER BY m.content_hash, m.id",
            sorted(set(hashes)),
        )
        return {r[0]: r[1] for r in rows}

    # -- search ----------------------------------------------------------------------------

    async def lexical_search(self, terms: Sequence[str], key: int, limit: int) -> list[SearchHit]:
        """The session's best `limit` matches for any of `terms` by bm25 (higher is better),
        each term a plain text (`plainto_tsquery`: nothing in it is syntax). The query is
        made first and planned with its value, so the planner chooses between the
        full-text index and the session's rows by how rare its words are."""
        searched = _terms(terms)
        if not searched:
            return []
        async with self._transaction() as conn:
            query = await conn.fetchval(
                "SELECT tiermem_any(plainto_tsquery('tiermem', t))::text FROM unnest($1::text[]) t",
                searched,
            )
            if not query:  # no word in any term
                return []
            # planned for this query's words (a cached generic plan cannot tell whether the
            # full-text index or the session's rows are cheaper)
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            rows = await conn.fetch(
                "WITH queries AS MATERIALIZED (SELECT t.n, plainto_tsquery('tiermem', t.term) AS q"
                " FROM unnest($2::text[]) WITH ORDINALITY AS t(term, n)),"
                " found AS MATERIALIZED (SELECT m.id, m.lexemes, m.lexical_length FROM messages m"
                " WHERE m.session_key = $1 AND m.lexemes @@ $4::tsquery),"
                " hits AS MATERIALIZED (SELECT f.id, f.lexical_length, q.n FROM found f"
                " JOIN queries q ON f.lexemes @@ q.q),"
                " df AS (SELECT n, count(*) AS d FROM hits GROUP BY n),"
                " stats AS (SELECT greatest(indexed_messages, 1)::float8 AS docs,"
                " greatest(indexed_length::float8 / greatest(indexed_messages, 1), 1) AS avgdl"
                " FROM session_state WHERE session_key = $1)"
                " SELECT h.id, sum(greatest(ln((s.docs - df.d + 0.5) / (df.d + 0.5)), 1e-6)"
                " * 2.2 / (1 + 1.2 * (0.25 + 0.75 * h.lexical_length / s.avgdl)))"
                " AS score FROM hits h JOIN df USING (n) CROSS JOIN stats s"
                " GROUP BY h.id ORDER BY score DESC, h.id LIMIT $3",
                key,
                searched,
                limit,
                query,
            )
        return [SearchHit(int(r[0]), float(r[1])) for r in rows]

    async def term_counts(self, terms: Sequence[str], key: int, latest: int) -> TermCounts:
        """How many of the session's `latest` messages hold each term, beside how many
        those are (a term that is no word, or only syntax, is in none)."""
        row = await self._read_one(
            "WITH latest AS MATERIALIZED (SELECT lexemes FROM messages WHERE session_key = $1"
            " ORDER BY position DESC LIMIT $2),"
            " queries AS MATERIALIZED (SELECT t.n, plainto_tsquery('tiermem', t.term) AS q"
            " FROM unnest($3::text[]) WITH ORDINALITY AS t(term, n))"
            " SELECT (SELECT count(*) FROM latest), ARRAY(SELECT (SELECT count(*) FROM latest"
            " WHERE lexemes @@ queries.q) FROM queries ORDER BY queries.n)",
            key,
            latest,
            [" ".join(folded(t)) for t in terms],
        )
        return TermCounts(int(row[0]), [int(n) for n in row[1]])

    async def vector_search(self, query: np.ndarray[Any, Any], key: int, k: int) -> list[SearchHit]:
        """The session's k nearest messages by cosine distance, nearest first: its first
        `exact_vectors` ranked exactly, the rest through the HNSW index, merged."""
        held = await self._read_one(
            "SELECT indexed_vectors, coalesce((SELECT reltuples FROM pg_class"
            " WHERE oid = to_regclass($2)), 0) FROM session_state WHERE session_key = $1",
            key,
            f"message_embeddings_hnsw_{self.dimensions}",
        )
        if held is None:
            return []
        in_index = int(held[0]) - self.exact_vectors
        exact = (
            "SELECT message_rowid, embedding <=> $2 AS d FROM message_embeddings"
            " WHERE session_key = $1 AND {} indexed ORDER BY d LIMIT $3"
        )
        rows = await self._read_all(exact.format("NOT"), key, query, k)
        if in_index > 0:
            found = await self._indexed_nearest(query, key, k, in_index, float(held[1]))
            if len(found) < min(k, in_index):  # the filter by session left too few
                found = await self._read_all(exact.format(""), key, query, k)
            rows = sorted([*rows, *found], key=lambda r: _distance(r[1]))
        # a zero vector's cosine distance is NaN in pgvector, 1 in `cosine_distances`
        return [SearchHit(int(r[0]), _distance(r[1])) for r in rows[:k]]

    async def _indexed_nearest(
        self, query: np.ndarray[Any, Any], key: int, k: int, in_index: int, table: float
    ) -> list[Any]:
        """The session's nearest vectors in the HNSW index: `KNN_OVERSAMPLE` x k of them,
        by exact distance, the index searched wide enough (`hnsw.ef_search`) that its
        filter by session keeps them among every session's."""
        wanted = KNN_OVERSAMPLE * k
        share = in_index / max(table, in_index)
        dims = self.dimensions
        distance = f"(embedding::vector({dims})) <=> $2::vector({dims})"
        async with self._transaction() as conn:
            await conn.execute(
                f"SET LOCAL hnsw.ef_search = {int(min(MAX_EF_SEARCH, max(40, wanted / share)))}"
            )
            return list(
                await conn.fetch(
                    f"SELECT message_rowid, {distance} FROM message_embeddings"
                    f" WHERE session_key = $1 AND indexed ORDER BY {distance} LIMIT $3",
                    key,
                    query,
                    wanted,
                )
            )

    async def snapshot_vector_search(
        self, query: np.ndarray[Any, Any], key: int, k: int
    ) -> list[SearchHit]:
        rows = await self._read_all(
            "SELECT message_rowid, embedding FROM message_embeddings WHERE message_rowid IN "
            "(SELECT e.message_rowid FROM kv_snapshots s "
            "JOIN kv_snapshot_entries e ON e.snapshot_id = s.id WHERE s.session_key = $1)",
            key,
        )
        return _nearest(_distances(query, rows), k)

    async def distances(
        self, query: np.ndarray[Any, Any], rowids: Sequence[int]
    ) -> dict[int, float]:
        return _distances(query, await self._embedding_rows(rowids))


def _distance(value: float) -> float:
    return 1.0 if math.isnan(value) else float(value)


def _distances(query: np.ndarray[Any, Any], rows: Sequence[Any]) -> dict[int, float]:
    """(rowid, vector) rows -> cosine distance from `query` to each, as the SQLite store's."""
    if not rows:
        return {}
    return distances_to(query, [r[0] for r in rows], np.stack([r[1] for r in rows]))
