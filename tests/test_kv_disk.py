"""The tiers of kept KV states without a model: the disk tier's files, index, byte budget
and LRU order, what survives a restart and a crash, and how the RAM tier spills to it."""

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from tiermem import KVState, KVStateCache, KVStateDisk, KVStateEvent, StorageError
from tiermem._kvdisk import INDEX, MAGIC, ORPHAN_SECONDS, SUFFIX
from tiermem._kvstate import checksum  # private: the checksum a state must carry


def state(n_tokens: int, size: int, seed: int = 0) -> KVState:
    rng = random.Random(seed)
    tokens = tuple(rng.randrange(50_000) for _ in range(n_tokens))
    data = rng.randbytes(size)
    return KVState(tokens, data, checksum(tokens, data), "print", time.time())


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix == SUFFIX}


def file_size(s: KVState, key: tuple[str, str]) -> int:
    head = json.dumps(
        {
            "namespace": key[0],
            "session": key[1],
            "fingerprint": s.fingerprint,
            "crc": s.crc,
            "tokens": len(s.tokens),
            "created": s.created,
        }
    )
    return len(MAGIC) + 4 + len(head) + 4 * len(s.tokens) + len(s.data)


def test_a_state_comes_back_whole_and_its_file_costs_exact_bytes(tmp_path: Path) -> None:
    disk = KVStateDisk(tmp_path, 10**9)
    a = state(100, 5_000)
    disk.write(("ns", "a"), a)
    assert disk.read(("ns", "a")) == a
    assert disk.read(("ns", "b")) is None
    assert disk.read(("other", "a")) is None  # namespaces never mix
    assert disk.usage() == (1, file_size(a, ("ns", "a")))
    (only,) = files(tmp_path)
    assert (tmp_path / only).stat().st_size == file_size(a, ("ns", "a"))
    # a newer state replaces the session's file
    b = state(120, 6_000, seed=1)
    disk.write(("ns", "a"), b)
    assert disk.read(("ns", "a")) == b and len(files(tmp_path)) == 1
    disk.close()
    # a restart finds it
    again = KVStateDisk(tmp_path, 10**9)
    assert again.read(("ns", "a")) == b
    again.close()


def test_the_disk_tier_keeps_under_its_budget_least_recently_used_first(tmp_path: Path) -> None:
    a, b, c = (state(10, 1_000, seed=i) for i in range(3))
    size = {name: file_size(s, ("ns", name)) for name, s in zip("abc", (a, b, c), strict=True)}
    disk = KVStateDisk(tmp_path, size["a"] + size["c"] + 10)
    disk.write(("ns", "a"), a)
    disk.write(("ns", "b"), b)
    assert disk.read(("ns", "a")) is not None  # a is now used more recently than b
    disk.write(("ns", "c"), c)
    assert disk.read(("ns", "b")) is None
    assert disk.read(("ns", "a")) == a and disk.read(("ns", "c")) == c
    assert disk.usage() == (2, size["a"] + size["c"]) and disk.evictions == 1
    assert len(files(tmp_path)) == 2
    # a state over the whole budget is not kept at all
    disk.write(("ns", "big"), state(10, 3 * size["a"], seed=4))
    assert disk.read(("ns", "big")) is None and disk.usage()[1] <= disk.max_bytes
    disk.close()


def test_two_processes_share_one_folder(tmp_path: Path) -> None:
    first, second = KVStateDisk(tmp_path, 10**9), KVStateDisk(tmp_path, 10**9)
    a = state(50, 2_000)
    first.write(("ns", "a"), a)
    assert second.read(("ns", "a")) == a
    second.drop(("ns", "a"))
    assert first.read(("ns", "a")) is None and files(tmp_path) == set()
    first.close()
    second.close()


