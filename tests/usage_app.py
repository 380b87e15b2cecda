"""hookd in this process with a fake compressor, for the usage tests: hook calls under Aperture's
request ids, `entire_request` events, and the counters `/metrics` shows."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from hookd import server
from hookd.config import Store
from hookd.hook import Hook
from hookd.metrics import Metrics
from hookd.prices import Usage
from hookd.settings import Settings
from tests import client, fixtures
from tests.fakes import FakeCompressor
from tests.hookd_process import free_port

USER = "alice@example.com"
KINDS = ("input", "cache_read", "cache_write_5m", "cache_write_1h")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclasses.dataclass
class Served:
    url: str
    hook: Hook
    http: aiohttp.ClientSession

    async def call(self, request_id: str, messages: list[Any], provider: str = "anthropic", **meta: Any) -> str:
        """A hook call under Aperture's request id; returns the answer's action."""
        call = fixtures.hook_call(messages, provider, session_id=meta.pop("session_id", "sess-events"))
        call["metadata"].update(request_id=request_id, login_name=meta.pop("user", USER), **meta)
        status, _, answer = await client.post(self.http, self.url, call)
        assert status == 200
        return str(answer["action"])

    async def event(self, document: Any, headers: dict[str, str] | None = None, coding: str | None = None) -> int:
        raw = document if isinstance(document, bytes) else orjson.dumps(document)
        status, _, answer = await client.post(self.http, self.url + "events", raw, coding, headers)
        if status == 200:
            assert answer == {"action": "allow"}
        return status

    async def metrics(self) -> Samples:
        async with self.http.get(self.url + "metrics") as response:
            text = await response.text()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


class Servers:
    """Apps started by one test, all stopped at its end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runners: list[Any] = []
        self.sessions: list[aiohttp.ClientSession] = []

    async def start(self, mode: str = "shorten", clock: Callable[[], float] = time.time, **overrides: Any) -> Served:
        settings = dataclasses.replace(Settings(port=free_port()), **overrides)
        store = Store(self.folder / f"state-{len(self.runners)}", settings.affinity_wait)
        app = server.build_app(settings, FakeCompressor(mode), Metrics(), store, clock)
        self.runners.append(await server.start_site(app, settings))
        self.sessions.append(aiohttp.ClientSession())
        return Served(f"http://127.0.0.1:{settings.port}/", app[server.HOOK], self.sessions[-1])

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        for runner in self.runners:
            await runner.cleanup()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_kind(samples: Samples, name: str, **labels: str) -> Usage:
    counts = [int(value(samples, name, **labels, kind=kind)) for kind in KINDS]
    return Usage(*counts)
