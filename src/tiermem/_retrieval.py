"""Three-tier search: the active cache (1), the session's snapshots (2), all its messages (3).

Candidates: every tier is searched lexically (FTS5 bm25 over the query's keywords, each a
quoted string) and by vector (cosine KNN, sqlite-vec partitioned by session, or in memory
for tier 1); a query naming a period ("in March", "last week") also searches the messages
of that period; the turns next to each candidate join them, because an answer ("Yes, a
Skoda") often means something only after the question before it.

Score, the same for every candidate whatever tier found it, so scores compare across tiers:

    base    = w * cosine + (1 - w) * bm25 / best_bm25           (fusion; w = vector_weight)
    context = base + neighbour_weight * base(previous turn)     (capped at 1)
    cues    = context, scaled down for messages outside the period the query names, from
              the other speaker than the one it asks about, or older when it asks "now"
    hop     = names in the best hits (the sister's name in "I'm visiting Marta") are
              searched again; what they find scores up to hop_weight x its parent's score

`similarity_score` = that score, in [0, 1], higher is better. A message found in several
tiers is one hit with its lowest tier (1 active, 2 snapshot, 3 history).
`escalating` mode is the seed's rule instead: tier 2 only if tier 1 found fewer than 5
relevant entries, tier 3 only if tiers 1 and 2 found fewer than 3; no context, cues or hop.

The text work here runs on the event loop and reads bounded parts of long texts: the query's
first `text.QUERY_CHARS` characters, a hit's first `NAME_CHARS` for names, its end for "is
it a question", and a long text's folding for repeats is skipped (see `_collapse`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from . import _query as query_cues
from . import _text as text
from ._cache import CacheEntry
from ._config import KVCacheConfig
from ._embedder import Embedder
from ._store import MessageRow, Store, TermCounts

ESCALATE_TIER2_BELOW = 5
ESCALATE_TIER3_BELOW = 3
RELEVANT_COSINE = 0.2
MIN_SCORE = 0.1
BM25_SCALE = 10.0
EMBED_MAX_CHARS = 4000
# a query's word in more than this share of the session's messages is left out of its
# lexical search and its embedding
COMMON_SHARE = 0.3
COMMON_MIN_MESSAGES = 20
# ...of its latest messages (a share, so the count costs the same at 1k or 1M messages)
COMMON_SAMPLE = 2000
# speaker labels ("Melanie: ...") are read from the openings of the latest messages
LABEL_SAMPLE = 64
LABEL_CHARS = 64
WINDOW_CANDIDATES = 2000
# the session's best lexical matches fetched once per search; every tier draws on them
LEXICAL_POOL = 1000
# how much a cue scales down what it does not point at
OUTSIDE_WINDOW = 0.5
OTHER_SPEAKER = 0.85
OLDEST_WHEN_LATEST = 0.8
HOP_TOP_HITS = 3
# a message reached through a name scores up to this share of the hit naming it
HOP_WEIGHT = 0.7
SAME_SITTING_SECONDS = 1800.0
HOP_NAMES = 4
HOP_MAX_LINKS = 5
# names are looked for in a hit's opening
NAME_CHARS = 16 * 1024
# a question mark this near the end (after trailing blanks) makes a message a question
QUESTION_TAIL_CHARS = 1024
# texts up to this long fold (case, blanks) before repeats are compared; longer ones must
# repeat exactly
FOLD_CHARS = 64 * 1024
_NOT_NAMES = (
    text.STOP_WORDS
    | set(query_cues.MONTHS)
    | {
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    }
)
_NAME = re.compile(r"\b([A-ZÀ-Ý][\w'’-]+)", re.UNICODE)


@dataclass(slots=True)
class Candidate:
    rowid: int
    tier: int = 3
    lexical: float | None = None
    distance: float | None = None
    base: float = 0.0
    score: float = 0.0
    row: MessageRow | None = field(default=None, repr=False)
    # messages with the same text, folded into this hit (best first)
    same_text: list[MessageRow] = field(default_factory=list)

    @property
    def cosine(self) -> float:
        return 1.0 - self.distance if self.distance is not None else 0.0

    def relevant(self) -> bool:
        return bool(self.lexical) or self.cosine >= RELEVANT_COSINE


@dataclass(frozen=True, slots=True)
class Query:
    """A query read against its session (`Retriever.read_query`)."""

    text: str  # what its vector is made of: the query without the session's common words
    cues: query_cues.QueryCues
    terms: list[str]  # its keywords
    searched: list[str]  # those searched lexically (not common)


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    hits: list[Candidate]
    tiers_searched: list[int]
    keywords: list[str]


class Retriever:
    def __init__(self, store: Store, embedder: Embedder | None, config: KVCacheConfig) -> None:
        self._store = store
        self._embedder = embedder
        self._config = config

    async def read_query(self, key: int, query: str, newest: float | None = None) -> Query:
        """The query read against its session: its cues (time relative to the session's
        latest message, or `newest` when that is later: a turn's own message not stored
        yet), its keywords, and the text its vector is made of."""
        hybrid = self._config.retrieval_mode != "escalating"
        # cues and keywords come from the query's opening; the vector pass embeds its own
        opening = text.head(query, text.QUERY_CHARS)
        cues = query_cues.QueryCues(topic=opening)
        if hybrid and self._config.retrieval_query_cues:
            latest = await self._store.latest_time(key)
            reference = max((t for t in (latest, newest) if t is not None), default=None)
            if reference is not None:
                cues = query_cues.analyse(opening, reference)
        terms = text.keywords(cues.topic) or text.keywords(opening)
        counts = await self._store.term_counts(terms, key, COMMON_SAMPLE)
        # a word in a large share of the session's messages (the speakers' names, in a
        # transcript) tells none of them apart: left out of the lexical query while rarer
        # ones remain (it would make nearly every message a match to be scored, the whole
        # cost of the query), and out of the query's embedding, where it would only pull
        # towards the messages that say little else
        common = _common_terms(terms, counts)
        embedded = text.without_keywords(query[:EMBED_MAX_CHARS], common) if common else query
        return Query(embedded, cues, terms, [t for t in terms if t not in common])

    async def search(
        self,
        key: int,
        active: Sequence[CacheEntry],
        query: str | Query,
        limit: int,
        exclude: Collection[int] = (),
        query_vector: np.ndarray[Any, Any] | None = None,
    ) -> SearchOutcome:
        """The best `limit` hits for `query` (text, or read already); `query_vector`, when
        given, is the embedding of its `Query.text`, already at hand (a turn embeds it with
        its messages)."""
        hybrid = self._config.retrieval_mode != "escalating"
        asked = query if isinstance(query, Query) else await self.read_query(key, query)
        cues, terms, searched, query = asked.cues, asked.terms, asked.searched, asked.text
        nearest: dict[int, Sequence[tuple[int, float]]] = {}
        embedded: list[np.ndarray[Any, Any]] = []
        reads: dict[str, Any] = {}

        async def read(name: str, call: Callable[..., Awaitable[Any]], *args: Any) -> None:
            reads[name] = await call(*args)

        async with anyio.create_task_group() as tg:
            # the vector pass (a model thread, then the vector connection) runs beside the
            # text reads, which are queued together rather than awaited one by one
            if self._embedder is not None and query and not query.isspace():
                tg.start_soon(
                    self._vector_pass, key, active, query, query_vector, embedded, nearest
                )
            store = self._store
            tg.start_soon(read, "snapshots", store.snapshot_message_rowids, key)
            tg.start_soon(read, "pool", store.lexical_search, searched, key, LEXICAL_POOL)
            if hybrid and self._config.retrieval_query_cues and cues.role is None:
                tg.start_soon(read, "cues", self._speaker_cue, key, cues, terms)
            if cues.window is not None:
                period = (*cues.window, WINDOW_CANDIDATES)
                tg.start_soon(read, "within", store.rowids_between_times, key, *period)
        vector = embedded[0] if embedded else None
        active_ids = {e.rowid for e in active}
        snapshot_ids = set(reads["snapshots"])
        pool = reads["pool"]
        cues = reads.get("cues", cues)
        floor = pool[-1].score if len(pool) == LEXICAL_POOL else 0.0

        found: dict[int, Candidate] = {}
        tiers: list[int] = []
        k = self._config.retrieval_candidates
        for tier, members in ((1, active_ids), (2, snapshot_ids), (3, None)):
            if self._config.retrieval_mode == "escalating" and tier > 1:
                relevant = sum(1 for c in found.values() if c.relevant())
                if relevant >= (ESCALATE_TIER2_BELOW if tier == 2 else ESCALATE_TIER3_BELOW):
                    break
            tiers.append(tier)
            lexical = pool[:k] if members is None else _best_among(pool, members, k)
            _merge(found, lexical, nearest.get(tier, []))

        if "within" in reads:
            await self._search_within(found, reads["within"], pool, vector)
        await self._attach_rows(key, found, with_neighbours=hybrid)
        allowed = set(tiers)
        for c in found.values():
            c.tier = _tier_of(c.rowid, active_ids, snapshot_ids)
        # only candidates that can be hits (their message loaded, a searched tier, not
        # excluded) get their distances looked up
        found = {
            r: c
            for r, c in found.items()
            if c.row is not None and c.tier in allowed and r not in exclude
        }
        await self._complete(found, dict(pool), floor, vector)

        self._fuse(found.values(), terms, has_vector=vector is not None)
        self._score(found, cues if hybrid and self._config.retrieval_query_cues else None)
        if hybrid and self._config.retrieval_entity_hop:
            await self._hop(key, found, terms, vector, exclude, allowed, active_ids, snapshot_ids)
        ranked = sorted(found.values(), key=lambda c: (-c.score, c.tier, -c.rowid))
        hits = _collapse([c for c in ranked if c.score >= MIN_SCORE])
        return SearchOutcome(hits[:limit], tiers, terms)

    async def _speaker_cue(
        self, key: int, cues: query_cues.QueryCues, terms: Sequence[str]
    ) -> query_cues.QueryCues:
        """In a session whose messages open with their speaker's name, a query naming one
        speaker asks about that speaker's messages."""
        openings = await self._store.latest_openings(key, LABEL_SAMPLE, LABEL_CHARS)
        role = query_cues.named_speaker(terms, query_cues.speaker_labels(openings))
        return cues if role is None else dataclasses.replace(cues, role=role)

    async def _vector_pass(
        self,
        key: int,
        active: Sequence[CacheEntry],
        query: str,
        vector: np.ndarray[Any, Any] | None,
        embedded: list[np.ndarray[Any, Any]],
        nearest: dict[int, Sequence[tuple[int, float]]],
    ) -> None:
        """Embed the query (unless its vector is given), then each tier's nearest messages:
        the active cache in memory, the snapshots and the whole history by KNN."""
        assert self._embedder is not None
        if vector is None:
            vector = (await self._embedder.embed([query[:EMBED_MAX_CHARS]]))[0]
        embedded.append(vector)
        k = self._config.retrieval_candidates
        nearest[1] = _nearest_in_memory(active, vector, k)
        nearest[2] = await self._store.snapshot_vector_search(vector, key, k)
        nearest[3] = await self._store.vector_search(vector, key, k)

    async def _search_within(
        self,
        found: dict[int, Candidate],
        within: Sequence[int],
        pool: Sequence[tuple[int, float]],
        vector: np.ndarray[Any, Any] | None,
    ) -> None:
        """Add the best matches among `within` (the messages of the period asked about)."""
        if not within:
            return
        k = self._config.retrieval_candidates
        lexical = _best_among(pool, set(within), k)
        vectors: list[tuple[int, float]] = []
        if vector is not None:
            distances = await self._store.distances(vector, within)
            vectors = sorted(distances.items(), key=lambda item: item[1])[:k]
        _merge(found, lexical, vectors)

    async def _attach_rows(
        self, key: int, found: dict[int, Candidate], with_neighbours: bool
    ) -> None:
        """Load every candidate's message. With neighbours, questions just before a
        candidate and answers just after one join, since context flows from a question
        to its answer (see `_answers`)."""
        rows = await self._store.messages_by_rowid(list(found))
        for row in rows:
            found[row.rowid].row = row
        if not with_neighbours or self._config.retrieval_neighbour_weight <= 0:
            return
        before = {r.position - 1 for r in rows}
        after = {r.position + 1 for r in rows if _is_question(r)}
        for row in await self._store.messages_at(key, before | after):
            if row.rowid not in found and (row.position in after or _is_question(row)):
                found[row.rowid] = Candidate(row.rowid, row=row)

    async def _complete(
        self,
        found: dict[int, Candidate],
        pool: dict[int, float],
        floor: float,
        vector: np.ndarray[Any, Any] | None,
    ) -> None:
        """Give every candidate both signals, so all are scored on the same terms. A message
        outside the lexical pool scores at most the pool's last (`floor`; 0 when the pool
        holds every match), which the keyword coverage then scales down."""
        no_distance = [r for r, c in found.items() if c.distance is None]
        if vector is not None and no_distance:
            for rowid, distance in (await self._store.distances(vector, no_distance)).items():
                found[rowid].distance = distance
        for rowid, c in found.items():
            if c.lexical is None:
                c.lexical = pool.get(rowid, floor)

    def _fuse(self, found: Collection[Candidate], terms: Sequence[str], has_vector: bool) -> None:
        """base = w * cosine + (1 - w) * lexical, where lexical = (1 - exp(-bm25 / 10)) x the
        share of the query's keywords the message holds: a strong match on every keyword
        counts fully, a match on one common word of five barely counts."""
        w = self._config.vector_weight if (terms and has_vector) else float(has_vector)
        for c in found:
            lexical = 0.0
            if c.lexical and c.row is not None and terms:
                coverage = len(text.matched_keywords(c.row.content, terms)) / len(terms)
                lexical = (1.0 - math.exp(-c.lexical / BM25_SCALE)) * coverage
            c.base = _clamp(w * max(0.0, c.cosine) + (1.0 - w) * lexical)

    def _score(self, found: dict[int, Candidate], cues: query_cues.QueryCues | None) -> None:
        by_position = {c.row.position: c for c in found.values() if c.row is not None}
        newest = max(by_position, default=0)
        beta = self._config.retrieval_neighbour_weight if cues is not None else 0.0
        for c in found.values():
            score = c.base
            if beta and c.row is not None:
                previous = by_position.get(c.row.position - 1)
                if previous is not None and previous.row and _answers(c.row, previous.row, cues):
                    score += beta * previous.base
            if cues is not None and c.row is not None:
                score *= _cue_factor(c.row, cues, newest)
            c.score = _clamp(score)

    async def _hop(
        self,
        key: int,
        found: dict[int, Candidate],
        terms: Sequence[str],
        vector: np.ndarray[Any, Any] | None,
        exclude: Collection[int],
        allowed: set[int],
        active_ids: set[int],
        snapshot_ids: set[int],
    ) -> None:
        """Search again for the names the best hits mention and the query does not. Every
        name is searched at once (one queue of reads, not a round trip each), then each
        parent's links are scored in order."""
        asked = set(terms)
        parents = [
            (parent, [n for n in names_in(parent.row.content) if n not in asked][:HOP_NAMES])
            for parent in sorted(found.values(), key=lambda c: -c.score)[:HOP_TOP_HITS]
            if parent.row is not None
        ]
        matches = await self._name_matches(key, {n for _, names in parents for n in names})
        links: list[tuple[Candidate, dict[int, list[str]]]] = []
        for parent, names in parents:
            matched: dict[int, list[str]] = {}
            for name in names:
                # a name in 2..HOP_MAX_LINKS messages links them; a commoner word does not
                if 1 < len(matches[name]) <= HOP_MAX_LINKS:
                    for rowid in matches[name]:
                        if rowid != parent.rowid and rowid not in exclude:
                            matched.setdefault(rowid, []).append(name)
            links.append((parent, matched))
        new = {r: Candidate(r) for _, matched in links for r in matched if r not in found}
        for row in await self._store.messages_by_rowid(list(new)) if new else []:
            new[row.rowid].row = row
        # a name is written with a capital wherever it is one: "Blue calms me", opening a
        # sentence, links no message about the colour blue
        linked = [
            (
                parent,
                {
                    rowid: c
                    for rowid, linking in matched.items()
                    if (c := found.get(rowid) or new[rowid]).row is not None
                    and any(_capitalised(c.row.content, name) for name in linking)
                },
            )
            for parent, matched in links
        ]
        fresh = {r: c for _, cs in linked for r, c in cs.items() if r in new}
        if fresh:
            # no lexical score: they were found through a name, not the query's words
            await self._complete(fresh, {}, 0.0, vector)
            self._fuse(fresh.values(), terms, has_vector=vector is not None)
            for c in fresh.values():
                c.tier = _tier_of(c.rowid, active_ids, snapshot_ids)
                c.score = c.base
        for parent, cs in linked:
            for rowid, c in cs.items():
                if c.tier in allowed:
                    c.score = max(c.score, HOP_WEIGHT * parent.score)
                    found[rowid] = c

    async def _name_matches(self, key: int, names: Collection[str]) -> dict[str, list[int]]:
        """The messages holding each name (HOP_MAX_LINKS + 1 at most), searched together."""
        out: dict[str, list[int]] = {}

        async def search(name: str) -> None:
            found = await self._store.lexical_search([name], key, HOP_MAX_LINKS + 1)
            out[name] = [rowid for rowid, _ in found]

        async with anyio.create_task_group() as tg:
            for name in sorted(names):
                tg.start_soon(search, name)
        return out


