"""Cumulative summaries: the `Summarizer` protocol, the prompts, and the LLM implementation.

A session has one summary covering everything up to its last clear. Each update takes the
prior summary and the messages since it: the model lists the facts of the new messages (in
chunks that fit its window, so no message is skipped) and they join the prior ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio.to_thread

from ._errors import ModelError

FIRST_MAX_TOKENS = 300
UPDATE_MAX_TOKENS = 400
# what the model may write for one chunk of new messages
FACTS_MAX_TOKENS = 300
MESSAGE_MAX_TOKENS = 384
PROMPT_OVERHEAD_TOKENS = 48

# Tuned with benchmarks/summary_quality.py on the bundled 135M model (see the README):
# asked to rewrite "the summary so far plus the new messages", it echoed the dialogue and
# kept 4% of the planted facts after five clears; asked only for the facts of the user's
# new statements, with the lists merged here, it keeps most of them.
SYSTEM_PROMPT = (
    "You keep notes about a user for an assistant. Write only facts the user stated: "
    "names, places, dates, numbers, decisions, preferences. One short line per fact. "
    "Never copy the dialogue."
)
FACTS_INSTRUCTION = (
    "Messages from the user:\n{transcript}\n\n"
    "Write the facts about the user as a list, one fact per line starting with '- '."
)

_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
_SPEAKER = re.compile(r"^(?:the\s+)?(?:user|assistant)\s*:\s*", re.IGNORECASE)
_INFORMATIVE = re.compile(r"(?<!^)\b[A-Z][\w'-]+|\d")


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


def build_messages(transcript: str) -> list[dict[str, str]]:
    """The chat prompt asking for the facts of one chunk of messages."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": FACTS_INSTRUCTION.format(transcript=transcript)},
    ]


def format_line(line: TranscriptLine) -> str:
    return f"{line.role}: {' '.join(line.content.split())}"


def states_a_fact(line: TranscriptLine) -> bool:
    """A user's statement (not a question): where what the user tells about themselves is."""
    return line.role == "user" and not line.content.rstrip().endswith("?")


def fact_lines(text: str) -> list[str]:
    """The model's answer as "- fact" lines: bullets, numbering and speaker labels dropped,
    lines of fewer than three words left out."""
    out = []
    for raw in text.splitlines():
        line = _SPEAKER.sub("", _BULLET.sub("", raw.strip())).strip()
        if len(line.split()) >= 3:
            out.append("- " + line)
    return out


def merge(known: list[str], new: list[str]) -> list[str]:
    """Known facts then new ones, each once (compared without case and spacing)."""
    seen: set[str] = set()
    out = []
    for line in [*known, *new]:
        key = " ".join(line.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(line)
    return out


class LLMSummarizer:
    """Cumulative summaries from a local chat model: the prior summary's facts plus the facts
    the model lists for the user's new statements, trimmed to the token budget.

    Each prompt is fitted to the model's window with room for the answer; what does not fit
    goes in further chunks, so no message is skipped. When the merged list is over budget
    (300 tokens the first time, 400 later), the least informative lines (fewest names and
    numbers), oldest first, are dropped: they are still in the history (tier 3).
    """

    def __init__(self, model: ChatModel, tokens: TokenCounter, timeout: float) -> None:
        self._model = model
        self._tokens = tokens
        self._timeout = timeout

    async def summarize(
        self, prior: str | None, transcript: Sequence[TranscriptLine]
    ) -> SummaryText:
        lines = [line for line in transcript if states_a_fact(line)] or list(transcript)
        chunks = await anyio.to_thread.run_sync(self._chunk, lines)
        facts = prior.splitlines() if prior else []
        for chunk in chunks:
            text, _ = await self._model.complete(
                build_messages("\n".join(chunk)), FACTS_MAX_TOKENS, self._timeout
            )
            facts = merge(facts, fact_lines(text))
        if not facts:
            raise ModelError("the model listed no facts")
        budget = UPDATE_MAX_TOKENS if prior else FIRST_MAX_TOKENS
        return await anyio.to_thread.run_sync(self._fit, facts, budget)

    def _fit(self, facts: list[str], budget: int) -> SummaryText:
        """Blocking: `facts` within `budget` tokens, least informative lines dropped first."""
        counts = self._tokens.count(facts)
        kept = list(range(len(facts)))
        total = sum(counts) + len(facts)
        # by informativeness, then age: the first of this order goes first
        order = sorted(kept, key=lambda i: (len(_INFORMATIVE.findall(facts[i])), i))
        for i in order:
            if total <= budget:
                break
            kept.remove(i)
            total -= counts[i] + 1
        text = "\n".join(facts[i] for i in kept)
        return SummaryText(text, self._tokens.count([text])[0] if text else 0)

    def _chunk(self, transcript: list[TranscriptLine]) -> list[list[str]]:
        """Blocking: transcript lines grouped so each step's prompt fits the window."""
        lines = [format_line(line) for line in transcript]
        counts = self._tokens.count(lines)
        for i, count in enumerate(counts):
            if count > MESSAGE_MAX_TOKENS:
                lines[i] = self._tokens.truncate(lines[i], MESSAGE_MAX_TOKENS) + " [...]"
                counts[i] = MESSAGE_MAX_TOKENS + 3
        frame = self._tokens.count([SYSTEM_PROMPT + FACTS_INSTRUCTION])[0]
        room = self._model.n_ctx - frame - FACTS_MAX_TOKENS - PROMPT_OVERHEAD_TOKENS
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
