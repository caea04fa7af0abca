"""Bad input: each kind gets correct handling or a clear `TierMemError` subclass, and
nothing stored before is lost."""

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import tiermem
from tests import rawfile
from tests.fakes import HashingEmbedder
from tests.test_manager import turn
from tiermem import Message


async def test_empty_and_whitespace_messages_are_stored_and_not_searched_for(
    manager: tiermem.KVCacheManager,
) -> None:
    result = await manager.process_conversation(
        "s", [Message("user", ""), Message("assistant", "   \n\t")]
    )
    assert result.retrieval_result is None and result.stored_message_ids == ["s#0", "s#1"]
    assert [m.content for m in await manager.get_conversation_history("s")] == ["", "   \n\t"]
    assert (await manager.retrieve_context("s", "  ")).entries == []


async def test_a_10_mb_message_is_stored_whole(manager: tiermem.KVCacheManager) -> None:
    big = "filler words " * 800_000 + "the zeppelin hangar code is 7391"
    assert len(big.encode()) > 10 * 10**6
    result = await manager.process_conversation("s", [Message("user", big, id="big")])
    assert result.stored_message_ids == ["big"]
    (stored,) = await manager.get_conversation_history("s")
    assert stored.content == big
    hits = await manager.retrieve_context("s", "filler words")
    assert hits.entries[0].message_ids == ["big"]


async def test_a_message_over_the_limit_is_refused_and_nothing_of_its_call_is_stored(
    open_manager: Callable[..., Any],
) -> None:
    config = tiermem.KVCacheConfig(max_message_bytes=1000, summary_mode="inline")
    async with await open_manager(config=config) as mgr:
        await mgr.process_conversation("s", turn(0))
        with pytest.raises(tiermem.InvalidInputError, match="limit is 1000"):
            await mgr.process_conversation("s", [*turn(1), Message("user", "x" * 1001)])
        assert [m.id for m in await mgr.get_conversation_history("s")] == ["u0", "a0"]


async def test_nul_bytes_emoji_and_mixed_scripts_round_trip(
    manager: tiermem.KVCacheManager,
) -> None:
    texts = [
        "nul\x00inside and after\x00",
        "emoji 🦜🏳️‍🌈 and combining é (e\u0301)",
        "Москва и Αθήνα and 東京 in one line",
        "right-to-left שלום עולם مرحبا",
    ]
    await manager.process_conversation("s", [Message("user", t) for t in texts])
    assert [m.content for m in await manager.get_conversation_history("s")] == texts
    assert (await manager.retrieve_context("s", "Москва")).entries[0].text == texts[2]
    assert (await manager.retrieve_context("s", "שלום")).entries[0].text == texts[3]
    with pytest.raises(tiermem.InvalidInputError, match="NUL"):
        await manager.process_conversation("a\x00b", turn(0))


@pytest.mark.parametrize(
    "query",
    [
        '"unbalanced',
        "say \"hi\" and 'bye'",
        "NEAR(a b",
        "a* OR -b ^c",
        "content:x",
        "{content role}: x",
        "AND OR NOT",
        "'; DROP TABLE messages; --",
        "",
        "*",
    ],
)
async def test_queries_with_fts_syntax_are_plain_text(
    manager: tiermem.KVCacheManager, query: str
) -> None:
    await manager.process_conversation("s", turn(0, "DROP TABLE messages is scary content"))
    await manager.retrieve_context("s", query)  # no error
    # the syntax around a word does not change what the word finds
    result = await manager.retrieve_context("s", f"{query} scary")
    assert "DROP TABLE messages is scary content" in [e.text for e in result.entries]
    assert "scary" in result.keywords_used
    assert len(await manager.get_conversation_history("s")) == 2


async def test_sql_looking_content_is_just_text(manager: tiermem.KVCacheManager) -> None:
    evil = "Robert'); DROP TABLE messages; -- \" OR 1=1 /*"
    await manager.process_conversation("s", [Message("user", evil)])
    await manager.process_conversation("s", turn(1))
    history = await manager.get_conversation_history("s")
    assert history[0].content == evil and len(history) == 3
    assert (await manager.retrieve_context("s", "Robert DROP TABLE")).entries[0].text == evil