def _common_terms(terms: Sequence[str], counts: TermCounts) -> set[str]:
    """The terms in more than `COMMON_SHARE` of the counted messages (the session's latest),
    once they are `COMMON_MIN_MESSAGES`; none unless a rarer term was found in them too
    (otherwise the query would be left with nothing to match)."""
    if counts.messages < COMMON_MIN_MESSAGES:
        return set()
    share = COMMON_SHARE * counts.messages
    pairs = list(zip(terms, counts.counts, strict=True))
    common = {t for t, n in pairs if n > share}
    return common if any(0 < n <= share for _, n in pairs) else set()


def names_in(content: str) -> list[str]:
    """Capitalised words as keywords (lower-cased, a possessive dropped): likely names of
    people, places, pets, and a sentence's first word (the hop links a name only to
    messages that capitalise it too). Stop words, months and weekdays are left out. Read
    from the first `NAME_CHARS`."""
    out: dict[str, None] = {}
    for match in _NAME.finditer(text.head(content, NAME_CHARS)):
        word = text.keywords(match[1])
        if word and word[0] not in _NOT_NAMES:
            out.setdefault(word[0], None)
    return list(out)


def _capitalised(content: str, name: str) -> bool:
    """Does `content` write `name` (a keyword: lower-cased) with a capital, in its first
    `NAME_CHARS`? One search for the name, not a scan of every capitalised word."""
    pattern = rf"\b{re.escape(name[:1].upper())}(?i:{re.escape(name[1:])})(?!\w)"
    return re.search(pattern, text.head(content, NAME_CHARS).replace("’", "'")) is not None


