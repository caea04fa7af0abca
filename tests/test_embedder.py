"""The embedding backends on the bundled MiniLM: the ONNX export gives the model's own
vectors (int8 close to them), is made once and reused, and keeps torch out of the process."""

import os
import subprocess
import sys
from pathlib import Path

import anyio
import numpy as np
import pytest

import tiermem
from tiermem import KVCacheConfig, ModelError
from tiermem._embedder import make_embedder
from tiermem._onnx import agreement

pytestmark = pytest.mark.real_models

TEXTS = [
    "Where did Ana stay in Lisbon?",
    "x",
    "Caroline: I went to the LGBTQ support group yesterday and it was so powerful.",
    "Ünïcödé, 日本語のテキスト, emoji 🎉 and a NUL \x00 byte",
    "def f(x):\n    return {k: v for k, v in x.items() if v}",
    "word " * 600,  # past the model's 256 tokens: truncated, as sentence-transformers does
    "   ",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of exports of this module's own, so the export itself runs here."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The vectors of the torch backend."""
    return anyio.run(tiermem.SentenceTransformerEmbedder().embed, TEXTS)


@pytest.mark.parametrize(("backend", "floor"), [("onnx", 0.9999), ("onnx-int8", 0.97)])
async def test_onnx_vectors_agree_with_the_models_own(
    backend: str, floor: float, cache_dir: Path, reference: np.ndarray
) -> None:
    config = KVCacheConfig(embedding_backend=backend, model_cache_dir=str(cache_dir))
    embedder = make_embedder(config)
    assert isinstance(embedder, tiermem.OnnxEmbedder)
    alone = await embedder.embed(TEXTS[:1])
    together = await embedder.embed(TEXTS)  # padded to the longest in the batch
    assert together.shape == (len(TEXTS), 384) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # int8 quantizes activations by the batch's range: a text's vector moves a little
    # with the texts beside it
    assert float(alone[0] @ together[0]) >= floor
    cosines = (together * reference).sum(axis=1)
    assert cosines.min() >= floor, cosines
    measured = agreement(embedder.graph)  # recorded by the export, on its own sentences
    assert measured["int8"] == (backend == "onnx-int8")
    assert measured["cosine_min"] >= floor


async def test_the_export_is_made_once_and_reused(cache_dir: Path) -> None:
    config = KVCacheConfig(model_cache_dir=str(cache_dir))
    first = make_embedder(config)
    await first.embed(["hello"])
    made = first.graph.stat().st_mtime_ns
    second = make_embedder(config)
    await second.embed(["hello"])
    assert second.graph == first.graph and second.graph.stat().st_mtime_ns == made
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".part")]


async def test_an_unwritable_cache_folder_is_a_model_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    embedder = make_embedder(KVCacheConfig(model_cache_dir=str(blocker / "cache")))
    with pytest.raises(ModelError, match="model_cache_dir"):
        await embedder.embed(["hello"])


def test_the_serving_process_does_not_import_torch(cache_dir: Path) -> None:
    script = (
        "import sys, anyio, tiermem\n"
        "from tiermem._embedder import make_embedder\n"
        f"e = make_embedder(tiermem.KVCacheConfig(model_cache_dir={str(cache_dir)!r}))\n"
        "anyio.run(e.embed, ['hello'])\n"
        "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.split() == ["False", "False"]
