"""Crash consistency: a process writing turns is killed with SIGKILL at random moments;
after each kill the file is whole and every turn that had returned is in it."""

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

import tiermem
from tests import rawfile
from tests.conftest import SHAPE
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

ROOT = Path(__file__).parent.parent

# writes turns to five sessions until killed; prints each turn's ids once it has returned
CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import anyio, tiermem
    from tests.conftest import SHAPE
    from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

    async def main(path, run):
        config = tiermem.KVCacheConfig(
            kv_shape=SHAPE, summary_mode="inline", clear_after_conversations=3,
            snapshot_strategy={{"kind": "full"}})
        mgr = await tiermem.KVCacheManager.open(
            path, config, embedder=HashingEmbedder(), summarizer=RecordingSummarizer(),
            tokenizer=WordCounter())
        print("ready", flush=True)
        i = 0
        while True:
            sid = f"s{{i % 5}}"
            ids = [f"r{{run}}-u{{i}}", f"r{{run}}-a{{i}}"]
            await mgr.process_conversation(sid, [
                tiermem.Message("user", f"run {{run}} note {{i}} about the harbour?", id=ids[0]),
                tiermem.Message("assistant", f"noted {{i}} for run {{run}}", id=ids[1]),
            ])
            print(sid, *ids, flush=True)
            i += 1

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
).format(root=str(ROOT))


def run_and_kill(path: Path, run: int, rng: random.Random) -> list[tuple[str, str]]:
    """Start a writer, SIGKILL it at a random moment, return the (session, id) it acked."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
    time.sleep(rng.uniform(0.0, 0.6))
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    acked = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:  # a line cut by the kill is not an acknowledgement
            acked += [(parts[0], parts[1]), (parts[0], parts[2])]
    return acked


async def check_whole(path: Path, acked: list[tuple[str, str]]) -> None:
    # the file as the kill left it (the WAL not yet checkpointed by a new manager)
    rawfile.assert_whole(path)
    async with await tiermem.KVCacheManager.open(
        path,
        tiermem.KVCacheConfig(kv_shape=SHAPE, summary_mode="inline"),
        embedder=HashingEmbedder(),
        summarizer=RecordingSummarizer(),
        tokenizer=WordCounter(),
    ) as mgr:
        stored: dict[str, set[str]] = {}
        for sid in {s for s, _ in acked}:
            history = await mgr.get_conversation_history(sid)
            assert [m.position for m in history] == list(range(len(history)))
            stored[sid] = {m.id for m in history}
            state = await mgr.get_session_state(sid)
            assert state is not None and state.message_count == len(history)
        missing = [(s, m) for s, m in acked if m not in stored[s]]
        assert missing == []


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_turn(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    rng = random.Random(20261124)
    acked: list[tuple[str, str]] = []
    for run in range(24):
        acked += run_and_kill(path, run, rng)
        anyio.run(check_whole, path, acked)
    assert len(acked) > 100  # the kills landed among real writes
