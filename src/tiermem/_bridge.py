"""Bridge messages: the short texts a host puts into the model's context at a transition."""

from __future__ import annotations

from collections.abc import Sequence

TIER_NAMES = {1: "active cache", 2: "recent snapshots", 3: "long-term memory"}


def _keyword_list(keywords: Sequence[str], fallback: str) -> str:
    return ", ".join(keywords[:3]) if keywords else fallback


def clear_bridge(cleared: int, preserved: int, keywords: Sequence[str]) -> str:
    return (
        f"[Cache Management] Cleared {cleared} entries from cache, preserved {preserved} "
        f"important entries related to: {_keyword_list(keywords, 'various topics')}."
    )


def summary_bridge(summary: str) -> str:
    return f"[Memory compressed — conversation summary up to this point:]\n{summary}"


PRIOR_SUMMARY = "[Prior conversation summary — context before memory compression:]"


def prior_summary_bridge(summary: str) -> str:
    return f"{PRIOR_SUMMARY}\n{summary}"


def retrieval_bridge(count: int, tier: int, keywords: Sequence[str], similarity: float) -> str:
    terms = "', '".join(keywords[:3]) if keywords else "relevant context"
    return (
        f"[Memory Retrieval] Retrieved {count} entries from {TIER_NAMES.get(tier, 'storage')} "
        f"for '{terms}' (similarity: {similarity:.2f})."
    )


def restore_bridge(count: int, minutes: int) -> str:
    return (
        f"[Cache Restoration] Restored {count} entries from previous snapshot "
        f"({minutes} minutes old)."
    )
