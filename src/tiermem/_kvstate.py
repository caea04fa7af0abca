"""Per-session llama.cpp KV state, restored instead of re-prefilled (the RAM tier).

After a reply, the context's sequence state (`llama_state_seq_get_data`: the KV cells of
the prompt so far and the reply) is copied out with the token ids it holds. On the
session's next call the state is set back into the context and llama-cpp-python's own
prefix match keeps the longest common token prefix with the new prompt: only the rest is
prefilled. Greedy output is the same as a cold prefill's.

A state is valid only where it was made: the same GGUF (its sha256), llama.cpp build, KV
types, flash attention, rope/yarn parameters and chat template (the fingerprint), in a
context with room for its tokens; it carries a crc32 of its bytes. Anything that does not
match is a cold prefill, never a load: llama.cpp loads a state with another rope base or
flipped bytes without complaint, and its output is wrong.

The tier is an LRU of states under exact byte budgets (a state costs its bytes: 23,052 a
token + 744 for the bundled model): per session, in total, and a number of states. A
session over its own budget keeps the longest prefix that fits. Everything here runs in
the model's worker thread, one call at a time (the caller's limiter).
"""

from __future__ import annotations

import ctypes
import hashlib
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

StateKey = tuple[str, str]  # (namespace, session)

# the model file is hashed once per path, size and modification time, this much at a time
_HASH_CHUNK = 1 << 20
_file_hashes: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True, slots=True)
class KVState:
    tokens: tuple[int, ...]
    data: bytes
    crc: int
    fingerprint: str

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class KVStateStats:
    """What the tier did: states and bytes held, and per call whether a state was found
    (hit: all of it reused; partial: a prefix), tokens reused and prefilled."""

    states: int = 0
    bytes: int = 0
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    rejected: int = 0
    tokens_reused: int = 0
    tokens_prefilled: int = 0
    evictions: int = 0
    restores: int = 0


@dataclass(slots=True)
class KVStateCache:
    """The RAM tier: states by (namespace, session), least recently used first out."""

    max_bytes_per_session: int
    max_bytes_total: int
    max_sessions: int
    stats: KVStateStats = field(default_factory=KVStateStats)
    _states: OrderedDict[StateKey, KVState] = field(default_factory=OrderedDict)

    def get(self, key: StateKey) -> KVState | None:
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
        return state

    def put(self, key: StateKey, state: KVState) -> None:
        self.drop(key)
        self._states[key] = state
        self.stats.bytes += state.nbytes
        while len(self._states) > 1 and (
            self.stats.bytes > self.max_bytes_total or len(self._states) > self.max_sessions
        ):
            oldest = next(iter(self._states))
            self.drop(oldest)
            self.stats.evictions += 1
        self.stats.states = len(self._states)

    def drop(self, key: StateKey) -> None:
        state = self._states.pop(key, None)
        if state is not None:
            self.stats.bytes -= state.nbytes
        self.stats.states = len(self._states)


def fingerprint(llama: Any, path: Path, template: str) -> str:
    """What makes a state valid: the model file, the llama.cpp build, the KV layout and the
    positional encoding of the context, and the chat template. Blocking (hashes the file
    once per path, size and modification time)."""
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
    ]
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


def capture(llama: Any, print_: str, max_bytes: int) -> KVState | None:
    """The context's sequence 0 as a state, cut to the longest prefix under `max_bytes`
    (the context is cut too, so it still matches its token ids); None when not even one
    token fits."""
    import llama_cpp

    ctx = llama._ctx.ctx
    n = llama.n_tokens
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    if n and size > max_bytes:
        per_token = size / n  # an upper bound: the fixed part is spread over the tokens
        keep = int(max_bytes // per_token)
        if keep <= 0:
            return None
        llama._ctx.kv_cache_seq_rm(0, keep, -1)
        llama.n_tokens = n = keep
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    if n == 0:
        return None
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
    data = bytes(buffer)[:written]
    return KVState(tuple(int(t) for t in llama.input_ids[:n]), data, zlib.crc32(data), print_)


def restore(llama: Any, state: KVState, print_: str) -> bool:
    """Set `state` into the context (emptied first), its token ids beside it, so the next
    generation reuses its common prefix. False, the context left empty, when the state is
    not valid here (another fingerprint, too many tokens, corrupt bytes, refused)."""
    import llama_cpp

    llama.reset()
    llama._ctx.kv_cache_clear()
    if (
        state.fingerprint != print_
        or len(state.tokens) >= llama.n_ctx()
        or zlib.crc32(state.data) != state.crc
    ):
        return False
    buffer = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
    if llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buffer, len(state.data), 0) == 0:
        llama._ctx.kv_cache_clear()
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
