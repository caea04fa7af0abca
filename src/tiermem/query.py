"""What a retrieval query asks for beyond its words: a time window, a speaker, the latest.

"What did I tell you about my knee in March?" asks for the user's messages of last March;
"what book did you suggest?" for the assistant's; "how do I take my coffee now?" for the
newest statement. Dates resolve against a reference time (the session's newest message),
so an imported history is searched as of its own "now". Deterministic; no model involved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

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
# "May 2024"), so "may" the verb and "mar" the word never open a window.
_MONTH_REF = re.compile(
    rf"\b(?:(?P<lead>in|last|during|since|early|late|mid|this|back in|around|of)\s+"
    rf"(?P<m1>{_MONTH})\b(?:\s+(?P<y1>\d{{4}}))?"
    rf"|(?P<d2>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<m2>{_MONTH})\b(?:\s+(?P<y2>\d{{4}}))?"
    rf"|(?P<m3>{_MONTH})\s+(?P<d3>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(?P<y3>\d{{4}}))?"
    rf"|(?P<m4>{_MONTH})\s+(?P<y4>\d{{4}}))",
    re.IGNORECASE,
)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_AGO = re.compile(r"\b(\d+|a|an|one|two|three|four|five|six)\s+(day|week|month)s?\s+ago\b", re.I)
_RELATIVE = re.compile(r"\b(yesterday|today|(?:last|this|past)\s+(?:week|month|year))\b", re.I)
_YEAR = re.compile(r"\b(?:in|during|of)\s+((?:19|20)\d{2})\b", re.I)
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

_ASKS_ASSISTANT = re.compile(
    r"\b(?:did|do|would|could|have)\s+you\s+(?:\w+\s+)?(?:suggest|recommend|say|tell|mention|"
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


def analyse(query: str, reference: float) -> QueryCues:
    """The time window, preferred speaker and wish for the newest facts in `query`."""
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


def time_window(query: str, reference: float) -> tuple[float, float] | None:
    """The period `query` names ("in March", "last week", "3 days ago", "2025-03-04"), as
    [start, end) in POSIX seconds, resolved against `reference`; None if it names none."""
    now = datetime.fromtimestamp(reference, UTC)
    day = timedelta(days=1)

    if match := _ISO_DATE.search(query):
        try:
            start = datetime(int(match[1]), int(match[2]), int(match[3]), tzinfo=UTC)
        except ValueError:
            return None
        return _span(start - day, start + 2 * day)
    if match := _MONTH_REF.search(query):
        month_name = match["m1"] or match["m2"] or match["m3"] or match["m4"]
        month = MONTHS[month_name.lower()]
        year_text = match["y1"] or match["y2"] or match["y3"] or match["y4"]
        day_text = match["d2"] or match["d3"]
        year = int(year_text) if year_text else _latest_year(now, month)
        if day_text and 1 <= int(day_text) <= 31:
            try:
                start = datetime(year, month, int(day_text), tzinfo=UTC)
            except ValueError:
                return None
            return _span(start - day, start + 2 * day)
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return _span(start - day, end + day)
    if match := _AGO.search(query):
        count = _NUMBERS.get(match[1].lower()) or int(match[1])
        unit = {"day": 1, "week": 7, "month": 30}[match[2].lower()]
        centre = now - timedelta(days=count * unit)
        slack = timedelta(days=max(1, unit * count // 4))
        return _span(centre - slack, centre + slack + day)
    if match := _RELATIVE.search(query):
        phrase = " ".join(match[1].lower().split())
        spans = {
            "yesterday": (now - 2 * day, now),
            "today": (now - day, now + day),
            "last week": (now - timedelta(days=14), now - timedelta(days=6)),
            "past week": (now - timedelta(days=8), now + day),
            "this week": (now - timedelta(days=8), now + day),
            "last month": (now - timedelta(days=62), now - timedelta(days=28)),
            "past month": (now - timedelta(days=32), now + day),
            "this month": (now - timedelta(days=32), now + day),
            "last year": (now - timedelta(days=730), now - timedelta(days=335)),
            "past year": (now - timedelta(days=366), now + day),
            "this year": (datetime(now.year, 1, 1, tzinfo=UTC), now + day),
        }
        start, end = spans[phrase]
        return _span(start, end)
    if match := _YEAR.search(query):
        year = int(match[1])
        return _span(datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC))
    return None


def _latest_year(now: datetime, month: int) -> int:
    """The year of the most recent `month` at or before `now`."""
    return now.year if month <= now.month else now.year - 1


def _span(start: datetime, end: datetime) -> tuple[float, float]:
    return start.timestamp(), end.timestamp()
