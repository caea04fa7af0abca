"""Peer worker: time mem0 (`mem0ai`) on a job, for a side-by-side with tiermem.

Run with the interpreter of a separate venv that has mem0ai, torch (CPU) and
sentence-transformers (never tiermem's venv; this file imports no tiermem):

    /work/peer-mem0/bin/python benchmarks/peer_mem0.py JOB.json OUT.json [--async]

JOB.json: {"model_path": sentence-transformers folder, "workdir": empty folder
this run may write into, "fill": [message], "turns": [message],
"questions": [{"session", "query"}], "limit": 10, optional "fill_mode":
"api"|"direct" and "threads" (torch.set_num_threads; torch's default otherwise)}
where a message is {"session", "id", "role", "content", "created_at"}.

Protocol: build mem0 (`Memory`, or `AsyncMemory` with --async, its calls awaited
one at a time) with its default local vector store (embedded Qdrant, kept under
workdir), the history SQLite under workdir, telemetry off and the huggingface
embedder on model_path; warm the embedder with one embed (load_s). Then write
`fill` in bulk (fill_s), then each turn with add(infer=False, user_id=session)
(write_ms each, ingest_s for the loop), then search each question in its session,
top `limit` with threshold 0 (search_ms each; hits = message ids, best first).
Only the add / search call is inside the timer. infer=False means no LLM: the
LLM configured is a dummy whose every call raises, so any LLM use fails the run.

Fill: "api" (default) hands each session's messages to one add() call
(mem0 still embeds and stores them one by one; a call's metadata is shared, so
the id rides in each message's `name`, stored as actor_id). "direct" bypasses
add(): one embed_batch over all texts, then vector_store.insert of the payloads
add() would have written (no history rows) -- the fastest path found.
"""

import asyncio
import hashlib
import json
import os
import resource
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

args = [a for a in sys.argv[1:] if a != "--async"]
ASYNC = "--async" in sys.argv[1:]
job = json.loads(Path(args[0]).read_text())
work = job["workdir"]
os.environ["MEM0_TELEMETRY"] = "False"  # read by mem0 at import time
os.environ["MEM0_DIR"] = os.path.join(work, "mem0home")  # ~/.mem0 otherwise
os.environ["HF_HUB_OFFLINE"] = "1"
# torch's OpenMP threads sleep instead of spinning (as tiermem's ONNX threads do): with
# spinning, a busy 2-core machine made each encode on the main thread ~500 ms, not ~15
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
t_import = time.perf_counter()
import mem0  # noqa: E402
from mem0 import AsyncMemory, Memory  # noqa: E402

import_s = time.perf_counter() - t_import
if job.get("threads"):
    import torch

    torch.set_num_threads(job["threads"])


def no_llm(*a, **k):
    raise RuntimeError("mem0 called its LLM although infer=False")


async def call(fn, *a, **k):
    r = fn(*a, **k)
    return await r if ASYNC else r


def hit_id(r):
    return (r.get("metadata") or {}).get("msg_id") or r.get("actor_id")


def by_session(messages):
    """Messages grouped by session, first-seen order (mem0 has no order to keep)."""
    groups = {}
    for m in messages:
        groups.setdefault(m["session"], []).append(m)
    return list(groups.values())


def direct_fill(mem, fill):
    vecs = mem.embedding_model.embed_batch([m["content"] for m in fill], "add")
    now = datetime.now(UTC).isoformat()
    payloads = [
        {
            "data": m["content"],
            "hash": hashlib.md5(m["content"].encode()).hexdigest(),
            "created_at": now,
            "updated_at": now,
            "text_lemmatized": m["content"],
            "user_id": m["session"],
            "role": m["role"],
            "msg_id": m["id"],
        }
        for m in fill
    ]
    for i in range(0, len(fill), 1000):
        mem.vector_store.insert(
            vectors=vecs[i : i + 1000],
            payloads=payloads[i : i + 1000],
            ids=[str(uuid.uuid4()) for _ in payloads[i : i + 1000]],
        )


DIMS = json.loads((Path(job["model_path"]) / "1_Pooling" / "config.json").read_text())[
    "word_embedding_dimension"
]


async def main():
    config = {
        "embedder": {"provider": "huggingface", "config": {"model": job["model_path"]}},
        "vector_store": {
            "provider": "qdrant",
            "config": {  # mem0's default store
                "path": os.path.join(work, "qdrant"),
                "collection_name": "peer",
                "embedding_model_dims": DIMS,
            },
        },
        "llm": {
            "provider": "openai",
            "config": {  # never used: infer=False
                "api_key": "unused",
                "openai_base_url": "http://127.0.0.1:9/v1",
            },
        },
        "history_db_path": os.path.join(work, "history.db"),
    }
    t0 = time.perf_counter()
    mem = (AsyncMemory if ASYNC else Memory).from_config(config)
    mem.llm.generate_response = no_llm
    mem.embedding_model.embed("warm up", "add")
    load_s = time.perf_counter() - t0

    fill_mode = job.get("fill_mode", "api")
    t0 = time.perf_counter()
    if fill_mode == "direct":
        direct_fill(mem, job["fill"])  # sync internals, same in both modes
    else:
        for run in by_session(job["fill"]):
            msgs = [{"role": m["role"], "content": m["content"], "name": m["id"]} for m in run]
            await call(mem.add, msgs, user_id=run[0]["session"], infer=False)
    fill_s = time.perf_counter() - t0

    write_ms = []
    t_loop = time.perf_counter()
    for m in job["turns"]:
        msg = [{"role": m["role"], "content": m["content"]}]
        t0 = time.perf_counter()
        await call(mem.add, msg, user_id=m["session"], metadata={"msg_id": m["id"]}, infer=False)
        write_ms.append((time.perf_counter() - t0) * 1000)
    ingest_s = time.perf_counter() - t_loop

    search_ms, hits = [], []
    for q in job["questions"]:
        t0 = time.perf_counter()
        res = await call(
            mem.search,
            q["query"],
            filters={"user_id": q["session"]},
            top_k=job.get("limit", 10),
            threshold=0.0,
        )
        search_ms.append((time.perf_counter() - t0) * 1000)
        hits.append([hit_id(r) for r in res["results"]])

    mem.close()
    mem.vector_store.client.close()
    return {
        "system": "mem0 AsyncMemory" if ASYNC else "mem0 Memory",
        "version": mem0.__version__,
        "write_ms": write_ms,
        "fill_s": fill_s,
        "fill_mode": fill_mode,
        "ingest_s": ingest_s,
        "search_ms": search_ms,
        "hits": hits,
        "load_s": load_s,
        "import_s": import_s,
        "threads": job.get("threads"),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


if __name__ == "__main__":
    Path(args[1]).write_text(json.dumps(asyncio.run(main())))
