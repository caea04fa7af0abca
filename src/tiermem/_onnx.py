"""ONNX export of a sentence-transformers model, cached on disk, and its runtime encoder.

The export runs once per model (and per variant: float, or int8 dynamic quantization) in a
child process, so the serving process never imports torch: `python -m tiermem._onnx SRC
DEST [--int8]` traces the whole sentence-transformers pipeline (transformer, pooling,
dense layers, normalisation) into one graph, then checks its vectors against the original
model's on fixed sentences. A float graph that disagrees (cosine < 0.999) is refused; the
int8 graph's agreement is recorded beside it. The cache is keyed by the model files'
contents, so a changed model is exported again; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import ModelError

FORMAT = 1  # bump when the exported graph changes shape: older files are not reused
# a run of texts embedded together: rows x width^2 at most (16 texts of 256 tokens)
ATTENTION_CELLS = 16 * 256 * 256
FLOAT_AGREEMENT = 0.999  # cosine to the original model below which an export is refused
CHECK_SENTENCES = [
    "Hi!",
    "Caroline: I went to the LGBTQ support group yesterday and it was so powerful.",
    "Where did Ana stay in Lisbon? She booked a flat near the river in May 2023.",
    "def retry(n): return [attempt() for _ in range(n)]  # then back off",
    "Le café était fermé, alors nous sommes allés au marché de Noël à Strasbourg.",
    "The invoice #4521 for $1,299.00 is due on 2024-03-15; please confirm receipt.",
    "I've been painting sunsets with my kids every weekend since we moved to the lake.",
    "ok " * 200,
]


def default_cache_dir() -> Path:
    """Where exported models live unless configured: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tiermem"


def cached_export(model_dir: Path, cache_dir: Path, int8: bool, name: str) -> Path:
    """Blocking: the model's exported graph in `cache_dir`, exported now if it is not
    there (several processes may race; each writes its own file and renames it)."""
    digest = _fingerprint(model_dir)
    target = cache_dir / f"{name}-{digest}{'-int8' if int8 else ''}.onnx"
    if target.is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache folder {cache_dir} ({exc}): set model_cache_dir "
            "to a writable folder, or embedding_backend='sentence-transformers'"
        ) from exc
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.part")  # this export's
    command = [sys.executable, "-m", "tiermem._onnx", str(model_dir), str(partial)]
    try:
        done = subprocess.run(
            [*command, *(["--int8"] if int8 else [])],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if done.returncode != 0:
            if target.is_file():  # another process's export of the same model won
                return target
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ModelError(f"exporting {model_dir} to ONNX failed: {' / '.join(tail)}")
        os.replace(partial.with_suffix(".json"), target.with_suffix(".json"))
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ModelError(f"exporting {model_dir} to ONNX failed: {exc}") from exc
    finally:
        float_graph = partial.with_name(partial.name + ".float")  # of an int8 export
        for leftover in (partial, partial.with_suffix(".json"), float_graph):
            leftover.unlink(missing_ok=True)
    return target


def agreement(graph: Path) -> dict[str, Any]:
    """What the export measured: cosine of the graph's vectors to the original model's."""
    try:
        result: dict[str, Any] = json.loads(graph.with_suffix(".json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return result


class OnnxEncoder:
    """A model's tokenizer and exported graph: texts in, normalised float32 vectors out.
    `threads` is onnxruntime's; None: two (a turn's batch of two texts, its message and
    query, ~25% faster than on one, a lone text alike; int8 MiniLM, 2 cores), or one on a
    one-core machine."""

    def __init__(self, model_dir: Path, graph: Path, threads: int | None) -> None:
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ModelError(
                f"the ONNX embedding backend needs onnxruntime and tokenizers: {exc}"
            ) from exc
        try:
            self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
            options.inter_op_num_threads = 1
            # no arena: it kept ~100 MB of a batch's activations for good (same speed)
            options.enable_cpu_mem_arena = False
            # idle threads sleep instead of spinning: the event loop and the store share
            # the cores with them
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = onnxruntime.InferenceSession(
                str(graph), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load the ONNX model {graph}: {exc}") from exc
        self._tokenizer.enable_truncation(_max_length(model_dir))
        self._tokenizer.no_padding()
        self._inputs = {i.name for i in self._session.get_inputs()}

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """The texts' vectors, run in runs of similar length: less padding, and a run's
        attention scores (rows x heads x width^2 floats) kept under `ATTENTION_CELLS`, so
        a batch of long texts does not take hundreds of MB at once."""
        try:
            encodings = self._tokenizer.encode_batch(list(texts))
        except Exception as exc:  # tokenizers raises its own untyped errors
            raise ModelError(f"tokenizing for the embedding failed: {exc}") from exc
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        runs = []
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order):
                width = len(encodings[order[end]].ids)
                if (end - start + 1) * width * width > ATTENTION_CELLS:
                    break
                end += 1
            runs.append(self._run([encodings[i] for i in order[start:end]]))
            start = end
        vectors = np.concatenate(runs)
        out = np.empty_like(vectors)
        out[order] = vectors  # back in the texts' order
        return out

    def _run(self, encodings: list[Any]) -> npt.NDArray[np.float32]:
        """One run, padded to its longest text."""
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        try:
            (vectors,) = self._session.run(None, feed)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"embedding failed: {exc}") from exc
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _max_length(model_dir: Path) -> int:
    """The model's token limit, as sentence-transformers truncates."""
    try:
        config = json.loads((model_dir / "sentence_bert_config.json").read_text("utf-8"))
        return int(config["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def _fingerprint(model_dir: Path) -> str:
    """The model files' contents (and the export format), hashed."""
    digest = hashlib.sha256(f"tiermem-onnx-{FORMAT}".encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        if path.suffix in (".md", ".gitattributes") or path.name.startswith("."):
            continue
        digest.update(str(path.relative_to(model_dir)).encode())
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _export(model_dir: Path, target: Path, int8: bool) -> None:
    """In the child process: trace, save, quantize if asked, check against the original."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True).eval()

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            out = self.model({"input_ids": input_ids, "attention_mask": attention_mask})
            return torch.nn.functional.normalize(out["sentence_embedding"], dim=1)

    sample = model.tokenizer(["a sample", "another, longer sample"], padding=True)
    args = tuple(torch.tensor(sample[k]) for k in ("input_ids", "attention_mask"))
    graph = target.with_name(target.name + ".float") if int8 else target
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    with torch.no_grad():
        torch.onnx.export(
            Pipeline(),
            args,
            str(graph),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(graph), str(target), weight_type=QuantType.QInt8, per_channel=True)
        graph.unlink()
    reference = model.encode(CHECK_SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    vectors = OnnxEncoder(model_dir, target, threads=1).encode(CHECK_SENTENCES)
    cosines = (vectors * reference).sum(axis=1)
    measured = {
        "int8": int8,
        "cosine_min": float(cosines.min()),
        "cosine_mean": float(cosines.mean()),
    }
    if not int8 and measured["cosine_min"] < FLOAT_AGREEMENT:
        raise SystemExit(f"the exported graph disagrees with the model: {measured}")
    target.with_suffix(".json").write_text(json.dumps(measured), "utf-8")


if __name__ == "__main__":
    _export(Path(sys.argv[1]), Path(sys.argv[2]), "--int8" in sys.argv[3:])