def test_unreadable_files_are_misses_and_a_damaged_state_fails_its_checksum(
    tmp_path: Path,
) -> None:
    disk = KVStateDisk(tmp_path, 10**9)
    for name in ("magic", "header", "short", "flipped"):
        disk.write(("ns", name), state(40, 4_000))
    by_session = {
        name: tmp_path / f
        for name, f in disk._db.execute(  # private: which file is whose
            "SELECT session, file FROM states"
        )
    }
    raw = {name: bytearray(path.read_bytes()) for name, path in by_session.items()}
    raw["magic"][:4] = b"XXXX"
    raw["header"][len(MAGIC) + 6] ^= 0xFF  # the JSON no longer parses
    raw["short"] = raw["short"][: len(raw["short"]) // 2]
    raw["flipped"][-100] ^= 0x01
    for name, path in by_session.items():
        path.write_bytes(raw[name])
    assert disk.read(("ns", "magic")) is None and disk.read(("ns", "header")) is None
    assert not by_session["magic"].exists() and not by_session["header"].exists()
    for name in ("short", "flipped"):  # readable, but not the state that was written
        damaged = disk.read(("ns", name))
        assert damaged is not None and checksum(damaged.tokens, damaged.data) != damaged.crc
    disk.close()


def test_orphans_of_a_crashed_writer_are_removed_once_old(tmp_path: Path) -> None:
    KVStateDisk(tmp_path, 10**9).close()
    old, recent = time.time() - ORPHAN_SECONDS - 5, time.time()
    for name, when in (
        (".tmp-a.kvs", old),
        ("b.kvs", old),
        (".tmp-c.kvs", recent),
        ("d.kvs", recent),
    ):
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (when, when))
    KVStateDisk(tmp_path, 10**9).close()
    left = {p.name for p in tmp_path.iterdir()} - {INDEX, f"{INDEX}-wal", f"{INDEX}-shm"}
    assert left == {".tmp-c.kvs", "d.kvs"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(tmp_path: Path, clock: Clock, **limits: int) -> KVStateCache:
    kw = {"max_bytes_per_session": 10**9, "max_bytes_total": 10**9, "max_sessions": 8}
    return KVStateCache(
        **{**kw, **limits}, disk=KVStateDisk(tmp_path, 10**9), idle_seconds=60.0, clock=clock
    )


def test_states_leaving_ram_spill_to_disk_and_come_back(tmp_path: Path) -> None:
    clock = Clock()
    tier = cache(tmp_path, clock, max_sessions=2)
    a, b, c = (state(20, 1_000, seed=i) for i in range(3))
    tier.put(("ns", "a"), a)
    tier.put(("ns", "b"), b)
    assert tier.lookup(("ns", "a")) == (a, False)  # now b is the least recently used
    tier.put(("ns", "c"), c)
    assert tier.stats.states == 2 and tier.stats.bytes == a.nbytes + c.nbytes
    wait_for_spills(tier, 1)
    assert tier.lookup(("ns", "b")) == (b, True)  # from disk, so a leaves RAM
    events = tier.take_events()
    assert events == [
        KVStateEvent("b", "ns", "evicted", "SessionLimit", 20, b.nbytes, "disk"),
        KVStateEvent("a", "ns", "evicted", "SessionLimit", 20, a.nbytes, "disk"),
    ]
    # idle states leave RAM at the idle time
    clock.now += 61
    assert tier.evict_idle() == 2 and tier.stats.states == 0
    tier.close()  # waits for the writes
    assert tier.stats.disk_states == 3
    again = cache(tmp_path, clock)  # a restart
    for key, expected in ((("ns", "a"), a), (("ns", "b"), b), (("ns", "c"), c)):
        assert again.lookup(key) == (expected, True)
    again.close()


def test_a_dropped_state_leaves_no_file_even_with_its_spill_in_flight(tmp_path: Path) -> None:
    for _ in range(20):  # the spill and the drop race: every order must end the same
        folder = tmp_path / str(random.random())
        tier = cache(folder, Clock(), max_sessions=1)
        tier.put(("ns", "a"), state(50, 200_000))
        tier.put(("ns", "b"), state(50, 1_000, seed=1))  # a spills
        tier.drop(("ns", "a"))
        tier.close()
        disk = KVStateDisk(folder, 10**9)
        assert disk.read(("ns", "a")) is None and disk.usage()[0] == 1
        disk.close()


def test_a_budget_over_the_total_evicts_by_memory(tmp_path: Path) -> None:
    a = state(20, 1_000)
    tier = cache(tmp_path, Clock(), max_bytes_total=2 * a.nbytes + 10)
    for name in "abc":
        tier.put(("ns", name), state(20, 1_000, seed=ord(name)))
    assert [e.reason for e in tier.take_events()] == ["MemoryBudget"]
    assert tier.stats.bytes == 2 * a.nbytes and tier.stats.evictions == 1
    tier.close()


@pytest.mark.parametrize("disk", [False, True])
def test_without_a_disk_tier_evicted_states_are_gone(tmp_path: Path, disk: bool) -> None:
    tier = KVStateCache(
        max_bytes_per_session=10**9,
        max_bytes_total=10**9,
        max_sessions=1,
        disk=KVStateDisk(tmp_path, 10**9) if disk else None,
    )
    tier.put(("ns", "a"), state(20, 1_000))
    tier.put(("ns", "b"), state(20, 1_000, seed=1))
    (event,) = tier.take_events()
    assert event.to == ("disk" if disk else None)
    assert (tier.get(("ns", "a")) is not None) is disk
    tier.close()


def wait_for_spills(tier: KVStateCache, n: int) -> None:
    deadline = time.monotonic() + 10
    while tier.stats.spills < n:
        assert time.monotonic() < deadline, "the spill was never written"
        time.sleep(0.01)


def test_a_corrupt_index_is_a_storage_error_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / INDEX).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="KV state folder"):
        KVStateDisk(tmp_path, 10**9)


