"""Importance of active-cache entries, in [0, 1]: recency, access, content, size, engagement.

Content patterns are whole words, case-insensitive, and an entry's class is decided by
fixed rules, so scores are deterministic (the seed matched substrings case-sensitively and
classified entries in hash-map order). A long entry is read at its opening and its end
(`SCAN_HEAD_CHARS`, `SCAN_TAIL_CHARS`), so scoring a 10 MB paste costs what 17 KB cost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from . import _text as text
from ._cache import CacheEntry
from ._config import ScoringWeights

SCAN_HEAD_CHARS = 16 * 1024
SCAN_TAIL_CHARS = 1024

_PATTERNS: tuple[tuple[re.Pattern[str], float], ...] = (
    (
        re.compile(
            r"\b(important|importantly|remember|critical|crucial|key|must|never|always|"
            r"deadline|urgent|essential|don'?t forget|note that|password|allerg\w*+)\b",
            re.IGNORECASE,
        ),
        0.9,
    ),
    (
        re.compile(
            r"\b(my name|i am|i'm|i live|i work|i prefer|i like|i love|i hate|i need|"
            r"i want|my \w++ (is|are)|we decided|decided|agreed|plan is)\b",
            re.IGNORECASE,
        ),
        0.7,
    ),
    (re.compile(r"\b\d[\d,.:/-]*\b"), 0.5),
    (re.compile(r"\?\s*+$|^\s*+(who|what|when|where|why|how|which)\b", re.IGNORECASE), 0.4),
)


def content_score(entry_type: str, content: str) -> float:
    """How much the text itself says it matters: the best matching pattern, plus a little
    for each further pattern."""
    if entry_type == "system_prompt":
        return 1.0
    read = text.sample(content, SCAN_HEAD_CHARS, SCAN_TAIL_CHARS)
    scores = [weight for pattern, weight in _PATTERNS if pattern.search(read)]
    if entry_type == "code":
        scores.append(0.9)
    if not scores:
        return 0.1
    scores.sort(reverse=True)
    return min(1.0, scores[0] + 0.05 * (len(scores) - 1))


class ImportanceScorer:
    """Scores entries relative to the newest position in their session."""

    def __init__(self, weights: ScoringWeights) -> None:
        self.weights = weights

    def score(self, entry: CacheEntry, newest_position: int) -> float:
        w = self.weights
        age = max(0, newest_position - entry.position)
        parts = (
            (w.recency, 0.5 ** (age / w.recency_half_life_messages)),
            (w.access, min(1.0, math.log1p(entry.access_count) / math.log1p(8))),
            (w.content, content_score(entry.entry_type, entry.content)),
            (w.size, min(1.0, math.log1p(entry.token_count) / math.log1p(256))),
            (w.engagement, min(1.0, max(0.0, entry.engagement))),
        )
        total = sum(weight for weight, _ in parts)
        return sum(weight * value for weight, value in parts) / total

    def rescore(self, entries: Sequence[CacheEntry]) -> None:
        if not entries:
            return
        newest = max(e.position for e in entries)
        for entry in entries:
            entry.importance = self.score(entry, newest)

    def decay(self, entries: Sequence[CacheEntry]) -> None:
        """One turn passes: engagement fades unless refreshed by retrieval."""
        for entry in entries:
            entry.engagement *= self.weights.engagement_decay

    def engage(self, entries: Sequence[CacheEntry]) -> None:
        """Entries were retrieved: raise their engagement and access count."""
        for entry in entries:
            entry.access_count += 1
            entry.engagement = min(1.0, entry.engagement + self.weights.engagement_boost)
