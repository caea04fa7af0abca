"""The suite itself: async tests run on pytest-asyncio, and tests reach the library only
through its public API and protocols (the store's own tests excepted)."""

import asyncio
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# the store's tests test the store; unit tests of pure helpers may import their modules
OWN_STORE_TESTS = {"test_store.py", "test_secure_delete.py"}
PRIVATE_REACH = re.compile(
    r"\b(mgr|manager|again|fresh|store|chat)\._[a-z]\w*"
    r"|\._(store|writer|reader|sessions|memory|pool|intake|summaries|limiter)\b"
    r"|\b_read_(all|one)\b|tiermem\._store\b|from tiermem\._(store|manager|sessions)\b"
)


def test_async_tests_run_on_pytest_asyncio(pytestconfig: pytest.Config) -> None:
    plugins = pytestconfig.pluginmanager
    assert plugins.has_plugin("asyncio")
    assert not plugins.has_plugin("anyio")  # disabled: one runner owns the event loop
    assert pytestconfig.getini("asyncio_mode") == "auto"


async def test_an_async_test_runs_on_asyncio() -> None:
    assert asyncio.get_running_loop().is_running()  # raises outside an asyncio loop


def test_tests_use_only_the_public_api() -> None:
    reaches = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name not in OWN_STORE_TESTS and path.name != Path(__file__).name
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_REACH.search(line) and "# private:" not in line
    ]
    assert reaches == []
