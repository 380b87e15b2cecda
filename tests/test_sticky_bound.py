"""Sticky mode's memory stays within --sticky-max-mb however many conversations pass, and none
of it reaches disk (issue 6)."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import client
from tests.disk import files_containing
from tests.hookd_process import Hookd

pytestmark = pytest.mark.slow
SESSIONS = 1000
BOUND_MB = 4


def turn(secret: str, session: int, turns: int) -> dict[str, Any]:
    """A conversation of `turns` tool calls over distinct JSON output (compressible, so sticky
    mode keeps its emitted bytes)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"session {session}: inventory"}]
    for t in range(turns):
        rows = [{"id": f"{session}-{t}-{k}", "name": f"item-{k % 17}", "state": "ok"} for k in range(120)]
        body = f"{secret}\n" + str(rows).replace("'", '"')
        messages.append(
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{t}", "name": "Ls", "input": {}}]}
        )
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{t}", "content": body}]})
    return {"metadata": {"session_id": f"bound-{session}", "model": "gpt-4o"}, "request_body": {"messages": messages}}


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_thousand_conversations_stay_within_the_bound(tmp_path: Path) -> None:
    secret = f"PLANTED-{os.urandom(8).hex()}"
    started = time.time() - 1
    with Hookd("--sticky-max-mb", str(BOUND_MB), state_dir=tmp_path / "state") as server:
        baseline = rss_mb(server.proc.pid)

        async def replay() -> list[str]:
            actions = []
            async with aiohttp.ClientSession() as http:
                for session in range(SESSIONS):
                    for turns in (1, 2):
                        _, _, answer = await client.post(http, server.url, turn(secret, session, turns))
                        actions.append(answer["action"])
            return actions

        actions = asyncio.run(replay())
        status, _ = server.get("/healthz")
        with urllib.request.urlopen(server.url + "metrics", timeout=10) as response:
            text = response.read().decode()
        grown = rss_mb(server.proc.pid) - baseline
    assert status == 200 and actions.count("modify") > SESSIONS
    held = metric(text, "hookd_sticky_bytes")
    assert 0 < held <= BOUND_MB * 1024 * 1024
    assert metric(text, "hookd_sticky_conversations") < SESSIONS
    # The front end holds the store; what it grew by is the store plus allocator slack.
    assert grown < BOUND_MB + 60, grown
    assert files_containing([tmp_path, Path.home(), Path("/tmp")], secret.encode(), since=started) == []
