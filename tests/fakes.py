"""Real fakes through tiermem's protocols: deterministic, fast, no models."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import anyio
import numpy as np

from tiermem import ModelError, SummaryText, TelemetryEvent, TranscriptLine
from tiermem._text import words

E = TypeVar("E")


class HashingEmbedder:
    """Bag-of-words vectors by feature hashing: texts sharing words are close."""

    def __init__(self, dimensions: int = 64, name: str = "hashing-test") -> None:
        self._dimensions = dimensions
        self._name = name
        self.calls: list[list[str]] = []

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.vectors(texts)

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dimensions), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in words(t):
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                out[i, h % self._dimensions] += 1.0
            norm = np.linalg.norm(out[i])
            if norm:
                out[i] /= norm
            else:
                out[i, 0] = 1.0
        return out


class RecordingSummarizer:
    """Summaries that name the number of lines seen; records every (prior, transcript)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str | None, list[TranscriptLine]]] = []
        self.fail = fail

    async def summarize(
        self, prior: str | None, transcript: Sequence[TranscriptLine]
    ) -> SummaryText:
        self.calls.append((prior, list(transcript)))
        if self.fail:
            raise ModelError("summarizer is down")
        facts = "; ".join(line.content[:40] for line in transcript[:3])
        text = f"summary #{len(self.calls)} of {len(transcript)} messages: {facts}"
        if prior:
            text = f"{prior} | {text}"
        return SummaryText(text, len(text.split()))


class WordCounter:
    """One token per whitespace-separated word."""

    def count(self, texts: list[str]) -> list[int]:
        return [max(1, len(t.split())) for t in texts]

    def truncate(self, text: str, max_tokens: int) -> str:
        return " ".join(text.split()[:max_tokens])


class GatedSummarizer(RecordingSummarizer):
    """A recording summarizer that holds every summary until `gate` is set: a slow LLM."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.entered = anyio.Event()  # set when the first summary starts
        self.started = 0

    async def summarize(
        self, prior: str | None, transcript: Sequence[TranscriptLine]
    ) -> SummaryText:
        self.started += 1
        self.entered.set()
        await self.gate.wait()
        return await super().summarize(prior, transcript)


class RecordingTelemetry:
    """Keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[TelemetryEvent] = []

    def emit(self, event: TelemetryEvent) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]