def test_a_spill_that_fails_is_reported_and_loses_only_the_state(tmp_path: Path) -> None:
    folder = tmp_path / "states"
    tier = cache(folder, Clock(), max_sessions=1)
    shutil.rmtree(folder)  # the disk went away
    tier.put(("ns", "a"), state(20, 1_000))
    tier.put(("ns", "b"), state(20, 1_000, seed=1))
    tier._writer.shutdown(wait=True)  # private: the spill has run
    events = tier.take_events()
    assert [e.action for e in events] == ["evicted", "spill_failed"]
    assert "KV state folder" in events[1].reason
    assert tier.get(("ns", "a")) is None and tier.get(("ns", "b")) is not None
    assert tier.disk is not None
    tier.disk.close()


def test_a_drop_wipes_the_file_and_refuses_older_states_from_other_processes(
    tmp_path: Path,
) -> None:
    here, there = KVStateDisk(tmp_path, 10**9), KVStateDisk(tmp_path, 10**9)
    old = state(30, 4_000)  # still in another process's RAM when the session is deleted
    here.write(("ns", "a"), state(30, 4_000, seed=1))
    (name,) = files(tmp_path)
    with (tmp_path / name).open("rb") as reader:  # what the disk still holds after
        here.drop(("ns", "a"))
        assert set(reader.read()) == {0}
    assert files(tmp_path) == set()
    there.write(("ns", "a"), old)  # the other process spills it at its shutdown
    assert here.read(("ns", "a")) is None and files(tmp_path) == set()
    newer = state(30, 4_000, seed=2)  # a new conversation under the same id
    there.write(("ns", "a"), newer)
    assert here.read(("ns", "a")) == newer
    here.close()
    there.close()


def test_an_index_naming_another_sessions_file_loses_neither(tmp_path: Path) -> None:
    disk = KVStateDisk(tmp_path, 10**9)
    a, b = state(20, 1_000), state(20, 1_000, seed=1)
    disk.write(("ns", "a"), a)
    disk.write(("ns", "b"), b)
    disk._db.execute(  # private: damage the index
        "UPDATE states SET file = (SELECT file FROM states WHERE session = 'b') WHERE session = 'a'"
    )
    assert disk.read(("ns", "a")) is None
    assert disk.read(("ns", "b")) == b
    disk.close()


def test_a_state_over_the_whole_ram_budget_goes_straight_to_disk(tmp_path: Path) -> None:
    big = state(20, 10_000)
    tier = cache(tmp_path, Clock(), max_bytes_total=5_000)
    tier.put(("ns", "a"), big)
    assert tier.stats.states == 0 and tier.stats.bytes == 0
    tier.close()
    assert tier.stats.disk_states == 1
