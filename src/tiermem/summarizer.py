"""Cumulative summaries: the `Summarizer` protocol, the prompts, and the LLM implementation.

A session has one summary covering everything up to its last clear. Each update feeds the
prior summary plus the messages since it; when they do not fit the model's window, the
messages are folded in chunk by chunk, so no message is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio.to_thread

from .errors import ModelError

FIRST_MAX_TOKENS = 300
UPDATE_MAX_TOKENS = 400
MESSAGE_MAX_TOKENS = 384
PROMPT_OVERHEAD_TOKENS = 48

SYSTEM_PROMPT = (
    "You write the memory of a conversation for an assistant. Keep every concrete fact: "
    "names, places, dates, numbers, amounts, decisions, preferences and open tasks. "
    "Write short plain sentences. Do not invent anything."
)
FIRST_INSTRUCTION = (
    "Conversation:\n{transcript}\n\n"
    "Summarize this conversation in under 300 tokens. Keep every name, number, date and "
    "decision."
)
UPDATE_INSTRUCTION = (
    "Summary so far:\n{prior}\n\nNew messages:\n{transcript}\n\n"
    "Rewrite the summary so it covers the summary so far and the new messages, in under "
    "400 tokens. Keep every name, number, date and decision from both; where the new "
    "messages change a fact, keep the new value."
)


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SummaryText:
    text: str
    token_count: int


@runtime_checkable
class Summarizer(Protocol):
    """Writes the updated cumulative summary from the prior one and the messages since."""

    async def summarize(
        self, prior: str | None, transcript: Sequence[TranscriptLine]
    ) -> SummaryText: ...


class ChatModel(Protocol):
    """What the LLM summarizer needs of a model (see `llm.LlamaChat`)."""

    n_ctx: int

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int, timeout: float
    ) -> tuple[str, int]: ...


class TokenCounter(Protocol):
    """Blocking token counting with the model's own vocabulary (see `llm.LlamaTokenizer`)."""

    def count(self, texts: list[str]) -> list[int]: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


def build_messages(prior: str | None, transcript: str) -> tuple[list[dict[str, str]], int]:
    """The chat prompt for one summary step and its answer budget."""
    if prior:
        user = UPDATE_INSTRUCTION.format(prior=prior, transcript=transcript)
        budget = UPDATE_MAX_TOKENS
    else:
        user = FIRST_INSTRUCTION.format(transcript=transcript)
        budget = FIRST_MAX_TOKENS
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}], budget


def format_line(line: TranscriptLine) -> str:
    return f"{line.role}: {' '.join(line.content.split())}"


class LLMSummarizer:
    """Summaries from a local chat model, every prompt fitted to its context window."""

    def __init__(self, model: ChatModel, tokens: TokenCounter, timeout: float) -> None:
        self._model = model
        self._tokens = tokens
        self._timeout = timeout

    async def summarize(
        self, prior: str | None, transcript: Sequence[TranscriptLine]
    ) -> SummaryText:
        chunks = await anyio.to_thread.run_sync(self._chunk, prior, list(transcript))
        summary, tokens = prior, 0
        for chunk in chunks:
            messages, budget = build_messages(summary, "\n".join(chunk))
            text, tokens = await self._model.complete(messages, budget, self._timeout)
            if not text:
                raise ModelError("the model returned an empty summary")
            summary = text
        if summary is None:
            raise ModelError("nothing to summarize")
        return SummaryText(summary, tokens)

    def _chunk(self, prior: str | None, transcript: list[TranscriptLine]) -> list[list[str]]:
        """Blocking: transcript lines grouped so each step's prompt fits the window."""
        lines = [format_line(line) for line in transcript]
        counts = self._tokens.count(lines)
        for i, count in enumerate(counts):
            if count > MESSAGE_MAX_TOKENS:
                lines[i] = self._tokens.truncate(lines[i], MESSAGE_MAX_TOKENS) + " [...]"
                counts[i] = MESSAGE_MAX_TOKENS + 3
        frame = self._tokens.count([SYSTEM_PROMPT + UPDATE_INSTRUCTION])[0]
        summary_room = (
            UPDATE_MAX_TOKENS
            if prior is None
            else max(UPDATE_MAX_TOKENS, self._tokens.count([prior])[0])
        )
        room = self._model.n_ctx - frame - summary_room - UPDATE_MAX_TOKENS
        room -= PROMPT_OVERHEAD_TOKENS
        if room < MESSAGE_MAX_TOKENS:
            raise ModelError(
                f"the model's context window ({self._model.n_ctx} tokens) is too small "
                "to summarize with"
            )
        chunks: list[list[str]] = [[]]
        used = 0
        for line, count in zip(lines, counts, strict=True):
            if chunks[-1] and used + count + 1 > room:
                chunks.append([])
                used = 0
            chunks[-1].append(line)
            used += count + 1
        return [c for c in chunks if c]
