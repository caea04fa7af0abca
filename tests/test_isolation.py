"""Isolation: what one namespace writes, another never sees, in any tier or summary, over
random interleavings of sessions and namespaces (a hypothesis property test), on both
stores."""

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiermem
from tests import pg
from tests.conftest import SHAPE
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

NAMESPACES = ("alpha", "beta", "gamma")
SESSIONS = ("s1", "s2")
# (namespace, session, retrieve instead of storing, which word)
OPS = st.lists(
    st.tuples(
        st.sampled_from(NAMESPACES),
        st.sampled_from(SESSIONS),
        st.booleans(),
        st.integers(0, 5),
    ),
    min_size=1,
    max_size=40,
)


def leaked(texts: list[str], namespace: str) -> list[str]:
    """Texts holding another namespace's marker words."""
    others = [n for n in NAMESPACES if n != namespace]
    return [t for t in texts if any(f"{o}word" in t for o in others)]


@asynccontextmanager
async def blank(store: str) -> AsyncIterator[str | Path]:
    """A new database on `store`, gone afterwards."""
    if store == "postgres":
        url = await pg.fresh_database(pg.url())
        try:
            yield url
        finally:
            await pg.drop_database(pg.url(), url)
    else:
        with tempfile.TemporaryDirectory() as folder:
            yield Path(folder) / "iso.db"


async def play(store: str, ops: list[tuple[str, str, bool, int]], concurrent: bool) -> None:
    config = tiermem.KVCacheConfig(
        kv_shape=SHAPE,
        summary_mode="inline",
        clear_after_conversations=3,
        snapshot_strategy={"kind": "full"},
        retrieve_always=True,
    )
    seen: dict[str, list[str]] = {n: [] for n in NAMESPACES}
    async with blank(store) as database:
        mgr = await tiermem.KVCacheManager.open(
            database,
            config,
            embedder=HashingEmbedder(),
            summarizer=RecordingSummarizer(),
            tokenizer=WordCounter(),
        )
        async with mgr:

            async def run(i: int, ns: str, sid: str, ask: bool, word: int) -> None:
                if ask:
                    try:
                        hits = await mgr.retrieve_context(sid, "which word did I say", namespace=ns)
                    except tiermem.NotFoundError:
                        return
                    seen[ns] += [e.text for e in hits.entries]
                    return
                result = await mgr.process_conversation(
                    sid,
                    [tiermem.Message("user", f"remember {ns}word{word} please, item {i}")],
                    namespace=ns,
                )
                seen[ns] += result.bridge_messages
                if result.retrieval_result:
                    seen[ns] += [e.text for e in result.retrieval_result.entries]

            if concurrent:
                async with anyio.create_task_group() as tg:
                    for i, op in enumerate(ops):
                        tg.start_soon(run, i, *op)
            else:
                for i, op in enumerate(ops):
                    await run(i, *op)
            for ns in NAMESPACES:
                for sid in SESSIONS:
                    if await mgr.get_session_state(sid, namespace=ns) is None:
                        continue
                    history = await mgr.get_conversation_history(sid, namespace=ns)
                    seen[ns] += [m.content for m in history]
                    summary = await mgr.get_summary(sid, namespace=ns)
                    seen[ns] += [summary.text] if summary else []
                    seen[ns] += [e.text for e in await mgr.get_active_cache(sid, namespace=ns)]
                assert leaked(seen[ns], ns) == []


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, concurrent=st.booleans())
def test_namespaces_never_see_each_other(
    store: str, postgres_server: str, ops: list[tuple[str, str, bool, int]], concurrent: bool
) -> None:
    anyio.run(play, store, ops, concurrent)
