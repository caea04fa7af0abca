"""Retrieval beyond plain fusion: time, speaker and recency cues, answer context, the name
hop, folded repeats, embedding reuse. On fakes through the protocols, a real SQLite file."""

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import tiermem
from tests.conftest import SHAPE
from tests.fakes import HashingEmbedder
from tiermem import KVCacheConfig, Message
from tiermem._query import analyse, named_speaker, speaker_labels, time_window

NOW = datetime(2025, 8, 20, 12, tzinfo=UTC)


def at(month: int, day: int = 10) -> datetime:
    return datetime(2025, month, day, 12, tzinfo=UTC)


def window_months(query: str) -> tuple[str, str] | None:
    window = time_window(query, NOW.timestamp())
    if window is None:
        return None
    start, end = (datetime.fromtimestamp(t, UTC) for t in window)
    return start.strftime("%Y-%m-%d"), end.strftime("%Y-%m-%d")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("what did I say about my knee in March?", ("2025-02-28", "2025-04-02")),
        ("how was the garden last August?", ("2025-07-31", "2025-09-02")),
        ("and back in October?", ("2024-09-30", "2024-11-02")),  # the latest October
        ("what happened on 3rd of May?", ("2025-05-02", "2025-05-05")),
        ("what happened on 2025-03-04?", ("2025-03-03", "2025-03-06")),
        ("in December 2023 I moved", ("2023-11-30", "2024-01-02")),
        ("what did I say two weeks ago?", ("2025-08-03", "2025-08-10")),
        ("anything from last week?", ("2025-08-06", "2025-08-14")),
        ("you may be right", None),  # "may" the verb opens no window
        ("what is the mar-a-lago thing", None),
        ("tell me about my knee", None),
    ],
)
def test_time_window_resolves_against_the_reference(
    query: str, expected: tuple[str, str] | None
) -> None:
    assert window_months(query) == expected


def test_cues_name_the_speaker_and_the_wish_for_news() -> None:
    reference = NOW.timestamp()
    assert analyse("What book did you suggest for the flight?", reference).role == "assistant"
    assert analyse("What did I tell you about my sister?", reference).role == "user"
    assert analyse("the capital of Peru", reference).role is None
    assert analyse("How do I take my coffee now?", reference).latest
    assert not analyse("How did I take my coffee?", reference).latest
    assert analyse("What did I say about my knee back in March?", reference).topic == (
        "What did I say about my knee ?"
    )


async def store(mgr: tiermem.KVCacheManager, messages: list[Message], sid: str = "s") -> None:
    for i in range(0, len(messages), 2):
        await mgr.process_conversation(sid, messages[i : i + 2])


async def test_a_month_in_the_query_finds_that_months_message(
    manager: tiermem.KVCacheManager,
) -> None:
    await store(
        manager,
        [
            Message("user", "I twisted my knee at football", id="feb", created_at=at(2)),
            Message("assistant", "Rest it.", id="feb-a", created_at=at(2)),
            Message("user", "The physio says my knee is healing", id="apr", created_at=at(4)),
            Message("assistant", "Good news.", id="apr-a", created_at=at(4)),
            Message("user", "Ran 5k and my knee held up", id="jun", created_at=at(6)),
            Message("assistant", "Brilliant.", id="jun-a", created_at=at(6)),
        ],
    )
    for month, expected in (("February", "feb"), ("April", "apr"), ("June", "jun")):
        hits = await manager.retrieve_context("s", f"What about my knee in {month}?")
        assert hits.entries[0].message_ids == [expected], month


async def test_asking_about_now_prefers_the_newest_statement(
    manager: tiermem.KVCacheManager,
) -> None:
    await store(
        manager,
        [
            Message("user", "I drink my coffee black", id="old", created_at=at(2)),
            Message("assistant", "Noted.", id="old-a", created_at=at(2)),
            Message("user", "I drink my coffee white", id="new", created_at=at(7)),
            Message("assistant", "Noted again.", id="new-a", created_at=at(7)),
        ],
    )
    hits = await manager.retrieve_context("s", "How do I drink my coffee now?")
    assert hits.entries[0].message_ids == ["new"]


