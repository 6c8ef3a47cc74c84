"""Shared fixtures. Every test run gets its own data folder and cache; the embedded model loads once."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator

import pytest

os.environ["FCAPP_HOME"] = tempfile.mkdtemp(prefix="fcapp-test-home-")
# one cache of derived task files (z3-labelled problems) for the run and the app servers it starts
os.environ["FCAPP_CACHE"] = tempfile.mkdtemp(prefix="fcapp-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run slow tests (bigger fuzz runs, long training)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long tests, run only with --slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_model():
    """The real embedded SmolLM2-135M-Instruct on CPU, loaded once per test session."""
    from fcapp.models.local import LocalModel

    return LocalModel()


@pytest.fixture
def scripted() -> Iterator[Any]:
    """`scripted(*responses)`: a real HTTP server scripting a teacher's answers (helpers.Scripted),
    shut down after the test."""
    from helpers import Scripted

    servers: list[Scripted] = []

    def make(*responses: tuple, **kw: Any) -> Scripted:
        servers.append(Scripted(*responses, **kw))
        return servers[-1]

    yield make
    for server in servers:
        server.close()