def _answers(row: MessageRow, previous: MessageRow, cues: query_cues.QueryCues | None) -> bool:
    """Is `row` the other speaker's reply to a question in `previous`, within one sitting,
    from the speaker the query asks about? Then the question is its context."""
    return (
        previous.role != row.role
        and _is_question(previous)
        and row.created_at - previous.created_at <= SAME_SITTING_SECONDS
        and (cues is None or cues.role in (None, row.role))
    )


def _tier_of(rowid: int, active_ids: Collection[int], snapshot_ids: Collection[int]) -> int:
    """The lowest tier holding a message: 1 active cache, 2 a snapshot, 3 history."""
    return 1 if rowid in active_ids else 2 if rowid in snapshot_ids else 3


def _is_question(row: MessageRow) -> bool:
    return row.content[-QUESTION_TAIL_CHARS:].rstrip().endswith("?")


def _collapse(ranked: Sequence[Candidate]) -> list[Candidate]:
    """One hit per distinct text: repeats fold into the best-scoring one's `same_text`."""
    first: dict[tuple[bool, str], Candidate] = {}
    for c in ranked:
        assert c.row is not None
        content = c.row.content
        # folding reads the whole text: a long one is compared as it is
        folded = len(content) <= FOLD_CHARS
        key = (folded, " ".join(content.lower().split()) if folded else content)
        kept = first.setdefault(key, c)
        if kept is not c:
            kept.same_text.append(c.row)
    return list(first.values())


