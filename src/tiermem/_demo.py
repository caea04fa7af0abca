"""`tiermem demo`: replays the fixture conversation through a real manager, turn by turn."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

from ._config import KVCacheConfig
from ._manager import KVCacheManager
from ._types import Message

DEFAULT_FIXTURE = "fixtures/demo_conversation.json"


def find_fixture(path: str | None) -> Path:
    """The given fixture, or the repository's demo conversation."""
    if path:
        return Path(path)
    here = Path(DEFAULT_FIXTURE)
    if here.exists():
        return here
    return Path(__file__).resolve().parents[2] / DEFAULT_FIXTURE


def _short(text: str, width: int = 96) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def run_demo(db: str, fixture: str | None, out: TextIO, config: KVCacheConfig) -> int:
    data: dict[str, Any] = json.loads(find_fixture(fixture).read_text(encoding="utf-8"))

    def write(line: str = "") -> None:
        print(line, file=out, flush=True)

    started = time.perf_counter()
    write(f"tiermem demo: database {db}")
    async with await KVCacheManager.open(db, config) as mgr:
        models = (await mgr.status()).models
        write(
            f"models: embeddings {models['embedding']['name']} "
            f"({models['embedding']['dimensions']} dims), summarizer {models['summarizer']}, "
            f"KV {models['kv_bytes_per_token']} B/token, window {models['context_tokens']} "
            f"tokens; clear at {config.clear_after_conversations} turns or "
            f"{config.memory_threshold_percent:.0%} of {mgr.max_cache_bytes() / 2**20:.0f} MiB"
        )
        shown: dict[str, str] = {}  # the last summary printed per session
        for session in data["sessions"]:
            sid = session["session_id"]
            if await mgr.get_session_state(sid) is not None:
                await mgr.delete_session(sid)
            write(f"\n=== session {sid!r} ===")
            conversation = [Message("system", session["system"], id=f"{sid}-system")]
            raw = session["messages"]
            for turn, i in enumerate(range(0, len(raw), 2), start=1):
                conversation += [
                    Message(m["role"], m["content"], id=m["id"]) for m in raw[i : i + 2]
                ]
                t0 = time.perf_counter()
                result = await mgr.process_conversation(sid, conversation)
                ms = (time.perf_counter() - t0) * 1000
                state = result.updated_session_state
                write(
                    f"turn {turn:2d} [{ms:6.0f} ms] entries={state.entry_count:3d} "
                    f"tokens={state.token_count:5d} | user: {_short(raw[i]['content'], 60)}"
                )
                clear = result.clear_result
                if clear is not None:
                    write(
                        f"  ** CLEAR ({clear.clear_reason.value}): "
                        f"cleared {clear.entries_cleared}, "
                        f"preserved {len(clear.entries_to_keep)}, snapshot {clear.snapshot_id}"
                    )
                    for kept in clear.entries_to_keep:
                        write(
                            f"     kept [{kept.entry_type}, {kept.importance:.2f}] "
                            f"{_short(kept.text, 70)}"
                        )
                    if clear.summary is not None:
                        write(
                            f"     summary (clear #{clear.summary.clear_count}, "
                            f"{clear.summary.token_count} tokens): "
                            f"{_short(clear.summary.text, 300)}"
                        )
                    elif clear.summary_pending:
                        write("     summary: being written in the background (no waiting)")
                    elif clear.summary_error:
                        write(f"     no summary: {clear.summary_error}")
                landed = await mgr.get_summary(sid)
                if landed is not None and shown.get(sid) != landed.text:
                    shown[sid] = landed.text
                    write(
                        f"  << summary #{landed.clear_count} landed ({landed.token_count} "
                        f"tokens), used from the next turn: {_short(landed.text, 300)}"
                    )
                if result.retrieval_result and result.retrieval_result.entries:
                    r = result.retrieval_result
                    write(f"  ?? {r.bridge_message}")
                    for hit in r.entries[:3]:
                        write(
                            f"     tier {hit.source_tier} score {hit.similarity_score:.2f} "
                            f"ids {hit.message_ids}: {_short(hit.text, 70)}"
                        )
        await mgr.wait_for_summaries()
        write("\n=== questions about early facts ===")
        for q in data.get("questions", []):
            hits = await mgr.retrieve_context(q["session"], q["question"], limit=5)
            found = [h for h in hits.entries if set(h.message_ids) & set(q["evidence"])]
            write(
                f"Q [{q['session']}] {q['question']}  ({hits.search_duration_ms:.0f} ms, "
                f"evidence {'found' if found else 'MISSED'} in top 5)"
            )
            for hit in hits.entries[:3]:
                write(
                    f"   tier {hit.source_tier} score {hit.similarity_score:.2f} "
                    f"ids {hit.message_ids}: {_short(hit.text, 70)}"
                )
        stats = mgr.export_statistics()
        status = await mgr.status()
        write("\n=== statistics ===")
        write(
            f"clears {stats.total_clears}, retrievals {stats.total_retrievals}, "
            f"preserved {stats.entries_preserved}, cleared {stats.entries_cleared}, "
            f"retrieved {stats.entries_retrieved}, operations logged "
            f"{stats.operation_history_count}"
        )
        write(
            f"memory: {status.estimated_bytes / 2**20:.1f} MiB KV estimated in "
            f"{status.session_count} sessions ({status.total_entries} entries), peak "
            f"{status.peak_bytes / 2**20:.1f} MiB, process RSS {status.rss_bytes / 2**20:.0f} MiB"
        )
        for sid in [s["session_id"] for s in data["sessions"]]:
            summary = await mgr.get_summary(sid)
            if summary:
                write(
                    f"summary of {sid!r} after {summary.clear_count} clears "
                    f"({summary.message_count} messages): {_short(summary.text, 400)}"
                )
    write(f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0
