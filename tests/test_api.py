import tiermem


def test_all_names_exist_and_are_sorted() -> None:
    assert list(tiermem.__all__) == sorted(tiermem.__all__)
    for name in tiermem.__all__:
        assert hasattr(tiermem, name), name


def test_contract_names_are_public() -> None:
    for name in ("KVCacheManager", "KVCacheConfig", "Message", "TierMemError", "RetrievedEntry"):
        assert name in tiermem.__all__


def test_every_error_is_a_tiermem_error() -> None:
    for name in (
        "ConfigError",
        "StorageError",
        "ModelError",
        "BudgetError",
        "NotFoundError",
        "InvalidInputError",
        "EmbeddingMismatchError",
        "ManagerClosedError",
    ):
        assert issubclass(getattr(tiermem, name), tiermem.TierMemError)
