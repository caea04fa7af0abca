"""Per-session llama.cpp KV state, restored instead of re-prefilled: the RAM tier, spilling
to the disk tier (`_kvdisk`).

After a reply, the context's sequence state (`llama_state_seq_get_data`: the KV cells of
the prompt, not of the reply, see `reusable`) is copied out with the token ids it holds.
On the session's next call the state is set back into the context and cut to the common
token prefix with the new prompt: only the rest is prefilled. Greedy output is the same
as a cold prefill's.

A state is valid only where it was made: the same GGUF (its sha256), llama.cpp build, KV
types, flash attention, rope/yarn parameters, chat template and every other option of the
model (the fingerprint), in a
context with room for its tokens; it carries a crc32 of its token ids and bytes. Anything
that does not match is a cold prefill, never a load: llama.cpp loads a state with another
rope base or flipped bytes without complaint, and its output is wrong.

The RAM tier is an LRU of states under exact byte budgets (a state costs its bytes: 23,052
a token + 744 for the bundled model): per session, in total, a number of states, and an
idle time. A session over its own budget keeps the longest prefix that fits. A state that
leaves RAM spills to the disk tier, when there is one, by a writer thread (the reply does
not wait for the file); a session's next call finds it there, after a restart too.
Everything else runs in the model's worker thread, one call at a time (the caller's
limiter).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import threading
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._errors import StorageError
from ._kvdisk import KVStateDisk
from ._telemetry import KVStateEvent
from ._types import EvictionReason, KVStateStats

StateKey = tuple[str, str]  # (namespace, session)

# the model file is hashed once per path, size and modification time, this much at a time
_HASH_CHUNK = 1 << 20
_file_hashes: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True, slots=True)
class KVState:
    """A context's sequence state (`data`), the token ids it holds, the crc32 of both and
    the fingerprint of what it is valid in."""

    tokens: tuple[int, ...]
    # the bytes, not copied out of the buffer llama.cpp or the file wrote them into
    data: bytes | bytearray | memoryview
    crc: int
    fingerprint: str
    created: float = 0.0  # wall-clock time it was taken (a drop refuses older ones)

    @property
    def nbytes(self) -> int:
        return len(self.data)


def checksum(tokens: tuple[int, ...] | list[int], data: bytes | bytearray | memoryview) -> int:
    """crc32 of the token ids and the state: a flipped token id would have the state
    reused for a prompt it does not hold."""
    return zlib.crc32(data, zlib.crc32(array("i", tokens).tobytes()))


@dataclass(slots=True)
class _Held:
    state: KVState
    used: float
    on_disk: bool  # the disk tier holds this very state: leaving RAM writes nothing


class KVStateCache:
    """The RAM tier: states by (namespace, session), least recently used first out, to
    `disk` when given. `idle_seconds`: a state unused that long leaves RAM too."""

    def __init__(
        self,
        *,
        max_bytes_per_session: int,
        max_bytes_total: int,
        max_sessions: int,
        disk: KVStateDisk | None = None,
        idle_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes_per_session = max_bytes_per_session
        self.max_bytes_total = max_bytes_total
        self.max_sessions = max_sessions
        self.disk = disk
        self.idle_seconds = idle_seconds
        self._clock = clock
        self.stats = KVStateStats()
        self._states: OrderedDict[StateKey, _Held] = OrderedDict()
        self._lock = threading.Lock()  # the RAM tier and the spills in flight
        self._disk_writes = threading.Lock()  # a spill's write against a drop's delete
        self._spilling: dict[StateKey, KVState] = {}
        self._writer = ThreadPoolExecutor(1, "tiermem-kv-spill") if disk is not None else None
        self._events: list[KVStateEvent] = []

    def get(self, key: StateKey) -> KVState | None:
        """The session's state from any tier (see `lookup`)."""
        found = self.lookup(key)
        return found[0] if found else None

    def lookup(self, key: StateKey) -> tuple[KVState, bool] | None:
        """The session's state from RAM, or from a spill in flight, or from disk (then
        it is in RAM again), and whether it came from disk; None when no tier has one."""
        with self._lock:
            held = self._states.get(key)
            if held is not None:
                self._states.move_to_end(key)
                held.used = self._clock()
                return held.state, False
            state = self._spilling.get(key)
        if state is not None:
            return state, False
        if self.disk is None or (state := self.disk.read(key)) is None:
            return None
        self._hold(key, state, on_disk=True)
        return state, True

    def put(self, key: StateKey, state: KVState) -> None:
        """Keep `state` as the session's newest (it must fit `max_bytes_per_session`:
        `capture` cuts it so); older states leave RAM while over the budgets."""
        self._hold(key, state, on_disk=False)
        self.evict_idle()

    def drop(self, key: StateKey) -> None:
        """Forget the session's state in every tier (deleted, or found invalid)."""
        with self._lock:
            self._forget(key)
            self._spilling.pop(key, None)
        if self.disk is not None:
            with self._disk_writes:
                self.disk.drop(key)

    def evict_idle(self) -> int:
        """States unused for `idle_seconds` leave RAM (to disk); how many left."""
        if self.idle_seconds is None:
            return 0
        cutoff = self._clock() - self.idle_seconds
        with self._lock:
            idle = [k for k, held in self._states.items() if held.used <= cutoff]
            for key in idle:
                self._evict(key, EvictionReason.IDLE)
        return len(idle)

    def close(self) -> None:
        """Spill every state RAM holds (a restart finds them), wait for the writes, close
        the disk tier. Blocking."""
        if self._writer is None:
            return
        with self._lock:
            for key in list(self._states):
                self._evict(key, None)
        self._writer.shutdown(wait=True)
        assert self.disk is not None
        self.stats.disk_states, self.stats.disk_bytes = self.disk.usage()
        self.stats.disk_evictions = self.disk.evictions
        self.disk.close()
        self.disk, self._writer = None, None  # RAM only from here

    def snapshot(self) -> KVStateStats:
        """The figures now, the disk tier's usage read from its index. Blocking."""
        with self._lock:
            stats = replace(self.stats)
        if self.disk is not None:
            stats.disk_states, stats.disk_bytes = self.disk.usage()
            stats.disk_evictions = self.disk.evictions
        return stats

    def take_events(self) -> list[KVStateEvent]:
        """The events since the last call (emitted on the event loop by the caller)."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def _hold(self, key: StateKey, state: KVState, on_disk: bool) -> None:
        with self._lock:
            self._forget(key)
            self._states[key] = _Held(state, self._clock(), on_disk)
            self.stats.bytes += state.nbytes
            while self._states and (
                self.stats.bytes > self.max_bytes_total or len(self._states) > self.max_sessions
            ):
                over_sessions = len(self._states) > self.max_sessions
                self._evict(
                    next(iter(self._states)),
                    EvictionReason.SESSION_LIMIT if over_sessions else EvictionReason.MEMORY_BUDGET,
                )
            self.stats.states = len(self._states)

    def _forget(self, key: StateKey) -> _Held | None:
        held = self._states.pop(key, None)
        if held is not None:
            self.stats.bytes -= held.state.nbytes
            self.stats.states = len(self._states)
        return held

    def _evict(self, key: StateKey, reason: EvictionReason | None) -> None:
        """Out of RAM (the lock held), to the disk tier unless it has this state already."""
        held = self._forget(key)
        if held is None:
            return
        spill = self._writer is not None and not held.on_disk
        if reason is not None:
            self.stats.evictions += 1
            self._events.append(
                KVStateEvent(
                    key[1],
                    key[0],
                    "evicted",
                    reason.value,
                    len(held.state.tokens),
                    held.state.nbytes,
                    "disk" if spill or held.on_disk else None,
                )
            )
        if spill:
            assert self._writer is not None
            self._spilling[key] = held.state
            self._writer.submit(self._spill, key, held.state)

    def _spill(self, key: StateKey, state: KVState) -> None:
        """Write one state to disk (the writer thread), unless dropped or replaced since."""
        assert self.disk is not None
        with self._disk_writes:
            with self._lock:
                if self._spilling.get(key) is not state:
                    return
            try:
                self.disk.write(key, state)
            except StorageError as exc:
                with self._lock:
                    self._events.append(
                        KVStateEvent(
                            key[1],
                            key[0],
                            "spill_failed",
                            str(exc),
                            len(state.tokens),
                            state.nbytes,
                            None,
                        )
                    )
            else:
                self.stats.spills += 1
            finally:
                with self._lock:
                    if self._spilling.get(key) is state:
                        del self._spilling[key]


def fingerprint(llama: Any, path: Path, template: str, options: Mapping[str, Any]) -> str:
    """What makes a state valid: the model file, the llama.cpp build, the KV layout and the
    positional encoding of the context, the chat template, and every other option the
    model was made with (metadata overrides, a LoRA adapter and its file). Blocking
    (hashes a file once per path, size and modification time)."""
    import llama_cpp

    params = llama.context_params
    rope = sorted((k, v) for k, v in llama.metadata.items() if "rope" in k or "yarn" in k)
    parts = [
        _file_sha256(path),
        llama_cpp.__version__,
        llama_cpp.llama_print_system_info().decode(errors="replace"),
        f"k={params.type_k} v={params.type_v} fa={getattr(params, 'flash_attn_type', None)}",
        f"rope={params.rope_freq_base},{params.rope_freq_scale},{params.rope_scaling_type}",
        f"yarn={params.yarn_ext_factor},{params.yarn_attn_factor},{params.yarn_beta_fast},"
        f"{params.yarn_beta_slow},{params.yarn_orig_ctx}",
        repr(rope),
        hashlib.sha256(template.encode()).hexdigest(),
        json.dumps(dict(options), sort_keys=True, default=repr),
    ]
    if options.get("lora_path"):
        parts.append(_file_sha256(Path(options["lora_path"])))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def capture(llama: Any, print_: str, max_bytes: int, prompt_tokens: int) -> KVState | None:
    """The context's sequence 0 as a state: its first `prompt_tokens` (the prompt's: a
    reply's tokens were decoded one at a time, see `reusable`), cut to the longest prefix
    under `max_bytes`. The context is cut the same way, so it still matches its token
    ids. None when not even one token fits."""
    import llama_cpp

    ctx = llama._ctx.ctx
    cut(llama, min(llama.n_tokens, prompt_tokens))
    n = llama.n_tokens
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    while n > 0 and size > max_bytes:
        # a state's bytes are per token plus a fixed part: a shorter one costs a little
        # more a token, so the cut may need a second step
        cut(llama, n := min(n - 1, int(n * max_bytes / size)))
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    if n <= 0:
        return None
    buffer = bytearray(size)  # 91 MB at 4,000 tokens: written once, never copied
    written = llama_cpp.llama_state_seq_get_data(
        ctx, (ctypes.c_uint8 * size).from_buffer(buffer), size, 0
    )
    data = memoryview(buffer)[:written]
    tokens = tuple(int(t) for t in llama.input_ids[:n])
    return KVState(tokens, data, checksum(tokens, data), print_, time.time())


def cut(llama: Any, n: int) -> None:
    """Keep the context's first `n` tokens (the logits at hand are no longer the last
    token's: llama-cpp-python must decode one again before it samples)."""
    if n < llama.n_tokens:
        llama._ctx.kv_cache_seq_rm(0, max(n, 0), -1)
        llama.n_tokens = max(n, 0)
        llama._requires_eval = True