async def test_an_answer_is_found_through_the_question_before_it(
    open_manager: Callable[..., Any], tmp_path: Path
) -> None:
    conversation = [
        Message("user", "We are redoing the kitchen soon.", id="u0"),
        Message("assistant", "What is the ceiling for the kitchen renovation?", id="a0"),
        Message("user", "Eighteen thousand euros, not a cent more.", id="u1"),
        Message("assistant", "Got it.", id="a1"),
    ]
    found = {}
    for weight in (0.3, 0.0):
        config = KVCacheConfig(
            retrieval_neighbour_weight=weight, kv_shape=SHAPE, context_window_tokens=4096
        )
        mgr = await open_manager(config=config, path=tmp_path / f"w{weight}.db")
        async with mgr:
            await mgr.process_conversation("s", conversation)
            hits = await mgr.retrieve_context(
                "s", "How much can I spend on the kitchen renovation?"
            )
            found[weight] = [i for e in hits.entries for i in e.message_ids]
    assert "u1" in found[0.3][:3]
    assert "u1" not in found[0.0]  # shares no word with the question: only context finds it


async def test_names_in_the_best_hit_lead_to_the_second_hop(
    manager: tiermem.KVCacheManager,
) -> None:
    await manager.process_conversation(
        "s",
        [
            Message("user", "My older sister Marta moved to Porto for work.", id="sister"),
            Message("assistant", "A big step for her.", id="a0"),
        ],
    )
    for i in range(6):
        await manager.process_conversation("s", turn_about(i, "city break weekend flights"))
    await manager.process_conversation(
        "s",
        [
            Message("user", "I booked flights to visit Marta over the Easter break.", id="trip"),
            Message("assistant", "Lovely.", id="a1"),
        ],
    )
    hits = await manager.retrieve_context("s", "Which city am I flying to over the Easter break?")
    ids = [i for e in hits.entries[:5] for i in e.message_ids]
    assert ids[0] == "trip"
    assert "sister" in ids  # no word in common with the question; reached through "Marta"
    manager.update_config(retrieval_entity_hop=False)
    hits = await manager.retrieve_context("s", "Which city am I flying to over the Easter break?")
    assert "sister" not in [i for e in hits.entries[:5] for i in e.message_ids]


async def test_a_capitalised_sentence_opening_links_only_where_it_is_capitalised_again(
    manager: tiermem.KVCacheManager,
) -> None:
    """A capitalised "Blue" opening a sentence looks like a name; the hop links it only
    to messages that write it with a capital too, as names are written."""
    await manager.process_conversation(
        "s",
        [
            Message("user", "I repainted the hallway walls last spring.", id="walls"),
            Message("assistant", "Blue suits a hallway.", id="blue-a"),
            Message("user", "My blue bike got a flat tyre.", id="bike"),
            Message("assistant", "Patch it tonight.", id="a1"),
            Message("user", "Blue Bottle opened a cafe near the hallway market.", id="cafe"),
            Message("assistant", "Nice.", id="a2"),
        ],
    )
    hits = await manager.retrieve_context("s", "What did I do to the hallway walls?")
    ids = [i for e in hits.entries for i in e.message_ids]
    assert ids[0] == "walls"
    assert "bike" not in ids  # "blue" there is the colour, written in lower case


def turn_about(i: int, topic: str) -> list[Message]:
    return [
        Message("user", f"Question {i} about {topic} in general?", id=f"q{i}"),
        Message("assistant", f"Answer {i}: {topic} tips.", id=f"r{i}"),
    ]


async def test_repeated_texts_are_one_hit_carrying_every_id(
    manager: tiermem.KVCacheManager,
) -> None:
    for i in range(3):
        await manager.process_conversation(
            "s",
            [
                Message("user", "Any tips for sleeping better?", id=f"u{i}"),
                Message("assistant", f"Try a fixed bedtime, number {i}.", id=f"a{i}"),
            ],
        )
    hits = await manager.retrieve_context("s", "tips for sleeping better", limit=10)
    texts = [e.text for e in hits.entries]
    assert len(texts) == len(set(texts))
    repeated = next(e for e in hits.entries if e.text == "Any tips for sleeping better?")
    assert sorted(repeated.message_ids) == ["u0", "u1", "u2"]
    assert all(0.0 <= e.similarity_score <= 1.0 for e in hits.entries)
    scores = [e.similarity_score for e in hits.entries]
    assert scores == sorted(scores, reverse=True)


async def test_a_text_is_embedded_once_per_database(open_manager: Callable[..., Any]) -> None:
    embedder = HashingEmbedder()
    async with await open_manager(embedder=embedder) as mgr:
        hello = [Message("user", "the same greeting"), Message("assistant", "the same reply")]
        await mgr.process_conversation("a", hello)
        await mgr.ingest("b", hello)  # another session, the same texts
        await mgr.process_conversation("a", [Message("user", "the same greeting", id="again")])
    async with await open_manager(embedder=embedder) as mgr:  # restart: nothing re-embedded
        await mgr.ingest("c", hello)
        hits = await mgr.retrieve_context("c", "greeting")
        assert hits.entries[0].message_ids == ["c#0"]
    embedded = [t for call in embedder.calls for t in call]
    assert sorted(embedded) == ["greeting", "the same greeting", "the same reply"]


