"""hookd served from this process on a replayed clock, for the prompt-cache benchmark.

The history policy decides by idle time (a cold cache is free to rewrite), so replaying a
recorded session faithfully means hookd must see the session's own clock, not the machine's. This
starts the real front end (the aiohttp app, the real worker pool, real headroom workers) inside
the benchmark's process with a `Clock` the replay sets before each request, and talks to it over
loopback HTTP like Aperture would. Between requests it waits for hookd's background work (a
rewrite candidate) to finish, as a real agent's reply would give it time to.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from hookd import server
from hookd.config import Store
from hookd.hook import Hook
from hookd.metrics import Metrics
from hookd.pool import WorkerPool
from hookd.settings import Settings
from tests import client
from tests.hookd_process import free_port

READY_TIMEOUT_S = 180.0


class Clock:
    """Seconds, as the replay says they are."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Answer:
    messages: list[Any]  # what went upstream
    line: str  # hookd's -v line
    action: str


class Served:
    def __init__(self, url: str, hook: Hook, pool: WorkerPool, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.hook = hook
        self.pool = pool
        self.http = http

    async def send(self, call: dict[str, Any]) -> Answer:
        lines = io.StringIO()
        with contextlib.redirect_stdout(lines):
            _, _, answer = await client.post(self.http, self.url, call)
            while self.hook.background:
                await asyncio.wait(list(self.hook.background))
        modified = answer["action"] == "modify"
        messages = answer["request_body"]["messages"] if modified else call["request_body"]["messages"]
        return Answer(messages, lines.getvalue().strip(), answer["action"])

    def worker_pid(self, slot: int) -> int | None:
        process = self.pool.workers[slot].process
        return process.pid if process is not None else None


@contextlib.asynccontextmanager
async def served(history: str, clock: Clock, pool_size: int = 2, **settings: Any) -> AsyncIterator[Served]:
    """hookd with `history` as its policy and `clock` as its time, until the block ends."""
    with tempfile.TemporaryDirectory() as state:
        config = replace(Settings(), port=free_port(), pool_size=pool_size, verbose=True, **settings)
        store = Store(Path(state), config.affinity_wait)
        store.update({"history": history}, profiles=None)
        metrics = Metrics()
        pool = WorkerPool(config, metrics)
        app = server.build_app(config, pool, metrics, store, clock)
        runner = web.AppRunner(app, auto_decompress=False, access_log=None, handler_cancellation=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", config.port).start()
        await pool.start()
        try:
            if not await pool.wait_ready(READY_TIMEOUT_S):
                raise RuntimeError(f"workers not warm after {READY_TIMEOUT_S} s")
            async with aiohttp.ClientSession() as http:
                yield Served(f"http://127.0.0.1:{config.port}/", app[server.HOOK], pool, http)
        finally:
            await runner.cleanup()
            await pool.stop(grace=1.0)
