"""The contenders: one way each of turning a conversation into a compressed one, behind one interface.

This module owns starting, calling and stopping each contender: the in-process floor, hookd (sticky
or plain, with or without affinity, pool = CPU count), headroom's own proxy (`headroom proxy`,
`POST /v1/compress` in its default marker-free mode, offline and stateless, on loopback), the
naive aiohttp server, and two hookd replicas sharing state in Redis behind haproxy (where both are
installed). Every HTTP contender is sent `Accept-Encoding: gzip`, as Go's client (so
Aperture) sends it, and is timed from the first byte sent to the last byte of the answer read.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import workloads
from bench.floor import Floor
from bench.replay import LineTap
from tests import deployment
from tests.hookd_process import Hookd, free_port
from worker import offline

READY_TIMEOUT_S = 180.0
# What hookd's worker refuses to send upstream (worker/engine.py): pointers only headroom's proxy can answer.
RETRIEVAL_MARKERS = (b"Retrieve more: hash=", b"Retrieve original: hash=", b"<<ccr:")


@dataclass(frozen=True)
class Answer:
    ms: float
    ok: bool
    body: bytes


@functools.lru_cache(maxsize=16)
def encoded(body: bytes, coding: str) -> bytes:
    # Cached: the size classes send the same multi-megabyte body many times.
    return workloads.encoded(body, coding)


def has_marker(body: bytes) -> bool:
    return any(marker in body for marker in RETRIEVAL_MARKERS)


class Contender(ABC):
    """Started once, called many times, stopped once; `pid` roots its whole process tree."""

    key: str
    label: str
    takes_codings = True

    @abstractmethod
    def start(self) -> None: ...

    @property
    @abstractmethod
    def pid(self) -> int: ...

    @abstractmethod
    async def send(self, http: aiohttp.ClientSession, call: workloads.Call, coding: str = "identity") -> Answer: ...

    @abstractmethod
    def sent_messages(self, call: workloads.Call, answer: Answer) -> list[Any]:
        """The messages that would go upstream after this answer."""

    async def server_lines(self, count: int) -> list[dict[str, Any]]:
        """What the contender logged about its last `count` requests, where it logs anything."""
        return []

    @abstractmethod
    def stop(self) -> None: ...


class InProcess(Contender):
    key, label, takes_codings = "inprocess", "compress() in-process", False

    def start(self) -> None:
        self.floor = Floor()
        self.floor.wait_ready()

    @property
    def pid(self) -> int:
        return self.floor.pid

    async def send(self, http: aiohttp.ClientSession, call: workloads.Call, coding: str = "identity") -> Answer:
        reply = await self.floor.acall(call.messages, call.model)
        return Answer(reply["ms"], True, reply["messages"])

    def sent_messages(self, call: workloads.Call, answer: Answer) -> list[Any]:
        return list(orjson.loads(answer.body))

    def stop(self) -> None:
        self.floor.close()


class HttpContender(Contender):
    path = "/"

    @property
    @abstractmethod
    def url(self) -> str: ...

    @abstractmethod
    def body(self, call: workloads.Call) -> bytes: ...

    async def send(self, http: aiohttp.ClientSession, call: workloads.Call, coding: str = "identity") -> Answer:
        data = encoded(self.body(call), coding)
        headers = {"Content-Type": "application/json", "Accept-Encoding": "gzip"}
        if coding != "identity":
            headers["Content-Encoding"] = coding
        started = time.perf_counter()
        async with http.post(self.url + self.path.lstrip("/"), data=data, headers=headers) as response:
            raw = await response.read()
        return Answer((time.perf_counter() - started) * 1000, response.status == 200, raw)


class HookdContender(HttpContender):
    def __init__(self, key: str, label: str, *, affinity: bool, sticky: bool) -> None:
        self.key, self.label = key, label
        self.flags = () if affinity else ("--no-affinity",)
        self.sticky = sticky

    def start(self) -> None:
        self.state = tempfile.TemporaryDirectory(prefix="bench-hookd-")
        if not self.sticky:
            # Plain per-turn compression, read at start-up (PUT /config would do the same live).
            (Path(self.state.name) / "settings.json").write_text('{"sticky": false}')
        self.hookd = Hookd(*self.flags, state_dir=Path(self.state.name), pool_size=os.cpu_count() or 1)
        self.tap = LineTap(self.hookd)
        self.hookd.wait_ready(READY_TIMEOUT_S)

    @property
    def pid(self) -> int:
        return self.hookd.proc.pid

    @property
    def url(self) -> str:
        return self.hookd.url

    def body(self, call: workloads.Call) -> bytes:
        return call.hook_body

    def sent_messages(self, call: workloads.Call, answer: Answer) -> list[Any]:
        return hook_sent_messages(call, answer)

    async def server_lines(self, count: int) -> list[dict[str, Any]]:
        # The -v lines: where the time went inside hookd, and which worker served the turn.
        return await self.tap.take(count)

    def stop(self) -> None:
        self.hookd.stop()
        self.state.cleanup()


def hook_sent_messages(call: workloads.Call, answer: Answer) -> list[Any]:
    """What goes upstream after a hook's answer: its messages on `modify`, else the request's."""
    reply = orjson.loads(answer.body)
    if reply.get("action") == "modify":
        return list(reply["request_body"]["messages"])
    return list(orjson.loads(call.messages))


# -- two replicas with shared state ------------------------------------------------------------


class Replicas(HttpContender):
    """Two hookd replicas sharing conversation state in Redis behind haproxy, on this machine, with
    as many workers between them as the single hookd has (`bench.cluster`)."""

    key, label = "hookd_replicas", "hookd x2 + Redis + haproxy"

    def start(self) -> None:
        self.home = tempfile.TemporaryDirectory(prefix="bench-replicas-")
        ready = Path(self.home.name) / "url"
        self.log = open(Path(self.home.name) / "cluster.log", "wb")  # noqa: SIM115 (closed in stop)
        pool = str(max(1, (os.cpu_count() or 1) // 2))
        command = [sys.executable, "-m", "bench.cluster", "--pool-size", pool, "--ready", str(ready)]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.1)
        self._url = ready.read_text()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return self._url

    def body(self, call: workloads.Call) -> bytes:
        return call.hook_body

    def sent_messages(self, call: workloads.Call, answer: Answer) -> list[Any]:
        return hook_sent_messages(call, answer)

    def stop(self) -> None:
        deployment.terminate(self.proc, grace=60)
        self.log.close()
        self.home.cleanup()


# -- servers taking {"messages", "model"} ------------------------------------------------------


class ServiceContender(HttpContender):
    """A server started as a subprocess on a free loopback port, taking `{"messages", "model"}`."""

    path = "/v1/compress"
    ready_path = "/healthz"

    def start(self) -> None:
        self.home = tempfile.TemporaryDirectory(prefix=f"bench-{self.key}-")
        self.port = free_port()
        self.log = open(Path(self.home.name) / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=self.env())
        self.wait_ready()

    @abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        offline.prepare(env)
        return env

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path.lstrip("/"), timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        raise TimeoutError(f"{self.label} not ready after {READY_TIMEOUT_S} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def body(self, call: workloads.Call) -> bytes:
        return call.api_body

    def sent_messages(self, call: workloads.Call, answer: Answer) -> list[Any]:
        return list(orjson.loads(answer.body)["messages"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        home = Path(self.home.name)
        # Kept for the report: whatever a "stateless" server still wrote to disk.
        self.written = sorted(
            str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and p != home / "server.log"
        )
        self.home.cleanup()


class HeadroomProxy(ServiceContender):
    key, label = "proxy", "headroom proxy"
    ready_path = "/health"

    def command(self) -> list[str]:
        headroom = Path(sys.executable).parent / "headroom"
        # --no-rate-limit: the default 60 requests a minute would throttle the benchmark, not
        # compression. --disable-kompress: no ML text model can be fetched here, and hookd runs
        # without one too. --stateless and --no-telemetry: nothing on disk, nothing sent.
        listen = ["--host", "127.0.0.1", "--port", str(self.port)]
        return [
            str(headroom),
            "proxy",
            *listen,
            "--stateless",
            "--no-telemetry",
            "--no-rate-limit",
            "--disable-kompress",
        ]

    def env(self) -> dict[str, str]:
        # A private HOME: whatever the proxy writes under ~/.headroom stays in the temporary directory.
        return super().env() | {"HOME": self.home.name}


class NaiveServer(ServiceContender):
    key, label = "naive", "naive aiohttp + threads"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.naive_server", "--port", str(self.port)]


def all_contenders() -> list[Contender]:
    return [
        InProcess(),
        HookdContender("hookd", "hookd", affinity=True, sticky=True),
        HookdContender("hookd_noaff", "hookd --no-affinity", affinity=False, sticky=True),
        HookdContender("hookd_plain", "hookd plain", affinity=True, sticky=False),
        HookdContender("hookd_plain_noaff", "hookd plain --no-affinity", affinity=False, sticky=False),
        HeadroomProxy(),
        NaiveServer(),
        # Where redis-server and haproxy are installed (scripts/test installs them as root).
        *([Replicas()] if deployment.missing() is None else []),
    ]
