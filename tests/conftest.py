"""Shared fixtures: a real `hookd` with real workers, and conversations built from real output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import corpus, fixtures
from tests.hookd_process import Hookd


@pytest.fixture(scope="session")
def anthropic_messages() -> list[dict[str, Any]]:
    return fixtures.anthropic_session()


@pytest.fixture(scope="session")
def openai_messages() -> list[dict[str, Any]]:
    return fixtures.openai_session()


@pytest.fixture(scope="module")
def hookd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookd]:
    """The real server with two real headroom workers, shared by a test module."""
    with Hookd(state_dir=tmp_path_factory.mktemp("state"), pool_size=2) as server:
        yield server


@pytest.fixture(scope="session")
def corpus_sessions() -> list[dict[str, Any]]:
    if not corpus.available():
        pytest.skip(corpus.why_missing())
    return corpus.sessions()


def pytest_report_header() -> str:
    where = corpus.corpus_dir()
    return f"hookd corpus: {where if corpus.available() else 'absent: ' + corpus.why_missing()} ({Path.cwd()})"