async def test_a_turns_question_is_embedded_once_to_store_and_search(
    open_manager: Callable[..., Any],
) -> None:
    embedder = HashingEmbedder()
    async with await open_manager(embedder=embedder) as mgr:
        await mgr.process_conversation("a", [Message("user", "Ana's dog is called Pico.")])
        result = await mgr.process_conversation("a", [Message("user", "what is the dog called?")])
    assert result.retrieval_result is not None
    assert result.retrieval_result.entries[0].text == "Ana's dog is called Pico."
    assert embedder.calls == [["Ana's dog is called Pico."], ["what is the dog called?"]]


async def test_a_turns_question_without_its_common_words_is_embedded_with_the_message(
    open_manager: Callable[..., Any],
) -> None:
    """The query's vector leaves out the speaker's name (in every message); it is made in
    the same batch as the message's own, not in a second call."""
    embedder = HashingEmbedder()
    async with await open_manager(embedder=embedder) as mgr:
        chat = [Message("user", f"Mia: day {i} was fine.") for i in range(24)]
        await mgr.ingest("s", [*chat, Message("user", "Mia: I paint fences in June.", id="p")])
        embedder.calls.clear()
        question = Message("user", "Mia: what do I paint?", created_at=datetime(2024, 7, 1))
        result = await mgr.process_conversation("s", [question])
    assert embedder.calls == [["Mia: what do I paint?", ": what do I paint?"]]
    assert result.retrieval_result is not None
    assert result.retrieval_result.entries[0].message_ids == ["p"]


async def test_another_embedding_model_is_refused(open_manager: Callable[..., Any]) -> None:
    async with await open_manager(embedder=HashingEmbedder(name="model-a")):
        pass
    with pytest.raises(tiermem.EmbeddingMismatchError, match="model-a"):
        await open_manager(embedder=HashingEmbedder(name="model-b"))


async def test_escalating_mode_stops_at_tier_1_when_it_finds_enough(
    manager: tiermem.KVCacheManager,
) -> None:
    for i in range(3):
        await manager.process_conversation("s", turn_about(i, "teal bicycle"))
    manager.update_config(retrieval_mode="escalating")
    hits = await manager.retrieve_context("s", "teal bicycle")
    assert hits.tiers_searched == [1]
    assert {e.source_tier for e in hits.entries} == {1}
    manager.update_config(retrieval_mode="hybrid")
    assert (await manager.retrieve_context("s", "teal bicycle")).tiers_searched == [1, 2, 3]


async def test_time_cues_work_at_the_ends_of_the_calendar(
    manager: tiermem.KVCacheManager,
) -> None:
    first, last = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)
    await store(
        manager,
        [
            Message("user", "I planted tulips in the garden", id="tulips", created_at=first),
            Message("assistant", "Lovely.", id="tulips-a", created_at=first),
            Message("user", "My flight to Lisbon is booked", id="flight", created_at=last),
            Message("assistant", "Safe travels.", id="flight-a", created_at=last),
        ],
    )
    # the session's "now" is its newest message: 9999-12-31
    for query in ("what did I say last week about my flight?", "my flight 3 days ago?"):
        hits = await manager.retrieve_context("s", query)
        assert hits.entries[0].message_ids == ["flight"], query
        assert hits.entries[0].created_at == last
    hits = await manager.retrieve_context("s", "what about the tulips in March?")
    assert hits.entries[0].message_ids == ["tulips"]
    assert hits.entries[0].created_at == first
    result = await manager.process_conversation(
        "s", [Message("user", "how were the tulips last week?", id="ask")]
    )
    assert result.retrieval_result is not None
    assert result.retrieval_result.entries[0].message_ids == ["tulips"]

    # a session whose "now" is 0001-01-01: last week and last March are before the calendar
    await store(manager, [Message("user", "Tulips again", id="t", created_at=first)], "early")
    for query in (
        "what did I say about tulips last week?",
        "tulips in March?",
        "tulips 3 days ago?",
        "tulips 9999999999 days ago?",
        "tulips in May 0000?",
        "tulips in 9999?",
        "tulips on 2024-13-45?",
        "tulips 99999 weeks ago?",
        "tulips in May 99999?",
    ):
        hits = await manager.retrieve_context("early", query)
        assert [e.message_ids for e in hits.entries][:1] == [["t"]], query


