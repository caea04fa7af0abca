"""Three-tier search: the active cache (1), the session's snapshots (2), all its messages (3).

Each tier is searched lexically (FTS5 bm25 over the query's keywords, each quoted) and by
vector (cosine KNN). Candidates from every tier are merged by message, so a message found
in tiers 1 and 3 is one hit carrying its best (lowest) tier. Every candidate is then scored
the same way, whatever tier found it:

    similarity = w * cosine_similarity + (1 - w) * bm25 / best_bm25_of_this_query

clamped to [0, 1]; higher is better, and scores are comparable across tiers.

`hybrid` (the default) searches all tiers; `escalating` is the seed's rule: tier 2 only if
tier 1 found fewer than 5 relevant entries, tier 3 only if tiers 1 and 2 found fewer than 3.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import text
from .cache import CacheEntry
from .embedder import Embedder
from .store import SQLiteStore

ESCALATE_TIER2_BELOW = 5
ESCALATE_TIER3_BELOW = 3
RELEVANT_COSINE = 0.35
EMBED_MAX_CHARS = 4000


@dataclass(slots=True)
class Candidate:
    rowid: int
    tier: int
    lexical: float | None = None
    distance: float | None = None
    score: float = 0.0

    def relevant(self) -> bool:
        return bool(self.lexical) or (
            self.distance is not None and 1.0 - self.distance >= RELEVANT_COSINE
        )


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    hits: list[Candidate]
    tiers_searched: list[int]
    keywords: list[str]


class Retriever:
    def __init__(
        self,
        store: SQLiteStore,
        embedder: Embedder | None,
        mode: str,
        candidates: int,
        vector_weight: float,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._mode = mode
        self._k = candidates
        self._vector_weight = vector_weight

    async def search(
        self,
        key: int,
        active: Sequence[CacheEntry],
        query: str,
        limit: int,
        exclude: Collection[int] = (),
    ) -> SearchOutcome:
        terms = text.keywords(query)
        fts = text.fts_query(terms)
        vector = None
        if self._embedder is not None and query.strip():
            vector = (await self._embedder.embed([query[:EMBED_MAX_CHARS]]))[0]

        found: dict[int, Candidate] = {}
        tiers: list[int] = []
        for tier in (1, 2, 3):
            if self._mode == "escalating" and tier > 1:
                relevant = sum(1 for c in found.values() if c.relevant())
                limit_for_tier = ESCALATE_TIER2_BELOW if tier == 2 else ESCALATE_TIER3_BELOW
                if relevant >= limit_for_tier:
                    break
            tiers.append(tier)
            lexical, vectors = await self._search_tier(tier, key, active, fts, vector)
            for rowid, score in lexical:
                c = found.setdefault(rowid, Candidate(rowid, tier))
                c.lexical = max(c.lexical or 0.0, score)
            for rowid, distance in vectors:
                c = found.setdefault(rowid, Candidate(rowid, tier))
                c.distance = distance if c.distance is None else min(c.distance, distance)

        for rowid in exclude:
            found.pop(rowid, None)
        await self._complete(found, fts, vector)
        self._score(found.values(), has_lexical=bool(fts), has_vector=vector is not None)
        ranked = sorted(found.values(), key=lambda c: (-c.score, c.tier, -c.rowid))
        hits = [c for c in ranked if c.relevant()][:limit]
        return SearchOutcome(hits, tiers, terms)

    async def _search_tier(
        self,
        tier: int,
        key: int,
        active: Sequence[CacheEntry],
        fts: str,
        vector: np.ndarray[Any, Any] | None,
    ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        lexical: list[tuple[int, float]] = []
        vectors: list[tuple[int, float]] = []
        if tier == 1:
            if fts:
                lexical = await self._store.lexical_search(
                    fts, key, self._k, within=[e.rowid for e in active]
                )
            if vector is not None:
                vectors = _nearest_in_memory(active, vector, self._k)
        elif tier == 2:
            if fts:
                within = await self._store.snapshot_message_rowids(key)
                lexical = await self._store.lexical_search(fts, key, self._k, within=within)
            if vector is not None:
                vectors = await self._store.snapshot_vector_search(vector, key, self._k)
        else:
            if fts:
                lexical = await self._store.lexical_search(fts, key, self._k)
            if vector is not None:
                vectors = await self._store.vector_search(vector, key, self._k)
        return lexical, vectors

    async def _complete(
        self, found: dict[int, Candidate], fts: str, vector: np.ndarray[Any, Any] | None
    ) -> None:
        """Give every candidate both signals, so all are scored on the same terms."""
        no_distance = [r for r, c in found.items() if c.distance is None]
        if vector is not None and no_distance:
            for rowid, distance in (await self._store.distances(vector, no_distance)).items():
                found[rowid].distance = distance
        no_lexical = [r for r, c in found.items() if c.lexical is None]
        if fts and no_lexical:
            for rowid, score in await self._store.lexical_search(
                fts, 0, len(no_lexical), within=no_lexical
            ):
                found[rowid].lexical = score

    def _score(self, found: Collection[Candidate], has_lexical: bool, has_vector: bool) -> None:
        best = max((c.lexical or 0.0 for c in found), default=0.0)
        w = self._vector_weight if (has_lexical and has_vector) else (1.0 if has_vector else 0.0)
        for c in found:
            cosine = 1.0 - c.distance if c.distance is not None else 0.0
            lexical = (c.lexical or 0.0) / best if best > 0 else 0.0
            c.score = min(1.0, max(0.0, w * cosine + (1.0 - w) * lexical))


def _nearest_in_memory(
    entries: Sequence[CacheEntry], vector: np.ndarray[Any, Any], k: int
) -> list[tuple[int, float]]:
    """Cosine distances to the active cache's vectors (normalised, so a dot product)."""
    with_vectors = [e for e in entries if e.vector is not None]
    if not with_vectors:
        return []
    matrix = np.stack([e.vector for e in with_vectors if e.vector is not None])
    similarity = matrix @ vector
    order = np.argsort(-similarity)[:k]
    return [(with_vectors[i].rowid, float(1.0 - similarity[i])) for i in order]
