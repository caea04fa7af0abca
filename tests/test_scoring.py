from tiermem import ScoringWeights
from tiermem._cache import CacheEntry, entry_type
from tiermem._scoring import ImportanceScorer, content_score
from tiermem._text import fts_query, keywords, matched_keywords


def entry(content: str, role: str = "user", position: int = 0, tokens: int = 10) -> CacheEntry:
    return CacheEntry(
        rowid=position + 1,
        message_id=str(position),
        position=position,
        role=role,
        content=content,
        created_at=0.0,
        token_count=tokens,
        kv_bytes=tokens,
        entry_type=entry_type(role, content),
    )


def test_patterns_are_whole_words_and_case_insensitive() -> None:
    assert content_score("user", "my keyboard is broken") < content_score("user", "the KEY point")
    assert content_score("user", "IMPORTANT: call me") == content_score(
        "user", "important: call me"
    )


def test_classification_is_rule_based() -> None:
    assert entry_type("system", "def f(): pass") == "system_prompt"
    assert entry_type("assistant", "```python\nprint(1)\n```") == "code"
    assert entry_type("user", "hello there") == "user"


def test_scores_are_deterministic_and_bounded() -> None:
    scorer = ImportanceScorer(ScoringWeights())
    items = [entry("Remember: my PIN is 4321", position=i) for i in range(5)]
    first = [scorer.score(e, 10) for e in items]
    assert first == [scorer.score(e, 10) for e in items]
    assert all(0.0 <= s <= 1.0 for s in first)
    assert first == sorted(first)  # newer is more important, all else equal


def test_engagement_raises_then_decays() -> None:
    scorer = ImportanceScorer(ScoringWeights())
    e = entry("plain words here")
    before = scorer.score(e, 0)
    scorer.engage([e])
    raised = scorer.score(e, 0)
    scorer.decay([e])
    assert before < scorer.score(e, 0) < raised
    assert e.access_count == 1


def test_keywords_and_fts_query_are_safe() -> None:
    assert keywords("Where is Ana staying? Where!") == ["ana", "staying"]
    query = fts_query(['say "hi"', "NEAR(", "*", "col:x"])
    assert query == '"say ""hi""" OR "NEAR(" OR "*" OR "col:x"'
    assert matched_keywords("The keyboards broke", ["key", "keyboard"]) == ["keyboard"]
