"""Configuration: one frozen, validated pydantic model with every default in one place.

`KVCacheConfig()` is pure defaults. `KVCacheConfig.from_env()` reads `TIERMEM_<FIELD>`
variables and `KVCacheConfig.from_toml(path)` a TOML file (environment wins over the file).
Nested values (snapshot strategy, scoring weights, KV shape) are JSON in the environment.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._errors import ConfigError

log = logging.getLogger("tiermem")
ENV_PREFIX = "TIERMEM_"


def is_url(target: object) -> bool:
    """Whether `target` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


class _Model(BaseModel):
    """Frozen, strict about unknown keys, and failing with `ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:  # frozen: change a copy (`replace`) instead
            raise ConfigError(_describe(exc)) from exc


class NoSnapshots(_Model):
    """Never snapshot preserved entries."""

    kind: Literal["none"] = "none"


class _KeptSnapshots(_Model):
    """A strategy that takes snapshots: maintenance keeps `max_snapshots` per session.

    The seed's `interval_conversations` never had an effect here (snapshots are taken at
    clears): it is accepted from old configs, said, and dropped."""

    max_snapshots: int = Field(default=4, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_interval(cls, data: Any) -> Any:
        if isinstance(data, dict) and "interval_conversations" in data:
            log.warning("snapshot_strategy.interval_conversations has no effect: ignored")
            data = {k: v for k, v in data.items() if k != "interval_conversations"}
        return data


class FullSnapshots(_KeptSnapshots):
    """Snapshot the preserved entries at every clear."""

    kind: Literal["full"] = "full"


class IncrementalSnapshots(_KeptSnapshots):
    """Snapshot only at conversation-limit clears."""

    kind: Literal["incremental"] = "incremental"


class AdaptiveSnapshots(_KeptSnapshots):
    """Snapshot at every clear, but only entries at or above `min_importance_threshold`."""

    kind: Literal["adaptive"] = "adaptive"
    min_importance_threshold: float = Field(default=0.7, ge=0.0, le=1.0)


SnapshotStrategy = Annotated[
    NoSnapshots | FullSnapshots | IncrementalSnapshots | AdaptiveSnapshots,
    Field(discriminator="kind"),
]


class ScoringWeights(_Model):
    """Weights of the importance score's parts and the engagement dynamics."""

    recency: float = Field(default=0.1, ge=0.0)
    access: float = Field(default=0.025, ge=0.0)
    content: float = Field(default=0.75, ge=0.0)
    size: float = Field(default=0.025, ge=0.0)
    engagement: float = Field(default=0.1, ge=0.0)
    recency_half_life_messages: float = Field(default=12.0, gt=0.0)
    engagement_boost: float = Field(default=0.5, ge=0.0, le=1.0)
    engagement_decay: float = Field(default=0.9, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_weight(self) -> ScoringWeights:
        if self.recency + self.access + self.content + self.size + self.engagement <= 0:
            raise ValueError("at least one scoring weight must be positive")
        return self


class KVShape(_Model):
    """The attention shape that sizes the KV cache: bytes per token = 2*L*H_kv*D*dtype."""

    n_layers: int = Field(ge=1)
    n_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    dtype_bytes: float = Field(default=2.0, gt=0.0)

    @property
    def bytes_per_token(self) -> int:
        return int(2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes)


# bytes per cached element of each llama.cpp KV cache type (q8_0: 34 bytes per 32 values,
# q4_0: 18 per 32)
KV_CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class KVCacheConfig(_Model):
    """Everything tiermem can be told; the defaults port the seed design."""

    enabled: bool = True
    # clear decision
    clear_after_conversations: int = Field(default=16, ge=1)
    memory_threshold_percent: float = Field(default=0.6, gt=0.0, le=1.0)
    max_cache_bytes: int | None = Field(default=None, ge=1)
    kv_shape: KVShape | None = None
    kv_cache_type: Literal["f32", "f16", "q8_0", "q4_0"] = "f16"
    context_window_tokens: int | None = Field(default=None, ge=16)
    context_overflow: Literal["clear_with_summary", "sliding_window"] = "clear_with_summary"
    # preservation and snapshots
    min_importance_to_preserve: float = Field(default=0.7, ge=0.0, le=1.0)
    preserve_system_prompts: bool = True
    preserve_code_entries: bool = True
    snapshot_strategy: SnapshotStrategy = Field(default_factory=IncrementalSnapshots)
    scoring: ScoringWeights = Field(default_factory=ScoringWeights)
    # retrieval
    retrieval_enabled: bool = True
    retrieve_always: bool = False
    retrieval_mode: Literal["hybrid", "escalating"] = "hybrid"
    retrieval_limit: int = Field(default=20, ge=1, le=1000)
    # the bit index proposes 4 candidates per one wanted, at most 4096 (sqlite-vec's k)
    retrieval_candidates: int = Field(default=50, ge=1, le=1024)
    vector_weight: float = Field(default=0.7, ge=0.0, le=1.0)
    retrieval_neighbour_weight: float = Field(default=0.3, ge=0.0, le=1.0)
    retrieval_query_cues: bool = True
    retrieval_entity_hop: bool = True
    # bridges and summaries
    bridge_enabled: bool = True
    summarizer_enabled: bool = True
    summarizer_context_tokens: int = Field(default=2048, ge=256)
    summary_timeout_seconds: float = Field(default=180.0, gt=0.0)
    summary_mode: Literal["background", "inline"] = "background"
    summary_close_wait_seconds: float = Field(default=30.0, ge=0.0)
    # models
    generate_cache_embeddings: bool = True
    embedding_model: str | None = None
    embedding_batch_size: int = Field(default=64, ge=1)
    # how the embedding model runs: its ONNX export by onnxruntime (made on first use and
    # cached; no torch in the process), with int8 weights ("onnx-int8": ~3x faster than
    # torch, vectors ~0.99 cosine to the model's, recall as with them; see README) or
    # float ones ("onnx": the model's own vectors, ~1.5x faster), or torch itself
    # ("sentence-transformers")
    embedding_backend: Literal["onnx-int8", "onnx", "sentence-transformers"] = "onnx-int8"
    # onnxruntime's threads (None: two, or one on a one-core machine)
    embedding_threads: int | None = Field(default=None, ge=1, le=256)
    # the ONNX exports' folder (default: $XDG_CACHE_HOME/tiermem or ~/.cache/tiermem)
    model_cache_dir: str | None = None
    llm_model_path: str | None = None
    # the chat model's threads (llama.cpp's default when None); the summarizer's: 1 when
    # None, for prompts too, at `summarizer_nice` (0: as the host's threads), so a
    # background summary takes the CPU that turns leave instead of slowing them
    llm_threads: int | None = Field(default=None, ge=1)
    summarizer_nice: int = Field(default=10, ge=0, le=19)
    # a GGUF no call has used for this long is unloaded (its RAM back between bursts of
    # summaries or chats; it loads again on its next call); None keeps it loaded
    llm_idle_unload_seconds: float | None = Field(default=120.0, gt=0.0)
    model_memory_limit_bytes: int | None = Field(default=None, ge=1)
    # sessions and storage
    max_bytes_per_session: int | None = Field(default=None, ge=1)
    max_bytes_total: int | None = Field(default=None, ge=1)
    max_sessions: int | None = Field(default=None, ge=1)
    # entries in one session's active cache; over it, a clear trims it (`max_cache_entries`
    # is the seed's name for it, still accepted)
    max_entries_per_session: int = Field(default=1000, ge=1)
    idle_eviction_seconds: float = Field(default=3600.0, gt=0.0)
    # kept KV states of a chat model (`open_chat_model`): their disk tier's folder (default:
    # beside the database, "<db>.kvstates") and its byte budget (0: no disk tier)
    kv_state_dir: str | None = None
    kv_state_disk_bytes: int = Field(default=4 * 2**30, ge=0)
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    # a message's metadata, as JSON
    max_metadata_bytes: int = Field(default=64 * 1024, ge=2)
    # aclose() waits this long for calls in flight before it cancels them
    close_wait_seconds: float = Field(default=10.0, ge=0.0)
    busy_timeout_ms: int = Field(default=10_000, ge=0)
    # the database when `KVCacheManager.open` names none (TIERMEM_DATABASE_URL): a SQLite
    # file, or a PostgreSQL URL ("postgresql://user@host/db"); default "tiermem.db"
    database_url: str | None = None
    # a PostgreSQL store's connections at most (one holds the sessions' advisory locks)
    database_pool_size: int = Field(default=10, ge=2, le=1000)
    # reads only (a file this process may not write is opened so anyway)
    read_only: bool = False
    # SQLite's quick_check at open: a read of the whole file, slow on a big one (SQLite only)
    check_on_open: bool = False

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, data: Any) -> Any:
        for alias, name in (
            ("max_cache_entries", "max_entries_per_session"),
            ("memory_threshold_fraction", "memory_threshold_percent"),
        ):
            if isinstance(data, dict) and alias in data:
                data = dict(data)
                data.setdefault(name, data.pop(alias))
        return data

    @property
    def memory_threshold_fraction(self) -> float:
        """`memory_threshold_percent` says what it is: a fraction of the bytes (0.6)."""
        return self.memory_threshold_percent

    @property
    def max_cache_entries(self) -> int:
        """The seed's name of `max_entries_per_session`."""
        return self.max_entries_per_session

    @model_validator(mode="after")
    def _consistent(self) -> KVCacheConfig:
        per, total = self.max_bytes_per_session, self.max_bytes_total
        if per is not None and total is not None and per > total:
            raise ValueError(
                f"max_bytes_per_session ({per}) must not exceed max_bytes_total ({total})"
            )
        return self

    @classmethod
    def build(cls, **values: Any) -> KVCacheConfig:
        """Validate `values` into a config, raising `ConfigError` with every problem listed."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from exc

    def replace(self, **changes: Any) -> KVCacheConfig:
        """A validated copy with `changes` applied."""
        return type(self).build(**{**self.model_dump(), **changes})

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, base: Mapping[str, Any] | None = None
    ) -> KVCacheConfig:
        """Defaults (or `base`), overridden by `TIERMEM_<FIELD>` variables."""
        env = os.environ if environ is None else environ
        values = dict(base or {})
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in cls.model_fields:
                # another program's variable or a typo: said, not fatal to every command
                close = difflib.get_close_matches(name, list(cls.model_fields), n=1)
                hint = f"; did you mean {ENV_PREFIX}{close[0].upper()}?" if close else ""
                log.warning("ignoring %s: tiermem has no setting %r%s", key, name, hint)
                continue
            values[name] = _parse_env_value(raw)
        return cls.build(**values)

    @classmethod
    def from_toml(cls, path: str | Path, environ: Mapping[str, str] | None = None) -> KVCacheConfig:
        """Values from a TOML file (top level or a `[tiermem]` table), then the environment."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        table = data.get("tiermem", data)
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [tiermem] must be a table")
        return cls.from_env(environ, base=table)


def _parse_env_value(raw: str) -> Any:
    """JSON where it parses (numbers, booleans, objects), the plain string otherwise."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid tiermem config: " + "; ".join(parts)
