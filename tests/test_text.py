"""Text work on the event loop: linear on pathological input, bounded on long input, and
unchanged on ordinary input; time cues that never overflow the calendar.

The 1 MB tests carry a generous `timeout` marker: a hang guard, not a speed claim (before
this, 80 000 hex digits held the loop for about a minute in the code pattern alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem import _text as text
from tiermem._cache import entry_type
from tiermem._query import END_SECOND, FIRST_SECOND, analyse, time_window
from tiermem._retrieval import names_in
from tiermem._scoring import content_score

MB = 1_000_000
NOW = datetime(2025, 8, 20, 12, tzinfo=UTC).timestamp()


def fill(unit: str, size: int = MB) -> str:
    return (unit * (size // len(unit) + 1))[:size]


# each is about 1 MB; what the regular expressions here have stumbled on, or could
PATHOLOGICAL: dict[str, Callable[[], str]] = {
    "hex": lambda: fill("0123456789abcdef"),
    "one letter": lambda: fill("a"),
    "one digit": lambda: fill("7"),
    "spaces": lambda: fill(" "),
    "newlines": lambda: fill("\n"),
    "tabs then a letter": lambda: fill("\t", MB - 1) + "x",
    "open brackets": lambda: fill("("),
    "a( runs": lambda: fill("a("),
    "nested calls": lambda: "f(" * (MB // 4) + ")" * (MB // 4) + "x",
    "call with a long argument": lambda: "f(" + fill("x ", MB) + ") {",
    "statement ends and blanks": lambda: fill("; \t") + "x",
    "question marks and blanks": lambda: fill("? \t") + "x",
    "capitalised words": lambda: fill("Marta Lisbon "),
    "apostrophes": lambda: fill("a'"),
    "month names": lambda: fill("May "),
    "dated months": lambda: fill("in March 2024 3rd of May May 12, "),
    "numbers": lambda: fill("12 1,2,3.4:5/6- "),
    "long number ago": lambda: fill("9", MB - 9) + " days ago",
    "weeks ago": lambda: fill("99999 weeks ago "),
    "iso dates": lambda: fill("2024-13-45 0000-00-00 "),
    "did you": lambda: fill("did you you "),
    "my words": lambda: "my " + fill("a") + " is",
    "mixed": lambda: fill("def f(x): return {x: [y => y; }]} ``` #include <a> \n"),
}


@pytest.fixture(params=sorted(PATHOLOGICAL))
def pathological(request: pytest.FixtureRequest) -> str:
    return PATHOLOGICAL[request.param]()


@pytest.mark.timeout(20)
def test_code_detection_and_entry_type_do_not_hang(pathological: str) -> None:
    assert isinstance(text.looks_like_code(pathological), bool)
    assert entry_type("user", pathological) in ("user", "code")


@pytest.mark.timeout(20)
def test_words_and_keywords_do_not_hang(pathological: str) -> None:
    terms = text.keywords(pathological)
    assert len(terms) <= 16
    assert len(text.words(pathological)) <= len(pathological)
    assert len(text.top_keywords([pathological, pathological])) <= 10
    present = text.matched_keywords(pathological, [*terms, "lisbon", "zzzz"])
    assert "zzzz" not in present
    assert text.fts_query(terms).count(" OR ") == max(0, len(terms) - 1)


@pytest.mark.timeout(20)
def test_scoring_does_not_hang(pathological: str) -> None:
    assert 0.0 <= content_score("user", pathological) <= 1.0
    assert 0.0 <= content_score("code", pathological) <= 1.0


@pytest.mark.timeout(20)
def test_query_cues_do_not_hang(pathological: str) -> None:
    cues = analyse(pathological, NOW)
    assert len(cues.topic) <= text.QUERY_CHARS
    window = time_window(pathological, NOW)
    assert window is None or FIRST_SECOND <= window[0] < window[1] <= END_SECOND


@pytest.mark.timeout(20)
def test_names_and_hashes_do_not_hang(pathological: str) -> None:
    assert len(names_in(pathological)) <= len(pathological)
    digest = text.content_hash("user", pathological)
    assert digest != text.content_hash("user", pathological + "!")
    assert len(text.chain_digest("", "m1", digest)) == 32


# -- ordinary input keeps its results ------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "is_code"),
    [
        ("```python\nprint(1)\n```", True),
        ("def area(r):\n    return 3.14 * r * r", True),
        ("  import os", True),
        ("function go() {\n  run();\n}", True),
        ("if (ready) {", True),
        ("compose(a, b):", True),
        ("xs.map(x => x * 2)", True),
        ("#include <stdio.h>", True),
        ("x = 1;\n", True),
        ("I met Ana (my sister) at the station: she was late.", False),
        ("Where is Ana staying?", False),
        ("define the class of problems", False),
        ("0123456789abcdef" * 5000, False),
    ],
)
def test_code_is_told_from_prose(content: str, is_code: bool) -> None:
    assert text.looks_like_code(content) is is_code
    assert (entry_type("assistant", content) == "code") is is_code


def test_a_long_text_is_code_by_its_opening_or_its_end() -> None:
    prose = fill("We walked along the river and talked about the weather. ", 2 * MB)
    assert not text.looks_like_code(prose)
    assert text.looks_like_code("def main():\n    pass\n" + prose)
    assert text.looks_like_code(prose + "\n```\nprint(1)\n```")
    # a cut inside the opening reads no statement end or definition that is not there
    assert not text.looks_like_code(
        fill("word ", text.CODE_HEAD_CHARS - 1) + ";" + "x" * MB + " prose"
    )
    assert not text.looks_like_code("x" * MB + "\ndefinitely prose " + "y" * 100)


def test_head_never_ends_in_half_a_word() -> None:
    body = fill("garden ", 2 * text.HEAD_CHARS)
    cut = text.head(body, text.HEAD_CHARS)
    assert len(cut) <= text.HEAD_CHARS
    assert set(cut.split()) == {"garden"}
    assert text.head("short", 100) == "short"
    # one word longer than the limit is cut where it must be
    assert text.head("a" * 500, 100) == "a" * 100


def test_keywords_of_a_long_text_come_from_its_opening() -> None:
    opening = "Ana is staying at the Lisbon harbour hotel. "
    assert text.keywords(opening + fill("filler ", 5 * MB)) == [
        "ana",
        "staying",
        "lisbon",
        "harbour",
        "hotel",
        "filler",
    ]
    assert text.keywords(fill("the ", MB)) == []
    assert text.matched_keywords(opening + fill("x ", MB), ["lisbon", "hotels", "ana"]) == [
        "lisbon",
        "ana",
    ]


def test_a_long_entry_scores_as_its_opening_and_end_say() -> None:
    filler = fill("and so on ", MB)
    assert content_score("user", "Important: " + filler) == content_score(
        "user", "Important: and so on"
    )
    assert content_score("user", filler + " what do you think?") > content_score("user", filler)
    assert content_score("user", filler) == content_score("user", "and so on")


def test_a_long_query_keeps_the_cues_of_its_opening() -> None:
    query = "What did I tell you about my knee last week? " + fill("log line 42 ", MB)
    cues = analyse(query, NOW)
    assert cues.role == "user"
    assert cues.window is not None
    assert datetime.fromtimestamp(cues.window[0], UTC).date().isoformat() == "2025-08-06"
    assert "knee" in text.keywords(cues.topic)


def test_names_come_from_a_hits_opening() -> None:
    assert names_in("I'm visiting Marta in Lisbon on Monday") == ["marta", "lisbon"]
    assert names_in("Marta " + fill("x ", MB) + " Jorge") == ["marta"]


# -- time cues at the calendar's ends ------------------------------------------------------

CALENDAR = st.datetimes(
    min_value=datetime(1, 1, 1),
    max_value=datetime(9999, 12, 31, 23, 59, 59),
    timezones=st.just(UTC),
)
ENDS = [
    datetime(1, 1, 1, tzinfo=UTC).timestamp(),
    datetime(9999, 12, 31, tzinfo=UTC).timestamp(),
    # rounds up to 10000-01-01 as a float: `datetime.fromtimestamp` refuses it
    datetime.max.replace(tzinfo=UTC).timestamp(),
    math.inf,
    -math.inf,
]
TEMPLATES = [
    "{n} days ago",
    "{n} weeks ago",
    "what did I say {n} months ago?",
    "in May {n:04d}",
    "May {n}",
    "in {n}",
    "December {n}",
    "on the {n}th of March",
    "in March {n}",
    "{n:04d}-12-31",
    "{n:04d}-01-01",
    "{n}-{n}-{n}",
]
PHRASES = [
    "what did I say last week?",
    "yesterday",
    "today",
    "this week",
    "past month",
    "last year",
    "this year",
    "in March",
    "in December",
    "back in January",
    "3 days ago",
    "in 1999",
    "9999999999 days ago",
    "in May 0000",
    "in 9999",
    "2024-13-45",
    "99999 weeks ago",
    "May 99999",
]


def assert_within_calendar(window: tuple[float, float] | None) -> None:
    if window is not None:
        assert FIRST_SECOND <= window[0] < window[1] <= END_SECOND


@settings(deadline=None)
@given(
    n=st.integers(0, 10**12),
    template=st.sampled_from(TEMPLATES),
    reference=st.one_of(CALENDAR.map(datetime.timestamp), st.sampled_from(ENDS)),
)
def test_numbers_in_time_cues_never_overflow(n: int, template: str, reference: float) -> None:
    query = template.format(n=n)
    cues = analyse(query, reference)
    assert cues.window == time_window(query, reference)
    assert_within_calendar(cues.window)


@settings(deadline=None)
@given(
    phrase=st.sampled_from(PHRASES),
    reference=st.one_of(CALENDAR.map(datetime.timestamp), st.sampled_from(ENDS)),
)
def test_time_phrases_resolve_at_any_reference(phrase: str, reference: float) -> None:
    assert_within_calendar(time_window(phrase, reference))


@settings(deadline=None)
@given(reference=CALENDAR, days=st.integers(1, 4_000_000))
def test_days_ago_covers_that_day_while_it_is_in_the_calendar(
    reference: datetime, days: int
) -> None:
    window = time_window(f"{days} days ago", reference.timestamp())
    target = reference.timestamp() - days * 86400
    slack = max(1, days // 4) * 86400
    if target + slack + 86400 <= FIRST_SECOND:
        assert window is None  # wholly before year 1
    else:
        assert window is not None
        assert_within_calendar(window)
        if target >= FIRST_SECOND:
            assert window[0] <= target < window[1]


@settings(deadline=None)
@given(day=st.dates(), reference=CALENDAR)
def test_a_named_day_is_found_in_any_year(day: Any, reference: datetime) -> None:
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()
    for query in (f"{day.isoformat()}", f"in {day:%B} {day.year:04d}"):
        window = time_window(query, reference.timestamp())
        assert window is not None, query
        assert window[0] <= noon < window[1], query


@pytest.mark.parametrize("query", ["2024-13-45", "0000-05-01", "2023-02-29", "in May 0000"])
def test_a_day_that_does_not_exist_names_no_window(query: str) -> None:
    assert time_window(query, NOW) is None


def test_keywords_drop_a_possessive_and_a_text_can_leave_keywords_out() -> None:
    assert text.keywords("What do Melanie's kids like? It's Ana’s dog") == [
        "melanie",
        "kids",
        "ana",
        "dog",
    ]
    assert text.without_keywords("What do Melanie's kids like, Melanie?", {"melanie"}) == (
        "What do  kids like, ?"
    )
    assert text.without_keywords("nothing to drop", set()) == "nothing to drop"
