"""Which of the messages a client sends are new: the whole conversation, only the new
messages, a sliding window, a regenerated reply, with and without ids, and the calls too
ambiguous to store (refused, nothing stored); derived ids never collide with a caller's."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiermem
from tests.conftest import SHAPE, Clock
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter
from tiermem import KVCacheConfig, Message

# no clear gets in the way: these tests are about what is stored
CONFIG = KVCacheConfig(
    kv_shape=SHAPE,
    context_window_tokens=1_000_000,
    clear_after_conversations=10_000,
    summary_mode="inline",
    retrieval_enabled=False,
)


class Client:
    """A chat client: the conversation it holds, and `log`, every message it ever made in
    order (abandoned replies included), which is what the memory must hold. `ids` says
    which messages carry the client's own ids: none, all, or the user's only."""

    def __init__(self, ids: str = "none", system: bool = True) -> None:
        self.ids = ids
        self.held: list[Message] = []
        self.log: list[Message] = []
        self._made = 0
        if system:
            self.add(self.make("system", "You are a helpful travel assistant."))

    def make(self, role: str, content: str) -> Message:
        self._made += 1
        with_id = self.ids == "all" or (self.ids == "users" and role == "user")
        return Message(role, content, id=f"m{self._made}" if with_id else None)

    def add(self, *messages: Message) -> list[Message]:
        self.held += messages
        self.log += messages
        return list(messages)

    def turn(self, user: str | None = None, reply: str | None = None) -> list[Message]:
        """A user message and its reply (texts unique unless given)."""
        n = self._made
        return self.add(
            self.make("user", user or f"question {n}: what about the museum in town {n}?"),
            self.make("assistant", reply or f"answer {n}: it opens at {n % 12 + 1} o'clock"),
        )

    def regenerate(self, at: int | None = None) -> Message:
        """Drop the reply at `at` (default the last) and what follows it; a new reply."""
        at = len(self.held) - 1 if at is None else at
        assert self.held[at].role == "assistant"
        del self.held[at:]
        (reply,) = self.add(self.make("assistant", f"regenerated answer {self._made}"))
        return reply

    def window(self, size: int, new: int) -> list[Message]:
        """Its last `size` messages before the `new` ones, then those."""
        return self.held[max(0, len(self.held) - new - size) :]


async def assert_stored(mgr: tiermem.KVCacheManager, sid: str, client: Client) -> None:
    history = await mgr.get_conversation_history(sid)
    assert [(m.role, m.content) for m in history] == [(m.role, m.content) for m in client.log]
    assert [m.id for m in history if m.id in {c.id for c in client.log}] == [
        c.id for c in client.log if c.id is not None
    ]


@pytest.fixture
async def mgr(open_manager: Callable[..., Any]) -> AsyncIterator[tiermem.KVCacheManager]:
    manager = await open_manager(config=CONFIG)
    try:
        yield manager
    finally:
        await manager.aclose()


IDS = ["none", "all", "users"]


@pytest.mark.parametrize("ids", IDS)
async def test_whole_conversation_each_turn(mgr: tiermem.KVCacheManager, ids: str) -> None:
    client = Client(ids)
    for turn in range(8):
        new = client.turn()
        result = await mgr.process_conversation("s", client.held)
        assert len(result.stored_message_ids) == len(new) + (turn == 0)
        await assert_stored(mgr, "s", client)
    result = await mgr.process_conversation("s", client.held)  # a retry
    assert result.stored_message_ids == []
    await assert_stored(mgr, "s", client)


@pytest.mark.parametrize("ids", IDS)
async def test_only_new_messages_each_turn(mgr: tiermem.KVCacheManager, ids: str) -> None:
    client = Client(ids)
    for turn in range(8):
        new = (client.held[:1] if turn == 0 else []) + client.turn()
        result = await mgr.process_conversation("s", new)
        assert len(result.stored_message_ids) == len(new)
        await assert_stored(mgr, "s", client)


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
async def test_sliding_window_stores_the_tail_after_the_overlap(
    mgr: tiermem.KVCacheManager, ids: str, size: int
) -> None:
    client = Client(ids)
    for _ in range(10):
        new = client.turn()
        result = await mgr.process_conversation("s", client.window(size, len(new)))
        assert len(result.stored_message_ids) in (len(new), len(new) + 1)  # + the system
        await assert_stored(mgr, "s", client)


@pytest.mark.parametrize("ids", IDS)
async def test_regenerated_replies_do_not_make_later_turns_store_it_all_again(
    mgr: tiermem.KVCacheManager, ids: str
) -> None:
    """Before: 8 turns, the reply regenerated in each from the second on, and every turn
    after the first regeneration storing the whole conversation again."""
    client = Client(ids)
    client.turn()
    await mgr.process_conversation("s", client.held)
    for _ in range(7):
        client.turn()
        await mgr.process_conversation("s", client.held)
        client.regenerate()
        result = await mgr.process_conversation("s", client.held)
        assert len(result.stored_message_ids) == 1
    assert len(client.held) == 17
    await assert_stored(mgr, "s", client)
    assert len(await mgr.get_conversation_history("s")) == 24


async def test_regenerating_the_first_reply_stores_its_question_again(
    mgr: tiermem.KVCacheManager,
) -> None:
    """[question, new reply] after [question, reply] is also an only-new turn repeating
    the question ("ok", "continue"): one message in common is no evidence, so both are
    stored. Later turns line up again; with ids, nothing is stored twice."""
    for ids, sid in (("none", "s"), ("all", "t")):
        client = Client(ids)
        client.turn()
        await mgr.process_conversation(sid, client.held)
        client.regenerate()
        result = await mgr.process_conversation(sid, client.held)
        assert len(result.stored_message_ids) == (2 if ids == "none" else 1)
        for _ in range(3):
            new = client.turn()
            result = await mgr.process_conversation(sid, client.held)
            assert len(result.stored_message_ids) == len(new)
        history = [m.content for m in await mgr.get_conversation_history(sid)]
        expected = [m.content for m in client.log]
        if ids == "none":
            expected.insert(3, expected[1])
        assert history == expected


@pytest.mark.parametrize("ids", IDS)
async def test_regenerate_in_the_middle_then_go_on(mgr: tiermem.KVCacheManager, ids: str) -> None:
    client = Client(ids)
    for _ in range(5):
        client.turn()
        await mgr.process_conversation("s", client.held)
    client.regenerate(at=4)  # the second reply: the client drops it and all after it
    result = await mgr.process_conversation("s", client.held)
    assert len(result.stored_message_ids) == 1
    for _ in range(4):
        new = client.turn()
        result = await mgr.process_conversation("s", client.held)
        assert len(result.stored_message_ids) == len(new)
    client.regenerate(at=6)  # again, behind the first branch
    await mgr.process_conversation("s", client.held)
    for _ in range(3):
        client.turn()
        await mgr.process_conversation("s", client.held)
    await assert_stored(mgr, "s", client)


async def test_an_edited_user_message_and_its_new_reply_are_new(
    mgr: tiermem.KVCacheManager,
) -> None:
    client = Client()
    for _ in range(4):
        client.turn()
        await mgr.process_conversation("s", client.held)
    del client.held[5:]  # the client edits its third message: that and what follows go
    client.add(client.make("user", "actually, what about the harbour?"))
    await mgr.process_conversation("s", client.held)  # before the reply is generated
    client.add(client.make("assistant", "the harbour is lovely at dusk"))
    await mgr.process_conversation("s", client.held)
    for _ in range(3):
        client.turn()
        await mgr.process_conversation("s", client.held)
    await assert_stored(mgr, "s", client)


@pytest.mark.parametrize("size", [2, 3, 5])
async def test_a_window_client_regenerates_and_goes_on(
    mgr: tiermem.KVCacheManager, size: int
) -> None:
    client = Client()
    for i in range(8):
        new = client.turn()
        await mgr.process_conversation("s", client.window(size, len(new)))
        if i % 3 == 1:
            client.regenerate()
            await mgr.process_conversation("s", client.window(size, 1))
    await assert_stored(mgr, "s", client)


@pytest.mark.parametrize("size", [0, 1, 4])
async def test_the_system_prompt_with_every_call_is_stored_once(
    mgr: tiermem.KVCacheManager, size: int
) -> None:
    client = Client()
    client.turn()
    await mgr.process_conversation("s", client.held)
    for _ in range(6):
        new = client.turn()
        window = client.window(size, len(new))
        sent = [client.held[0], *[m for m in window if m is not client.held[0]]]
        result = await mgr.process_conversation("s", sent)
        assert len(result.stored_message_ids) == len(new)
    await assert_stored(mgr, "s", client)


async def test_a_changed_system_prompt_is_new_and_the_rest_lines_up(
    mgr: tiermem.KVCacheManager,
) -> None:
    client = Client()
    client.turn()
    await mgr.process_conversation("s", client.held)
    for day in range(3):
        new = client.turn()
        prompt = client.make("system", f"You are a helpful travel assistant. Day {day}.")
        client.log.insert(len(client.log) - len(new), prompt)
        result = await mgr.process_conversation("s", [prompt, *client.held[1:]])
        assert len(result.stored_message_ids) == len(new) + 1
    await assert_stored(mgr, "s", client)


async def test_a_client_that_switches_between_ways_of_sending(
    mgr: tiermem.KVCacheManager,
) -> None:
    client = Client()
    client.turn()
    await mgr.process_conversation("s", client.held)
    await mgr.process_conversation("s", client.turn())
    await mgr.process_conversation("s", client.window(3, len(client.turn())))
    client.regenerate()
    await mgr.process_conversation("s", client.held)
    await mgr.process_conversation("s", client.turn())
    await mgr.process_conversation("s", client.window(1, len(client.turn())))
    await mgr.process_conversation("s", client.held)
    await assert_stored(mgr, "s", client)


@pytest.mark.parametrize(
    "turns",
    [
        [("ok", None)] * 8,  # the same short question, other replies
        [(None, "ok")] * 8,  # other questions, the same short reply
        [("ok", "yes"), ("yes", "ok")] * 4,  # two exchanges, alternately
        [("ok", "sure"), ("yes", "sure"), ("ok", "sure"), ("thanks", "sure")] * 2,
        [("continue", None)] * 8,
    ],
)
async def test_only_new_messages_may_repeat_older_texts(
    mgr: tiermem.KVCacheManager, turns: list[tuple[str | None, str | None]]
) -> None:
    client = Client(system=False)
    for user, reply in turns:
        await mgr.process_conversation("s", client.turn(user, reply))
        await assert_stored(mgr, "s", client)


async def test_single_messages_repeating_texts_are_all_stored(
    mgr: tiermem.KVCacheManager,
) -> None:
    client = Client(system=False)
    for i in range(8):
        message = client.make("user" if i % 2 == 0 else "assistant", "ok" if i % 4 < 2 else "yes")
        await mgr.process_conversation("s", client.add(message))
    await assert_stored(mgr, "s", client)


async def test_repeating_the_last_stored_messages_exactly_reads_as_a_retry(
    mgr: tiermem.KVCacheManager,
) -> None:
    """Without ids, a call that repeats the stored conversation's last messages is a
    retry: only ids can say it is the same exchange once more."""
    await mgr.process_conversation("s", [Message("user", "ok"), Message("assistant", "yes")])
    result = await mgr.process_conversation(
        "s", [Message("user", "ok"), Message("assistant", "yes")]
    )
    assert result.stored_message_ids == []
    result = await mgr.process_conversation(
        "s", [Message("user", "ok", id="u2"), Message("assistant", "yes", id="a2")]
    )
    assert result.stored_message_ids == ["u2", "a2"]


def inserted(held: Sequence[Message], at: int) -> list[Message]:
    return [*held[:at], Message("user", "a message the memory never saw"), *held[at:]]


@pytest.mark.parametrize("at", [0, 1, 2, 5, 12])
async def test_an_unknown_message_before_stored_ones_is_refused(
    mgr: tiermem.KVCacheManager, at: int
) -> None:
    client = Client()
    for _ in range(6):
        client.turn()
        await mgr.process_conversation("s", client.held)
    before = await mgr.get_conversation_history("s")
    state = await mgr.get_session_state("s")
    for sent in (inserted(client.held, at), inserted(client.held, at) + client.turn()):
        with pytest.raises(tiermem.InvalidInputError, match="send message ids"):
            await mgr.process_conversation("s", sent)
    assert await mgr.get_conversation_history("s") == before
    assert await mgr.get_session_state("s") == state


async def test_a_window_with_an_unknown_message_before_stored_ones_is_refused(
    mgr: tiermem.KVCacheManager,
) -> None:
    client = Client()
    for _ in range(4):
        client.turn()
        await mgr.process_conversation("s", client.held)
    before = await mgr.get_conversation_history("s")
    with pytest.raises(tiermem.InvalidInputError, match="send message ids"):
        await mgr.process_conversation("s", inserted(client.held[-4:], 1) + client.turn())
    assert await mgr.get_conversation_history("s") == before


async def test_ids_decide_where_content_cannot(mgr: tiermem.KVCacheManager) -> None:
    client = Client(ids="all")
    for _ in range(3):
        client.turn()
        await mgr.process_conversation("s", client.held)
    sent = inserted(client.held, 2)
    sent[2] = Message(sent[2].role, sent[2].content, id="inserted")
    result = await mgr.process_conversation("s", sent)
    assert result.stored_message_ids == ["inserted"]
    with pytest.raises(tiermem.InvalidInputError, match="other content"):
        await mgr.process_conversation("s", [Message("user", "changed", id="m2")])


async def test_a_caller_id_shaped_like_a_derived_one_does_not_poison_the_session(
    mgr: tiermem.KVCacheManager, open_manager: Callable[..., Any]
) -> None:
    result = await mgr.process_conversation("s", [Message("user", "hi", id="s#1")])
    assert result.stored_message_ids == ["s#1"]
    result = await mgr.process_conversation("s", [Message("assistant", "hello")])
    assert result.stored_message_ids == ["s#1.1"]
    conversation = [Message("user", "hi", id="s#1"), Message("assistant", "hello")]
    assert (await mgr.process_conversation("s", conversation)).stored_message_ids == []
    conversation += [Message("user", "and tomorrow?"), Message("assistant", "rain")]
    result = await mgr.process_conversation("s", conversation)
    assert result.stored_message_ids == ["s#2", "s#3"]
    history = await mgr.get_conversation_history("s")
    assert [m.id for m in history] == ["s#1", "s#1.1", "s#2", "s#3"]

    # in one call, and a suffix taken too
    result = await mgr.process_conversation(
        "t",
        [Message("user", "a"), Message("user", "b", id="t#0"), Message("user", "c", id="t#0.1")],
    )
    assert result.stored_message_ids == ["t#0.2", "t#0", "t#0.1"]

    await mgr.aclose()  # after a restart, the whole conversation is still known
    reopened = await open_manager(config=CONFIG)
    try:
        assert (await reopened.process_conversation("s", conversation)).stored_message_ids == []
        result = await reopened.process_conversation("s", [Message("user", "x", id="s#5")])
        result = await reopened.process_conversation("s", [Message("assistant", "y")])
        assert result.stored_message_ids == ["s#5.1"]
    finally:
        await reopened.aclose()


async def test_ingest_skips_what_is_stored_the_same_way(mgr: tiermem.KVCacheManager) -> None:
    client = Client()
    for _ in range(3):
        client.turn()
        await mgr.process_conversation("s", client.held)
    client.regenerate()
    for _ in range(3):
        client.turn()
    assert await mgr.ingest("s", client.held) == 7
    await assert_stored(mgr, "s", client)


# -- random clients against the reference (the client's log) -----------------------------------

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(
            ["whole", "window", "new", "system+new", "regenerate", "regenerate-middle"]
        ),
        st.integers(1, 6),  # window size
        st.sampled_from([None, "ok", "yes"]),  # the user's text (None: a new one)
    ),
    min_size=1,
    max_size=10,
)


async def play(actions: list[tuple[str, int, str | None]], ids: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mgr = await tiermem.KVCacheManager.open(
            Path(tmp) / "memory.db",
            CONFIG,
            embedder=HashingEmbedder(),
            summarizer=RecordingSummarizer(),
            tokenizer=WordCounter(),
            clock=Clock(),
        )
        try:
            client = Client(ids)
            for _ in range(2):  # the first reply is not regenerated (see the test above)
                client.turn()
                await mgr.process_conversation("s", client.held)
            for action, size, user in actions:
                if action.startswith("regenerate"):
                    replies = [i for i, m in enumerate(client.held) if m.role == "assistant"]
                    at = replies[len(replies) // 2] if action == "regenerate-middle" else None
                    new = [client.regenerate(at)]
                    if action == "regenerate-middle":
                        action = "whole"  # a client that can go back sends it all
                    else:
                        action = ["whole", "window", "new"][size % 3]
                        # a window of one before a regenerated reply, [question, reply], is
                        # also an only-new turn repeating the last question: stored as new
                        size = max(size, 2)
                else:
                    new = client.turn(user)
                sent = {
                    "whole": client.held,
                    "window": client.window(size, len(new)),
                    "new": new,
                    "system+new": [client.held[0], *new],
                }[action]
                result = await mgr.process_conversation("s", sent)
                assert len(result.stored_message_ids) == len(new)
                await assert_stored(mgr, "s", client)
        finally:
            await mgr.aclose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(actions=ACTIONS, ids=st.sampled_from(IDS))
def test_random_clients_store_what_they_said_once(
    actions: list[tuple[str, int, str | None]], ids: str
) -> None:
    anyio.run(play, actions, ids)
