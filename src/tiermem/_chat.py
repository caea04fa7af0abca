"""`tiermem chat`: talk to a GGUF model (the bundled SmolLM2 by default) whose memory
tiermem manages, with clears, summaries and retrievals printed as they happen.

Each user line is one turn: `process_conversation` gets the previous reply and the new
line, then the model sees the bridges, the retrieved messages and the active cache (its
newest entries that fit the window), and answers.
"""

from __future__ import annotations

import time
from typing import TextIO

import anyio
import anyio.to_thread

from . import _bridge as bridge
from ._config import KVCacheConfig
from ._kvdisk import KVStateDisk
from ._kvstate import KVStateCache
from ._llm import LlamaChat, resolve_gguf
from ._manager import KVCacheManager
from ._telemetry import SummaryEvent
from ._types import ActiveEntry, CacheProcessingResult, Message

SYSTEM = "You are a friendly assistant. Answer in one or two sentences."
CHAT_WINDOW = 2048
REPLY_TOKENS = 160
RETRIEVED_SHOWN = 4
# a prompt's room for what belongs to one turn only (bridges, retrieved messages)
CONTEXT_TOKENS = 384
# when the window is full, the history's start moves by this many entries at once
TRIM_BLOCK = 8
# the kept KV states' RAM when the config sets no budget
DEFAULT_STATE_BYTES = 1 << 30
DEFAULT_STATE_SESSIONS = 64