def _cue_factor(row: MessageRow, cues: query_cues.QueryCues, newest: int) -> float:
    factor = 1.0
    if cues.window is not None and not cues.window[0] <= row.created_at < cues.window[1]:
        factor *= OUTSIDE_WINDOW
    if cues.role is not None and row.role != cues.role:
        factor *= OTHER_SPEAKER
    if cues.latest and newest > 0:
        factor *= OLDEST_WHEN_LATEST + (1.0 - OLDEST_WHEN_LATEST) * row.position / newest
    return factor


def _best_among(
    pool: Sequence[tuple[int, float]], members: Collection[int], k: int
) -> list[tuple[int, float]]:
    """The pool's best `k` lexical matches that are among `members`."""
    return [(rowid, score) for rowid, score in pool if rowid in members][:k]


def _merge(
    found: dict[int, Candidate],
    lexical: Iterable[tuple[int, float]],
    vectors: Iterable[tuple[int, float]],
) -> None:
    for rowid, score in lexical:
        c = found.setdefault(rowid, Candidate(rowid))
        c.lexical = max(c.lexical or 0.0, score)
    for rowid, distance in vectors:
        c = found.setdefault(rowid, Candidate(rowid))
        c.distance = distance if c.distance is None else min(c.distance, distance)


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


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