def empty(llama: Any) -> None:
    """Forget every cell of the context, without writing zeros over its buffers (a
    memset of the whole window, 189 MB for 8,192 tokens, on every restore)."""
    import llama_cpp

    if llama._ctx.memory is not None:
        llama_cpp.llama_memory_clear(llama._ctx.memory, False)


def reusable(common: int, n: int, batch: int) -> int:
    """How many of a prompt's `n` tokens to take from a context sharing its first
    `common`, so that every token is decoded in a batch of the same kind as in a cold
    prefill of the whole prompt (in batches of `batch` from its start). llama.cpp decodes a
    batch of one token another way: its KV and logits differ in the last bits from a
    batch's, and a greedy reply can change. So the rest is at least two tokens, or, when
    the cold prefill's last batch is the last token alone, a number of tokens whose last
    batch is too."""
    if (n - 1) % batch == 0:
        rest = n - min(common, n - 1)
        return max(n - (rest + (1 - rest) % batch), 0)
    reuse = min(common, n - 2)
    if (n - reuse) % batch == 1:
        reuse -= 1
    return max(reuse, 0)


def restore(llama: Any, state: KVState, print_: str) -> bool:
    """Set `state` into the context (emptied first), its token ids beside it, so the next
    generation reuses its common prefix. False, the context left empty, when the state is
    not valid here (another fingerprint, too many tokens, corrupt bytes, refused)."""
    import llama_cpp

    llama.reset()
    empty(llama)
    if (
        state.fingerprint != print_
        # llama.cpp may pad the window past what was asked: the token array is the bound
        or len(state.tokens) >= min(llama.n_ctx(), len(llama.input_ids))
        or checksum(state.tokens, state.data) != state.crc
    ):
        return False
    size = len(state.data)
    view = memoryview(state.data)
    # llama.cpp only reads it: a writable buffer is handed over as it is, not copied
    buffer = ctypes.c_uint8 * size
    array_ = buffer.from_buffer_copy(view) if view.readonly else buffer.from_buffer(view)
    if llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, array_, size, 0) == 0:
        empty(llama)
        return False
    n = len(state.tokens)
    llama.input_ids[:n] = state.tokens
    llama.n_tokens = n
    llama._requires_eval = True  # no logits came with the state
    return True


def common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
