import ast
import inspect
import typing
from pathlib import Path
from typing import Any

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


PACKAGE = Path(tiermem.__file__).parent


def test_modules_are_private() -> None:
    public = [
        p.name
        for p in PACKAGE.glob("*.py")
        if not p.name.startswith("_") and p.name not in ("__init__.py", "__main__.py")
    ]
    assert public == []


def module_imports(path: Path) -> set[str]:
    """The package modules `path` imports when it is imported (not those imported inside
    functions or only for type checking)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:`
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_no_import_cycles() -> None:
    graph = {p.stem: module_imports(p) for p in PACKAGE.glob("_*.py")}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for child in graph.get(module, ()):
            visit(child, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_everything_in_a_public_signature_is_exported() -> None:
    missing = set()
    for name in tiermem.__all__:
        obj = getattr(tiermem, name)
        members = [obj]
        if inspect.isclass(obj):
            members += [m for n, m in vars(obj).items() if callable(m) and not n.startswith("_")]
            members += [m.fget for m in vars(obj).values() if isinstance(m, property)]
        for member in members:
            try:
                hints = typing.get_type_hints(member)
            except (TypeError, NameError):
                continue
            for hint in hints.values():
                for part in _parts(hint):
                    module = getattr(part, "__module__", "")
                    if module.startswith("tiermem") and part.__name__ not in tiermem.__all__:
                        missing.add(f"{name}: {part.__name__}")
    assert missing == set()


def _parts(hint: object) -> list[Any]:
    out = [hint] if inspect.isclass(hint) else []
    for arg in typing.get_args(hint):
        out += _parts(arg)
    return out


def test_descriptive_names_stand_beside_the_contract_names() -> None:
    config = tiermem.KVCacheConfig(memory_threshold_fraction=0.4, max_cache_entries=9)
    assert config.memory_threshold_percent == config.memory_threshold_fraction == 0.4
    assert config.max_entries_per_session == config.max_cache_entries == 9
    assert tiermem.Tier.HISTORY == 3 and tiermem.EvictionReason.IDLE == "Idle"
    assert tiermem.ClearReason.MANUAL == "Manual"  # one style: CamelCase values
