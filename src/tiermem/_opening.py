"""Opening a manager: which models it gets (injected, or the bundled ones), the KV shape
and context window they imply, and the store. Everything fixed at `open()` lives here."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
import psutil

from ._config import KV_CACHE_TYPE_BYTES, KVCacheConfig, KVShape
from ._embedder import Embedder, make_embedder
from ._errors import ConfigError, ModelError
from ._llm import LlamaChat, LlamaTokenizer, resolve_gguf
from ._pool import ModelPool
from ._store import PostgresStore, SQLiteStore, Store, is_url
from ._summarizer import LLMSummarizer, Summarizer, TokenCounter

log = logging.getLogger("tiermem")

# Used only when neither a GGUF nor `kv_shape` says otherwise: a typical 8B model
# (32 layers, 8 KV heads of 128, f16), so byte figures stay realistic.
FALLBACK_KV_SHAPE = KVShape(n_layers=32, n_kv_heads=8, head_dim=128, dtype_bytes=2)


class HeuristicTokenCounter:
    """About four bytes of UTF-8 per token; used when no GGUF vocabulary is available."""

    def count(self, texts: list[str]) -> list[int]:
        return [max(1, math.ceil(len(t.encode("utf-8", "surrogatepass")) / 4)) for t in texts]

    def truncate(self, text_: str, max_tokens: int) -> str:
        return text_[: max_tokens * 4]


# settings read once, at open(): a manager refuses to change them
FIXED_AT_OPEN = (
    "embedding_model",
    "embedding_batch_size",
    "embedding_backend",
    "embedding_threads",
    "model_cache_dir",
    "llm_model_path",
    "llm_threads",
    "llm_idle_unload_seconds",
    "summarizer_nice",
    "summarizer_enabled",
    "summarizer_context_tokens",
    "summary_timeout_seconds",
    "context_window_tokens",
    "kv_shape",
    "kv_cache_type",
    "model_memory_limit_bytes",
    "busy_timeout_ms",
    "read_only",
    "check_on_open",
    "kv_state_dir",
    "database_url",
    "database_pool_size",
)


def check_changeable(old: KVCacheConfig, new: KVCacheConfig) -> None:
    """Refuse a live change of a setting read only at open."""
    fixed = [n for n in FIXED_AT_OPEN if getattr(new, n) != getattr(old, n)]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot change while the manager is open")


@dataclass(slots=True)
class Parts:
    """What a manager is made of."""

    store: Store
    config: KVCacheConfig
    embedder: Embedder
    summarizer: Summarizer | None
    tokens: TokenCounter
    kv_shape: KVShape
    context_tokens: int | None
    pool: ModelPool
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    # what to free last, after the store and the pool (the GGUF's vocabulary)
    closers: list[Callable[[], None]] = field(default_factory=list)
    # where chat models keep their KV states on disk (None: a database in memory, or in
    # PostgreSQL without `kv_state_dir`: states stay in this process's RAM)
    kv_state_dir: Path | None = None
    # chat models whose kept states the manager looks after (`attach_chat`)
    chats: list[LlamaChat] = field(default_factory=list)

    def stop_models(self) -> None:
        """Stop the bundled models' calls in progress (at shutdown)."""
        for stop in self.stoppers:
            stop()

    def max_cache_bytes(self, config: KVCacheConfig) -> int:
        """The KV bytes the memory threshold is measured against: configured, or the
        model's window, or (no model shape known) 25% of available RAM in [256 MB, 8 GB]."""
        if config.max_cache_bytes:
            return config.max_cache_bytes
        if self.context_tokens:
            return self.context_tokens * self.kv_shape.bytes_per_token
        available = psutil.virtual_memory().available // 4
        return int(min(max(available, 256 * 2**20), 8 * 2**30))


async def open_parts(
    path: str | Path,
    config: KVCacheConfig,
    embedder: Embedder | None,
    summarizer: Summarizer | None,
    tokenizer: TokenCounter | None,
    clock: Callable[[], float],
) -> Parts:
    """The models (lazily loaded, through one pool) and the opened store. The GGUF is read
    now (vocabulary and shape), so a missing or corrupt model fails here, not at a turn."""
    pool = ModelPool(config.model_memory_limit_bytes)
    if embedder is None:
        embedder = make_embedder(config, pool)
    vocab: LlamaTokenizer | None = None
    needs_llm = summarizer is None and config.summarizer_enabled
    if tokenizer is None or needs_llm or config.kv_shape is None:
        try:
            gguf = await anyio.to_thread.run_sync(resolve_gguf, config.llm_model_path)
            vocab = await anyio.to_thread.run_sync(LlamaTokenizer, gguf)
        except ModelError as exc:
            if needs_llm or config.llm_model_path:
                raise
            log.warning("no GGUF model could be read (%s): falling back", exc)
    dtype = KV_CACHE_TYPE_BYTES[config.kv_cache_type]
    shape = config.kv_shape or (vocab.kv_shape(dtype) if vocab else None)
    if shape is None:
        log.warning(
            "no kv_shape configured and no GGUF to read one from: KV bytes are estimated "
            "for a typical 8B model (%d bytes a token)",
            FALLBACK_KV_SHAPE.bytes_per_token,
        )
        shape = FALLBACK_KV_SHAPE
    stoppers: list[Callable[[], None]] = []
    if needs_llm:
        assert vocab is not None
        threads = config.llm_threads or 1
        chat = LlamaChat(
            vocab.path,
            config.summarizer_context_tokens,
            threads,
            pool,
            shape.bytes_per_token,
            llama_options={"n_threads_batch": threads},
            idle_seconds=config.llm_idle_unload_seconds,
            nice=config.summarizer_nice or None,
        )
        stoppers.append(chat.stop)
        summarizer = LLMSummarizer(chat, vocab, config.summary_timeout_seconds)
    tokens: TokenCounter = tokenizer or vocab or HeuristicTokenCounter()
    if tokenizer is None and vocab is None:
        log.warning("no tokenizer: tokens are estimated at four bytes each")
    context = config.context_window_tokens or (vocab.context_length() if vocab else None)
    store = await open_store(path, embedder.model_name, embedder.dimensions, config, clock)
    parts = Parts(store, config, embedder, summarizer, tokens, shape, context, pool, stoppers)
    if vocab is not None:
        parts.closers.append(vocab.close)
    if config.kv_state_dir:
        parts.kv_state_dir = Path(config.kv_state_dir)
    elif str(path) != ":memory:" and not str(path).startswith("file:") and not is_url(path):
        parts.kv_state_dir = Path(f"{path}.kvstates")
    return parts


async def open_store(
    path: str | Path,
    embedding_model: str,
    dimensions: int,
    config: KVCacheConfig,
    clock: Callable[[], float],
) -> Store:
    """The store at `path`: a PostgreSQL database for a `postgresql://` URL, else a SQLite
    file."""
    if is_url(path):
        return await PostgresStore.open(
            str(path),
            embedding_model,
            dimensions,
            pool_size=config.database_pool_size,
            read_only=config.read_only,
            clock=clock,
        )
    return await SQLiteStore.open(
        path,
        embedding_model,
        dimensions,
        config.busy_timeout_ms,
        read_only=config.read_only,
        check=config.check_on_open,
        clock=clock,
    )
