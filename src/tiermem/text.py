"""Text analysis shared by scoring and retrieval: words, keywords, FTS5 queries, code.

Everything here is word-aware and deterministic: "key" does not match "keyboard", and the
same text always gives the same keywords in the same order.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do
    does doesn't doing don't down during each few for from further had hadn't has hasn't
    have haven't having he he'd he'll he's her here here's hers herself him himself his how
    how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
    mustn't my myself no nor not of off on once only or other ought our ours ourselves out
    over own same shan't she she'd she'll she's should shouldn't so some such than that
    that's the their theirs them themselves then there there's these they they'd they'll
    they're they've this those through to too under until up very was wasn't we we'd we'll
    we're we've were weren't what what's when when's where where's which while who who's
    whom why why's will with won't would wouldn't you you'd you'll you're you've your yours
    yourself yourselves also just tell told say said know knew remember recall please
    thanks thank okay ok yes yeah hey hi hello again ever still something anything really
    mean get got like""".split()  # noqa: SIM905
)

_CODE = re.compile(
    r"```|^\s*(def|class|import|from|function|const|let|var|public|private|fn|func|#include)\b"
    r"|[;{}]\s*$|=>|\w+\([^()]*\)\s*[{:]",
    re.MULTILINE,
)


def words(text: str) -> list[str]:
    """Lower-cased words (letters and digits, with inner apostrophes)."""
    return [w.replace("’", "'") for w in _WORD.findall(text.lower())]


def keywords(text: str, limit: int = 16) -> list[str]:
    """The content words of `text`, in order of first appearance, without stop words."""
    seen: dict[str, None] = {}
    for word in words(text):
        if word not in STOP_WORDS and (len(word) > 1 or word.isdigit()):
            seen.setdefault(word, None)
    return list(seen)[:limit]


def top_keywords(texts: Iterable[str], limit: int = 10) -> list[str]:
    """The most frequent content words over `texts` (ties broken by first appearance)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in keywords(text, limit=64) if len(w) > 2)
    return [w for w, _ in counts.most_common(limit)]


def fts_query(terms: Iterable[str]) -> str:
    """An FTS5 query matching any of `terms`, each a quoted string: no operator, column
    filter or quote in the user's text can change the query's meaning."""
    quoted = ['"' + t.replace('"', '""') + '"' for t in terms if t.strip()]
    return " OR ".join(quoted)


def matched_keywords(text: str, terms: Iterable[str]) -> list[str]:
    """Which `terms` occur in `text` as words (or as a word's start, for plurals and tenses)."""
    present = set(words(text))
    # "garden" matches "gardens" and "gardening": a term of 4+ letters may be the start of a
    # word when at most 3 letters follow it
    starts = {w[:n] for w in present for n in range(max(4, len(w) - 3), len(w))}
    return [term for term in terms if term in present or term in starts]


def looks_like_code(text: str) -> bool:
    return bool(_CODE.search(text))


def content_hash(role: str, content: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(role.encode())
    digest.update(b"\x00")
    digest.update(content.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def chain_digest(previous: str, message_id: str, item_hash: str) -> str:
    """The running digest of a session's messages: equal digests, equal message prefixes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(previous.encode())
    digest.update(message_id.encode("utf-8", "surrogatepass"))
    digest.update(item_hash.encode())
    return digest.hexdigest()