def test_speaker_labels_are_the_names_each_role_mostly_opens_with() -> None:
    openings = [("user", "Mia: hi"), ("assistant", "Leo: hey Mia"), ("user", "Mia:ok")] * 8
    labels = speaker_labels([*openings, ("user", "no label here")])
    assert labels == {"user": ("mia",), "assistant": ("leo",)}
    assert named_speaker(["leo", "paint"], labels) == "assistant"
    assert named_speaker(["leo", "mia"], labels) is None  # both named: no preference
    assert named_speaker(["paint"], labels) is None
    # a role whose messages mostly carry no label, or changing ones, has none; nor has one
    # labelled message ("Summary: ...")
    assert speaker_labels([("user", "Mia: hi"), ("user", "hello"), ("user", "Re: x")] * 8) == {}
    assert speaker_labels([("assistant", "Summary: the plan")]) == {}
    assert speaker_labels([]) == {}
    # labels read as the query's keywords do: apostrophes, hyphens, accents, however written
    odd = ["O’Brien: hi", "Mary-Jane: hi", "Zoe\u0308: hi", "José: hi"]
    for opening, terms in zip(odd, [["o'brien"], ["mary", "jane"], ["zoë"], ["jose"]], strict=True):
        labels = speaker_labels([("user", opening)] * 8 + [("assistant", "Ann: yes")] * 8)
        assert named_speaker(terms, labels) == "user", opening


async def test_a_named_speakers_words_are_searched_without_the_name(
    open_manager: Callable[..., Any],
) -> None:
    """In a transcript ("Leo: ..."), the speakers' names are in most messages: they tell
    none apart, so they leave the query's words and embedding, and a query naming one
    speaker prefers what that speaker said."""
    embedder = HashingEmbedder()
    async with await open_manager(embedder=embedder) as mgr:
        chat = []
        for i in range(12):
            chat += [
                Message("user", f"Mia: Hey Leo, day {i} was fine.", id=f"u{i}"),
                Message("assistant", f"Leo: Glad to hear it, Mia! Day {i} here too.", id=f"a{i}"),
            ]
        chat += [
            Message("user", "Mia: Leo, I paint fences.", id="mia-paint"),
            Message(
                "assistant",
                "Leo: Mia, I paint sunsets.",
                id="leo-paint",
            ),
        ]
        await mgr.ingest("s", chat)
        hits = await mgr.retrieve_context("s", "What did Leo paint?")
        assert hits.entries[0].message_ids == ["leo-paint"]
        assert embedder.calls[-1] == ["What did  paint?"]
        hits = await mgr.retrieve_context("s", "What did Mia paint?")
        assert hits.entries[0].message_ids == ["mia-paint"]
        assert embedder.calls[-1] == ["What did  paint?"]


async def test_a_message_linked_by_any_capitalised_name_of_the_hit_is_linked(
    manager: tiermem.KVCacheManager,
) -> None:
    """The hit names Rose and Caroline; a message holding "rose" (the flower) and
    "Caroline" is linked through Caroline, whichever name is searched first."""
    for first, second in (("Rose", "Caroline"), ("Caroline", "Rose")):
        sid = f"s-{first}"
        await manager.process_conversation(
            sid,
            [
                Message("user", f"{first} and {second} booked the Easter flights.", id="hit"),
                Message("assistant", "Great.", id="a0"),
                Message("user", "Rose said the hotel was cheap.", id="rose"),
                Message("assistant", "Ok.", id="a1"),
                Message("user", "I planted a rose bush; Caroline loved it.", id="x"),
                Message("assistant", "Nice.", id="a2"),
                Message("user", "Caroline adopted a kitten.", id="caroline"),
                Message("assistant", "Cute.", id="a3"),
            ],
        )
        hits = await manager.retrieve_context(sid, "Who booked the Easter flights?")
        assert {"rose", "x", "caroline"} <= {i for e in hits.entries for i in e.message_ids}


async def test_common_words_stay_when_nothing_else_of_the_query_is_found(
    open_manager: Callable[..., Any],
) -> None:
    """Both names are in most messages; "near" is in none. Dropping the names would leave
    the query nothing to match, so they stay."""
    async with await open_manager() as mgr:
        chat = []
        for i in range(25):
            chat += [
                Message("user", f"Melanie: I painted lake{i} today", id=f"u{i}"),
                Message("assistant", f"Caroline: nice lake{i}", id=f"a{i}"),
            ]
        chat.append(Message("user", "Melanie: Caroline, we should paint together", id="both"))
        await mgr.ingest("s", chat)
        hits = await mgr.retrieve_context("s", "NEAR(Melanie Caroline)")
        assert "both" in [i for e in hits.entries[:3] for i in e.message_ids]
