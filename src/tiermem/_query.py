"""What a retrieval query asks for beyond its words: a time window, a speaker, the latest.

"What did I tell you about my knee in March?" asks for the user's messages of last March;
"what book did you suggest?" for the assistant's; "how do I take my coffee now?" for the
newest statement. Dates resolve against a reference time (the session's newest message),
so an imported history is searched as of its own "now". Deterministic; no model involved.

Only a query's first `text.QUERY_CHARS` characters are read, and every pattern reads them in
linear time. Dates are worked in POSIX seconds within the calendar's range (years 1 to
9999): "9999999999 days ago", "May 0000" or a session dated 9999-12-31 give a window cut
at the range's end, or none, never an error.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import _text as text
from ._types import timestamp_to_datetime

MONTHS = {
    name: i + 1
    for i, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ]
    )
    for name in names
}
_MONTH = "|".join(sorted(MONTHS, key=len, reverse=True))
# A month name counts only where it reads as a date ("in May", "May 3", "3rd of May",
# "May 2024"), so "may" the verb and "mar" the word never open a window. A year is four
# digits not followed by a fifth. Blank runs are possessive (read once, never given back).
_MONTH_REF = re.compile(
    rf"\b(?:(?P<lead>in|last|during|since|early|late|mid|this|back in|around|of)\s++"
    rf"(?P<m1>{_MONTH})\b(?:\s++(?P<y1>\d{{4}})(?!\d))?"
    rf"|(?P<d2>\d{{1,2}})(?:st|nd|rd|th)?\s++(?:of\s++)?(?P<m2>{_MONTH})\b"
    rf"(?:\s++(?P<y2>\d{{4}})(?!\d))?"
    rf"|(?P<m3>{_MONTH})\s++(?P<d3>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s++(?P<y3>\d{{4}})(?!\d))?"
    rf"|(?P<m4>{_MONTH})\s++(?P<y4>\d{{4}})(?!\d))",
    re.IGNORECASE,
)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_AGO = re.compile(r"\b(\d++|a|an|one|two|three|four|five|six)\s++(day|week|month)s?\s++ago\b", re.I)
_RELATIVE = re.compile(r"\b(yesterday|today|(?:last|this|past)\s++(?:week|month|year))\b", re.I)
_YEAR = re.compile(r"\b(?:in|during|of)\s++((?:19|20)\d{2})\b", re.I)
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

_ASKS_ASSISTANT = re.compile(
    r"\b(?:did|do|would|could|have)\s++you\s++(?:\w++\s++)?(?:suggest|recommend|say|tell|mention|"
    r"advise|propose|give|write|explain|answer|pick|choose)\w*\b|\byou\s+(?:suggested|recommended"
    r"|said|told|mentioned|advised|proposed|gave|wrote|explained|picked|chose)\b|\byour\s+"
    r"(?:suggestion|recommendation|advice|answer)\b",
    re.IGNORECASE,
)
_BACK = re.compile(r"\b(?:back|ago|since|recently)\b", re.IGNORECASE)
_ASKS_USER = re.compile(r"\b(?:i|my|me|mine|we|our|us)\b", re.IGNORECASE)
_ASKS_LATEST = re.compile(
    r"\b(?:now|these days|nowadays|currently|current|at the moment|at present|anymore|any more"
    r"|latest|lately|recently|still|today)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class QueryCues:
    """What the query asks beyond its words. Times are POSIX seconds, `end` exclusive;
    `topic` is the query without its time and recency phrases ("my knee" of "what did I
    say about my knee back in March?"), what its words and vector should match."""

    window: tuple[float, float] | None = None
    role: str | None = None
    latest: bool = False
    topic: str = ""


DAY = 86400.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# the calendar's range in POSIX seconds: from 0001-01-01 up to (excluding) 10000-01-01
FIRST_SECOND = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds()
END_SECOND = (datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH).total_seconds() + DAY
# the last whole second of the calendar (its float end is rounded: 10000-01-01)
_LAST_SECOND = END_SECOND - 1.0
# "N days ago" with more digits than this is before year 1, whatever the reference
_MAX_COUNT_DIGITS = 9


def analyse(query: str, reference: float) -> QueryCues:
    """The time window, preferred speaker and wish for the newest facts in `query` (in its
    first `text.QUERY_CHARS` characters)."""
    query = text.head(query, text.QUERY_CHARS)
    role = None
    if _ASKS_ASSISTANT.search(query):
        role = "assistant"
    elif _ASKS_USER.search(query):
        role = "user"
    topic = query
    for pattern in (_ISO_DATE, _MONTH_REF, _AGO, _RELATIVE, _YEAR, _ASKS_LATEST, _BACK):
        topic = pattern.sub(" ", topic)
    return QueryCues(
        window=time_window(query, reference),
        role=role,
        latest=bool(_ASKS_LATEST.search(query)),
        topic=" ".join(topic.split()),
    )


# "Melanie: Yeah, I painted that lake sunrise" — a transcript's speaker label
_SPEAKER_LABEL = re.compile(r"[^\S\n]*+([^\W\d_][\w'’-]{0,39}+):")
# a role is labelled when this share of its latest messages, at least `LABELLED_MIN`, opens
# with the same name
LABELLED_SHARE = 0.8
LABELLED_MIN = 8


def speaker_labels(openings: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """The name each role's messages open with ("Melanie: ..."), as folded keywords
    ("Mary-Jane" is mary and jane), for the roles whose given (role, opening) pairs mostly
    carry the same one: transcripts, group chats and imported logs label their speakers so.
    One message opening "Summary:" labels nobody."""
    by_role: dict[str, Counter[tuple[str, ...]]] = {}
    for role, opening in openings:
        match = _SPEAKER_LABEL.match(unicodedata.normalize("NFC", opening))
        name = tuple(fold(w) for w in text.keywords(match[1])) if match else ()
        by_role.setdefault(role, Counter())[name] += 1
    labels = {}
    for role, names in by_role.items():
        name, n = names.most_common(1)[0]
        if name and n >= max(LABELLED_MIN, LABELLED_SHARE * names.total()):
            labels[role] = name
    return labels


def named_speaker(terms: Collection[str], labels: dict[str, tuple[str, ...]]) -> str | None:
    """The role whose label the query's keywords name, when they name exactly one:
    "what did Melanie paint?" asks about what Melanie said."""
    folded = {fold(t) for t in terms}
    named = [role for role, name in labels.items() if folded.issuperset(name)]
    return named[0] if len(named) == 1 else None


def fold(word: str) -> str:
    """`word` without accents, as the full-text index compares words: "josé" is "jose"."""
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


def time_window(query: str, reference: float) -> tuple[float, float] | None:
    """The period `query` names ("in March", "last week", "3 days ago", "2025-03-04"), as
    [start, end) in POSIX seconds, resolved against `reference`; None if it names none or
    one wholly outside years 1-9999. A window reaching past either end is cut there."""
    if math.isnan(reference):
        return None
    query = text.head(query, text.QUERY_CHARS)
    reference = min(max(reference, FIRST_SECOND), _LAST_SECOND)
    now = timestamp_to_datetime(reference)

    if match := _ISO_DATE.search(query):
        start = _day_start(int(match[1]), int(match[2]), int(match[3]))
        return None if start is None else _span(start - DAY, start + 2 * DAY)
    if match := _MONTH_REF.search(query):
        month_name = match["m1"] or match["m2"] or match["m3"] or match["m4"]
        month = MONTHS[month_name.lower()]
        year_text = match["y1"] or match["y2"] or match["y3"] or match["y4"]
        day_text = match["d2"] or match["d3"]
        year = int(year_text) if year_text else _latest_year(now, month)
        if day_text and 1 <= int(day_text) <= 31:
            start = _day_start(year, month, int(day_text))
            return None if start is None else _span(start - DAY, start + 2 * DAY)
        start, end = _month_start(year, month), _month_start(year, month + 1)
        return None if start is None or end is None else _span(start - DAY, end + DAY)
    if match := _AGO.search(query):
        number = match[1].lower()
        if len(number) > _MAX_COUNT_DIGITS:
            return None
        count = _NUMBERS.get(number) or int(number)
        unit = {"day": 1, "week": 7, "month": 30}[match[2].lower()]
        centre = reference - count * unit * DAY
        slack = max(1, unit * count // 4) * DAY
        return _span(centre - slack, centre + slack + DAY)
    if match := _RELATIVE.search(query):
        phrase = " ".join(match[1].lower().split())
        if phrase == "this year":
            new_year = _month_start(now.year, 1)
            assert new_year is not None  # `now` is within years 1-9999
            return _span(new_year, reference + DAY)
        # days before the reference that the period starts and ends (negative: after it)
        starts, ends = {
            "yesterday": (2, 0),
            "today": (1, -1),
            "last week": (14, 6),
            "past week": (8, -1),
            "this week": (8, -1),
            "last month": (62, 28),
            "past month": (32, -1),
            "this month": (32, -1),
            "last year": (730, 335),
            "past year": (366, -1),
        }[phrase]
        return _span(reference - starts * DAY, reference - ends * DAY)
    if match := _YEAR.search(query):
        year = int(match[1])
        start, end = _month_start(year, 1), _month_start(year + 1, 1)
        return None if start is None or end is None else _span(start, end)
    return None


def _latest_year(now: datetime, month: int) -> int:
    """The year of the most recent `month` at or before `now` (0, which has no days,
    when that is before year 1)."""
    return now.year if month <= now.month else now.year - 1


def _day_start(year: int, month: int, day: int) -> float | None:
    """POSIX seconds at the start of that day; None if there is no such day in 1-9999."""
    try:
        return (datetime(year, month, day, tzinfo=UTC) - _EPOCH).total_seconds()
    except (ValueError, OverflowError):
        return None


def _month_start(year: int, month: int) -> float | None:
    """POSIX seconds at the start of `month` of `year` (month 13 is the next January); the
    month after December 9999 starts at the calendar's end."""
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    if (year, month) == (10000, 1):
        return END_SECOND
    return _day_start(year, month, 1)


def _span(start: float, end: float) -> tuple[float, float] | None:
    """[start, end) cut to the calendar's range; None when nothing of it is left."""
    start, end = max(start, FIRST_SECOND), min(end, END_SECOND)
    return (start, end) if start < end else None
