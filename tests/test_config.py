from pathlib import Path

import pytest

import tiermem
from tiermem import ConfigError, KVCacheConfig


def test_defaults_port_the_seed() -> None:
    c = KVCacheConfig()
    assert c.clear_after_conversations == 16
    assert c.memory_threshold_percent == 0.6
    assert c.max_cache_entries == 1000
    assert c.min_importance_to_preserve == 0.7
    assert c.preserve_system_prompts and c.preserve_code_entries
    assert c.retrieval_enabled and c.bridge_enabled and c.generate_cache_embeddings
    assert c.snapshot_strategy == tiermem.IncrementalSnapshots(max_snapshots=4)
    # one setting under both names: the seed's max_cache_entries is max_entries_per_session
    assert c.max_entries_per_session == 1000
    assert KVCacheConfig(max_cache_entries=50).max_entries_per_session == 50


@pytest.mark.parametrize(
    "values",
    [
        {"clear_after_conversations": 0},
        {"memory_threshold_percent": 1.5},
        {"memory_threshold_percent": 0},
        {"min_importance_to_preserve": -0.1},
        {"max_bytes_per_session": 10, "max_bytes_total": 5},
        {"max_sessions": 0},
        {"snapshot_strategy": {"kind": "sometimes"}},
        {"no_such_field": 1},
        {"retrieval_mode": "magic"},
    ],
)
def test_invalid_config_is_a_config_error(values: dict) -> None:
    with pytest.raises(ConfigError) as info:
        KVCacheConfig(**values)
    assert "invalid tiermem config" in str(info.value)
    with pytest.raises(ConfigError):
        KVCacheConfig.build(**values)


def test_config_is_frozen() -> None:
    config = KVCacheConfig()
    with pytest.raises(ConfigError, match="frozen"):
        config.clear_after_conversations = 3  # type: ignore[misc]
    assert config.clear_after_conversations == 16


def test_strategies_are_a_discriminated_union() -> None:
    c = KVCacheConfig(snapshot_strategy={"kind": "adaptive", "min_importance_threshold": 0.8})
    assert isinstance(c.snapshot_strategy, tiermem.AdaptiveSnapshots)
    assert c.snapshot_strategy.max_snapshots == 4
    assert isinstance(
        KVCacheConfig(snapshot_strategy={"kind": "none"}).snapshot_strategy, tiermem.NoSnapshots
    )


def test_from_env_reads_prefixed_variables() -> None:
    env = {
        "TIERMEM_CLEAR_AFTER_CONVERSATIONS": "8",
        "TIERMEM_RETRIEVAL_ENABLED": "false",
        "TIERMEM_SNAPSHOT_STRATEGY": '{"kind": "full", "interval_conversations": 2}',
        "PATH": "/usr/bin",
    }
    c = KVCacheConfig.from_env(env)
    assert c.clear_after_conversations == 8
    assert c.retrieval_enabled is False
    assert isinstance(c.snapshot_strategy, tiermem.FullSnapshots)


def test_from_env_warns_of_unknown_names_and_rejects_invalid_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="tiermem"):
        c = KVCacheConfig.from_env({"TIERMEM_CLEAR_AFTER": "3", "TIERMEM_TEST_URL": "x"})
    assert c == KVCacheConfig()
    assert "did you mean TIERMEM_CLEAR_AFTER_CONVERSATIONS?" in caplog.text
    assert "TIERMEM_TEST_URL" in caplog.text
    with pytest.raises(ConfigError):
        KVCacheConfig.from_env({"TIERMEM_CLEAR_AFTER_CONVERSATIONS": "many"})


def test_from_toml_then_env(tmp_path: Path) -> None:
    path = tmp_path / "tiermem.toml"
    path.write_text(
        "[tiermem]\nclear_after_conversations = 4\nvector_weight = 0.5\n"
        "[tiermem.snapshot_strategy]\nkind = 'none'\n"
    )
    c = KVCacheConfig.from_toml(path, environ={"TIERMEM_VECTOR_WEIGHT": "0.9"})
    assert c.clear_after_conversations == 4
    assert c.vector_weight == 0.9
    assert isinstance(c.snapshot_strategy, tiermem.NoSnapshots)
    with pytest.raises(ConfigError):
        KVCacheConfig.from_toml(tmp_path / "missing.toml")
    path.write_text("clear_after_conversations = [")
    with pytest.raises(ConfigError):
        KVCacheConfig.from_toml(path)


def test_replace_validates() -> None:
    c = KVCacheConfig().replace(clear_after_conversations=3)
    assert c.clear_after_conversations == 3
    with pytest.raises(ConfigError):
        c.replace(clear_after_conversations=-1)


def test_retrieval_candidates_are_capped_where_the_index_caps_them() -> None:
    assert KVCacheConfig(retrieval_candidates=1024).retrieval_candidates == 1024
    with pytest.raises(ConfigError):
        KVCacheConfig(retrieval_candidates=5000)


def test_interval_conversations_of_old_configs_is_accepted_and_has_no_effect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="tiermem"):
        c = KVCacheConfig(snapshot_strategy={"kind": "full", "interval_conversations": 2})
    assert c.snapshot_strategy == tiermem.FullSnapshots()
    assert "no effect" in caplog.text
