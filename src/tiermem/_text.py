"""Text analysis shared by scoring and retrieval: words, keywords, FTS5 queries, code.

Everything here is word-aware and deterministic: "key" does not match "keyboard", and the
same text always gives the same keywords in the same order.

It runs on the event loop, once or more per message, so every function is linear in what it
reads (no pattern backtracks more than once over a stretch of text) and what needs only part
of a text reads a bounded part: a 10 MB paste costs about what its first 64 KB cost.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Iterable

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)

# how much of a text each kind of look reads (characters)
HEAD_CHARS = 64 * 1024  # its words: keywords and matched keywords
QUERY_CHARS = 4096  # a query's cues and keywords
CODE_HEAD_CHARS = 16 * 1024  # code detection: the opening...
CODE_TAIL_CHARS = 4096  # ...and the end, where a pasted snippet often sits
# a cut inside a word moves back to the word's start, unless the word is longer than this
_WORD_CUT_CHARS = 64

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


def _code_pattern(line_end: str, word_end: str) -> re.Pattern[str]:
    # Possessive quantifiers and the word start before a call keep every branch linear: a
    # run of word characters is tried as a function name once, from its start, not from
    # each of its characters (80 000 hex digits took a minute); blank runs are read once.
    return re.compile(
        r"```"
        r"|^[^\S\n]*+(?:def|class|import|from|function|const|let|var|public|private|fn|func"
        rf"|#include){word_end}"
        rf"|[;{{}}][^\S\n]*+{line_end}"
        r"|=>"
        r"|\b\w++\([^()]*+\)\s*+[{:]",
        re.MULTILINE,
    )


_CODE = _code_pattern(line_end="$", word_end=r"\b")
# for an opening searched up to a cut (`endpos`), where "$" and "\b" would take the cut for
# the text's end: only a real line break or non-word character counts
_CODE_OPENING = _code_pattern(line_end=r"(?=\n)", word_end=r"(?=\W)")


def head(text: str, limit: int) -> str:
    """The first `limit` characters of `text`, without a word cut in two at the end (a
    half word would read as a word of its own)."""
    if len(text) <= limit:
        return text
    start = limit
    while start > 0 and limit - start < _WORD_CUT_CHARS and text[start - 1].isalnum():
        start -= 1
    cut_in_word = text[limit].isalnum() and start < limit
    if cut_in_word and start > 0 and not text[start - 1].isalnum():
        return text[:start]
    return text[:limit]


def sample(text: str, head_chars: int, tail_chars: int) -> str:
    """`text` itself, or when longer its opening and its end joined by a line break: what
    a look for patterns anywhere (a number, "important") reads of a long text."""
    if len(text) <= head_chars + tail_chars:
        return text
    return text[:head_chars] + "\n" + text[len(text) - tail_chars :]


def words(text: str) -> list[str]:
    """Lower-cased words (letters and digits, with inner apostrophes)."""
    return [w.replace("’", "'") for w in _WORD.findall(text.lower())]


def keywords(text: str, limit: int = 16) -> list[str]:
    """The content words of `text`, in order of first appearance, without stop words; read
    from its first `HEAD_CHARS` characters, and only as far as the `limit`-th."""
    seen: dict[str, None] = {}
    for match in _WORD.finditer(head(text, HEAD_CHARS).lower()):
        word = _keyword_form(match[0])
        if word is not None:
            seen.setdefault(word, None)
            if len(seen) >= limit:
                break
    return list(seen)


def _keyword_form(word: str) -> str | None:
    """`word` as a keyword (lower-cased, a possessive's "'s" dropped: "Melanie's kids" is
    about Melanie), or None for a stop word or a single letter."""
    word = word.lower().replace("’", "'")
    if word.endswith("'s") and word not in STOP_WORDS:
        word = word[:-2]
    if word in STOP_WORDS or (len(word) < 2 and not word.isdigit()):
        return None
    return word


def without_keywords(text: str, drop: Collection[str]) -> str:
    """`text` with the words whose keyword form is in `drop` left out."""
    kept: list[str] = []
    start = 0
    for match in _WORD.finditer(text):
        if _keyword_form(match[0]) in drop:
            kept.append(text[start : match.start()])
            start = match.end()
    kept.append(text[start:])
    return "".join(kept)


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
    """Which `terms` occur in `text` as words (or as a word's start, for plurals and tenses),
    among its first `HEAD_CHARS` characters."""
    present = set(words(head(text, HEAD_CHARS)))
    # "garden" matches "gardens" and "gardening": a term of 4+ letters may be the start of a
    # word when at most 3 letters follow it
    starts = {w[:n] for w in present for n in range(max(4, len(w) - 3), len(w))}
    return [term for term in terms if term in present or term in starts]


def looks_like_code(text: str) -> bool:
    """Does `text` hold code (a fence, a definition, a statement end, a call with a body)?
    A long text is read at its opening and its end only."""
    if len(text) <= CODE_HEAD_CHARS + CODE_TAIL_CHARS:
        return _CODE.search(text) is not None
    # the end is searched in place (from a position, not a slice), so that "^" and "\b"
    # there see the text before it
    return (
        _CODE_OPENING.search(text, 0, CODE_HEAD_CHARS) is not None
        or _CODE.search(text, len(text) - CODE_TAIL_CHARS) is not None
    )


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
