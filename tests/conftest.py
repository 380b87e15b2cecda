"""Shared fixtures: a real `hookd` with real workers, and conversations built from real output."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hookd import server
from hookd.config import Store
from hookd.metrics import Metrics
from hookd.settings import Settings
from tests import corpus, fixtures
from tests.fakes import FakeCompressor, Start
from tests.hookd_process import Hookd, free_port


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


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Starts the real app in this process, with a fake compressor behind the seam."""
    runners: list[Any] = []
    sessions: list[aiohttp.ClientSession] = []

    async def _start(
        mode: str = "shorten", clock: Callable[[], float] = time.time, **overrides: Any
    ) -> tuple[str, FakeCompressor, aiohttp.ClientSession]:
        settings = dataclasses.replace(Settings(port=free_port()), **overrides)
        fake = FakeCompressor(mode)
        store = Store(tmp_path / f"state-{len(runners)}", settings.affinity_wait)
        runner = await server.start_site(server.build_app(settings, fake, Metrics(), store, clock), settings)
        runners.append(runner)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return f"http://127.0.0.1:{settings.port}/", fake, session

    yield _start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()