class _SummaryPrinter:
    """Telemetry that prints each background summary when it lands."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def emit(self, event: object) -> None:
        if not isinstance(event, SummaryEvent):
            return
        if event.error:
            line = f"[memory] summary failed: {event.error}"
        else:
            line = (
                f"[memory] summary updated in the background: {event.tokens} tokens, "
                f"{event.messages} new messages, {event.duration_ms / 1000:.1f} s"
            )
        print(line, file=self._out, flush=True)


def describe(result: CacheProcessingResult) -> list[str]:
    """What tiermem did in a turn, one line each."""
    lines = []
    clear = result.clear_result
    if clear is not None:
        summary = (
            "summary being written in the background"
            if clear.summary_pending
            else f"summary failed: {clear.summary_error}"
            if clear.summary_error
            else "summary updated"
        )
        lines.append(
            f"[memory] cleared {clear.entries_cleared} entries ({clear.clear_reason.value}), "
            f"kept {len(clear.entries_to_keep)}, snapshot {clear.snapshot_id}; {summary}"
        )
    retrieval = result.retrieval_result
    if retrieval is not None and retrieval.entries:
        tiers = sorted({e.source_tier for e in retrieval.entries})
        top = retrieval.entries[0]
        lines.append(
            f"[memory] retrieved {len(retrieval.entries)} from tiers {tiers} for "
            f"{', '.join(retrieval.keywords_used)!r}; best ({top.similarity_score:.2f}): "
            f"{top.text[:70]!r}"
        )
    return lines


def build_prompt(
    result: CacheProcessingResult,
    cache: list[ActiveEntry],
    window_tokens: int = CHAT_WINDOW,
    *,
    system_prompt: str = SYSTEM,
    reply_tokens: int = REPLY_TOKENS,
    user_message: str | None = None,
) -> list[dict[str, str]]:
    """The messages a chat model should see after a turn, laid out stable-first so that a
    turn extends the previous prompt and a kept KV state stays valid: the system text
    with the summary so far (it changes only when a new summary lands), the active cache's
    turns from a start that moves a block of `TRIM_BLOCK` entries at a time when the
    window is full, then what belongs to this turn only (its bridges and the retrieved
    messages, in `CONTEXT_TOKENS` at most) just before the newest user message.

    `user_message` is the turn's message: a clear in this turn may not have kept it in
    the active cache, and the model must still see the question it answers."""
    stable = [b for b in result.bridge_messages if b.startswith(bridge.PRIOR_SUMMARY)]
    system = "\n\n".join([system_prompt, *stable])
    notes = [b for b in result.bridge_messages if b not in stable]
    retrieval = result.retrieval_result
    turns = [e for e in cache if e.role in ("user", "assistant")]
    in_cache = {e.message_id for e in turns}
    if retrieval is not None:
        recalled = [e.text for e in retrieval.entries if not set(e.message_ids) & in_cache][
            :RETRIEVED_SHOWN
        ]
        if recalled:
            notes.append(
                "Earlier messages that may help:\n" + "\n".join(f"- {t}" for t in recalled)
            )
    context = "\n\n".join(notes)[: CONTEXT_TOKENS * 3]
    budget = window_tokens - reply_tokens - len(system) // 3 - CONTEXT_TOKENS
    start = len(turns)
    while start > 0 and budget - (turns[start - 1].token_count + 8) >= 0:
        start -= 1
        budget -= turns[start].token_count + 8
    if start > 0:  # trimmed: from the next block's first entry, so the start stays put
        start = min(-(-start // TRIM_BLOCK) * TRIM_BLOCK, len(turns) - 1)
    kept = [{"role": e.role, "content": e.text} for e in turns[start:]]
    if user_message is not None and kept[-1:] != [{"role": "user", "content": user_message}]:
        kept.append({"role": "user", "content": user_message})
    last_user = len(kept) - 1 if kept and kept[-1]["role"] == "user" else len(kept)
    if context:
        kept.insert(last_user, {"role": "system", "content": context})
    return [{"role": "system", "content": system}, *kept]


async def open_chat_model(
    mgr: KVCacheManager, name: str = "replies", keep_states: bool = True
) -> LlamaChat:
    """The configured GGUF (the bundled SmolLM2 by default) for writing replies: its own
    instance in the manager's model pool, beside the summarizer's, so a reply never queues
    behind a summary. Answer with `await model.complete(build_prompt(...), max_tokens,
    timeout, session=(namespace, session_id))`.

    With `keep_states`, each session's KV state is kept after a reply and restored on its
    next call instead of prefilled again: in RAM under the config's
    `max_bytes_per_session`, `max_bytes_total`, `max_sessions` (else 1 GiB and 64
    sessions) and `idle_eviction_seconds`, then on disk under `kv_state_disk_bytes`, in
    `kv_state_dir` or beside the database (a folder per `name`). The model is attached to
    the manager (`attach_chat`)."""
    config = mgr.config
    gguf = await anyio.to_thread.run_sync(resolve_gguf, config.llm_model_path)
    states = None
    if keep_states:
        total = config.max_bytes_total or DEFAULT_STATE_BYTES
        folder = mgr.kv_state_dir
        disk = None
        if folder is not None and config.kv_state_disk_bytes > 0 and not config.read_only:
            disk = await anyio.to_thread.run_sync(
                KVStateDisk, folder / name, config.kv_state_disk_bytes
            )
        states = KVStateCache(
            max_bytes_per_session=config.max_bytes_per_session or total,
            max_bytes_total=total,
            max_sessions=config.max_sessions or DEFAULT_STATE_SESSIONS,
            disk=disk,
            idle_seconds=config.idle_eviction_seconds,
        )
    chat = LlamaChat(
        gguf,
        CHAT_WINDOW,
        config.llm_threads,
        mgr.model_pool,
        name=name,
        kv_states=states,
        idle_seconds=config.llm_idle_unload_seconds,
    )
    mgr.attach_chat(chat)
    return chat


async def run_chat(
    db: str, session: str, namespace: str, config: KVCacheConfig, inp: TextIO, out: TextIO
) -> int:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    async with await KVCacheManager.open(db, config, telemetry=_SummaryPrinter(out)) as mgr:
        llm = await open_chat_model(mgr, "chat")
        state = await mgr.get_session_state(session, namespace=namespace)
        if state is not None:
            say(
                f"resuming session {session!r}: {state.message_count} messages, "
                f"{state.clear_count} clears"
            )
        say("type a message; an empty line or end of input quits")
        reply: list[Message] = []  # the last answer, stored with the next turn
        while True:
            line = await anyio.to_thread.run_sync(inp.readline)
            if not line.strip():
                break
            if not inp.isatty():
                say(f"you: {line.strip()}")  # a piped conversation reads as one
            result = await mgr.process_conversation(
                session, [*reply, Message("user", line.strip())], namespace=namespace
            )
            for note in describe(result):
                say(note)
            cache = await mgr.get_active_cache(session, namespace=namespace)
            started = time.perf_counter()
            text, _ = await llm.complete(
                build_prompt(result, cache, user_message=line.strip()),
                REPLY_TOKENS,
                config.summary_timeout_seconds,
                session=(namespace, session),
            )
            ttft = f"{llm.last_ttft_ms / 1000:.2f} s" if llm.last_ttft_ms is not None else "-"
            say(
                f"[kv] {llm.last_reused} prompt tokens reused from the session's kept state, "
                f"{llm.last_prefilled} prefilled; first token in {ttft}, "
                f"reply in {time.perf_counter() - started:.1f} s"
            )
            say(f"assistant: {text}")
            reply = [Message("assistant", text)]
        if reply:  # the last answer is part of the conversation too
            for note in describe(
                await mgr.process_conversation(session, reply, namespace=namespace)
            ):
                say(note)
        state = await mgr.get_session_state(session, namespace=namespace)
        if state is not None:
            say(f"session {session!r}: {state.message_count} messages, {state.clear_count} clears")
    return 0
