"""Running hookd for months: readiness, systemd's protocol, tokens, live settings, metrics and
a graceful stop, each against the real `hookd` command with real workers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import client, fixtures
from tests.corpus import REPO
from tests.hookd_process import Hookd

SMALL_CALL = fixtures.hook_call(
    [
        {"role": "user", "content": "show the log"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "\n".join(
                        f"2026-11-22 10:00:{i % 60:02d} INFO request {i} ok in {i % 7} ms" for i in range(400)
                    ),
                }
            ],
        },
        {"role": "assistant", "content": "Looking."},
        {"role": "user", "content": "and?"},
    ]
)


def promtool() -> str | None:
    return shutil.which("promtool") or shutil.which("promtool", path=str(REPO / ".venv" / "bin"))


async def post(url: str, call: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        status, _, answer = await client.post(session, url, call, headers=headers)
        return status, answer


async def request(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


class NotifySocket:
    """A stand-in for systemd's notification socket that records every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.running = True
        self.thread.start()

    def _collect(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def first(self, field: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.messages):
                if line == field:
                    return at
            time.sleep(0.05)
        raise AssertionError(f"{field} not received; got {self.messages}")

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def test_readiness_and_the_systemd_protocol(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    server = Hookd(state_dir=tmp_path / "state", env=env)
    try:
        statuses = []
        while not statuses or statuses[-1][0] != 200:
            with contextlib.suppress(OSError):
                statuses.append(server.get("/readyz"))
            time.sleep(0.05)
        ready_seen = time.monotonic()
        assert statuses[0][0] == 503 and statuses[0][1]["status"] == "starting", statuses[0]
        assert "reason" in statuses[0][1]
        ready_at = notify.first("READY=1")
        watchdog_at = notify.first("WATCHDOG=1")
        assert all(line != "READY=1" for at, line in notify.messages if at < ready_at - 0.001)
        assert ready_at <= ready_seen + 1.0
        assert watchdog_at >= ready_at
        assert server.stop() == 0
        assert notify.first("STOPPING=1", timeout=5) > watchdog_at
    finally:
        server.stop()
        notify.close()


@pytest.mark.parametrize("units", [["hookd.service"], ["hookd.socket"], ["hookd.socket", "hookd.service"]])
def test_unit_files_verify_clean(units: list[str]) -> None:
    """The service alone (it works without the socket), the socket (which starts the service of
    its name, found beside it), and the two together."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    paths = [str(REPO / "systemd" / unit) for unit in units]
    result = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hookd, str, str]]:
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "hook").write_text("hook-secret\n")
    (folder / "admin").write_text("admin-secret\n")
    flags = ("--token-file", str(folder / "hook"), "--admin-token-file", str(folder / "admin"))
    with Hookd(*flags, state_dir=folder / "state", pool_size=1) as server:
        yield server, "hook-secret", "admin-secret"


@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"}, {"Authorization": "Basic aG9vay1zZWNyZXQ="}],
)
def test_hook_without_the_token_gets_401(tokens: tuple[Hookd, str, str], headers: dict[str, str] | None) -> None:
    server, _, _ = tokens
    status, answer = asyncio.run(post(server.url, SMALL_CALL, headers))
    assert status == 401
    assert "action" not in answer


@pytest.mark.parametrize("header", ["Authorization", "X-Api-Key"])
def test_hook_with_the_token_is_served(tokens: tuple[Hookd, str, str], header: str) -> None:
    server, hook_token, _ = tokens
    value = f"Bearer {hook_token}" if header == "Authorization" else hook_token
    status, answer = asyncio.run(post(server.url, SMALL_CALL, {header: value}))
    assert (status, answer["action"]) == (200, "modify")


def test_put_config_needs_the_admin_token(tokens: tuple[Hookd, str, str]) -> None:
    server, hook_token, admin_token = tokens
    url = server.url + "config"
    for token in (None, hook_token):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        status, _ = asyncio.run(request("PUT", url, json={"protect_recent": 1}, headers=headers))
        assert status == 401
    status, document = asyncio.run(
        request("PUT", url, json={"protect_recent": 1}, headers={"Authorization": f"Bearer {admin_token}"})
    )
    assert (status, document["protect_recent"]) == (200, 1)
    status, document = asyncio.run(request("GET", url, headers={"X-Api-Key": hook_token}))
    assert (status, document["protect_recent"]) == (200, 1)


def test_settings_survive_a_restart_and_a_corrupt_file_does_not(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Hookd(state_dir=state, pool_size=1) as server:
        url = server.url + "config"
        status, body = asyncio.run(request("PUT", url, json={"protect_recent": 0, "target_ratio": 0.5}))
        assert status == 200
        status, body = asyncio.run(request("PUT", url, json={"protect_recent": 2, "target_ratio": 2}))
        assert status == 400 and "target_ratio" in body["error"]
        status, answer = asyncio.run(post(server.url, SMALL_CALL))
        assert (status, answer["action"]) == (200, "modify")
    with Hookd(state_dir=state, pool_size=1) as server:
        document = server.get("/config")[1]
        assert (document["protect_recent"], document["target_ratio"]) == (0, 0.5)
    (state / "settings.json").write_text('{"protect_recent": "lots"')
    with Hookd(state_dir=state, pool_size=1) as server:
        document = server.get("/config")[1]
        assert document["protect_recent"] == 4
        assert any("settings file" in line and "unusable" in line for line in server.stderr)
    assert list(state.glob("settings.json.corrupt-*"))


def test_metrics_agree_with_the_traffic_and_pass_promtool(tmp_path: Path) -> None:
    with Hookd(state_dir=tmp_path, pool_size=2) as server:
        messages = fixtures.anthropic_session()
        calls = [fixtures.hook_call(messages, session_id=f"m{i}") for i in range(3)]
        calls += [SMALL_CALL, {"request_body": {"input": "responses api"}}]
        for call in calls:
            asyncio.run(post(server.url, call))
        server.line(len(calls) - 1)
        text = _get_text(server.url + "metrics")
    lines = server.stdout
    modify = [line for line in lines if line.strip().endswith("-> modify")]
    saved = sum(int(_field(line, "tokens_in")) - int(_field(line, "tokens_out")) for line in modify)
    assert _metric(text, "headroom_requests_total") == 4
    assert _metric(text, "headroom_inbound_requests_total") == 5
    assert _metric(text, 'hookd_outcomes_total{outcome="modify"}') == len(modify) == 4
    assert _metric(text, 'hookd_outcomes_total{outcome="allow(passthrough)"}') == 1
    assert _metric(text, "headroom_tokens_saved_total") == saved > 0
    assert _metric(text, 'headroom_requests_by_provider_total{provider="anthropic"}') == 4
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/test installs it)")
    result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _get_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def _field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match, line
    return match.group(1)


def test_sigterm_under_load_answers_every_request(tmp_path: Path) -> None:
    server = Hookd(state_dir=tmp_path, pool_size=2)
    server.wait_ready()
    results: list[tuple[float, int | str]] = []
    stop_sending = asyncio.Event()

    async def agent(number: int) -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stop_sending.is_set():
                sent = time.monotonic()
                try:
                    status, _, _ = await client.post(
                        session,
                        server.url,
                        fixtures.hook_call(SMALL_CALL["request_body"]["messages"], session_id=f"load-{number}-{sent}"),
                    )
                    results.append((sent, status))
                except aiohttp.ClientError as exc:
                    results.append((sent, type(exc).__name__))
                    return

    async def load() -> float:
        agents = [asyncio.create_task(agent(n)) for n in range(6)]
        await asyncio.sleep(3)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        stop_sending.set()
        await asyncio.gather(*agents)
        return signalled

    signalled = asyncio.run(load())
    assert server.proc.wait(60) == 0
    server.stop()
    before = [outcome for sent, outcome in results if sent < signalled - 0.05]
    assert len(before) > 20
    assert all(outcome == 200 for outcome in before), [o for o in before if o != 200]
