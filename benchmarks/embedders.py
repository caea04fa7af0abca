"""The embedding backends side by side: speed, memory, and agreement with the model's own
vectors, on the synthetic fixture's messages (fixtures/retrieval_eval.json).

Each backend runs in a process of its own (so its RSS is its own): it loads the bundled
MiniLM through tiermem's embedder, embeds every message one at a time (one text per call,
as a turn does) and then all of them in batches (as `ingest` does), and saves the vectors.
The table gives per-text latency p50 / p95, batched texts per second, the process's peak
RSS and the cosine of each vector to the torch backend's (sentence-transformers: the
model's own). The retrieval evaluations' recall with each backend comes from
`retrieval_eval.py --embedding-backend B` (README, *Embedding backends*).

Run: .venv/bin/python benchmarks/embedders.py [--texts 600]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import pct, write_results

BACKENDS = ["sentence-transformers", "onnx", "onnx-int8"]
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "retrieval_eval.json"


def texts(n: int) -> list[str]:
    fixture = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return [m["content"] for c in fixture["conversations"] for m in c["messages"]][:n]


async def worker(backend: str, n: int, out: Path) -> dict[str, Any]:
    import tiermem
    from tiermem._embedder import make_embedder

    embedder = make_embedder(tiermem.KVCacheConfig(embedding_backend=backend))
    corpus = texts(n)
    started = time.perf_counter()
    await embedder.embed(["warm up"])
    load_s = time.perf_counter() - started
    one = []
    for text in corpus:
        started = time.perf_counter()
        await embedder.embed([text])
        one.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    vectors = await embedder.embed(corpus)
    batched_s = time.perf_counter() - started
    np.save(out, vectors)
    return {
        "load_s": load_s,
        "one_p50_ms": pct(one, 0.5),
        "one_p95_ms": pct(one, 0.95),
        "batched_per_s": len(corpus) / batched_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_imported": "torch" in sys.modules,
    }


def main(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for backend in BACKENDS:
            out = Path(folder) / f"{backend}.npy"
            command = [sys.executable, __file__, "--worker", backend, str(args.texts), str(out)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
        reference = np.load(Path(folder) / "sentence-transformers.npy")
        for backend in BACKENDS:
            cosines = (np.load(Path(folder) / f"{backend}.npy") * reference).sum(axis=1)
            results[backend] |= {
                "cosine_min": float(cosines.min()),
                "cosine_mean": float(cosines.mean()),
            }
    print(f"{args.texts} texts of the synthetic fixture, one process per backend\n")
    print(
        f"{'backend':<24}{'one text p50':>14}{'p95':>9}{'batched/s':>11}{'peak RSS':>10}"
        f"{'cos min':>9}{'cos mean':>10}{'torch':>7}"
    )
    for backend, r in results.items():
        print(
            f"{backend:<24}{r['one_p50_ms']:>11.2f} ms{r['one_p95_ms']:>6.2f} ms"
            f"{r['batched_per_s']:>11.0f}{r['peak_rss_mb']:>7.0f} MB"
            f"{r['cosine_min']:>9.4f}{r['cosine_mean']:>10.4f}{r['torch_imported']!s:>7}"
        )
    write_results("embedders", results)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        import anyio

        backend, n, out = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
        print(json.dumps(anyio.run(worker, backend, n, out)))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=600)
    main(parser.parse_args())