async def test_wrong_types_roles_ids_and_sessions_are_typed(
    manager: tiermem.KVCacheManager,
) -> None:
    await manager.process_conversation("s", turn(0))
    with pytest.raises(tiermem.InvalidInputError, match="unknown role"):
        Message("wizard", "hi")
    with pytest.raises(tiermem.InvalidInputError):
        await manager.process_conversation("s", [{"role": "user"}])  # no content
    with pytest.raises(tiermem.InvalidInputError):
        await manager.process_conversation("", [Message("user", "hi")])
    with pytest.raises(tiermem.InvalidInputError, match="lone surrogate"):
        await manager.process_conversation("s", [Message("user", "bad \ud800 text")])
    with pytest.raises(tiermem.InvalidInputError):
        await manager.process_conversation("s", "not a list")  # type: ignore[arg-type]
    with pytest.raises(tiermem.InvalidInputError, match="other content"):
        await manager.process_conversation("s", [Message("user", "changed", id="u0")])
    with pytest.raises(tiermem.InvalidInputError, match="twice"):
        await manager.process_conversation("s", [Message("user", "a", id="x")] * 2)
    with pytest.raises(tiermem.NotFoundError):
        await manager.retrieve_context("nobody", "hello")
    with pytest.raises(tiermem.NotFoundError):
        await manager.restore_from_snapshot("s", 12345)
    with pytest.raises(tiermem.NotFoundError):
        await manager.restore_from_snapshot("nobody", 1)
    assert await manager.get_session_state("nobody") is None
    assert [m.id for m in await manager.get_conversation_history("s")] == ["u0", "a0"]


async def test_a_corrupt_database_file_is_refused_untouched(
    open_manager: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "corrupt.db"
    junk = b"this is not a database" * 200
    path.write_bytes(junk)
    with pytest.raises(tiermem.StorageError):
        await open_manager(path=path)
    assert path.read_bytes() == junk


async def test_a_full_disk_fails_the_turn_and_keeps_what_was_stored(
    manager: tiermem.KVCacheManager, db_path: Path
) -> None:
    await manager.process_conversation("s", turn(0))
    huge = "words that fill the disk " * 20_000
    with rawfile.full_disk(db_path), pytest.raises(tiermem.StorageError, match="disk"):
        await manager.process_conversation("s", [Message("user", huge, id="huge")])
    assert [m.id for m in await manager.get_conversation_history("s")] == ["u0", "a0"]
    rawfile.assert_whole(db_path)
    result = await manager.process_conversation("s", turn(1))  # room again
    assert result.updated_session_state.message_count == 4
    assert [m.id for m in await manager.get_conversation_history("s")] == ["u0", "a0", "u1", "a1"]


async def test_an_embedder_returning_the_wrong_shape_stores_nothing(
    open_manager: Callable[..., Any],
) -> None:
    class Short(HashingEmbedder):
        async def embed(self, texts: Any) -> np.ndarray:
            return (await super().embed(texts))[:, :10]

    async with await open_manager() as mgr:
        await mgr.process_conversation("s", turn(0))
    async with await open_manager(embedder=Short()) as mgr:
        with pytest.raises(tiermem.ModelError, match="shape"):
            await mgr.process_conversation("s", turn(1, "new words"))
        assert len(await mgr.get_conversation_history("s")) == 2


def test_a_missing_embedding_model_folder_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(tiermem.ModelError, match="does not exist"):
        tiermem.SentenceTransformerEmbedder(str(tmp_path / "nowhere"))


def set_read_only(path: Path, read_only: bool) -> None:
    """File modes do not stop root: as root, the file is made immutable instead."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if read_only else "-i", str(path)], check=True)
    else:
        path.chmod(0o444 if read_only else 0o644)


async def test_a_read_only_database_file_serves_reads_and_is_kept(
    open_manager: Callable[..., Any], db_path: Path
) -> None:
    async with await open_manager() as mgr:
        await mgr.process_conversation("s", turn(0))
    before = await anyio.Path(db_path).read_bytes()
    set_read_only(db_path, True)
    try:
        async with await open_manager() as mgr:
            assert [s.session_id for s in await mgr.list_sessions()] == ["s"]
            assert [m.id for m in await mgr.get_conversation_history("s")] == ["u0", "a0"]
            hits = await mgr.retrieve_context("s", "what about the weather?")
            assert "small talk number 0 about the weather" in [e.text for e in hits.entries]
            with pytest.raises(tiermem.StorageError, match="read-only"):
                await mgr.process_conversation("s", turn(1))
    finally:
        set_read_only(db_path, False)
    assert await anyio.Path(db_path).read_bytes() == before
